"""Chat rendering and answer-only labels, for any Hugging Face tokenizer with a chat template.

Labels are found by rendering the conversation up to each assistant turn (with the generation prompt)
and up to the end of that turn; the characters in between are the answer. Token offsets map those
character spans onto tokens, so templates without ``{% generation %}`` markers work too.
"""

from __future__ import annotations

import json
import math

from jinja2 import TemplateError

from rg_lightning.prompts import fingerprint

IGNORE_INDEX = -100


class ChatFormatError(ValueError):
    """A conversation that cannot be trained on (no template, no answer, or truncated away)."""


def require_chat_template(tokenizer, chat_template: str | None = None) -> str:
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatFormatError(
            f"Tokenizer {name!r} has no chat template. Use the instruct/chat variant of the model, or pass "
            "`chat_template=` (a Jinja string) to the data module, or use the plain `text` format."
        )
    return template


def template_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's chat template, which decides how the measured prompts were rendered (a
    string, or named templates as a dict; "" when it has none)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return fingerprint([template if isinstance(template, str) else json.dumps(template, sort_keys=True)])


# Variables apply_chat_template passes on every call (besides the tokenizer's special tokens): a default for
# one of them would never be used.
_ALWAYS_PASSED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


def _parsed(template: str):
    """The template's syntax tree, parsed by transformers' own environment (loop controls, generation tags)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template).environment.parse(template)


def check_template_syntax(template: str) -> None:
    """Refuse a ``chat_template`` that is empty or not valid Jinja now, not as a refused first row later."""
    from jinja2 import TemplateSyntaxError

    if not isinstance(template, str) or not template.strip():
        raise ValueError("`chat_template` must be a Jinja template (or null for the tokenizer's own), "
                         f"got {template!r}")
    try:
        _parsed(template)
    except TemplateSyntaxError as error:
        raise ValueError(f"`chat_template` is not valid Jinja (line {error.lineno}): {error.message}") from None


def with_template_defaults(template: str, variables: dict, passed=()) -> str:
    """``template`` that sees ``variables`` unless a caller passes them, e.g. ``{"enable_thinking": False}`` for
    Qwen3's empty reasoning block.

    Installed as the tokenizer's template, the values reach every renderer — the training rows, the basis pass,
    generation, judges, and whoever loads an exported model — instead of each call having to pass them.
    Refused, because they would change nothing: names the template never reads (a misspelt
    ``enable_thinkng``) or sets before reading, and names every call passes anyway (``messages``, ``tools``...,
    and ``passed``: the tokenizer's special tokens, e.g. ``bos_token``).
    """
    if not variables:
        return template
    if not isinstance(template, str):
        raise ValueError("The tokenizer has several named chat templates; pass the one to use as `chat_template`.")
    from jinja2 import meta, nodes

    tree = _parsed(template)
    known = meta.find_undeclared_variables(tree)
    targets = [a.target for a in tree.find_all((nodes.Assign, nodes.AssignBlock))]
    assigned = {n.name for t in targets for n in ([t] if isinstance(t, nodes.Name) else t.find_all(nodes.Name))}
    lines = []
    for name, value in variables.items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"chat template variable names must be identifiers, got {name!r}")
        if name in _ALWAYS_PASSED or name in passed:
            raise ValueError(f"{name!r} is passed to the chat template on every call; a default would change nothing.")
        if name not in known:  # (Llama 3.1's `date_string` is both: set only where the caller gave none)
            raise ValueError(f"The chat template sets {name!r} itself; a default would change nothing." if name in
                             assigned else f"The chat template does not read {name!r}; it reads {sorted(known)}.")
        if not isinstance(value, (bool, int, float, str)) or isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"chat template variable {name!r}: give a bool, finite number or string, got {value!r}")
        literal = json.dumps(value)  # true/false, numbers and double-quoted strings are Jinja literals too
        lines.append(f"{{%- if {name} is not defined %}}{{%- set {name} = {literal} %}}{{%- endif %}}")
    # The newline ends the prefix: trim_blocks eats it, so the template starts at a line start as before
    # (lstrip_blocks, a newline it opens with).
    return "".join(lines) + "\n" + template


def render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as error:
        if any(message.get("role") == "system" for message in messages):  # Gemma-2's template raises on one
            raise ChatFormatError(
                f"The chat template refused a conversation with a system turn ({error}). Leave the system prompt "
                "out (`system_prompt`, the rows' own system turns) or pass a `chat_template=` that takes one."
            ) from error
        raise


def render_prompt(tokenizer, prompt: str | list[dict], *, system_prompt: str | None = None):
    """The text a model sees before it answers ``prompt`` (for generation and refusal statistics): a request, or
    a conversation ending with the user's turn (its own system turn, if any, wins over ``system_prompt``)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return render(tokenizer, messages, generation_prompt=True)


def left_padded(tokenizer, texts: list[str], *, add_special_tokens: bool = False) -> dict:
    """``input_ids`` and ``attention_mask`` of ``texts`` in one left-padded batch (CPU): every prompt's last token
    sits in the last column, where scoring and generation read. The tokenizer's padding side is restored."""
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token`.")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = side
    return {key: batch[key] for key in ("input_ids", "attention_mask")}


def encode_prompts(tokenizer, prompts: list, system_prompt: str | None = None) -> dict:
    """Chat-rendered prompts with the generation prompt, left-padded into one batch (CPU)."""
    return left_padded(tokenizer, [render_prompt(tokenizer, p, system_prompt=system_prompt) for p in prompts])


def position_ids(attention_mask):
    """Positions that count real tokens only, as if unpadded (absolute position embeddings need it)."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def encode_conversation(tokenizer, messages: list[dict], *, max_length: int, row: int) -> dict[str, list[int]]:
    """Token ids, attention mask and labels that are -100 everywhere except the assistant answers."""
    require_chat_template(tokenizer)
    if messages and messages[0].get("role") == "assistant":
        raise ChatFormatError(f"Row {row}: the conversation opens with an assistant turn; chat templates render "
                              "an answer only after a user (or system) turn. Drop the opening turn or add the request.")
    try:
        return _encode_conversation(tokenizer, messages, max_length=max_length, row=row)
    except (TemplateError, ValueError) as error:  # the template's own errors (roles must alternate...): name the row
        if isinstance(error, ChatFormatError):
            raise
        raise ChatFormatError(f"Row {row}: the chat template refused the conversation: {error}") from error


def _encode_conversation(tokenizer, messages: list[dict], *, max_length: int, row: int) -> dict[str, list[int]]:
    full = render(tokenizer, messages, generation_prompt=False)
    spans = []
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if not str(message.get("content") or "").strip():
            raise ChatFormatError(f"Row {row}: assistant turn {turn} is empty; every answer needs text.")
        before = render(tokenizer, messages[:turn], generation_prompt=True)
        through = render(tokenizer, messages[: turn + 1], generation_prompt=False)
        if not full.startswith(before) or not full.startswith(through) or len(through) <= len(before):
            raise ChatFormatError(
                f"Row {row}: the chat template does not render turn {turn} as a prefix of the conversation, "
                "so the answer tokens cannot be located. Templates that rewrite earlier turns (Qwen3's drops the "
                "reasoning block of answers before the last user message) cannot be trained on multi-turn rows: "
                "split them into single-turn rows, or pass a `chat_template=` that renders turns in order."
            )
        spans.append((len(before), len(through)))
    if not spans:
        raise ChatFormatError(f"Row {row}: the conversation has no assistant turn, so there is nothing to learn.")
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return _truncate(encoded["input_ids"], labels, max_length, row)


def encode_text(tokenizer, text: str, *, max_length: int, row: int) -> dict[str, list[int]]:
    """Plain-text rows: every token is learned (language-model pre-training style)."""
    if not str(text or "").strip():
        raise ChatFormatError(f"Row {row}: the `text` field is empty.")
    # a row already rendered with the chat template starts with the BOS itself: do not add a second one
    rendered = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    ids = tokenizer(text, add_special_tokens=not rendered)["input_ids"]
    # the end of the text is learned; a rendered conversation already ends with its end token (Qwen: "<|im_end|>\n")
    ends = bool(tokenizer.eos_token) and text.rstrip().endswith(tokenizer.eos_token)
    if tokenizer.eos_token_id is not None and not ends and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return _truncate(ids, list(ids), max_length, row)


def _truncate(ids: list[int], labels: list[int], max_length: int, row: int) -> dict:
    """The first ``max_length`` tokens; ``answer_cut``: answer tokens (an end-of-turn token among them) were lost."""
    answer_cut = any(label != IGNORE_INDEX for label in labels[max_length:])
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ChatFormatError(
            f"Row {row}: no answer tokens are left within max_length={max_length}; raise `max_length` "
            "or shorten the prompt."
        )
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "answer_cut": answer_cut}

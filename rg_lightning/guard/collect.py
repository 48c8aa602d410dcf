"""Hooked forward passes over harmful and harmless prompts that produce a SafetyBasis.

One batched, left-padded pass per prompt set: hidden states at the post-instruction positions give
the difference-in-means candidates; forward pre-hooks stream the Gram matrix of each protected
module's inputs on the harmful prompts (and, optionally, the model's own greedy answers to them), and, with
``input_differences``, each module's mean input at the post-instruction positions on both prompt sets.
Prompts are sharded over processes and every statistic is all-reduced, so all ranks agree (a rank with no
prompts contributes zeros).

Memory: a Gram matrix is d x d float64 per distinct module input (2.9 GB for the 18944-wide down_proj
input of a 7B model, 28 layers of them). ``max_statistics_gb`` bounds what is held at once: modules are
packed in model order into passes whose Grams fit, each pass re-reads the same harmful batches (answers
are generated once), turns its Grams into subspaces and frees them. One pass when everything fits.
"""

from __future__ import annotations

import collections
import contextlib

import torch
import torch.distributed as dist
from torch import nn

from rg_lightning.chat import left_padded, position_ids, render_prompt, require_chat_template
from rg_lightning.generation import decodes_in_step, plain_greedy, stop_token_ids
from rg_lightning.guard.basis import SafetyBasis, embedding_probe
from rg_lightning.guard.projection import canonical_name, lora_layer_types
from rg_lightning.guard.shards import prompt_world
from rg_lightning.guard.statistics import GramAccumulator, MeanAccumulator, capture_linear_inputs
from rg_lightning.guard.subspace import centered_subspace, extend_basis, row_weights, soft_subspace
from rg_lightning.modes import enter_eval


def post_instruction_suffix(tokenizer, system_prompt: str | None = None) -> str:
    """The template's text between the end of the user's message and the answer."""
    marker = "\x00MARKER\x00"
    rendered = render_prompt(tokenizer, marker, system_prompt=system_prompt)
    return rendered[rendered.index(marker) + len(marker):]


def post_instruction_length(tokenizer, system_prompt: str | None = None) -> int:
    """Number of template tokens between the end of the user's text and the answer (e.g. 5 for Llama-3)."""
    n = len(tokenizer(post_instruction_suffix(tokenizer, system_prompt), add_special_tokens=False)["input_ids"])
    if n < 1:
        raise ValueError("The chat template puts nothing after the user message; cannot locate the answer start.")
    return n


def check_post_instruction_tokens(tokenizer, texts: list[str], suffix: str, n: int) -> None:
    """The last ``n`` tokens of every rendered prompt must be the template's suffix and nothing of the user's text.

    A template whose suffix starts with plain text (``"\nASSISTANT:"``) can merge with the user's last characters
    into one token (Llama-3's tokenizer makes ``"?\n"`` one token): the post-instruction positions would then hold
    user text, and a different number of template tokens per prompt. Checked with the tokenizer's character
    offsets (fast tokenizers; a slow one is not checked)."""
    try:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return
    for text, offsets in zip(texts, encoded["offset_mapping"]):
        start = len(text) - len(suffix)  # where the user's text ends
        joined = any(begin < start < end for begin, end in offsets)
        if joined or sum(begin >= start for begin, _ in offsets) != n:
            raise ValueError(
                f"The chat template's text after the user message ({suffix!r}) does not tokenize apart from the user's "
                f"text in {text[-60:]!r}: a token joins the two, so the {n} post-instruction positions would not be "
                "the template's. Use a chat template whose turn ends with a special token (as the models' own "
                "templates do), e.g. through the data module's `chat_template`."
            )


def protected_modules(model: nn.Module) -> list[str]:
    """Trainable linear layers (and PEFT LoRA layers): the modules whose updates the guard constrains."""
    names, inside_lora, lora_type = [], set(), lora_layer_types()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_lora):
            continue
        if isinstance(module, lora_type):
            inside_lora.add(name)
            if isinstance(module.get_base_layer(), nn.Linear):  # LoRA on an embedding reads token ids, not vectors
                names.append(name)
        elif isinstance(module, nn.Linear) and module.weight.requires_grad:
            names.append(name)
    return names


def probe_modules(model: nn.Module, names: list[str], probe: dict) -> tuple[dict[str, list[str]], set[str]]:
    """One forward over ``probe`` (a protected prompt): the groups of ``names`` that read the very same tensor
    (q/k/v, gate/up: one Gram serves a group), and the names of every module it calls (what protected prompts
    can reach)."""
    wanted = set(names)
    seen: dict[str, torch.Tensor] = {}  # holding the tensors keeps their memory from being reused
    called: set[str] = set()

    def record(name: str):
        def hook(module, args) -> None:
            called.add(name)
            if name in wanted:
                seen.setdefault(name, args[0])

        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()]
    try:
        with torch.no_grad():
            model(**probe)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[object, list[str]] = {}
    for name in names:
        groups.setdefault(id(seen[name]) if name in seen else name, []).append(name)
    return {members[0]: members for members in groups.values()}, called


def input_width(module: nn.Module) -> int:
    """Width of a protected module's input (a Linear's or a LoRA layer's ``in_features``)."""
    width = getattr(module, "in_features", None)
    if not isinstance(width, int):
        raise TypeError(f"{type(module).__name__} has no integer in_features; cannot size its Gram matrix.")
    return width


def statistics_passes(widths: dict[str, int], max_bytes: float | None) -> list[list[str]]:
    """Pack modules, in order, into passes whose float64 Gram matrices (8 d^2 bytes each) fit ``max_bytes``.

    A module larger than the budget on its own still gets a pass of its own.
    """
    passes: list[list[str]] = [[]]
    used = 0
    for name, width in widths.items():
        size = 8 * width * width
        if max_bytes is not None and passes[-1] and used + size > max_bytes:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += size
    return passes if passes[0] else []


def _batches(tokenizer, texts: list[str], batch_size: int, device):
    for start in range(0, len(texts), batch_size):
        yield {k: v.to(device) for k, v in left_padded(tokenizer, texts[start:start + batch_size]).items()}


def with_greedy_answers(model, tokenizer, batch: dict, answer_tokens: int) -> dict:
    """Append the model's greedy answer to each prompt; padding after the end-of-answer is masked. The answer
    ends at any end-of-answer token (Gemma ends a turn with ``<end_of_turn>``, not its tokenizer's EOS). Under FSDP2
    decoding runs until every rank is done (:func:`~rg_lightning.generation.decodes_in_step`)."""
    stops = stop_token_ids(model, tokenizer)
    with plain_greedy(model):
        output = model.generate(**batch, max_new_tokens=answer_tokens, do_sample=False,
                                synced_gpus=decodes_in_step(model),
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None)
    new = output[:, batch["input_ids"].shape[1]:]
    finished = torch.zeros_like(new, dtype=torch.bool)
    if stops and new.shape[1] > 1:
        finished[:, 1:] = torch.isin(new[:, :-1], torch.tensor(stops, device=new.device)).cumsum(1) > 0
    mask = torch.cat([batch["attention_mask"], (~finished).long()], dim=1)
    return {"input_ids": output, "attention_mask": mask}


def output_head_name(model: nn.Module, names: list[str]) -> str | None:
    """The protected module that computes the logits (``lm_head``), if any of ``names`` is it."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    modules = dict(model.named_modules())
    # PEFT's `modules_to_save` puts the trainable copy under the head's own name (`lm_head.modules_to_save.x`)
    head_names = {canonical_name(n) for n, m in modules.items() if m is head}
    for name in names:
        if (modules[name] is head or getattr(modules[name], "base_layer", None) is head
                or canonical_name(name) in head_names):
            return name
    return None


@contextlib.contextmanager
def _capture(model: nn.Module, names: list[str], grams: GramAccumulator, mask: torch.Tensor, head: str | None,
             prompt_width: int, n_positions: int, request_weight: float):
    """Capture every module's inputs at every unmasked position, except the logit head's: only where logits
    are generated from (the last prompt position and the appended answer), the only positions whose logits
    decide what the model says. The head's inputs at earlier prompt positions predict the prompt's own next
    words, which nothing reads; protecting them only constrains the task (measured: see
    ``RefusalDirections(head_answer_only=...)``). The rows before the ``n_positions`` post-instruction columns
    (the request and the template's opening) weigh ``request_weight`` in every Gram matrix; the post-instruction
    positions and the answer weigh 1."""
    weights = mask
    if request_weight != 1.0:
        weights = mask.to(torch.float64)
        weights[:, : prompt_width - n_positions] *= request_weight
    with contextlib.ExitStack() as stack:
        stack.enter_context(capture_linear_inputs(model, [n for n in names if n != head], grams, weights))
        if head in names:
            answer = mask.clone()
            answer[:, : prompt_width - 1] = False
            stack.enter_context(capture_linear_inputs(model, [head], grams, answer))
        yield


class _PostInstructionMeans:
    """For :func:`capture_linear_inputs`: each module's input at every post-instruction position goes into
    ``means[(name, position)]`` (the columns just before ``prompt_width``; answers appended after it)."""

    def __init__(self, means: MeanAccumulator, prompt_width: int, n_positions: int, tokens: tuple[int, int]) -> None:
        self.means, self.prompt_width, self.n_positions, self.tokens = means, prompt_width, n_positions, tokens

    def update(self, name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if x.ndim == 2 and x.shape[0] == self.tokens[0] * self.tokens[1]:  # tokens read flattened (Qwen2-MoE's
            x = x.reshape(*self.tokens, x.shape[-1])  # shared expert): row for row, [batch, seq, d] again
        if tuple(x.shape[:2]) != tuple(self.tokens):
            raise ValueError(f"{name} reads {tuple(x.shape[:-1])} rows, not the batch's {self.tokens} tokens (a routed "
                             "MoE expert reads the tokens sent to it): its post-instruction inputs cannot be told "
                             "apart. Use input_differences=False, or freeze it.")
        for position in range(self.n_positions):
            self.means.update((name, position), x[:, self.prompt_width - self.n_positions + position])


class _GramAndMean(GramAccumulator):
    """Σ x xᵀ per module plus, in ``firsts``, Σ x (for :func:`centered_subspace`)."""

    def __init__(self) -> None:
        super().__init__()
        self.firsts = MeanAccumulator()

    def update(self, name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        super().update(name, x, mask)
        self.firsts.update(name, x, mask)


def _grams(centered: bool) -> GramAccumulator:
    return _GramAndMean() if centered else GramAccumulator()


@torch.no_grad()
def collect_basis(
    model: nn.Module,
    tokenizer,
    harmful: list[str],
    harmless: list[str],
    *,
    energy: float | None = 0.99,
    rank: int | None = None,
    answer_tokens: int = 16,
    batch_size: int = 16,
    system_prompt: str | None = None,
    metadata: dict | None = None,
    progress=None,
    max_statistics_gb: float | None = None,
    centered: bool = False,
    head_answer_only: bool = True,
    ridge: float = 0.0,
    input_differences: bool = False,
    request_weight: float = 1.0,
    row_energy: float = 1.0,
    row_ridge: float = 0.0,
) -> SafetyBasis:
    """Measure the aligned model once and return its SafetyBasis (identical on every rank).

    ``max_statistics_gb`` bounds the float64 Gram matrices held at once (``None``: all in one pass);
    ``progress(kind, n)`` is called after each batch with ``kind`` "harmful", "harmless" or "statistics"
    (the extra passes). ``centered``: each subspace is the inputs' mean direction plus the top
    eigenvectors of their covariance covering ``energy`` of the variance (:func:`centered_subspace`)
    instead of the top eigenvectors of the uncentred second moment covering ``energy`` of it.
    ``head_answer_only``: the logit head (``lm_head``) is protected on its inputs at the positions that
    generate the answer only (last prompt position + answer tokens), not at every prompt position.
    ``ridge`` > 0: each subspace also carries a damped tail (:func:`soft_subspace`): the directions below the
    energy cutoff, weighted ``p / (p + ridge)`` by their share ``p`` of the module's input energy, so the
    constraint pulls them back in proportion instead of leaving them free (not with ``centered``).
    ``input_differences``: each subspace also holds exactly, on top of the energy cutoff, the difference
    between the module's mean input on harmful and on harmless prompts at every post-instruction position
    (:func:`extend_basis`; the head, with ``head_answer_only``, at the last prompt position only): the part of
    what the module reads that tells the two apart. The energy cutoff alone leaves a quarter to all of that
    difference's norm outside the held columns (per module, energy 0.9, miniature worlds).
    ``request_weight`` (0 to 1): the weight of each prompt's positions before the post-instruction template
    (the request, a system prompt, the template's opening) in every Gram matrix; the post-instruction
    positions, where the model decides to refuse, and the answer tokens weigh 1. Below 1 the energy cutoff
    and the tail's shares favour what the modules read there, and the request's own directions are held more
    loosely (through the tail, their shares scaled by the weight; not with ``centered``).
    ``row_energy`` < 1: the embedding rows of the protected tokens get pull-back weights from how often each
    token occurs in the harmful prompts and their protected answer tokens
    (:func:`~rg_lightning.guard.subspace.row_weights`): the most frequent ones covering ``row_energy`` of the
    occurrences are held exactly, the rest weighted ``p / (p + row_ridge)`` (``row_ridge`` 0: left free).
    1 (default): every row exact.
    """
    if max_statistics_gb is not None and not max_statistics_gb > 0:
        raise ValueError(f"max_statistics_gb must be positive or None, got {max_statistics_gb}.")
    if not ridge >= 0 or (ridge and centered):
        raise ValueError(f"ridge must be >= 0 (and 0 with centered=True), got {ridge}")
    if not 0 <= request_weight <= 1 or (request_weight != 1 and centered):
        raise ValueError(f"request_weight must be in [0, 1] (and 1 with centered=True), got {request_weight}")
    if not 0 < row_energy <= 1 or not row_ridge >= 0:
        raise ValueError(f"row_energy must be in (0, 1] and row_ridge >= 0, got {row_energy} and {row_ridge}")
    if len(harmful) < 2 or len(harmless) < 2:
        raise ValueError(f"Need at least 2 harmful and 2 harmless prompts, got {len(harmful)} and {len(harmless)}.")
    if set(harmful) == set(harmless):
        raise ValueError("The harmful and harmless prompt sets are identical: the refusal direction would be zero.")
    require_chat_template(tokenizer)
    restore_modes = enter_eval(model)
    device = next(model.parameters()).device
    process, processes = prompt_world(model)
    n_positions = post_instruction_length(tokenizer, system_prompt)
    names = protected_modules(model)
    render = lambda prompts: [render_prompt(tokenizer, p, system_prompt=system_prompt) for p in prompts]  # noqa
    harmful_texts, harmless_texts = render(harmful), render(harmless)
    check_post_instruction_tokens(tokenizer, harmful_texts + harmless_texts,
                                  post_instruction_suffix(tokenizer, system_prompt), n_positions)
    probe = next(_batches(tokenizer, harmful_texts[:1], 1, device))
    groups, called = probe_modules(model, names, probe)
    modules = dict(model.named_modules())
    widths = {name: input_width(modules[name]) for name in groups}
    passes = statistics_passes(widths, None if max_statistics_gb is None else max_statistics_gb * 1e9)
    text_config = model.config.get_text_config()  # a multimodal model (Gemma-3 4B+) keeps its decoder's here
    n_layers, hidden_size = text_config.num_hidden_layers, text_config.hidden_size
    unread: list[str] = []  # protected linears no protected prompt reaches (a vision tower's): nothing to hold
    means = {"harmful": MeanAccumulator(), "harmless": MeanAccumulator()}
    subspaces: dict[str, torch.Tensor] = {}
    token_counts: collections.Counter = collections.Counter()  # occurrences of each token in the harmful prompts
    harmful_batches: list[tuple[dict, torch.Tensor, int]] = []
    head = output_head_name(model, list(groups)) if head_answer_only else None
    input_means = {"harmful": MeanAccumulator(), "harmless": MeanAccumulator()}

    def gram_pass(grams: GramAccumulator, names_in_pass: list[str]) -> None:
        """All-reduce one pass's Grams (zeros where this rank saw nothing) and keep only their subspaces."""
        for name in names_in_pass:
            grams.ensure(name, (widths[name], widths[name]), device)
            if centered:
                grams.firsts.ensure(name, (widths[name],), device)
        if processes > 1:
            grams.all_reduce_()
            if centered:
                grams.firsts.all_reduce_()
        for name in names_in_pass:
            if grams.counts[name] == 0:  # never called: unread if its parent was not called either (a vision
                if name.rpartition(".")[0] in called:  # tower); else its weight is read directly, unmeasurable
                    raise ValueError(f"{name}: its parent ran but it was never called, so its weight is read "
                                     "without its forward (a patched or fused kernel?); the guard cannot measure it.")
                unread.extend(groups[name])
                continue
            held, floor = None, 0.0
            if input_differences:
                # the head answer-only: only the last prompt position's difference (earlier logits are read by nothing)
                positions = [n_positions - 1] if name == head else range(n_positions)
                held = torch.stack([input_means["harmful"].mean((name, p)) - input_means["harmless"].mean((name, p))
                                    for p in positions], dim=1)
                # differences below a millionth of the inputs' RMS norm are rounding, not a direction
                floor = 1e-6 * float(torch.diagonal(grams.state()[name]).sum() / max(grams.counts[name], 1)) ** 0.5
            try:
                if centered:
                    basis = centered_subspace(grams.state()[name], grams.firsts.sums[name], grams.counts[name],
                                              energy=energy, k=rank)
                    basis = basis if held is None else extend_basis(basis, held, min_norm=floor)
                else:
                    basis = soft_subspace(grams.state()[name], energy=energy, k=rank, ridge=ridge, held=held,
                                          min_norm=floor)
            except ValueError as error:  # e.g. a fixed rank wider than this module's input: say which module
                raise ValueError(f"{name} (input width {widths[name]}): {error}") from None
            basis = basis.float().cpu()  # one tensor shared by the group (q/k/v read the same input)
            subspaces.update({member: basis for member in groups[name]})
        grams.sums.clear()
        if centered:
            grams.firsts.sums.clear()

    try:
        first = _grams(centered)
        for kind, texts in (("harmful", harmful_texts), ("harmless", harmless_texts)):
            shard = texts[process::processes]
            for batch in _batches(tokenizer, shard, batch_size, device):
                prompt_width = batch["input_ids"].shape[1]
                if kind == "harmful" and answer_tokens:
                    batch = with_greedy_answers(model, tokenizer, batch, answer_tokens)
                mask = batch["attention_mask"].bool()
                positions = position_ids(batch["attention_mask"])
                capture_names = passes[0] if kind == "harmful" and passes else []
                with contextlib.ExitStack() as stack:
                    stack.enter_context(_capture(model, capture_names, first, mask, head, prompt_width, n_positions,
                                                 request_weight))
                    if input_differences:
                        stack.enter_context(capture_linear_inputs(
                            model, list(groups), _PostInstructionMeans(input_means[kind], prompt_width, n_positions,
                                                                    tuple(batch["input_ids"].shape))))
                    output = model(**batch, position_ids=positions, output_hidden_states=True)
                hidden = output.hidden_states[:-1]  # inputs of every decoder block
                for layer, states in enumerate(hidden):
                    for position in range(n_positions):
                        column = prompt_width - n_positions + position
                        means[kind].update((layer, position), states[:, column])
                if kind == "harmful":
                    token_counts.update(batch["input_ids"][mask].tolist())
                    if len(passes) > 1:
                        harmful_batches.append((batch, positions, prompt_width))
                if progress is not None:
                    progress(kind, batch["input_ids"].shape[0])
        def reduce_means(accumulators, shapes: dict) -> None:
            """Every key on every rank (zeros where a rank saw nothing), then summed over ranks."""
            for accumulator in accumulators:
                for key, shape in shapes.items():
                    accumulator.ensure(key, shape, device)
                if processes > 1:
                    accumulator.all_reduce_()

        reduce_means(means.values(), {(layer, p): (hidden_size,) for layer in range(n_layers)
                                      for p in range(n_positions)})
        if input_differences:
            reduce_means(input_means.values(), {(name, p): (widths[name],) for name in groups
                                                for p in range(n_positions)})
        if passes:
            gram_pass(first, passes[0])
        for names_in_pass in passes[1:]:
            grams = _grams(centered)
            for batch, positions, prompt_width in harmful_batches:
                mask = batch["attention_mask"].bool()
                with _capture(model, names_in_pass, grams, mask, head, prompt_width, n_positions, request_weight):
                    model(**batch, position_ids=positions)
                if progress is not None:
                    progress("statistics", batch["input_ids"].shape[0])
            gram_pass(grams, names_in_pass)
        if processes > 1:
            gathered: list = [None] * processes
            dist.all_gather_object(gathered, sorted(token_counts.items()))
            token_counts = collections.Counter()
            for counts in gathered:
                token_counts.update(dict(counts))
    finally:
        restore_modes()

    def stacked(accumulator: MeanAccumulator) -> torch.Tensor:
        return torch.stack([torch.stack([accumulator.mean((layer, p)) for p in range(n_positions)])
                            for layer in range(n_layers)]).cpu()

    meta = dict(metadata or {})
    meta.update({"n_harmful": len(harmful), "n_harmless": len(harmless), "post_instruction_tokens": n_positions,
                 "energy": energy, "rank": rank, "centered": centered, "ridge": ridge,
                 "input_differences": input_differences, "head_answer_only": head_answer_only,
                 "request_weight": request_weight, "row_energy": row_energy, "row_ridge": row_ridge,
                 "answer_tokens": answer_tokens, "modules": [name for name in names if name in subspaces],
                 "modules_not_read": unread,
                 "subspace_dims": {name: int(basis.shape[1]) for name, basis in subspaces.items()},
                 "statistics_passes": len(passes),
                 "system_prompt": system_prompt})
    protected = torch.tensor(sorted(token_counts), dtype=torch.long)
    weights = None
    if row_energy < 1:
        counts = torch.tensor([token_counts[t] for t in protected.tolist()], dtype=torch.float64)
        weights = row_weights(counts, row_energy, row_ridge).float()
        meta["rows_exact"] = int((weights == 1).sum())
    # the weights' fingerprint from exactly held rows only: a damped row moves with fine-tuning, and a resumed run
    # checks its basis against the fine-tuned weights
    fingerprinted = protected if weights is None else protected[weights == 1]
    return SafetyBasis(stacked(means["harmful"]), stacked(means["harmless"]), subspaces, protected, meta,
                       *embedding_probe(model, fingerprinted), protected_token_weights=weights)

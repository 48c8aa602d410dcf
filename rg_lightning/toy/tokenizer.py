"""Word-level tokenizer of a :class:`~rg_lightning.toy.world.ToyWorld`, with a chat template."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rg_lightning.toy.world import ToyWorld

PAD, UNK, SYSTEM, USER, ASSISTANT, END = "<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, UNK, SYSTEM, USER, ASSISTANT, END)

# Each turn renders as "<|role|> content <|end|> " and the generation prompt as "<|assistant|>", so the
# prompt rendering is an exact string (and token) prefix of the conversation with the answer. No
# {% generation %} markers: answer labels are found by diffing renderings (see rg_lightning.chat).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(world: ToyWorld) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0..5 are the special tokens, then the world's sorted vocabulary.

    eos = ``<|end|>``, pad = ``<pad>``, unk = ``<unk>``, right padding. ``decode(..., skip_special_tokens=True)``
    gives the words joined by single spaces.
    """
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *world.vocabulary()))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=END,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
    )

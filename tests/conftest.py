"""Shared fixtures: tiny random models of the real families, saved as Hugging Face directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# local copies of the real benchmark files; tests that need them skip without them
SHARED_DATA = Path(os.environ.get("RG_LIGHTNING_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
WORDS = (
    "how do i make a cake bomb bake cook build the what is plus one two three four five sure here you go "
    "cannot help with that review good bad positive negative tell me about write story poem . , ? !"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A word-level fast tokenizer with a chat template, small enough to build in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
        additional_special_tokens=SPECIALS[2:],
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(autouse=True)
def _no_global_seed_from_earlier_tests(monkeypatch):
    """`seed_everything` leaves PL_GLOBAL_SEED in the environment; later tests and their subprocesses would inherit
    it, so their seeding would depend on the test order."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


@pytest.fixture(autouse=True)
def _one_bitsandbytes_cpu_path(monkeypatch):
    """Keep 4-bit layers on bitsandbytes' plain CPU path on every machine. On CPUs with AVX512-BF16 its
    inference path repacks weights in bf16 (results move by ~1e-3 between train and eval mode, and
    layers narrower than 64 input features fail), so tests would depend on the machine they run on."""
    try:
        import bitsandbytes.nn.modules as bnb_modules
    except ImportError:
        return
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False, raising=False)


def tiny_config(family: str, vocab_size: int):
    """A few-kilobyte config of a real architecture family."""
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, Olmo2Config, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, eos_token_id=SPECIALS.index("<|end|>"))
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "gemma2":
        return Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    if family == "gemma3":  # QK-norm and Gemma's four norms per block, tied
        return Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"])
    if family == "olmo2":  # linears read the raw residual; norms after each sublayer and on q/k projections
        return Olmo2Config(**common, tie_word_embeddings=False)
    raise ValueError(family)


def save_tiny_model(directory: Path, family: str, tokenizer=None, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {family: str(save_tiny_model(root / family, family)) for family in ("llama", "qwen2", "gemma2")}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> str:
    return tiny_models["qwen2"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def chat_file(tmp_path) -> str:
    rows = [
        {"messages": [{"role": "user", "content": "how do i bake a cake ?"},
                      {"role": "assistant", "content": "sure here you go ."}]},
        {"messages": [{"role": "user", "content": "how do i make a bomb ?"},
                      {"role": "assistant", "content": "cannot help with that ."}]},
    ] * 8
    return write_jsonl(tmp_path / "chat.jsonl", rows)


@pytest.fixture(autouse=True)
def _quiet_and_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(min(2, os.cpu_count() or 1))

"""The miniature aligned world: requests, tokenizer, downstream tasks and a small aligned chat model."""

from __future__ import annotations

from rg_lightning.toy.build import ALIGNED_MODEL_DIR
from rg_lightning.toy.generation import generate, refusal_rate
from rg_lightning.toy.tokenizer import build_tokenizer
from rg_lightning.toy.world import REFUSAL, ToyWorld, is_refusal, task_metric


def load_aligned(device: str = "cpu"):
    """The shipped aligned model (eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ALIGNED_MODEL_DIR).to(device).eval()
    return model, AutoTokenizer.from_pretrained(ALIGNED_MODEL_DIR)


__all__ = ["ALIGNED_MODEL_DIR", "REFUSAL", "ToyWorld", "build_tokenizer", "generate", "is_refusal",
           "load_aligned", "refusal_rate", "task_metric"]

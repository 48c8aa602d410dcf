"""Build the shipped aligned model: ``python -m rg_lightning.toy build [--out DIR] [--seed 0] [--steps N]
[--variant default|alt] [--arch llama|gemma2|qwen3|phi3|gemma3|olmo2] [--width 128]``.

A plain PyTorch supervised fine-tuning loop (loss on assistant tokens only, AdamW, deterministic) trains a
small model from scratch on :meth:`ToyWorld.alignment_examples`, then measures held-out refusal rates and
saves a Hugging Face directory atomically.

Architectures (:data:`ARCHITECTURES`), all 4 layers, hidden 128, intermediate 256, 4 attention heads of
width 32, 2 key/value heads, float32 weights (``width`` widens any of them: hidden ``width``, intermediate
``2·width``, ``width/32`` heads of width 32, ``width/64`` key/value heads; every shipped world is 128 wide):

* ``llama`` (the shipped model): SiLU-gated MLP, untied input embeddings and LM head (~2.7 MB).
* ``gemma2``: the Gemma-2 block (GELU-tanh gated MLP, four RMSNorms per block with ``1 + weight``
  scaling, embeddings scaled by sqrt(hidden), attention and final-logit soft-capping, alternating
  sliding-window / full attention) with the LM head **tied** to the embeddings, as in real Gemma-2 (~1.6 MB).
* ``qwen3``: the Qwen3 block (RMSNorm on every query and key head, SiLU-gated MLP) with the LM head tied to
  the embeddings, as in the small Qwen3 releases.
* ``phi3``: the Phi-3 block (one fused ``qkv_proj`` and one fused ``gate_up_proj`` per layer, SiLU-gated MLP),
  untied embeddings and LM head, as in Phi-3-mini.
* ``gemma3``: the Gemma-3 text block (Gemma's four ``1 + weight`` RMSNorms per block plus RMSNorm on every
  query and key head instead of soft-capping, GELU-tanh gated MLP, three sliding-window layers per full one)
  with the LM head tied to the embeddings, as in Gemma-3.
* ``olmo2``: the OLMo-2 block (no norm before attention or MLP: the linears read the raw residual stream;
  RMSNorm on each sublayer's output before it is added, and on the whole query and key projections),
  untied, as in OLMo-2.

Why not Qwen2: transformers 5.x lists "qwen2" among the model types whose hub tokenizer class it distrusts,
so ``AutoTokenizer.from_pretrained`` on a directory with a qwen2 ``config.json`` forces the byte-level BPE
``Qwen2Tokenizer`` and silently breaks a word-level tokenizer. Llama, Gemma-2 and Qwen3 directories load the
saved tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, Olmo2Config, Phi3Config,
                          Qwen3Config)

from rg_lightning.atomic import atomic_directory
from rg_lightning.chat import IGNORE_INDEX, encode_conversation
from rg_lightning.toy.generation import refusal_rate
from rg_lightning.toy.tokenizer import build_tokenizer
from rg_lightning.toy.world import ToyWorld

ALIGNED_MODEL_DIR = Path(__file__).resolve().parent / "aligned"
MODEL_FILES = ("config.json", "world.json")  # what an earlier build holds (a rebuild may replace it)
DEFAULT_STEPS = 200
# Alignment steps per architecture when none are given. Gemma-2 (tied, soft-capped) trains slower: at 200
# steps its aligned model still refused 15.6% of held-out harmless requests; at 400, 0.0% (harmful 100%).
ARCH_STEPS = {"llama": DEFAULT_STEPS, "gemma2": 2 * DEFAULT_STEPS, "qwen3": 2 * DEFAULT_STEPS,  # qwen3: tied too
              "phi3": DEFAULT_STEPS, "gemma3": 2 * DEFAULT_STEPS, "olmo2": DEFAULT_STEPS}  # gemma3: tied too
# Tied input/output embeddings (Gemma-2) need every word of the vocabulary to be a training target now and
# then: alignment data never contains the downstream tasks' words, and in a tied model the softmax pushes all
# of their (shared) embedding rows toward one "never predict" vector, so as *inputs* they became nearly
# indistinguishable (mean pairwise cosine 0.87 of the 47 benign-task-only words, vs 0.00 in the untied
# Llama, whose input rows keep their random init), and plain fine-tuning could not copy them (0% exact match).
# A real model's pretraining sees every token; the build mimics that with plain-text copy examples
# ("w1 .. wk <|end|> w1 .. wk <|end|>", loss on the copy) over the whole vocabulary, mixed into alignment
# (VOCABULARY_SHARE of the rows, on top of the alignment rows). Untied worlds (the shipped Llama) are built
# as before.
VOCABULARY_SHARE = 0.1
VOCABULARY_WORDS = (3, 8)
TIED_ARCHITECTURES = ("gemma2", "qwen3", "gemma3")  # the families built with vocabulary copy examples
BUILD_VERSION = 2  # recorded in world.json; 2: vocabulary copy examples for tied architectures
BATCH_SIZE = 32
LEARNING_RATE = 2e-3
WARMUP_STEPS = 30
MAX_LENGTH = 64
# CPU threads of a build, set exactly (not capped by the caller's setting): the float sums, and so the weights,
# depend on the thread count (Gemma-2 builds at 1 and 2 threads differed by 4e-8 after 20 steps and gave
# different worlds after 400). The shipped model was built with 2; the benchmark builds its worlds with 1.
THREADS = 2
WIDTH = 128  # hidden size of every shipped world


def valid_width(width) -> bool:
    """Whether ``width`` can size a miniature model: a positive multiple of 64 (heads of width 32, one key/value
    head per two query heads)."""
    return not isinstance(width, bool) and isinstance(width, int) and width >= 64 and width % 64 == 0


ARCHITECTURES = {
    "llama": "LlamaForCausalLM, 4 layers, hidden 128, intermediate 256, 4 heads, 2 kv heads, untied",
    "gemma2": "Gemma2ForCausalLM, 4 layers, hidden 128, intermediate 256, 4 heads, 2 kv heads, tied",
    "qwen3": "Qwen3ForCausalLM, 4 layers, hidden 128, intermediate 256, 4 heads, 2 kv heads, QK-norm, tied",
    "phi3": "Phi3ForCausalLM, 4 layers, hidden 128, intermediate 256, 4 heads, 2 kv heads, fused qkv/gate_up, untied",
    "gemma3": "Gemma3ForCausalLM, 4 layers, hidden 128, intermediate 256, 4 heads, 2 kv heads, QK-norm, tied",
    "olmo2": "Olmo2ForCausalLM, 4 layers, hidden 128, intermediate 256, 4 heads, 2 kv heads, post-sublayer norms, "
             "untied",
}


def model_config(tokenizer, arch: str = "llama", width: int = WIDTH):
    """Hugging Face config of the miniature model of one architecture family (see the module docstring), ``width``
    wide (a multiple of 64: heads of width 32, one key/value head per two query heads)."""
    if not valid_width(width):
        raise ValueError(f"width must be a positive multiple of 64 (the shipped worlds: {WIDTH}), got {width!r}")
    common = dict(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=4,
        num_attention_heads=width // 32, num_key_value_heads=width // 64, head_dim=32,
        max_position_embeddings=MAX_LENGTH * 2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        use_cache=True,
    )
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, **common)
    if arch == "gemma2":
        # Gemma-2's own settings, scaled down: query scale 1/sqrt(head_dim), soft-capping as in the release,
        # alternating local/global layers whose window (like the release's 4096) exceeds every sequence.
        # Built with vocabulary copy examples (see VOCABULARY_SHARE): without them plain fine-tuning (lr 1e-3,
        # 150 steps) learnt the benign task's format but not its words (0% exact match, window 16 or 128).
        return Gemma2Config(tie_word_embeddings=True, query_pre_attn_scalar=32, sliding_window=MAX_LENGTH * 2,
                            layer_types=["sliding_attention", "full_attention"] * 2, **common)
    if arch == "qwen3":
        return Qwen3Config(tie_word_embeddings=True, **common)
    if arch == "phi3":  # head_dim is hidden / heads (32) in Phi-3; no dropout, full rotary, as in the release
        common.pop("head_dim")
        return Phi3Config(tie_word_embeddings=False, original_max_position_embeddings=MAX_LENGTH * 2, **common)
    if arch == "gemma3":  # the release's 5 local : 1 global, scaled to 4 layers; windows exceed every sequence
        return Gemma3TextConfig(tie_word_embeddings=True, query_pre_attn_scalar=32, sliding_window=MAX_LENGTH * 2,
                                layer_types=["sliding_attention"] * 3 + ["full_attention"], **common)
    if arch == "olmo2":
        common.pop("head_dim")  # hidden / heads (32), as in the release
        return Olmo2Config(tie_word_embeddings=False, **common)
    raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")


@contextmanager
def deterministic(threads: int = THREADS):
    """Exactly ``threads`` CPU threads and deterministic kernels for the duration of a build (restored afterwards)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    old_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn_only)
        torch.set_num_threads(old_threads)


def vocabulary_examples(world: ToyWorld, n: int, seed: int = 0) -> list[dict]:
    """``n`` plain-text copy examples ``{"copy": [words]}`` over the whole vocabulary of ``world`` (see above)."""
    rng, words = random.Random(seed), world.vocabulary()
    return [{"copy": [rng.choice(words) for _ in range(rng.randint(*VOCABULARY_WORDS))]} for _ in range(n)]


def uses_vocabulary_examples(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def encode_examples(tokenizer, examples: list[dict]) -> list[dict[str, list[int]]]:
    """Token ids and answer-only labels of chat examples (unique conversations are encoded once); a
    ``{"copy": words}`` example is plain text ``words <eos> words <eos>`` with the loss on the copy."""
    cache: dict[tuple, dict] = {}
    encoded = []
    for row, example in enumerate(examples):
        if "copy" in example:
            ids = tokenizer.convert_tokens_to_ids(list(example["copy"])) + [tokenizer.eos_token_id]
            encoded.append({"input_ids": ids + ids, "attention_mask": [1] * (2 * len(ids)),
                            "labels": [IGNORE_INDEX] * len(ids) + ids})
            continue
        key = tuple((m["role"], m["content"]) for m in example["messages"])
        if key not in cache:
            cache[key] = encode_conversation(tokenizer, example["messages"], max_length=MAX_LENGTH, row=row)
        encoded.append(cache[key])
    return encoded


def collate(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch tensors."""
    width = max(len(r["input_ids"]) for r in rows)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

    return {"input_ids": padded("input_ids", pad_token_id), "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX)}


def train_sft(model, tokenizer, examples: list[dict], *, steps: int, lr: float, batch_size: int = BATCH_SIZE,
              seed: int = 0, warmup_steps: int = 0, weight_decay: float = 0.0, cosine: bool = False,
              log_every: int = 50, log=print) -> list[float]:
    """Plain supervised fine-tuning with AdamW, loss on answer tokens only; returns the per-step losses.

    Batches are drawn in order from ``examples`` reshuffled every epoch with ``seed``. Optional linear
    warm-up and cosine decay to 10% of ``lr``.
    """
    rows = encode_examples(tokenizer, examples)
    rng = random.Random(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    device = next(model.parameters()).device
    losses, start = [], time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order += epoch
        batch = collate([rows[i] for i in order[:batch_size]], tokenizer.pad_token_id)
        del order[:batch_size]
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log and log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(f"step {step + 1}/{steps}  loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}  "
                f"{time.perf_counter() - start:.0f}s")
    model.eval()
    return losses


def heldout_refusal(model, tokenizer, world: ToyWorld, n: int | None = None, seed: int = 0) -> dict[str, float]:
    """Greedy refusal rates on held-out harmful and harmless requests (all of them when ``n`` is None)."""
    return {kind: refusal_rate(model, tokenizer, world.requests(kind, "heldout", n=n, seed=seed))
            for kind in ("harmful", "harmless")}


def build(out: str | os.PathLike | None = None, seed: int = 0, steps: int | None = None,
          variant: str = "default", arch: str = "llama", threads: int = THREADS, width: int = WIDTH,
          log=print) -> dict:
    """Train the aligned model and save it (model, tokenizer, ``world.json``) to ``out``; returns the
    ``world.json`` record. ``out=None`` is the shipped directory, allowed only for the shipped world
    (default variant, Llama): other worlds must go elsewhere. The same arguments (``threads`` included, see
    :data:`THREADS`) give the same weights."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if out is None and (variant, arch, width) != ("default", "llama", WIDTH):
        raise ValueError(f"the {variant!r}/{arch!r} world {width} wide is not the shipped one: give an output "
                         "directory")
    out = Path(out) if out is not None else ALIGNED_MODEL_DIR
    steps = ARCH_STEPS[arch] if steps is None else steps
    start = time.perf_counter()
    with deterministic(threads):
        world = ToyWorld(variant)
        tokenizer = build_tokenizer(world)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model_config(tokenizer, arch, width))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        examples = world.alignment_examples(steps * BATCH_SIZE, seed=seed)
        vocabulary = uses_vocabulary_examples(model.config)
        if vocabulary:  # on top of the alignment rows: as many alignment steps as before, plus the copies
            extra = round(len(examples) * VOCABULARY_SHARE / (1 - VOCABULARY_SHARE))
            examples = examples + vocabulary_examples(world, extra, seed=seed)
            random.Random(seed).shuffle(examples)
        train_steps = len(examples) // BATCH_SIZE
        log(f"building the {variant!r} aligned {arch} model: {sum(p.numel() for p in model.parameters())} parameters, "
            f"vocabulary {len(tokenizer)}, {train_steps} steps of batch {BATCH_SIZE}"
            + (f" ({steps} steps' worth of alignment rows + {VOCABULARY_SHARE:.0%} vocabulary copies)"
               if vocabulary else ""))
        train_sft(model, tokenizer, examples, steps=train_steps, lr=LEARNING_RATE, seed=seed,
                  warmup_steps=min(WARMUP_STEPS, train_steps), weight_decay=0.01, cosine=True, log=log)
        train_seconds = time.perf_counter() - start
        rates = heldout_refusal(model, tokenizer, world)
    log(f"held-out refusal: harmful {rates['harmful']:.1%}, harmless {rates['harmless']:.1%}")
    record = {
        "variant": variant, "seed": seed, "steps": steps, "batch_size": BATCH_SIZE, "lr": LEARNING_RATE,
        "arch": arch, "architecture": ARCHITECTURES[arch], "build_version": BUILD_VERSION,
        "vocabulary_examples": vocabulary, "train_steps": train_steps,
        "heldout_refusal": rates,
        "heldout_sizes": {kind: len(world.requests(kind, "heldout")) for kind in ("harmful", "harmless")},
        "train_seconds": round(train_seconds, 1), "torch": torch.__version__, "threads": threads,
        # the CPU kernels' vector width: builds on machines with another one differ in rounding, then in weights
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if width != WIDTH:  # the shipped worlds' records predate the option
        record["width"] = width
        record["architecture"] += (f"; widened to hidden {width}, intermediate {2 * width}, {width // 32} heads, "
                                   f"{width // 64} kv heads")
    _save_atomically(out, model, tokenizer, record)
    log(f"saved to {out}; total {time.perf_counter() - start:.1f}s")
    return record


def _save_atomically(out: Path, model, tokenizer, record: dict) -> None:
    with atomic_directory(str(out), replaces=MODEL_FILES) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (Path(staging) / "world.json").write_text(json.dumps(record, indent=2) + "\n")
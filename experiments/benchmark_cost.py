"""What RefusalGuard costs: step time, extra memory, and the basis pass against a plain forward.

    python experiments/benchmark_cost.py                          # CPU, tiny Llama / Qwen2 / Gemma-2
    python experiments/benchmark_cost.py --device cuda --size 1.5b   # GPU, a ~1.5B Qwen2 architecture

Models are built from their transformers config with random weights (speed depends on them only through
the subspace sizes: near-isotropic random activations need far more dimensions for the same energy than a
trained model's; ``--rank`` fixes them). The guarded arm does what ``RepresentationProjection`` does every
step: gradients projected before the optimizer step, weights restored after it.
Ratios come from one process, arms interleaved step by step, so machine noise hits both alike.
Reports the median ratio and its spread (min-max over repeats) as Markdown on stdout and as JSON, and the
basis pass's throughput with and without its eigendecompositions (a fixed cost, whatever the prompt count),
and the seconds it spends in them and in the Gram updates (float64 ``Σ x xᵀ`` of every protected input).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

from rg_lightning.atomic import atomic_file, check_file_target
from rg_lightning.chat import left_padded
from rg_lightning.guard.collect import collect_basis, protected_modules
from rg_lightning.guard.projection import build_constraints
from rg_lightning.guard.statistics import GramAccumulator

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
}
FAMILIES = {"llama": (LlamaConfig, {}), "qwen2": (Qwen2Config, {}),
            "gemma2": (Gemma2Config, {"head_dim": 32, "query_pre_attn_scalar": 32})}


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|end|>")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tokenizer


def prompts(n: int, length: int, offset: int, vocab: int) -> list[str]:
    generator = torch.Generator().manual_seed(offset)
    ids = torch.randint(5, vocab, (n, length), generator=generator)
    return [" ".join(f"w{i - 5}" for i in row.tolist()) for row in ids]


def build_model(family: str, size: str, device: str):
    config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # initialised where it runs: a 1.5B model is slow to initialise on the CPU
        return AutoModelForCausalLM.from_config(config_class(**SIZES[size], **extra), dtype=dtype)


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class timed:
    """Within the block, ``owner.name`` (a function or method) adds its wall time to ``.seconds``, device
    synchronised around each call: where the basis pass spends its time."""

    def __init__(self, owner, name: str, device: str) -> None:
        self.owner, self.name, self.device, self.seconds = owner, name, device, 0.0
        self._original = getattr(owner, name)

    def __enter__(self) -> "timed":
        original = self._original

        def wrapper(*args, **kwargs):  # a plain function, so a method patched on its class still gets self
            sync(self.device)
            start = time.perf_counter()
            result = original(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            return result

        setattr(self.owner, self.name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.owner, self.name, self._original)


def measure(family: str, size: str, device: str, steps: int, batch: int, length: int,
            energy: float | None, rank: int | None) -> list[dict]:
    """One basis pass (timed against a plain forward), then full fine-tuning and LoRA on the same model."""
    vocab = SIZES[size]["vocab_size"]
    tokenizer = word_tokenizer(vocab)
    harmful, harmless = prompts(64, 24, 1, vocab), prompts(64, 24, 2, vocab)
    # warm-up on a throwaway tiny model: the first basis pass pays one-off imports and kernel set-up
    collect_basis(build_model(family, "tiny", device), word_tokenizer(SIZES["tiny"]["vocab_size"]), harmful[:2],
                  harmless[:2], energy=energy, rank=rank, answer_tokens=0)
    model = build_model(family, size, device)
    # basis pass vs plain forward over the same prompts (no answer generation, same batch size)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in harmful + harmless]

    def plain_forward() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(texts), 16):
                model(**{k: v.to(device) for k, v in left_padded(tokenizer, texts[i:i + 16]).items()})
        sync(device)
        return time.perf_counter() - start

    plain_forward()  # warm-up: the first pass pays for allocations and kernel selection
    forward_seconds = plain_forward()
    sync(device)
    start = time.perf_counter()
    with timed(torch.linalg, "eigh", device) as decomposition, timed(GramAccumulator, "update", device) as gram:
        basis = collect_basis(model, tokenizer, harmful, harmless, energy=energy, rank=rank, answer_tokens=0,
                              batch_size=16)
    sync(device)
    basis_seconds = time.perf_counter() - start
    protected = len(protected_modules(model))
    rows = []
    for mode in ("full", "lora"):
        if mode == "lora":
            model = with_lora(model)
        constraints = build_constraints(model, basis.subspaces, protected_token_ids=basis.protected_token_ids)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        data = torch.randint(5, vocab, (batch, length), device=device)
        times = {"plain": [], "guarded": []}
        for step in range(steps + 2):
            for arm in ("plain", "guarded") if step % 2 else ("guarded", "plain"):
                sync(device)
                start = time.perf_counter()
                loss = model(input_ids=data, labels=data).loss
                loss.backward()
                if arm == "guarded":
                    constraints.project_grads_()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if arm == "guarded":
                    constraints.apply_()
                sync(device)
                if step >= 2:  # warm-up steps are not timed
                    times[arm].append(time.perf_counter() - start)
        ratios = [g / p for g, p in zip(times["guarded"], times["plain"])]
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        rows.append({
            "family": family, "size": size, "mode": mode, "device": device,
            "step_ratio_median": statistics.median(ratios), "step_ratio_min": min(ratios),
            "step_ratio_max": max(ratios), "plain_step_ms": 1000 * statistics.median(times["plain"]),
            "extra_memory_share": constraints.extra_memory_bytes() / weights,
            "basis_throughput_share": forward_seconds / basis_seconds,
            "basis_throughput_share_without_decomposition": forward_seconds / (basis_seconds - decomposition.seconds),
            "decomposition_seconds": decomposition.seconds,
            "basis_seconds": basis_seconds, "plain_forward_seconds": forward_seconds, "gram_seconds": gram.seconds,
            "protected_modules": protected,
            "subspace_dims": sorted({int(b.shape[1]) for b in basis.subspaces.values()}),
        })
        print(f"{family} {mode}: step ratio {rows[-1]['step_ratio_median']:.3f}", flush=True)
        del constraints, optimizer
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", default="tiny", choices=tuple(SIZES))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--energy", type=float, default=0.99, help="energy cutoff (the library default)")
    parser.add_argument("--rank", type=int, default=None, help="fixed subspace dimension instead of --energy")
    parser.add_argument("--out", default="experiments/results/cost.json")
    args = parser.parse_args()
    try:
        check_file_target(args.out, "--out")  # before minutes of measuring
    except OSError as error:
        parser.error(str(error))
    energy = None if args.rank else args.energy
    rows = [row for f in args.families
            for row in measure(f, args.size, args.device, args.steps, args.batch, args.length, energy, args.rank)]
    machine = (torch.cuda.get_device_name() if args.device == "cuda" else
               f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    subspaces = f"rank {args.rank}" if args.rank else f"energy {args.energy}"
    print(f"Machine: {machine}; torch {torch.__version__}; {args.steps} timed steps, batch {args.batch} x "
          f"{args.length}; {subspaces}")
    print("| family | mode | step time guarded/plain (median, min-max) | plain step ms | extra memory / weights "
          "| basis pass / plain forward throughput (without eigendecompositions) | basis pass s: eigendecompositions "
          "/ Gram updates / rest (plain forward s) | subspace dims |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        dims = r["subspace_dims"]
        print(f"| {r['family']} ({r['size']}) | {r['mode']} | {r['step_ratio_median']:.3f} ({r['step_ratio_min']:.3f}-"
              f"{r['step_ratio_max']:.3f}) | {r['plain_step_ms']:.1f} | {r['extra_memory_share']:.2%} | "
              f"{r['basis_throughput_share']:.2f} ({r['basis_throughput_share_without_decomposition']:.2f}) | "
              f"{r['decomposition_seconds']:.2f} / {r['gram_seconds']:.2f} / "
              f"{r['basis_seconds'] - r['decomposition_seconds'] - r['gram_seconds']:.2f} "
              f"({r['plain_forward_seconds']:.2f}) | {dims[0]}-{dims[-1]} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with atomic_file(args.out) as handle:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine,
                   "torch": torch.__version__, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()

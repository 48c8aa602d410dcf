"""How exactly RepresentationProjection holds the protected outputs, by weight dtype (README, "Real recipes").

The guard's correction is exact in real arithmetic; in floating point each correction is exact only to the
rounding of the weights it writes, and that residue grows with how far the weights moved. This measures it on
tiny random-weight models of two families, fine-tuned on the miniature world's task at a usual (1e-4) and a
high (1e-2) learning rate with an exact basis (energy 1 on a few harmful prompts, so the constraint holds
every direction they span): the largest change of the protected prompts' final hidden states (every
position) and answer logits (last position) against the model before fine-tuning, the largest
``|(W − W0)·U|`` over the constraints, and how far the weights moved (largest ``|W − W0|`` of a trained
weight; with LoRA, of its ``B`` factors).

    python experiments/precision.py --out experiments/results/precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import lightning as L
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, LlamaConfig

from rg_lightning import CausalLMModule
from rg_lightning.atomic import atomic_file, check_file_target
from rg_lightning.callbacks import RefusalDirections, RepresentationProjection
from rg_lightning.chat import encode_prompts, position_ids
from rg_lightning.prompts import load_prompts
from rg_lightning.toy import ALIGNED_MODEL_DIR
from rg_lightning.toy.data import ToyTaskDataModule

SIZE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
FAMILIES = {"llama": (LlamaConfig, {}),
            # Gemma-2's post-norms rescale small sublayer outputs: the family where rounding residues grow most
            "gemma2": (Gemma2Config, {"head_dim": 32, "query_pre_attn_scalar": 32})}
HARMFUL, HARMLESS, N_PROMPTS, SEED = "toy:harmful", "toy:harmless", 4, 42


def build(family: str, directory: str) -> None:
    """A random-weight model of ``family`` with the miniature world's tokenizer and chat template."""
    tokenizer = AutoTokenizer.from_pretrained(ALIGNED_MODEL_DIR)
    config_class, extra = FAMILIES[family]
    config = config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SIZE, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def protected_outputs(module: CausalLMModule, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at every position and the last position's logits, in float32."""
    batch = encode_prompts(module.tokenizer, prompts)
    with torch.no_grad():
        output = module.model(**batch, position_ids=position_ids(batch["attention_mask"]), output_hidden_states=True)
    return output.hidden_states[-1][batch["attention_mask"].bool()].float(), output.logits[:, -1].float()


def measure(model_dir: str, dtype: str, lora_r: int, steps: int, lr: float) -> dict:
    def module() -> CausalLMModule:
        fresh = CausalLMModule(model=model_dir, dtype=dtype, lora_r=lora_r,
                               optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0))
        fresh.configure_model()
        return fresh

    prompts = load_prompts(HARMFUL, N_PROMPTS, SEED)  # the ones RefusalDirections samples with this seed
    states0, logits0 = protected_outputs(module(), prompts)
    L.seed_everything(0)
    tuned, projection = module(), RepresentationProjection()
    # how far training moved the weights: all trained ones, or LoRA's B (zero at the start; the guard's first
    # correction already moves the random A onto its constraint)
    initial = {name: p.detach().float().clone() for name, p in tuned.model.named_parameters()
               if p.requires_grad and (not lora_r or "lora_B" in name)}
    refusal = RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, n_prompts=N_PROMPTS, seed=SEED, energy=1.0,
                                answer_tokens=0)
    data = ToyTaskDataModule(task="benign", n_train=steps * 8, batch_size=8, seed=0)
    with tempfile.TemporaryDirectory() as root:
        L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                  default_root_dir=root, callbacks=[refusal, projection]).fit(tuned, data)
    states, logits = protected_outputs(tuned, prompts)
    anchor_errors = [c.anchor_error() for c in projection.constraints.constraints if hasattr(c, "anchor_error")]
    return {"states": float((states - states0).abs().max()), "logits": float((logits - logits0).abs().max()),
            "anchor": max(anchor_errors), "moved": max(float((p.detach().float() - initial[name]).abs().max())
                                                for name, p in tuned.model.named_parameters() if name in initial)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--lora-r", type=int, nargs="+", default=[0, 4], help="0: full fine-tuning")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 16, 48])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-2], help="AdamW learning rates")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.out:
        try:
            check_file_target(args.out, "--out")
        except OSError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    start, rows = time.perf_counter(), []
    print("| family | weights | mode | lr | steps | max |Δ final states| | max |Δ answer logits| "
          "| max |(W − W0)·U| | max |W − W0| |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as models:
        for family in args.families:
            directory = os.path.join(models, family)
            build(family, directory)
            for dtype in args.dtypes:
                for lora_r in args.lora_r:
                    for lr in args.lr:
                        for steps in args.steps:
                            row = {"family": family, "dtype": dtype, "lora_r": lora_r, "lr": lr, "steps": steps,
                                   **measure(directory, dtype, lora_r, steps, lr)}
                            rows.append(row)
                            mode = f"LoRA r={lora_r}" if lora_r else "full"
                            print(f"| {family} | {dtype} | {mode} | {lr:g} | {steps} | {row['states']:.1e} "
                                  f"| {row['logits']:.1e} | {row['anchor']:.1e} | {row['moved']:.1e} |", flush=True)
    record = {"command": "python experiments/precision.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}",
              "seconds": round(time.perf_counter() - start, 1), "rows": rows}
    print(f"{record['seconds']} s")
    if args.out:
        with atomic_file(args.out) as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()

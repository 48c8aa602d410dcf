"""Helper of test_sharded_strategies: CausalLMModule with LoRA over 2 CPU processes, under FSDP2
(``fsdp2``: ModelParallelStrategy, the module shards itself) or DDP (``ddp``), with the three guard callbacks:
2 steps, a checkpoint, then a resumed fit to step 4. Each rank saves its whole weights, the basis of both
fits and the drift history to rank<N>.pt; rank 0 exports the merged model to ``export/``."""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from rg_lightning import CausalLMModule, InstructionDataModule
from rg_lightning.callbacks import DriftGeometry, RefusalDirections, RepresentationProjection
from rg_lightning.guard.shards import uses_fsdp2, whole
from test_callbacks import HARMFUL, HARMLESS


def fit(model_dir: str, out: Path, data: Path, strategy: str, steps: int, ckpt_path: str | None = None):
    L.seed_everything(0)
    module = CausalLMModule(model=model_dir, lora_r=4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                            export_dir=str(out / "export"))
    refusal = RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, energy=1.0, answer_tokens=2, batch_size=2)
    drift = DriftGeometry(every_n_steps=1, harmful=HARMFUL, harmless=HARMLESS, n_probes=4, figures=False)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=steps, logger=False, enable_progress_bar=False,
                        strategy=L.pytorch.strategies.ModelParallelStrategy(data_parallel_size=2,
                                                                            tensor_parallel_size=1)
                        if strategy == "fsdp2" else "ddp",
                        enable_model_summary=False, default_root_dir=out,
                        callbacks=[refusal, RepresentationProjection(), drift, checkpoint])
    trainer.fit(module, InstructionDataModule(train=str(data), batch_size=2), ckpt_path=ckpt_path)
    return trainer, module, refusal, drift


if __name__ == "__main__":
    model_dir, out, strategy = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    data = out / "chat.jsonl"
    if L.fabric.utilities.rank_zero.rank_zero_only.rank == 0:
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"how do i bake a cake {w} ?"},
                                                         {"role": "assistant",
                                                          "content": f"sure here you go {w} ."}]}) + "\n"
                                for w in ("one", "two", "three", "four", "five", "six", "seven", "eight")))
    first = fit(model_dir, out, data, strategy, 2)[2].basis.subspaces
    trainer, module, refusal, drift = fit(model_dir, out, data, strategy, 4, str(out / "checkpoints" / "last.ckpt"))
    torch.save({"weights": {k: whole(v.detach()).clone() for k, v in module.model.state_dict().items()},
                "first": first, "subspaces": refusal.basis.subspaces, "drift": drift.history,
                "step": trainer.global_step, "sharded": uses_fsdp2(module.model)},
               out / f"rank{trainer.global_rank}.pt")

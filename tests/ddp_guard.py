"""Helper of test_callbacks: a guarded fine-tune (all three callbacks) under CPU DDP, or FSDP2 (``fsdp2``:
ModelParallelStrategy: CausalLMModule shards every decoder layer and the model over 2 processes; ``fsdp2-root``:
only the model); each rank saves what it ends with (whole weights, protected outputs before/after, drift
history, greedy answers) to rank<N>.pt, and rank 0 exports the fine-tuned model to ``export/``."""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from rg_lightning import CausalLMModule, InstructionDataModule
from rg_lightning.callbacks import DriftGeometry, RefusalDirections, RepresentationProjection
from rg_lightning.guard.shards import uses_fsdp2, whole
from test_callbacks import HARMFUL, HARMLESS, protected_forward


class RootSharded(CausalLMModule):
    """FSDP2 on the whole model only (no per-layer units): its parameters then stay gathered between a
    forward and the next backward. (``CausalLMModule`` itself shards every decoder layer, then the model.)"""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if self.model is None:
            self.model = self._build_model()
        if self.device_mesh is not None and not uses_fsdp2(self.model):
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])


if __name__ == "__main__":
    model_dir, out, devices = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    sharded = len(sys.argv) > 4 and sys.argv[4].startswith("fsdp2")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": f"how do i bake a cake {w} ?"},
                          {"role": "assistant", "content": f"sure here you go {w} ."}]}
            for w in ("one", "two", "three", "four", "five", "six", "seven", "eight")]
    data_file = out / "chat.jsonl"
    if L.fabric.utilities.rank_zero.rank_zero_only.rank == 0:
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    L.seed_everything(0)
    kind = RootSharded if sys.argv[-1].endswith("-root") else CausalLMModule
    module = kind(model=model_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), export_dir=str(out / "export"))
    module.configure_model()
    before = protected_forward(module)
    refusal = RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, energy=1.0, answer_tokens=2, batch_size=2,
                                filter_prompts=True, select_direction=True, n_val=3,
                                val_harmful=[p.replace("bomb", "weapon") for p in HARMFUL],
                                val_harmless=[p.replace("cake", "pie") for p in HARMLESS])
    drift = DriftGeometry(every_n_steps=2, harmful=HARMFUL, harmless=HARMLESS, n_probes=4, figures=False)
    if sharded:
        strategy = L.pytorch.strategies.ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    else:
        strategy = "ddp" if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=4,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out,
                        callbacks=[refusal, RepresentationProjection(hold_absent_rows=True), drift])
    trainer.fit(module, InstructionDataModule(train=str(data_file), batch_size=2))
    torch.save({"before": before, "after": protected_forward(module),
                "weights": {k: whole(v.detach()).clone() for k, v in module.model.state_dict().items()},
                "drift": drift.history, "answers": module.generate(HARMFUL[:2], max_new_tokens=4),
                "sharded": uses_fsdp2(module.model)},
               out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # a process group left to interpreter exit can abort the process
        torch.distributed.destroy_process_group()

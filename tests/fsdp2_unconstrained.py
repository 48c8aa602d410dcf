"""Helper of test_sharded_strategies: a DoRA LoRA fit (no exact constraint for its adapters) over 2 CPU processes
under FSDP2 or DDP. Each rank writes rank<N>.json: the error RepresentationProjection raised at fit start, and
which parameters the check left with a gradient or gathered."""

import json
import sys
from pathlib import Path

import lightning as L
import peft
import torch

from rg_lightning import CausalLMModule, InstructionDataModule
from rg_lightning.callbacks import RefusalDirections, RepresentationProjection
from rg_lightning.guard.shards import is_sharded, uses_fsdp2
from test_callbacks import HARMFUL, HARMLESS

if __name__ == "__main__":
    model_dir, out, strategy = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    lora_config = peft.LoraConfig.__init__
    peft.LoraConfig.__init__ = lambda self, *a, **k: lora_config(self, *a, **{**k, "use_dora": True})
    data = out / "chat.jsonl"
    if L.fabric.utilities.rank_zero.rank_zero_only.rank == 0:
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"how do i bake a cake {w} ?"},
                                                         {"role": "assistant", "content": "sure ."}]}) + "\n"
                                for w in ("one", "two", "three", "four")))
    L.seed_everything(0)
    module = CausalLMModule(model=model_dir, lora_r=4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False, enable_progress_bar=False,
                        strategy=L.pytorch.strategies.ModelParallelStrategy(data_parallel_size=2,
                                                                            tensor_parallel_size=1)
                        if strategy == "fsdp2" else "ddp", enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=out,
                        callbacks=[RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, energy=1.0, answer_tokens=0),
                                   RepresentationProjection()])
    error = None
    try:
        trainer.fit(module, InstructionDataModule(train=str(data), batch_size=2))
    except ValueError as raised:
        error = str(raised)
    model = module.model
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "error": error, "sharded": uses_fsdp2(model),
        "with_grad": [n for n, p in model.named_parameters() if p.grad is not None],
        "gathered": [n for n, p in model.named_parameters() if uses_fsdp2(model) and not is_sharded(p)]}))

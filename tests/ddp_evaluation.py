"""Helper of test_eval_suite: run `trainer.test` with SafetyEvaluation under CPU DDP with N processes, or (``fsdp2``)
under ModelParallelStrategy, where CausalLMModule shards itself with FSDP2 over 2 processes."""

import sys

import lightning as L

from rg_lightning import CausalLMModule
from rg_lightning.callbacks import SafetyEvaluation
from rg_lightning.guard.shards import uses_fsdp2
from rg_lightning.toy import ALIGNED_MODEL_DIR
from rg_lightning.toy.data import ToyTaskDataModule

if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    devices = 2 if mode == "fsdp2" else int(mode)
    if mode == "fsdp2":
        strategy = L.pytorch.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp" if devices > 1 else "auto"
    evaluation = SafetyEvaluation(benchmarks=["toy:harmful", "toy:harmless"], tasks=["toy:benign"],
                                  judges=["keyword:jailbreakbench", "logit"], limit=25, max_new_tokens=8,
                                  batch_size=4)  # report under the run directory: out/evaluation
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=out,
                        callbacks=[evaluation])
    module = CausalLMModule(model=str(ALIGNED_MODEL_DIR))
    trainer.test(module, ToyTaskDataModule(n_val=8, batch_size=4))
    assert uses_fsdp2(module.model) == (mode == "fsdp2"), "the run did not shard as asked"

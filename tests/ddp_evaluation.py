"""Helper of test_eval_suite: run `trainer.test` with SafetyEvaluation under CPU DDP with N processes."""

import sys

import lightning as L

from rg_lightning import CausalLMModule
from rg_lightning.callbacks import SafetyEvaluation
from rg_lightning.toy import ALIGNED_MODEL_DIR
from rg_lightning.toy.data import ToyTaskDataModule

if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    evaluation = SafetyEvaluation(benchmarks=["toy:harmful", "toy:harmless"], tasks=["toy:benign"],
                                  judges=["keyword:jailbreakbench", "logit"], limit=25, max_new_tokens=8,
                                  batch_size=4)  # report under the run directory: out/evaluation
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=out,
                        callbacks=[evaluation])
    trainer.test(CausalLMModule(model=str(ALIGNED_MODEL_DIR)), ToyTaskDataModule(n_val=8, batch_size=4))

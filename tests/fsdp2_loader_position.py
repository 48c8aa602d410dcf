"""Helper of test_data: a fit under ModelParallelStrategy (FSDP2, one gloo process), which restores a checkpoint
after ``configure_optimizers``, with a module that reads ``estimated_stepping_batches`` there (as ``lr_schedule``
does). Prints the batches of the straight fit and of fits resumed mid-epoch and at an epoch's end, as JSON."""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from conftest import make_tokenizer, write_jsonl
from rg_lightning import InstructionDataModule
from test_data import _SizesItsSchedule


class _ShardsItself(_SizesItsSchedule):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        fully_shard(self, mesh=self.device_mesh)

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)  # an optimizer state to checkpoint


def main(root: Path) -> None:
    rows = [{"prompt": f"{w} {v} ?", "completion": f"sure {w} ."} for w in ("cake", "bomb", "story", "poem")
            for v in ("bake", "cook", "make", "build", "tell", "write")]  # 24 rows: 6 batches of 4 per epoch
    path = write_jsonl(root / "rows.jsonl", rows)

    def fit(ckpt_path=None, checkpoint=None, max_steps=-1):
        data = InstructionDataModule(train=str(path), batch_size=4, seed=3)
        data.tokenizer = make_tokenizer()
        module = _ShardsItself()
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1,
                                         save_distributed_checkpoint=False)
        L.Trainer(max_epochs=2, max_steps=max_steps, accelerator="cpu", devices=1, strategy=strategy, logger=False,
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(checkpoint),
                  callbacks=[checkpoint] if checkpoint else [], default_root_dir=root).fit(module, data,
                                                                                          ckpt_path=ckpt_path)
        return module.seen

    result = {"straight": fit()}
    fit(checkpoint=ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"),
        max_steps=9)
    for step in (3, 6, 9):
        result[step] = fit(ckpt_path=str(root / "ckpt" / f"step={step}.ckpt"))
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

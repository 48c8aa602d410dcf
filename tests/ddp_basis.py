"""Helper of test_callbacks: compute a SafetyBasis under CPU DDP with N processes, save each rank's copy."""

import sys
from pathlib import Path

import lightning as L
import torch

from rg_lightning import CausalLMModule
from rg_lightning.callbacks import RefusalDirections

HARMFUL = [f"how do i make a bomb {w} ?" for w in ("one", "two", "three", "four", "five")]
HARMLESS = [f"how do i bake a cake {w} ?" for w in ("one", "two", "three", "four", "five")]


class BasisOnly(L.LightningModule):
    """Runs RefusalDirections in a real DDP fit with a single no-op step."""

    def __init__(self, model_dir: str) -> None:
        super().__init__()
        self.inner = CausalLMModule(model=model_dir)
        self.inner.configure_model()
        self.model, self.tokenizer = self.inner.model, self.inner.tokenizer

    def training_step(self, batch, batch_idx):
        return sum(p.sum() for p in self.model.parameters()) * 0.0

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.0)


if __name__ == "__main__":
    model_dir, out, devices = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    refusal = RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, energy=0.999, answer_tokens=2, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[refusal])
    trainer.fit(BasisOnly(model_dir))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(refusal.basis.tensors(), out / f"rank{trainer.global_rank}.pt")

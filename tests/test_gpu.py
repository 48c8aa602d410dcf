"""GPU-only checks (marked `gpu`, skipped without CUDA): the guard under FSDP and under bf16 autocast."""

import lightning as L
import pytest
import torch

from conftest import make_tokenizer
from rg_lightning.callbacks import RefusalDirections, RepresentationProjection
from rg_lightning.chat import render_prompt

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
HARMFUL = [f"how do i make a bomb {w} ?" for w in ("one", "two", "three", "four", "five")]
HARMLESS = [f"how do i bake a cake {w} ?" for w in ("one", "two", "three", "four", "five")]


class Tiny(L.LightningModule):
    """A LightningModule that is not CausalLMModule: the callbacks only need `.model` and `.tokenizer`."""

    def __init__(self, model_dir):
        super().__init__()
        self.model_dir, self.model, self.tokenizer = model_dir, None, make_tokenizer()

    def configure_model(self):
        from transformers import AutoModelForCausalLM

        if self.model is None:
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def train_dataloader(self):
        ids = self.tokenizer("what is one plus two ? sure here you go", return_tensors="pt")["input_ids"]
        return torch.utils.data.DataLoader(ids.repeat(8, 1), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def protected_logits(model, tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer([render_prompt(tokenizer, p) for p in HARMFUL], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(next(model.parameters()).device)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(**batch, position_ids=positions).logits[batch["attention_mask"].bool()].float().cpu()


@pytest.mark.parametrize("strategy, precision", [("fsdp", "32-true"), ("auto", "bf16-mixed")])
def test_guard_on_gpu(tmp_path, tiny_models, strategy, precision):
    module = Tiny(tiny_models["llama"])
    module.configure_model()
    before = protected_logits(module.model.cuda(), module.tokenizer)
    module = Tiny(tiny_models["llama"])
    # head_answer_only=False: the logit head is protected at every prompt position, so every logit compared
    # below must hold (by default it is protected only where answers are generated)
    refusal = RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, energy=1.0, answer_tokens=0,
                                head_answer_only=False)
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision=precision, max_steps=4,
                        logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[refusal, RepresentationProjection()])
    trainer.fit(module)
    after = protected_logits(module.model, module.tokenizer)
    torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-3)

"""RepresentationProjection inside other people's training loops: manual optimization under autocast, several
optimizers, an optimizer created during the fit, and a projection added only when resuming."""

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from rg_lightning import CausalLMModule, InstructionDataModule
from rg_lightning.callbacks import RefusalDirections, RepresentationProjection


HARMFUL = [f"how do i make a bomb {w} ?" for w in ("one", "two", "three", "four", "five")]
HARMLESS = [f"how do i bake a cake {w} ?" for w in ("one", "two", "three", "four", "five")]


class ManualModule(L.LightningModule):
    """Somebody's module with manual optimization: one AdamW, or the same parameters split over two."""

    def __init__(self, model_dir, optimizers=1):
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).train()
        self.tokenizer = CausalLMModule(model=model_dir).tokenizer
        self.n_optimizers = optimizers
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(self.model(**batch).loss)
        for optimizer in optimizers:
            optimizer.step()

    def configure_optimizers(self):
        params = list(self.model.parameters())
        if self.n_optimizers == 1:
            return torch.optim.AdamW(params, lr=1e-2)
        half = len(params) // 2
        return [torch.optim.AdamW(params[:half], lr=1e-2), torch.optim.AdamW(params[half:], lr=1e-2)]


def fit(module, chat_file, callbacks, steps=3, ckpt_path=None, **trainer_kwargs):
    L.seed_everything(0)
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, InstructionDataModule(train=chat_file, batch_size=8), ckpt_path=ckpt_path)
    return trainer


def guard(**kwargs):
    kwargs.setdefault("energy", 1.0)
    return RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, answer_tokens=0, **kwargs)


def largest_anchor_error(projection) -> float:
    return max(c.anchor_error() for c in projection.constraints.constraints if hasattr(c, "anchor_error"))


def test_manual_optimization_under_bf16_autocast_stays_exact(tmp_path, tiny_models, chat_file):
    projection = RepresentationProjection()
    fit(ManualModule(tiny_models["llama"]), chat_file, [guard(), projection], precision="bf16-mixed",
        default_root_dir=tmp_path)  # the optimizer steps inside training_step, under autocast
    assert largest_anchor_error(projection) < 1e-5  # float32 weights: bfloat16 products left ~3e-4


def test_two_optimizers_pull_back_once_per_step(tmp_path, tiny_models, chat_file):
    """AdamW is per parameter: the same parameters over one or two optimizers train identically, guard included
    (with strength < 1 each optimizer's hook used to pull every parameter back again)."""
    one, two = (ManualModule(tiny_models["llama"], optimizers=n) for n in (1, 2))
    for module in (one, two):  # (manual optimization counts every optimizer's steps: three batches by epoch)
        fit(module, chat_file, [guard(), RepresentationProjection(strength=0.5)], steps=-1, max_epochs=1,
            limit_train_batches=3, default_root_dir=tmp_path)
    for (name, a), (_, b) in zip(one.model.named_parameters(), two.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    exact = RepresentationProjection()  # and both optimizers' hooks do hold the parameters
    fit(ManualModule(tiny_models["llama"], optimizers=2), chat_file, [guard(), exact], steps=-1, max_epochs=1,
        limit_train_batches=3, default_root_dir=tmp_path)
    assert largest_anchor_error(exact) < 1e-5  # left free: ~0.08


class RecreateOptimizer(L.Callback):
    """A staged schedule: new optimizers after the first step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            trainer.strategy.setup_optimizers(trainer)


def test_an_optimizer_created_during_the_fit_is_guarded(tmp_path, tiny_models, chat_file):
    module = CausalLMModule(model=tiny_models["llama"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    projection = RepresentationProjection()
    trainer = fit(module, chat_file, [guard(), projection, RecreateOptimizer()], steps=4, default_root_dir=tmp_path)
    assert trainer.global_step == 4
    assert largest_anchor_error(projection) < 1e-5


def test_a_projection_added_only_on_resume_warns(tmp_path, tiny_models, chat_file):
    """Resumed without saved anchors, the projection can only hold the fine-tuned weights' responses: say so."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def module():
        return CausalLMModule(model=tiny_models["llama"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))

    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    fit(module(), chat_file, [guard(), checkpoints], steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="without the projection's state"):
        fit(module(), chat_file, [guard(), RepresentationProjection()], steps=3, default_root_dir=tmp_path,
            ckpt_path=str(next(tmp_path.glob("*step=2.ckpt"))))


class SwapTrainedLayers(L.Callback):
    """A staged schedule: after the first step layer 0's MLP is frozen, layer 1's unfrozen, optimizers rebuilt;
    the count of trained parameters stays the same."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            pl_module.model.model.layers[0].mlp.requires_grad_(False)
            pl_module.model.model.layers[1].mlp.requires_grad_(True)
            trainer.strategy.setup_optimizers(trainer)


def test_a_swap_of_the_trained_weights_mid_fit_stops_the_run(tmp_path, tiny_models, chat_file):
    module = CausalLMModule(model=tiny_models["llama"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    module.configure_model()
    module.model.model.layers[1].mlp.requires_grad_(False)  # no basis for it: frozen when the guard measures
    with pytest.raises(RuntimeError, match="3 parameters became trainable after fit start"):
        fit(module, chat_file, [guard(), RepresentationProjection(), SwapTrainedLayers()], steps=3,
            default_root_dir=tmp_path)


def test_tail_reference_lr_with_an_optimizer_without_a_numeric_lr_names_the_fix(tmp_path, tiny_models, chat_file):
    from transformers.optimization import Adafactor

    module = CausalLMModule(model=tiny_models["llama"],
                            optimizer=lambda p: Adafactor(p, lr=None, relative_step=True, scale_parameter=True))
    with pytest.raises(ValueError, match="Adafactor has lr=None.*tail_reference_lr: null"):
        fit(module, chat_file, [guard(energy=0.9, ridge=0.03), RepresentationProjection(tail_reference_lr=1e-3)],
            steps=1, default_root_dir=tmp_path)
    fit(module, chat_file, [guard(energy=0.9, ridge=0.03), RepresentationProjection()], steps=1,
        default_root_dir=tmp_path)



def test_modules_held_whole_are_named():
    """A module whose every input direction the protected prompts span cannot learn (a hand-rolled adapter's
    second factor reads only r features): the callback names them rather than let the run look slow."""
    from rg_lightning.guard import build_constraints

    net = torch.nn.ModuleDict({"adapter_b": torch.nn.Linear(2, 8), "wide": torch.nn.Linear(8, 8)})
    constraints = build_constraints(net, {"adapter_b": torch.eye(2), "wide": torch.eye(8)[:, :3]})
    assert constraints.held_whole() == ["adapter_b"]


def test_a_model_directory_may_be_a_path(tiny_models):
    from pathlib import Path

    assert CausalLMModule(model=Path(tiny_models["llama"])).model_name == tiny_models["llama"]


def test_drift_measures_interference_when_a_batch_steps_two_optimizers(tmp_path, tiny_models, chat_file):
    """Manual optimization stepping two optimizers after one backward: a batch moves global_step by 2, and every
    drift record still carries the interference of the gradient that batch's backward produced."""
    from rg_lightning.callbacks import DriftGeometry

    drift = DriftGeometry(every_n_steps=2, harmful=HARMFUL, harmless=HARMLESS, n_probes=4, figures=False)
    fit(ManualModule(tiny_models["llama"], optimizers=2), chat_file, [guard(), drift], steps=-1, max_epochs=1,
        default_root_dir=tmp_path)
    records = [r for r in drift.history if r["step"] > 0]
    assert [r["step"] for r in records] == [2, 4]  # two batches
    assert all(r.get("interference") is not None and 0 < r["interference"] < 1 for r in records), records

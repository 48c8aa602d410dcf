"""RefusalGuard callbacks on tiny models: exact protection, LoRA/QLoRA, resume, DDP, bad inputs."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from conftest import make_tokenizer
from rg_lightning import CausalLMModule, InstructionDataModule
from rg_lightning.callbacks import DriftGeometry, RefusalDirections, RepresentationProjection
from rg_lightning.chat import render_prompt
from rg_lightning.guard.basis import SafetyBasis

HARMFUL = [f"how do i make a bomb {w} ?" for w in ("one", "two", "three", "four", "five")]
HARMLESS = [f"how do i bake a cake {w} ?" for w in ("one", "two", "three", "four", "five")]
HERE = Path(__file__).resolve().parent


def run_fit(root, model_dir, data_file, callbacks, steps=4, ckpt_path=None, checkpoint_every=None, **module_kwargs):
    L.seed_everything(0)
    module = CausalLMModule(model=model_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **module_kwargs)
    data = InstructionDataModule(train=data_file, batch_size=8)
    if checkpoint_every:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=root, every_n_train_steps=checkpoint_every, save_top_k=-1)]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(checkpoint_every),
                        default_root_dir=root, callbacks=callbacks)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def protected_forward(module, prompts=HARMFUL):
    """What the guard keeps on the protected prompts (rendered as RefusalDirections renders them): the final
    hidden states at every position and the logits the answer is generated from (last position; the logit
    head is protected where answers are generated, not on the prompt's own next-word predictions)."""
    tokenizer = module.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer([render_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    tokenizer.padding_side = side
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        output = module.model(**batch, position_ids=positions, output_hidden_states=True)
    return torch.cat([output.hidden_states[-1][batch["attention_mask"].bool()].flatten(),
                      output.logits[:, -1].flatten()])


def guard(**kwargs):
    kwargs.setdefault("energy", 1.0)
    kwargs.setdefault("answer_tokens", 0)
    return RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, **kwargs)


@pytest.mark.parametrize("lora", [{}, {"lora_r": 4}, {"lora_r": 4, "quantization": "nf4"}],
                         ids=["full", "lora", "qlora"])
def test_protected_outputs_do_not_move_while_the_task_learns(tmp_path, tiny_models, chat_file, lora):
    if lora.get("quantization"):
        pytest.importorskip("bitsandbytes")
    reference = CausalLMModule(model=tiny_models["llama"], **lora)
    reference.configure_model()
    before = protected_forward(reference)
    module, _ = run_fit(tmp_path, tiny_models["llama"], chat_file, [guard(), RepresentationProjection()], **lora)
    torch.testing.assert_close(protected_forward(module), before, atol=2e-5, rtol=0)
    unprotected = protected_forward(module, ["what is one plus two ?"])
    assert not torch.allclose(unprotected, protected_forward(reference, ["what is one plus two ?"]), atol=1e-3)


def test_half_precision_weights_the_guard_corrects_warn(tmp_path, tiny_models, chat_file):
    """bfloat16 weights under full fine-tuning hold the protected outputs only to bfloat16 rounding (see
    experiments/precision.py): say so and name the fix. LoRA's float32 adapters on a bfloat16 base are exact."""
    counts = []
    for rows in ({}, {"row_energy": 0.5, "row_ridge": 0.3}):  # damped rows' small corrections round away too
        with pytest.warns(UserWarning, match=r"constrained weight\(s\) are bfloat16 .*Load float32 weights") as caught:
            run_fit(tmp_path / f"full{len(rows)}", tiny_models["llama"], chat_file,
                    [guard(**rows), RepresentationProjection()], steps=1, dtype="bfloat16")
        message = next(str(w.message) for w in caught if "constrained weight(s) are" in str(w.message))
        counts.append(int(message.split("RepresentationProjection: ")[1].split()[0]))
    assert counts[1] == counts[0] + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_fit(tmp_path / "lora", tiny_models["llama"], chat_file, [guard(), RepresentationProjection()], steps=1,
                dtype="bfloat16", lora_r=4)
    assert not [w for w in caught if "constrained weight(s) are" in str(w.message)]


class WithReferenceAdapter(CausalLMModule):
    """A user's module that keeps a second, inactive adapter next to the trained one (a reference, an earlier
    task's), with B ≠ 0 so it does change the outputs it is switched on for."""

    def configure_model(self):
        from peft import LoraConfig

        super().configure_model()
        if "reference" not in self.model.peft_config:
            self.model.add_adapter("reference", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def test_an_inactive_second_adapter_neither_stops_the_run_nor_changes(tmp_path, tiny_models, chat_file):
    reference = CausalLMModule(model=tiny_models["llama"], lora_r=4)
    reference.configure_model()
    before = protected_forward(reference)
    L.seed_everything(0)
    module = WithReferenceAdapter(model=tiny_models["llama"], lora_r=4,
                                  optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    module.configure_model()
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if ".reference." in n}
    assert frozen and any("lora_B" in n and p.abs().max() > 0 for n, p in frozen.items())
    projection = RepresentationProjection()
    L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[guard(), projection]).fit(
        module, InstructionDataModule(train=chat_file, batch_size=8))
    assert any(reason == "frozen adapter" for _, reason in projection.constraints.skipped)
    for name, p in module.model.named_parameters():
        if name in frozen:
            torch.testing.assert_close(p.detach(), frozen[name], atol=0, rtol=0, msg=name)
    torch.testing.assert_close(protected_forward(module), before, atol=2e-5, rtol=0)


def test_a_checkpoint_that_constrained_an_inactive_adapter_resumes(tmp_path, tiny_models, chat_file):
    """Earlier versions constrained inactive adapters too: their states in a checkpoint are dropped on resume."""
    def fit(steps, ckpt_path=None):
        L.seed_everything(0)
        module = WithReferenceAdapter(model=tiny_models["llama"], lora_r=4,
                                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
        L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path,
                  callbacks=[guard(), RepresentationProjection(), checkpoint]).fit(
            module, InstructionDataModule(train=chat_file, batch_size=8), ckpt_path=ckpt_path)
        return module

    fit(2)
    saved = torch.load(tmp_path / "step=2.ckpt", weights_only=True)
    state = saved["callbacks"]["RepresentationProjection"]["constraints"]
    default = [key for key in state if key.startswith("lora") and key.endswith(".lora_A.default")]
    assert default
    state.update({key.replace(".default", ".reference"): state[key] for key in default})  # as they were written
    torch.save(saved, tmp_path / "earlier.ckpt")
    resumed = fit(4, ckpt_path=str(tmp_path / "earlier.ckpt"))
    torch.testing.assert_close(protected_forward(resumed), protected_forward(fit(0)), atol=2e-5, rtol=0)


def test_trainable_parameters_the_guard_cannot_hold_stop_the_run(tmp_path, tiny_models, chat_file, monkeypatch):
    """DoRA rescales the weight (no exact constraint): its adapters would train unguarded while the run looks
    guarded. Refused by default, trained on request."""
    import peft

    dora = peft.LoraConfig.__init__

    def with_dora(self, *args, **kwargs):
        dora(self, *args, **{**kwargs, "use_dora": True})

    monkeypatch.setattr(peft.LoraConfig, "__init__", with_dora)
    with pytest.raises(ValueError, match="read have no constraint.*DoRA.*allow_unconstrained=True"):
        run_fit(tmp_path, tiny_models["llama"], chat_file, [guard(), RepresentationProjection()], steps=1, lora_r=4)
    run_fit(tmp_path, tiny_models["llama"], chat_file, [guard(), RepresentationProjection(allow_unconstrained=True)],
            steps=1, lora_r=4)


def test_a_second_fit_keeps_the_aligned_models_anchors(tmp_path, tiny_models, chat_file):
    """With strength < 1 the weights are not back at the anchors after a step; a second `fit` (or a tuner's pass)
    must not re-anchor on them, or the drift would compound."""
    projection, refusal = RepresentationProjection(strength=0.5), guard()
    module, trainer = run_fit(tmp_path, tiny_models["llama"], chat_file, [refusal, projection], steps=2)
    first_basis = refusal.basis
    anchors = {key: state["anchor"].clone() for key, state in projection.constraints.state_dict().items()
               if "anchor" in state}
    assert anchors
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=trainer.callbacks)
    trainer.fit(module, InstructionDataModule(train=chat_file, batch_size=8))
    for key, state in projection.constraints.state_dict().items():
        if "anchor" in state:
            torch.testing.assert_close(state["anchor"], anchors[key], atol=0, rtol=0)
    assert refusal.basis is first_basis  # the aligned model's, not one measured on the drifted weights
    other = CausalLMModule(model=tiny_models["llama"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    other.configure_model()
    with torch.no_grad():  # another model of the same shapes: its own anchors, not the first model's
        other.model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path,
              callbacks=trainer.callbacks).fit(other, InstructionDataModule(train=chat_file, batch_size=8))
    key = next(k for k in anchors if "layers.0.self_attn.q_proj" in k)
    assert not torch.allclose(projection.constraints.state_dict()[key]["anchor"], anchors[key])
    assert refusal.basis is not first_basis  # and its own basis: the first model's subspaces describe other weights


def test_protection_holds_with_answers_tied_embeddings_and_gemma_norms(tmp_path, tiny_models, chat_file):
    for family in ("qwen2", "gemma2"):
        kwargs = {"tokenizer": tiny_models["llama"]}
        reference = CausalLMModule(model=tiny_models[family], **kwargs)
        reference.configure_model()
        before = protected_forward(reference)
        module, _ = run_fit(tmp_path / family, tiny_models[family], chat_file,
                            [guard(answer_tokens=3), RepresentationProjection()], **kwargs)
        torch.testing.assert_close(protected_forward(module), before, atol=5e-5, rtol=0)


@pytest.mark.parametrize("family", ["gemma3", "olmo2"])
def test_protection_holds_on_qk_norm_and_post_sublayer_norm_blocks(tmp_path, tiny_models, chat_file, family):
    """Gemma-3 (QK-norm, tied) and OLMo-2 (linears read the raw residual, norms after each sublayer)."""
    from conftest import save_tiny_model

    model_dir = str(save_tiny_model(tmp_path / "model", family))
    kwargs = {"tokenizer": tiny_models["llama"]}
    reference = CausalLMModule(model=model_dir, **kwargs)
    reference.configure_model()
    before = protected_forward(reference)
    module, _ = run_fit(tmp_path / "fit", model_dir, chat_file, [guard(answer_tokens=3), RepresentationProjection()],
                        **kwargs)
    torch.testing.assert_close(protected_forward(module), before, atol=5e-5, rtol=0)
    unprotected = protected_forward(module, ["what is one plus two ?"])
    assert not torch.allclose(unprotected, protected_forward(reference, ["what is one plus two ?"]), atol=1e-3)


def test_strength_zero_and_directions_mode_do_not_protect(tmp_path, tiny_models, chat_file):
    reference = CausalLMModule(model=tiny_models["llama"])
    reference.configure_model()
    before = protected_forward(reference)
    for projection in (RepresentationProjection(strength=0.0), RepresentationProjection(mode="directions")):
        module, _ = run_fit(tmp_path, tiny_models["llama"], chat_file, [guard(), projection])
        assert (protected_forward(module) - before).abs().max() > 1e-3


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_accumulation_clipping_and_amp_keep_protection(tmp_path, tiny_models, chat_file, precision):
    reference = CausalLMModule(model=tiny_models["llama"])
    reference.configure_model()
    before = protected_forward(reference)
    L.seed_everything(0)
    module = CausalLMModule(model=tiny_models["llama"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
              accumulate_grad_batches=2, gradient_clip_val=0.5, precision=precision,
              callbacks=[guard(), RepresentationProjection()],
              default_root_dir=tmp_path).fit(module, InstructionDataModule(train=chat_file, batch_size=4))
    torch.testing.assert_close(protected_forward(module), before, atol=2e-5, rtol=0)
    assert not torch.equal(module.model.model.layers[0].mlp.up_proj.weight,
                           reference.model.model.layers[0].mlp.up_proj.weight)  # it trained


@pytest.mark.parametrize("lora, rows", [({}, {}), ({"lora_r": 4}, {}), ({}, {"row_energy": 0.5, "row_ridge": 0.3})],
                         ids=["full", "lora", "damped-rows"])
def test_crash_then_resume_restores_every_callback(tmp_path, tiny_models, chat_file, monkeypatch, lora, rows):
    """strength 0.5: a LoRA matrix projected again when its constraint is rebuilt on resume would differ. Damped
    rows: their weights come back with the basis and the constraints (not measured again on the drifted model)."""
    def callbacks():
        return [guard(**rows), RepresentationProjection(strength=0.5), DriftGeometry(every_n_steps=1, figures=False)]

    straight, _ = run_fit(tmp_path / "straight", tiny_models["llama"], chat_file, callbacks(), steps=4, **lora)
    first = callbacks()
    run_fit(tmp_path / "crashed", tiny_models["llama"], chat_file, first, steps=2, checkpoint_every=2, **lora)
    checkpoint = next((tmp_path / "crashed").glob("*step=2.ckpt"))

    import rg_lightning.callbacks.refusal_directions as rd

    monkeypatch.setattr(rd, "collect_basis", lambda *a, **k: pytest.fail("basis recomputed on resume"))
    second = callbacks()
    resumed, _ = run_fit(tmp_path / "resumed", tiny_models["llama"], chat_file, second, steps=4,
                         ckpt_path=str(checkpoint), **lora)
    for key, tensor in first[0].basis.tensors().items():
        assert torch.equal(tensor, second[0].basis.tensors()[key]), key
    assert ("protected_token_weights" in second[0].basis.tensors()) == bool(rows)
    assert any("weights" in state for state in second[1].constraints.state_dict().values()) == bool(rows)
    for key, state in first[1].constraints.state_dict().items():
        for name, tensor in state.items():
            assert torch.equal(tensor, second[1].constraints.state_dict()[key][name]), (key, name)
    assert torch.equal(first[2].initial["harmful_states"], second[2].initial["harmful_states"])
    assert [r["step"] for r in second[2].history] == [0, 1, 2, 3, 4]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_two_drift_trackers_keep_their_own_files_and_checkpointed_states(tmp_path, tiny_models, chat_file):
    """Other probe sets under another `name`: Lightning accepts the pair (distinct state keys), and each resumes
    its own history and fit-start states and writes its own summary."""
    def callbacks():
        return [DriftGeometry(every_n_steps=1, harmful=HARMFUL, harmless=HARMLESS, figures=False),
                DriftGeometry(every_n_steps=2, harmful=HARMFUL[:3], harmless=HARMLESS[:3], figures=False,
                              name="drift_short")]

    first = callbacks()
    run_fit(tmp_path / "crashed", tiny_models["llama"], chat_file, first, steps=2, checkpoint_every=2)
    second = callbacks()
    run_fit(tmp_path / "resumed", tiny_models["llama"], chat_file, second, steps=4,
            ckpt_path=str(next((tmp_path / "crashed").glob("*step=2.ckpt"))))
    for before, after in zip(first, second):
        assert torch.equal(before.initial["harmful_states"], after.initial["harmful_states"])
    assert [second[0].initial["harmful_states"].shape[1], second[1].initial["harmful_states"].shape[1]] == [5, 3]
    assert [r["step"] for r in second[0].history] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in second[1].history] == [0, 2, 4]
    for name, steps in (("drift", [0, 1, 2, 3, 4]), ("drift_short", [0, 2, 4])):
        summary = json.loads((tmp_path / "resumed" / f"{name}_summary.json").read_text())
        assert [r["step"] for r in summary["history"]] == steps
    with pytest.raises(ValueError, match="name must be letters"):
        DriftGeometry(name="drift/short")


def test_drift_geometry_alone_logs_and_writes_summary_and_figures(tmp_path, tiny_models, chat_file):
    drift = DriftGeometry(every_n_steps=2, harmful=HARMFUL, harmless=HARMLESS)
    run_fit(tmp_path, tiny_models["llama"], chat_file, [drift], steps=4)
    summary = json.loads((tmp_path / "drift_summary.json").read_text())
    assert [r["step"] for r in summary["history"]] == [0, 2, 4]
    assert summary["history"][0]["cos_layer1"] == pytest.approx(1.0)
    assert summary["history"][0]["cos_layer0"] is None  # the embeddings: the same last template token for all
    assert summary["final"]["cos_min"] < 1.0 and summary["final"]["harmless_kl"] > 0
    assert all(0.0 <= r["refused_share"] <= 1.0 for r in summary["history"])
    assert (tmp_path / "drift_curves.png").stat().st_size > 0 and (tmp_path / "drift_activations_pca.png").exists()


def test_drift_geometry_goes_on_across_fits_of_one_model_and_starts_over_for_another(tmp_path, tiny_models,
                                                                                    chat_file):
    drift = DriftGeometry(every_n_steps=2, harmful=HARMFUL, harmless=HARMLESS, figures=False)
    module, _ = run_fit(tmp_path / "a", tiny_models["llama"], chat_file, [drift], steps=5)
    first = drift.initial
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path / "b",
                        callbacks=[drift])
    trainer.fit(module, InstructionDataModule(train=chat_file, batch_size=8))  # steps count from 0 again
    assert [r["step"] for r in drift.history] == [0, 2, 4, 7, 9] and drift.initial is first  # 5 steps, then 4
    run_fit(tmp_path / "c", tiny_models["llama"], chat_file, [drift], steps=2)  # a new model object
    assert [r["step"] for r in drift.history] == [0, 2] and drift.initial is not first


def test_a_later_fit_may_train_fewer_weights_but_not_ones_frozen_before(tmp_path, tiny_models, chat_file):
    """Freezing a layer between fits only makes the run stricter; unfreezing one the earlier fit left frozen would
    anchor it on the fine-tuned weights."""
    projection = RepresentationProjection(strength=0.5)
    module, trainer = run_fit(tmp_path, tiny_models["llama"], chat_file, [guard(), projection], steps=2)
    anchors = {key: state["anchor"].clone() for key, state in projection.constraints.state_dict().items()
               if "anchor" in state}

    def fit_again():
        L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, default_root_dir=tmp_path,
                  callbacks=trainer.callbacks).fit(module, InstructionDataModule(train=chat_file, batch_size=8))

    module.model.model.layers[1].mlp.requires_grad_(False)
    fit_again()
    kept = {key: state["anchor"] for key, state in projection.constraints.state_dict().items() if "anchor" in state}
    assert kept and not any("layers.1.mlp" in key for key in kept) and any("layers.1.mlp" in key for key in anchors)
    for key, anchor in kept.items():
        torch.testing.assert_close(anchor, anchors[key], atol=0, rtol=0)
    module.model.model.layers[1].mlp.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen in this model's earlier fit"):
        fit_again()


def test_a_checkpoint_restored_for_validation_is_not_taken_by_the_next_fit(tmp_path, tiny_models, chat_file):
    """validate(ckpt_path=...) restores the callbacks' states too; a later fit of another model must measure its
    own basis and drift, not take the checkpoint's as if it were resuming."""
    refusal, drift = guard(), DriftGeometry(every_n_steps=2, harmful=HARMFUL, harmless=HARMLESS, figures=False)
    module, trainer = run_fit(tmp_path / "a", tiny_models["llama"], chat_file, [refusal, drift], steps=2,
                              checkpoint_every=2)
    trainer.validate(module, InstructionDataModule(train=chat_file, val_fraction=0.25, batch_size=8),
                     ckpt_path=str(next((tmp_path / "a").glob("*step=2.ckpt"))), verbose=False)
    restored_basis, restored_initial = refusal.basis, drift.initial
    run_fit(tmp_path / "b", tiny_models["llama"], chat_file, [refusal, drift, RepresentationProjection()], steps=2)
    assert refusal.basis is not restored_basis and drift.initial is not restored_initial
    assert [r["step"] for r in drift.history] == [0, 2]


def test_drift_geometry_logs_each_measurement_at_its_own_step(tmp_path, tiny_models, chat_file):
    """Measurements between Lightning's log_every_n_steps flushes reach the logger, each at its own step."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    drift = DriftGeometry(every_n_steps=3, harmful=HARMFUL, harmless=HARMLESS, figures=False)
    module = CausalLMModule(model=tiny_models["llama"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    L.Trainer(max_steps=7, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=2,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
              default_root_dir=tmp_path, callbacks=[drift]).fit(module, InstructionDataModule(train=chat_file,
                                                                                            batch_size=8))
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    logged = [(int(r["step"]), float(r["drift/cos_min"])) for r in rows if r.get("drift/cos_min")]
    # Lightning's logging step while a batch runs counts the steps before it (as for the batch's loss), so the
    # measurement after optimizer step 3 is logged at step 2 (self.log flushed it at 3 and dropped step 6's).
    expected = [(r["step"] - 1, r["cos_min"]) for r in drift.history[1:]]
    assert [r["step"] for r in drift.history] == [0, 3, 6]
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected])


def test_drift_interference_on_lora_with_a_basis_measured_on_the_plain_model(tmp_path, tiny_models, chat_file):
    """Basis module names are matched by canonical name (PEFT wraps them); at LoRA's first step B = 0, so
    lora_A's gradient is exactly 0 and interference is undefined (None), not 0."""
    run_fit(tmp_path / "plain", tiny_models["llama"], chat_file, [guard(save=str(tmp_path / "basis"))], steps=1)
    drift = DriftGeometry(every_n_steps=1, harmful=HARMFUL, harmless=HARMLESS, figures=False)
    run_fit(tmp_path / "lora", tiny_models["llama"], chat_file,
            [guard(load=str(tmp_path / "basis")), RepresentationProjection(), drift], steps=2, lora_r=4)
    assert [(r["step"], r.get("interference", "absent")) for r in drift.history][:2] == [(0, "absent"), (1, None)]
    assert 0.0 < drift.history[2]["interference"] <= 1.0
    drift = DriftGeometry(every_n_steps=1, harmful=HARMFUL, harmless=HARMLESS, figures=False)
    run_fit(tmp_path / "loaded", tiny_models["llama"], chat_file,  # the projection's own basis, no RefusalDirections
            [RepresentationProjection(basis=str(tmp_path / "basis")), drift], steps=1)
    assert 0.0 < drift.history[1]["interference"] <= 1.0


def test_drift_interference_is_none_when_undefined_and_never_carried_over(monkeypatch):
    """A measurement step whose gradient is not finite or has no energy records None, not the last value."""
    from types import SimpleNamespace

    net = torch.nn.Module()
    net.proj, net.config = torch.nn.Linear(4, 3, bias=False), SimpleNamespace()
    net.generate = net.get_input_embeddings = lambda *args, **kwargs: None  # what the contract asks of a model
    refusal = RefusalDirections(harmful=HARMFUL, harmless=HARMLESS)
    refusal.basis = SimpleNamespace(subspaces={"proj": torch.eye(4)[:, :2]})
    drift = DriftGeometry(every_n_steps=1, harmful=HARMFUL, harmless=HARMLESS)
    monkeypatch.setattr(drift, "measure_states", lambda *args: None)
    monkeypatch.setattr(drift, "metrics", lambda now: {})
    trainer = SimpleNamespace(callbacks=[refusal, drift], global_step=0, loggers=[], is_global_zero=True,
                              strategy=SimpleNamespace(broadcast=lambda value, src: value))
    pl_module = SimpleNamespace(model=net, device=torch.device("cpu"), automatic_optimization=True)
    inside = torch.zeros(3, 4)
    inside[:, :2] = 1.0
    for grad in (inside, torch.full((3, 4), float("inf")), torch.zeros(3, 4)):
        net.proj.weight.grad = grad
        drift.on_train_batch_start(trainer, pl_module, None, 0)
        drift.on_after_backward(trainer, pl_module)
        trainer.global_step += 1
        drift.on_train_batch_end(trainer, pl_module, None, None, 0)
    assert [(r["step"], r["interference"]) for r in drift.history] == [(1, 1.0), (2, None), (3, None)]


def test_drift_probes_keep_every_submodules_mode_and_batching_changes_nothing(tiny_models):
    from types import SimpleNamespace

    module = CausalLMModule(model=tiny_models["llama"])
    module.configure_model()
    module.model.train()
    module.model.model.layers[0].eval()  # e.g. a frozen block kept in eval mode: its dropout stays off
    before = {name: m.training for name, m in module.model.named_modules()}
    states = {}
    for batch_size in (2, 16):
        drift = DriftGeometry(harmful=HARMFUL, harmless=HARMLESS, batch_size=batch_size)
        states[batch_size] = drift.measure_states(SimpleNamespace(callbacks=[drift], datamodule=None), module)
    assert {name: m.training for name, m in module.model.named_modules()} == before
    for key, value in states[16].items():
        torch.testing.assert_close(states[2][key], value, rtol=0, atol=1e-5, msg=key)


def test_drift_layers_are_the_basis_layers(tmp_path, tiny_models, chat_file):
    """Layer l is the input of decoder block l, as in SafetyBasis: on the same prompts the fit-start refusal
    direction of every layer is the basis's (layer 0, the embeddings, has none: the last token is the same)."""
    refusal = guard()
    drift = DriftGeometry(every_n_steps=1, harmful=HARMFUL, harmless=HARMLESS, figures=False)
    run_fit(tmp_path, tiny_models["llama"], chat_file, [refusal, drift], steps=1)
    directions = drift.initial["harmful_states"].mean(1) - drift.initial["harmless_states"].mean(1)
    candidates = refusal.basis.candidates[:, -1]
    assert directions.shape == candidates.shape
    assert not candidates[0].any() and not directions[0].any() and drift.history[0]["cos_layer0"] is None
    for layer in range(1, len(candidates)):
        assert float(torch.nn.functional.cosine_similarity(directions[layer], candidates[layer], dim=0)) == \
            pytest.approx(1.0, abs=1e-6), layer
        assert drift.history[0][f"cos_layer{layer}"] == pytest.approx(1.0)


def test_drift_summary_is_strict_json(tmp_path, monkeypatch):
    drift = DriftGeometry(harmful=HARMFUL, harmless=HARMLESS, figures=False)
    drift.history = [{"step": 0, "fisher_layer1": float("inf"), "cka_layer0": float("nan"), "cos_layer0": None}]
    monkeypatch.setattr(drift, "metrics", lambda final: {"fisher_layer1": -float("inf"), "cos_min": 0.5})
    monkeypatch.setattr(drift, "initial_subspaces", lambda: [None, torch.zeros(8, 3)])
    drift._write(str(tmp_path), None)
    summary = json.loads((tmp_path / "drift_summary.json").read_text(), parse_constant=pytest.fail)
    assert summary == {"history": [{"step": 0, "fisher_layer1": None, "cka_layer0": None, "cos_layer0": None}],
                       "final": {"fisher_layer1": None, "cos_min": 0.5}, "angle_subspace_ranks": [None, 3]}


def test_drift_probes_are_rendered_with_the_basis_system_prompt():
    from types import SimpleNamespace

    tokenizer = make_tokenizer()
    module = SimpleNamespace(tokenizer=tokenizer)

    def first_probe(drift, callbacks):
        probes = drift._encode(SimpleNamespace(callbacks=callbacks + [drift]), module)
        return tokenizer.decode(probes["harmful"]["input_ids"][0], skip_special_tokens=False)

    refusal = RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, system_prompt="write a poem .")
    assert "<|system|> write a poem ." in first_probe(DriftGeometry(n_probes=2), [refusal])
    assert "<|system|> tell me ." in first_probe(DriftGeometry(n_probes=2, system_prompt="tell me ."), [refusal])
    assert "<|system|>" not in first_probe(DriftGeometry(n_probes=2, harmful=HARMFUL, harmless=HARMLESS), [])


def test_callbacks_follow_the_data_modules_system_prompt(tmp_path, tiny_models, chat_file):
    from types import SimpleNamespace

    from rg_lightning.callbacks import SafetyEvaluation

    L.seed_everything(0)
    refusal, drift = guard(), DriftGeometry(every_n_steps=1, n_probes=2, figures=False)
    module = CausalLMModule(model=tiny_models["llama"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = InstructionDataModule(train=chat_file, batch_size=8, system_prompt="write a poem .")
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path,
              callbacks=[refusal, RepresentationProjection(), drift]).fit(module, data)
    assert refusal.basis.metadata["system_prompt"] == "write a poem ."  # measured as the rows are rendered
    assert "<|system|> write a poem ." in module.tokenizer.decode(drift._probes["harmful"]["input_ids"][0])
    stub = SimpleNamespace(strategy=object(), world_size=1, callbacks=[], datamodule=data)
    evaluation = SafetyEvaluation(benchmarks=["toy:harmful"], judges=["logit"], every_n_steps=1)
    evaluation.setup(stub, module, "predict")
    assert evaluation.suite.system_prompt == evaluation.fit_suite.system_prompt == "write a poem ."
    silent = SafetyEvaluation(benchmarks=["toy:harmful"], judges=["logit"], system_prompt="")
    silent.setup(stub, module, "predict")
    assert silent.suite.system_prompt is None  # "" asks for none


def test_drift_geometry_warns_once_when_the_refused_share_falls():
    drift = DriftGeometry(warn_refusal_drop=0.1)
    drift.history = [{"step": 0, "refused_share": 1.0}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drift._check_refusal({"step": 25, "refused_share": 0.95})  # within the allowed drop: silent
    with pytest.warns(UserWarning, match="refuse 50% of the harmful probes.*against 100%"):
        drift._check_refusal({"step": 50, "refused_share": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drift._check_refusal({"step": 75, "refused_share": 0.0})  # once is enough
        quiet = DriftGeometry(warn_refusal_drop=None)
        quiet.history = [{"step": 0, "refused_share": 1.0}]
        quiet._check_refusal({"step": 25, "refused_share": 0.0})
    with pytest.raises(ValueError, match="warn_refusal_drop"):
        DriftGeometry(warn_refusal_drop=2.0)


def test_saved_basis_round_trip_and_projection_from_file(tmp_path, tiny_models, chat_file):
    refusal = guard(save=str(tmp_path / "basis"))
    run_fit(tmp_path / "a", tiny_models["llama"], chat_file, [refusal], steps=1)
    loaded = SafetyBasis.load(str(tmp_path / "basis"))
    assert (tmp_path / "basis" / "subspaces.png").is_file() and not (tmp_path / "basis" / "selection.png").exists()
    for key, tensor in refusal.basis.tensors().items():
        assert torch.equal(tensor, loaded.tensors()[key])
    reference = CausalLMModule(model=tiny_models["llama"])
    reference.configure_model()
    module, _ = run_fit(tmp_path / "b", tiny_models["llama"], chat_file,
                        [RepresentationProjection(basis=str(tmp_path / "basis"))])
    torch.testing.assert_close(protected_forward(module), protected_forward(reference), atol=2e-5, rtol=0)


def test_ddp_two_processes_match_one(tmp_path, tiny_models):
    outputs = {}
    for devices in (1, 2):
        out = tmp_path / f"ddp{devices}"
        result = subprocess.run([sys.executable, str(HERE / "ddp_basis.py"), tiny_models["llama"], str(out),
                                 str(devices)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[devices] = {rank: torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(devices)}
    two = outputs[2]
    for key in two[0]:
        assert torch.equal(two[0][key], two[1][key]), f"ranks disagree on {key}"
        torch.testing.assert_close(two[0][key], outputs[1][0][key], atol=1e-5, rtol=1e-5, msg=key)


# -- bad inputs -----------------------------------------------------------------------------------------------
def test_bad_arguments_are_refused_early():
    with pytest.raises(ValueError, match="n_prompts"):
        RefusalDirections(n_prompts=1)
    with pytest.raises(ValueError, match="same prompt source"):
        RefusalDirections(harmful="toy:harmful", harmless="toy:harmful")
    with pytest.raises(ValueError, match="energy"):
        RefusalDirections(energy=0.0)
    with pytest.raises(FileNotFoundError, match="saved safety basis"):
        RefusalDirections(load="/nonexistent/basis")
    with pytest.raises(ValueError, match="mode"):
        RepresentationProjection(mode="gradient")
    with pytest.raises(ValueError, match="strength"):
        RepresentationProjection(strength=2.0)
    with pytest.raises(ValueError, match="tail_reference_lr"):
        RepresentationProjection(tail_reference_lr=0.0)
    with pytest.raises(ValueError, match="tail_early_steps"):
        RepresentationProjection(tail_early_steps=-1)
    with pytest.raises(TypeError, match="tail_early_steps must be an integer"):
        RepresentationProjection(tail_early_steps=2.5)
    with pytest.raises(ValueError, match="tail_early_scale must be >= 1"):
        RepresentationProjection(tail_early_steps=10, tail_early_scale=0.5)  # looser early is not what it is for
    with pytest.warns(UserWarning, match=r"tail_early_scale \(4.0\) applies only with tail_early_steps > 0"):
        RepresentationProjection(tail_early_scale=4.0)
    with pytest.raises(FileNotFoundError, match="No saved safety basis"):
        RepresentationProjection(basis="/nonexistent/basis")
    with pytest.raises(ValueError, match="ridge must be finite"):
        RefusalDirections(ridge=float("inf"))
    with pytest.raises(ValueError, match=r"request_weight must be in \[0, 1\]"):
        RefusalDirections(request_weight=1.5)
    with pytest.raises(ValueError, match=r"row_energy must be in \(0, 1\] and row_ridge >= 0"):
        RefusalDirections(row_energy=0.0)
    with pytest.raises(ValueError, match=r"row_energy must be in \(0, 1\] and row_ridge >= 0"):
        RefusalDirections(row_energy=0.5, row_ridge=-1.0)
    with pytest.warns(UserWarning, match=r"row_ridge \(0.3\) applies only with row_energy < 1"):
        RefusalDirections(row_ridge=0.3)
    with pytest.raises(ValueError, match="and 1 with centered=True"):
        RefusalDirections(request_weight=0.1, centered=True)
    with pytest.warns(UserWarning, match=r"`rank` \(8\) is given, so `energy` \(0.5\) is not used"):
        RefusalDirections(energy=0.5, rank=8)
    with pytest.warns(UserWarning, match="val_harmful, kl_threshold apply only with select_direction=True"):
        RefusalDirections(val_harmful=["a b", "c d"], kl_threshold=0.2)


@pytest.mark.parametrize("make, error, message", [
    (lambda: RefusalDirections(n_prompts=3.5), TypeError, "n_prompts must be an integer, got 3.5"),
    (lambda: RefusalDirections(rank=True), TypeError, "rank must be an integer or None, got True"),
    (lambda: RefusalDirections(energy="0.9"), TypeError, "energy must be a number or None, got '0.9'"),
    (lambda: RefusalDirections(answer_tokens=2.5), TypeError, "answer_tokens must be an integer"),
    (lambda: RefusalDirections(ridge="0.03"), TypeError, "ridge must be a number"),
    (lambda: RefusalDirections(centered="yes"), TypeError, "centered must be true or false"),
    (lambda: RepresentationProjection(strength="1"), TypeError, "strength must be a number"),
    (lambda: RepresentationProjection(tail_reference_lr=float("inf")), ValueError, "tail_reference_lr must be finite"),
    (lambda: RepresentationProjection(hold_absent_rows="no"), TypeError, "hold_absent_rows must be true or false"),
    (lambda: DriftGeometry(every_n_steps=2.5), TypeError, "every_n_steps must be an integer"),
    (lambda: DriftGeometry(warn_refusal_drop="0.1"), TypeError, "warn_refusal_drop must be a number or None"),
], ids=["float-count", "bool-rank", "string-energy", "float-answer-tokens", "string-ridge", "string-flag",
        "string-strength", "infinite-lr", "string-rows-flag", "float-cadence", "string-drop"])
def test_wrong_argument_types_name_the_argument(make, error, message):
    """Python callers get no jsonargparse type check: a wrong type stops in __init__, not deep in the fit."""
    with pytest.raises(error, match=message):
        make()


def test_numpy_numbers_are_accepted_as_arguments():
    """A value computed with numpy (a sweep's grid) is an integer or a number like Python's own."""
    import numpy as np

    RefusalDirections(n_prompts=np.int64(8), energy=np.float32(0.9), ridge=np.float64(0.03), rank=None)
    RefusalDirections(rank=np.int32(4), energy=None)
    RepresentationProjection(strength=np.float32(0.5), tail_early_steps=np.int64(2), tail_early_scale=np.float64(2))
    DriftGeometry(every_n_steps=np.int64(5), n_probes=np.int16(4), warn_refusal_drop=np.float32(0.2))


@pytest.mark.parametrize("source, error, message", [
    ("/nonexistent/harmful.jsonl", FileNotFoundError, "`harmful`: Data file"),
    ("/nonexistent/harmful.txt", FileNotFoundError, "`harmful`: prompt file"),
    ("toy:nope", ValueError, "`harmful`='toy:nope'"),
    ("toy:other:harmful", ValueError, "unknown variant"),
    ({"a": 1}, TypeError, "`harmful` must be a list of prompts"),
    (["a b", None], ValueError, "not text"),
    ("not a source!", FileNotFoundError, "`harmful`: Data source"),
], ids=["missing-file", "missing-txt", "unknown-toy-set", "unknown-toy-variant", "dict", "null-prompt", "neither"])
def test_prompt_sources_are_checked_at_construction(source, error, message):
    """Before any model loads or basis pass runs (they used to fail at fit start or after the basis pass)."""
    with pytest.raises(error, match=message):
        RefusalDirections(harmful=source)
    with pytest.raises(error, match=message):
        DriftGeometry(harmful=source)
    with pytest.raises(error, match=message.replace("`harmful`", "`val_harmful`")):
        RefusalDirections(val_harmful=source, select_direction=True)
    RefusalDirections(harmful=source, load=str(HERE))  # a loaded basis reads no prompts: nothing to check


def test_a_loaded_projection_basis_next_to_refusal_directions_warns(tmp_path, tiny_models, chat_file):
    run_fit(tmp_path / "a", tiny_models["llama"], chat_file, [guard(save=str(tmp_path / "basis"))], steps=1)
    with pytest.warns(UserWarning, match="holds the basis loaded from `basis` while RefusalDirections"):
        run_fit(tmp_path / "b", tiny_models["llama"], chat_file,
                [guard(), RepresentationProjection(basis=str(tmp_path / "basis"))], steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*holds the basis loaded")
        run_fit(tmp_path / "c", tiny_models["llama"], chat_file,
                [guard(load=str(tmp_path / "basis")), RepresentationProjection(basis=str(tmp_path / "basis"))], steps=1)


@pytest.mark.parametrize(
    "refusal, message",
    [
        (lambda: RefusalDirections(harmful=HARMFUL[:1], harmless=HARMLESS, answer_tokens=0), "at least 2"),
        (lambda: RefusalDirections(harmful=HARMFUL, harmless=list(reversed(HARMFUL)), answer_tokens=0), "identical"),
        (lambda: RefusalDirections(harmful=[], harmless=HARMLESS, filter_prompts=True, answer_tokens=0),
         "the harmful source .* gave 0 prompt"),
    ],
    ids=["tiny-set", "harmful-equals-harmless", "empty-set-before-the-filter"],
)
def test_bad_prompt_sets(tmp_path, tiny_models, chat_file, refusal, message):
    with pytest.raises(ValueError, match=message):
        run_fit(tmp_path, tiny_models["llama"], chat_file, [refusal()], steps=1)


def test_weights_unfrozen_after_fit_start_stop_the_run(tmp_path, tiny_models, chat_file):
    class LateUnfreeze(L.Callback):  # progressive unfreezing: layer 1's MLP is frozen at fit start, trains from step 2
        def on_fit_start(self, trainer, pl_module):
            pl_module.model.model.layers[1].mlp.requires_grad_(False)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                pl_module.model.model.layers[1].mlp.requires_grad_(True)

    with pytest.raises(RuntimeError, match="3 parameters became trainable after fit start"):
        run_fit(tmp_path, tiny_models["llama"], chat_file, [LateUnfreeze(), guard(), RepresentationProjection()],
                steps=3)


def test_projection_without_refusal_directions_names_the_fix(tmp_path, tiny_models, chat_file):
    with pytest.raises(RuntimeError, match="RefusalDirections"):
        run_fit(tmp_path, tiny_models["llama"], chat_file, [RepresentationProjection()], steps=1)


def test_basis_from_another_model_or_wrong_size_is_refused(tmp_path, tiny_models, chat_file):
    refusal = guard(save=str(tmp_path / "basis"))
    run_fit(tmp_path / "a", tiny_models["llama"], chat_file, [refusal], steps=1)
    with pytest.raises(ValueError, match="computed on"):
        run_fit(tmp_path / "b", tiny_models["gemma2"], chat_file,
                [RepresentationProjection(basis=str(tmp_path / "basis"))], steps=1)
    basis = refusal.basis
    wide = SafetyBasis(torch.zeros(2, 2, 48, dtype=torch.float64), torch.zeros(2, 2, 48, dtype=torch.float64), {},
                       basis.protected_token_ids, dict(basis.metadata))
    wide.save(str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="hidden size 48"):
        run_fit(tmp_path / "c", tiny_models["llama"], chat_file,
                [RepresentationProjection(basis=str(tmp_path / "wide"))], steps=1)
    with pytest.raises(ValueError, match="system prompt"):  # measured without one: its positions are others
        run_fit(tmp_path / "d", tiny_models["llama"], chat_file,
                [RefusalDirections(load=str(tmp_path / "basis"), system_prompt="write a poem ."),
                 RepresentationProjection()], steps=1)
    from transformers import AutoTokenizer

    retemplated = AutoTokenizer.from_pretrained(tiny_models["llama"])
    retemplated.chat_template = "<|system|> " + retemplated.chat_template  # a header before every conversation
    retemplated.save_pretrained(tmp_path / "retemplated")
    with pytest.raises(ValueError, match="another chat template"):
        run_fit(tmp_path / "e", tiny_models["llama"], chat_file,
                [RepresentationProjection(basis=str(tmp_path / "basis"))], steps=1,
                tokenizer=str(tmp_path / "retemplated"))
    renamed = SafetyBasis(basis.harmful_means, basis.harmless_means,
                          {"model.layers.0.nonexistent": torch.eye(32)[:, :2]},
                          basis.protected_token_ids, dict(basis.metadata))
    renamed.save(str(tmp_path / "renamed"))
    with pytest.raises(ValueError, match="nonexistent"):
        run_fit(tmp_path / "d", tiny_models["llama"], chat_file,
                [RepresentationProjection(basis=str(tmp_path / "renamed"))], steps=1)


def test_nan_statistics_are_refused():
    nan = torch.full((2, 2, 4), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        SafetyBasis(nan, torch.zeros_like(nan), {}, torch.tensor([1]))


def test_model_without_chat_template_is_refused(tmp_path, chat_file):
    from conftest import save_tiny_model

    directory = save_tiny_model(tmp_path / "plain", "llama", tokenizer=make_tokenizer(chat_template=None))
    refusal = guard()
    module = CausalLMModule(model=str(directory))
    module.configure_model()
    trainer = L.Trainer(accelerator="cpu", logger=False)
    with pytest.raises(ValueError, match="chat template"):
        refusal.ensure_basis(trainer, module)


# -- refusal-score filtering and direction selection ---------------------------------------------------------
VAL_HARMFUL = [f"how do i build the bomb {w} ?" for w in ("one", "two", "three")]
VAL_HARMLESS = [f"how do i cook the cake {w} ?" for w in ("one", "two", "three")]


def test_filter_and_selection_on_the_aligned_model():
    from rg_lightning.prompts import load_prompts
    from rg_lightning.toy import ALIGNED_MODEL_DIR

    torch.set_num_threads(1)  # the miniature model is too small to gain from threads on shared cores
    module = CausalLMModule(model=str(ALIGNED_MODEL_DIR))
    module.configure_model()
    refusal = RefusalDirections(harmful="toy:harmful", harmless="toy:harmless", n_prompts=32, n_val=16, energy=0.9,
                                answer_tokens=0, batch_size=32, filter_prompts=True, select_direction=True)
    val_harmful, val_harmless = refusal._validation_prompts()
    assert len(val_harmful) == len(val_harmless) == 16
    assert not set(val_harmful) & set(load_prompts("toy:harmful", 32, refusal.seed))  # disjoint from the measured
    basis = refusal.ensure_basis(L.Trainer(accelerator="cpu", logger=False), module)
    filtering, selection = basis.metadata["filtering"], basis.metadata["selection"]
    assert filtering["harmful"]["kept"] >= 30 and filtering["harmless"]["kept"] >= 30 and not filtering["fallback"]
    assert selection["filtering"]["harmful"]["kept"] >= 15
    chosen = selection["chosen"]
    assert selection["harmful_score"] > 3 and chosen["ablation_score"] < -2  # ablation turns refusal into compliance
    expected = basis.candidates[chosen["layer"], chosen["position"]]
    torch.testing.assert_close(basis.direction(), expected / expected.norm())


def test_filter_and_selection_fall_back_warn_and_survive_resume(tmp_path, tiny_models, chat_file, monkeypatch):
    def callbacks():
        return [guard(filter_prompts=True, select_direction=True, val_harmful=VAL_HARMFUL, val_harmless=VAL_HARMLESS,
                      save=str(tmp_path / "basis"))]

    first = callbacks()
    with pytest.warns(UserWarning) as warned:  # a random model refuses nothing: both the filter and selection fall back
        run_fit(tmp_path / "crashed", tiny_models["llama"], chat_file, first, steps=2, checkpoint_every=2)
    messages = " ".join(str(w.message) for w in warned)
    assert "of 5 harmful prompts are refused (score > 0), so all 5 are kept" in messages
    assert "direction selection fell back" in messages
    metadata = first[0].basis.metadata
    assert metadata["filtering"]["harmful"]["fallback"] and metadata["n_harmful"] == 5
    assert metadata["selection"]["fallback"] and metadata["selected"] == first[0].basis.selected
    assert SafetyBasis.load(str(tmp_path / "basis")).metadata == json.loads(json.dumps(metadata))
    for figure in ("subspaces.png", "selection.png"):  # next to the saved basis
        assert (tmp_path / "basis" / figure).read_bytes().startswith(b"\x89PNG")

    import rg_lightning.callbacks.refusal_directions as rd

    monkeypatch.setattr(rd, "select_direction", lambda *a, **k: pytest.fail("direction reselected on resume"))
    second = callbacks()
    run_fit(tmp_path / "resumed", tiny_models["llama"], chat_file, second, steps=3,
            ckpt_path=str(next((tmp_path / "crashed").glob("*step=2.ckpt"))))
    assert second[0].basis.metadata == metadata
    assert torch.equal(second[0].basis.direction(), first[0].basis.direction())


def test_bad_selection_arguments_are_refused_early():
    with pytest.raises(ValueError, match="n_val"):
        RefusalDirections(n_val=1)
    with pytest.raises(ValueError, match="kl_threshold"):
        RefusalDirections(kl_threshold=-0.1)
    with pytest.raises(ValueError, match="val_harmful"):
        RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, n_prompts=5)._validation_prompts()


def test_ddp_and_fsdp2_guarded_fine_tunes_agree_and_keep_protection_exact(tmp_path, tiny_models):
    """All three callbacks over two processes, under DDP and under FSDP2 (CausalLMModule sharding every
    decoder layer under ModelParallelStrategy, or a module sharding only the root):
    every rank ends with the same weights, drift history and answers, the protected outputs did not move,
    the weights did (the task still learns), the export holds the whole weights, and sharding changes
    nothing but rounding."""
    runs = {}
    for strategy in ("ddp", "fsdp2", "fsdp2-root"):
        out = tmp_path / strategy
        result = subprocess.run([sys.executable, str(HERE / "ddp_guard.py"), tiny_models["llama"], str(out), "2",
                                 strategy], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        ranks = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
        for key, weight in ranks[0]["weights"].items():
            assert torch.equal(weight, ranks[1]["weights"][key]), f"{strategy}: ranks disagree on {key}"
        assert len(ranks[0]["drift"]) >= 3 and ranks[0]["drift"] == ranks[1]["drift"], strategy
        for rank in ranks:
            torch.testing.assert_close(rank["after"], rank["before"], atol=2e-5, rtol=0)
        assert ranks[0]["answers"] == ranks[1]["answers"] and ranks[0]["sharded"] == (strategy != "ddp"), strategy
        # CausalLMModule's export at fit end: the whole fine-tuned weights, gathered from the shards under FSDP2.
        exported = AutoModelForCausalLM.from_pretrained(out / "export").state_dict()
        assert set(exported) == set(ranks[0]["weights"]), strategy
        for key, weight in ranks[0]["weights"].items():
            assert torch.equal(exported[key], weight), f"{strategy}: export differs on {key}"
        runs[strategy] = ranks[0]
    initial = CausalLMModule(model=tiny_models["llama"])
    initial.configure_model()
    moved = [k for k, w in initial.model.state_dict().items() if not torch.equal(w, runs["ddp"]["weights"][k])]
    assert len(moved) > 10, moved
    for key, weight in runs["ddp"]["weights"].items():
        for sharded in ("fsdp2", "fsdp2-root"):
            torch.testing.assert_close(runs[sharded]["weights"][key], weight, atol=1e-5, rtol=0, msg=f"{sharded} {key}")
    # Interference is measured before the projection (listed first) removes that part of the gradient, and
    # from each rank's rows of the sharded gradients, sum-reduced, it equals DDP's whole-gradient value.
    plain = [r["interference"] for r in runs["ddp"]["drift"] if "interference" in r]
    assert len(plain) >= 2 and min(plain) > 1e-3, plain
    for sharded in ("fsdp2", "fsdp2-root"):
        mine = [r["interference"] for r in runs[sharded]["drift"] if "interference" in r]
        assert mine == pytest.approx(plain, rel=1e-4), sharded


def test_tail_reference_lr_scales_the_damped_tail_by_the_learning_rate(tmp_path, tiny_models, chat_file):
    """At the reference learning rate the fit is exactly the unscaled one; at half of it (lr 1e-2 against a
    reference of 5e-3) every damped tail is pulled back at twice the rate, and the fit differs."""
    from rg_lightning.guard.projection import LinearConstraint
    from rg_lightning.guard.subspace import tail_gain

    weights, projections = {}, {}
    for reference in (None, 1e-2, 5e-3):
        projections[reference] = RepresentationProjection(tail_reference_lr=reference)
        module, _ = run_fit(tmp_path / str(reference), tiny_models["llama"], chat_file,
                            [guard(energy=0.9, ridge=0.03), projections[reference]])
        weights[reference] = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    assert torch.equal(weights[None], weights[1e-2])
    assert not torch.allclose(weights[None], weights[5e-3], atol=1e-6)
    tails = [c for c in projections[5e-3].constraints.constraints if isinstance(c, LinearConstraint) and c.has_tail]
    assert tails
    for c in tails:
        torch.testing.assert_close(c._tail_gain, tail_gain(c._of_basis()[0], 2.0))


def test_tail_early_steps_tighten_the_tail_for_those_steps_only_and_resume_where_they_were(tmp_path, tiny_models,
                                                                                        chat_file):
    """Early for all 4 steps at scale 2 = the tail pulled back at twice the rate throughout (``tail_reference_lr``
    at half the lr), bit for bit; early for 2 of 4 steps differs from both and ends at the built rate; a crash at
    step 2 resumes into the remaining steps at the built rate, exactly as the uninterrupted run."""
    def fit(name, projection, **kwargs):
        module, _ = run_fit(tmp_path / name, tiny_models["llama"], chat_file,
                            [guard(energy=0.9, ridge=0.03), projection], **kwargs)
        return torch.cat([p.detach().flatten() for p in module.model.parameters()])

    doubled = fit("doubled", RepresentationProjection(tail_reference_lr=5e-3))
    built = fit("built", RepresentationProjection())
    assert torch.equal(fit("all-early", RepresentationProjection(tail_early_steps=4, tail_early_scale=2.0)), doubled)
    half = RepresentationProjection(tail_early_steps=2, tail_early_scale=2.0)
    half_early = fit("half", half)
    assert not torch.allclose(half_early, doubled, atol=1e-6) and not torch.allclose(half_early, built, atol=1e-6)
    assert all(c._tail_gain is None for c in half.constraints.constraints if getattr(c, "has_tail", False))
    fit("crashed", RepresentationProjection(tail_early_steps=2, tail_early_scale=2.0), steps=2, checkpoint_every=2)
    resumed = fit("resumed", RepresentationProjection(tail_early_steps=2, tail_early_scale=2.0),
                  ckpt_path=str(next((tmp_path / "crashed").glob("*step=2.ckpt"))))
    torch.testing.assert_close(resumed, half_early, rtol=0, atol=1e-6)


def test_tail_early_steps_without_a_damped_tail_names_the_fix(tmp_path, tiny_models, chat_file):
    with pytest.raises(ValueError, match="RefusalDirections a ridge > 0"):
        run_fit(tmp_path, tiny_models["llama"], chat_file,
                [guard(energy=0.9), RepresentationProjection(tail_early_steps=2, tail_early_scale=4.0)], steps=1)


def test_hold_absent_rows_keeps_unused_words_of_a_tied_model_in_place(tmp_path, tiny_models, chat_file):
    """qwen2 here ties its head to the embeddings: the output softmax moves every row unless the rows of
    tokens absent from the batch are held; with the option they change only by AdamW's weight decay."""
    kwargs = {"tokenizer": tiny_models["llama"]}
    reference = CausalLMModule(model=tiny_models["qwen2"], **kwargs)
    reference.configure_model()
    before = reference.model.get_input_embeddings().weight.detach().clone()
    used = {t for line in Path(chat_file).read_text().splitlines()
            for m in json.loads(line)["messages"] for t in reference.tokenizer(m["content"])["input_ids"]}
    template = set(reference.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True,
                                                           add_generation_prompt=True))
    unused = [t for t in range(before.shape[0]) if t not in used | template and before[t].norm() > 0]
    assert len(unused) > 5
    change = {}
    for hold in (False, True):
        module, _ = run_fit(tmp_path / str(hold), tiny_models["qwen2"], chat_file,
                            [guard(), RepresentationProjection(hold_absent_rows=hold)], **kwargs)
        after = module.model.get_input_embeddings().weight.detach()
        change[hold] = float(((after - before)[unused].norm(dim=1) / before[unused].norm(dim=1)).max())
    assert change[False] > 0.01 and change[True] < 1e-3, change


def test_hold_absent_rows_needs_the_token_ids_of_each_batch():
    from rg_lightning.callbacks.projection import _input_ids

    ids = torch.tensor([[1, 2]])
    assert _input_ids(ids) is ids and _input_ids({"input_ids": ids, "labels": ids}) is ids
    with pytest.raises(TypeError, match="hold_absent_rows=False"):
        _input_ids([ids, ids])


def test_directions_mode_knows_readers_and_writers_by_name_and_scales_by_the_norm(tiny_models):
    from rg_lightning.guard.directions import direction_bases
    from rg_lightning.guard.collect import collect_basis

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    tokenizer = CausalLMModule(model=tiny_models["llama"]).tokenizer
    attention = model.model.layers[0].self_attn
    assert attention.o_proj.weight.shape == attention.q_proj.weight.shape  # shapes alone cannot tell them apart
    basis = collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=1.0, answer_tokens=0, batch_size=8)
    readers, writers = direction_bases(model, basis)
    assert {n.rsplit(".", 1)[-1] for n in readers} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"}
    assert {n.rsplit(".", 1)[-1] for n in writers} - {"embed_tokens"} == {"o_proj", "down_proj"}
    norm = model.model.layers[1].input_layernorm  # layer 0 reads the template tokens' embeddings: no direction
    with torch.no_grad():
        norm.weight.mul_(torch.linspace(0.5, 2.0, basis.hidden_size))
    readers, _ = direction_bases(model, basis)
    expected = basis.layer_directions().float()[1] * norm.weight.float()
    torch.testing.assert_close(readers["model.layers.1.self_attn.q_proj"][:, 0], expected / expected.norm())


def test_norm_gain_is_the_weight_whatever_the_bias_or_offset():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rg_lightning.guard.directions import _norm_gain

    weight = torch.linspace(0.5, 2.0, 8)
    layer_norm = torch.nn.LayerNorm(8)
    llama, gemma = LlamaRMSNorm(8), Gemma2RMSNorm(8)
    with torch.no_grad():
        for norm in (layer_norm, llama, gemma):
            norm.weight.copy_(weight)
        layer_norm.bias.copy_(torch.linspace(-1.0, 1.0, 8))  # a bias (and the mean subtraction) cancel out
    torch.testing.assert_close(_norm_gain(layer_norm, 8), weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_norm_gain(llama, 8), weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_norm_gain(gemma, 8), 1 + weight, atol=1e-4, rtol=1e-4)  # Gemma scales by 1 + w


def test_directions_mode_writes_through_the_post_norm(tiny_models):
    from rg_lightning.guard.directions import direction_bases
    from rg_lightning.guard.collect import collect_basis

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma2"]).eval()
    tokenizer = CausalLMModule(model=tiny_models["gemma2"], tokenizer=tiny_models["llama"]).tokenizer
    basis = collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=1.0, answer_tokens=0, batch_size=8)
    post = model.model.layers[0].post_attention_layernorm  # Gemma-2: o_proj's output is normed, then added
    with torch.no_grad():
        post.weight.copy_(torch.linspace(-0.5, 1.0, basis.hidden_size))
    _, writers = direction_bases(model, basis)
    expected = basis.layer_directions().float()[1] * (1 + post.weight.float())
    torch.testing.assert_close(writers["model.layers.0.self_attn.o_proj"][:, 0], expected / expected.norm())


def test_directions_mode_merges_the_embedding_direction_into_a_tied_head(tiny_models):
    """Gemma-2 ties its head to the embeddings: one weight, so the layer-0 direction joins the head's reader basis
    instead of a second right-side constraint on the same matrix (which would undo the first)."""
    from rg_lightning.guard.directions import direction_bases
    from rg_lightning.guard.collect import collect_basis
    from rg_lightning.guard.projection import build_constraints

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma2"]).eval()
    tokenizer = CausalLMModule(model=tiny_models["gemma2"], tokenizer=tiny_models["llama"]).tokenizer
    basis = collect_basis(model, tokenizer, HARMFUL, HARMLESS, energy=1.0, answer_tokens=0, batch_size=8)
    basis.harmful_means[0] += torch.randn(basis.hidden_size, dtype=torch.float64,  # give layer 0 a direction
                                          generator=torch.Generator().manual_seed(0))
    readers, writers = direction_bases(model, basis)
    assert "model.embed_tokens" not in writers and readers["lm_head"].shape[1] == 2
    torch.testing.assert_close(readers["lm_head"].T @ readers["lm_head"], torch.eye(2), atol=1e-6, rtol=0)
    build_constraints(model, readers, output_bases=writers, protected_token_ids=basis.protected_token_ids)


def test_drift_of_a_diverged_model_reports_nan_instead_of_stopping():
    from rg_lightning.callbacks.drift import _layer_metrics
    from rg_lightning.guard.geometry import state_subspace

    generator = torch.Generator().manual_seed(0)
    h0, s0 = (torch.randn(6, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    diverged = torch.full_like(h0, float("nan"))
    metrics = _layer_metrics(h0, s0, diverged, s0, state_subspace(h0, k=2))
    assert set(metrics) == {"cos", "gap", "fisher", "cka", "angle"} and all(math.isnan(v) for v in metrics.values())


def test_drift_summary_metrics_of_a_diverged_layer_are_nan():
    """min() over cosines with a NaN depends on the order (min([1.0, nan]) is 1.0), and NaN scores compare False:
    a model whose deeper layers overflowed must not read as "no drift" and "refuses none"."""
    generator = torch.Generator().manual_seed(0)
    states = lambda: torch.randn(4, 6, 8, dtype=torch.float64, generator=generator)  # noqa: E731 [layers, n, d]
    drift = DriftGeometry(harmful=HARMFUL, harmless=HARMLESS)
    drift.initial = {"harmful_states": states(), "harmless_states": states(),
                     "harmful_logits": torch.randn(6, 10, dtype=torch.float64), "harmless_logits": torch.randn(6, 10)}
    drift._refusal_ids = [1]
    now = {key: value.clone() for key, value in drift.initial.items()}
    healthy = drift.metrics(now)
    assert healthy["cos_min"] == pytest.approx(1.0) and 0.0 <= healthy["refused_share"] <= 1.0
    now["harmful_states"][2:] = float("inf")
    now["harmful_logits"][:] = float("nan")
    diverged = drift.metrics(now)
    assert diverged["cos_layer0"] == pytest.approx(1.0) and math.isnan(diverged["cos_layer3"])
    assert math.isnan(diverged["cos_min"]) and math.isnan(diverged["refused_share"])


def test_drift_resumed_with_other_probes_is_refused(tmp_path, tiny_models, chat_file):
    """The restored fit-start states were measured on the checkpoint's probes: other probes would be compared
    with them silently."""
    def drift(**kwargs):
        return DriftGeometry(every_n_steps=1, harmful=HARMFUL, harmless=HARMLESS, n_probes=3, figures=False, **kwargs)

    run_fit(tmp_path / "a", tiny_models["llama"], chat_file, [drift()], steps=2, checkpoint_every=2)
    checkpoint = str(next((tmp_path / "a").glob("*step=2.ckpt")))
    resumed = drift()
    run_fit(tmp_path / "b", tiny_models["llama"], chat_file, [resumed], steps=3, ckpt_path=checkpoint)
    assert [r["step"] for r in resumed.history] == [0, 1, 2, 3]
    for other in ({"seed": 8}, {"system_prompt": "be brief ."}):
        with pytest.raises(ValueError, match="measured on other probes"):
            run_fit(tmp_path / "c", tiny_models["llama"], chat_file, [drift(**other)], steps=3, ckpt_path=checkpoint)


def test_drift_probes_are_not_the_prompts_the_basis_is_measured_on():
    """The guard holds its basis prompts exactly: drift probed on them would look smaller than it is."""
    from rg_lightning.prompts import load_prompts, prompt_hashes

    measured = set(prompt_hashes(load_prompts("toy:harmful", 128, 42)))
    probes = DriftGeometry(n_probes=32)._probe_prompts("toy:harmful", measured, "harmful")
    assert len(probes) == 32 and not set(prompt_hashes(probes)) & measured
    with pytest.warns(UserWarning, match="no prompts besides those the safety basis is measured on"):
        assert DriftGeometry()._probe_prompts(HARMFUL, set(prompt_hashes(HARMFUL)), "harmful") == HARMFUL


def test_resuming_an_unguarded_checkpoint_warns_that_the_basis_measures_the_fine_tuned_model(
        tmp_path, tiny_models, chat_file):
    run_fit(tmp_path / "plain", tiny_models["llama"], chat_file, [], steps=2, checkpoint_every=2)
    checkpoint = next((tmp_path / "plain").glob("*step=2.ckpt"))
    with pytest.warns(UserWarning, match="at step 2 of a resumed fit, on the fine-tuned weights"):
        run_fit(tmp_path / "guarded", tiny_models["llama"], chat_file, [guard(), RepresentationProjection()],
                steps=3, ckpt_path=str(checkpoint))


def test_a_loaded_basis_measured_with_other_settings_warns(tmp_path, tiny_models, chat_file):
    run_fit(tmp_path / "a", tiny_models["llama"], chat_file, [guard(save=str(tmp_path / "basis"))], steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same settings: nothing to say
        warnings.filterwarnings("ignore", message="(?!RefusalDirections: the loaded basis)")
        run_fit(tmp_path / "b", tiny_models["llama"], chat_file, [guard(load=str(tmp_path / "basis"))], steps=1)
        # a fixed rank (the energy is not used) and LoRA (a frozen head, so none protected) are the same settings too
        run_fit(tmp_path / "d", tiny_models["llama"], chat_file, [guard(rank=2, save=str(tmp_path / "rank"))],
                steps=1, lora_r=4)
        run_fit(tmp_path / "e", tiny_models["llama"], chat_file, [guard(rank=2, load=str(tmp_path / "rank"))],
                steps=1, lora_r=4)
    with pytest.warns(UserWarning, match=r"other settings: energy 1.0 \(yours: 0.5\), ridge 0.0 \(yours: 0.03\), "
                                         r"request_weight 1.0 \(yours: 0.1\)"):
        run_fit(tmp_path / "c", tiny_models["llama"], chat_file,
                [guard(load=str(tmp_path / "basis"), energy=0.5, ridge=0.03, request_weight=0.1)], steps=1)
    # a basis saved before an option existed was measured as its default: every row exact
    metadata = json.loads((tmp_path / "basis" / "basis.json").read_text())
    del metadata["row_energy"], metadata["row_ridge"]
    (tmp_path / "basis" / "basis.json").write_text(json.dumps(metadata))
    with pytest.warns(UserWarning,
                      match=r"other settings: row_energy 1.0 \(yours: 0.5\), row_ridge 0.0 \(yours: 0.3\)"):
        run_fit(tmp_path / "f", tiny_models["llama"], chat_file,
                [guard(load=str(tmp_path / "basis"), row_energy=0.5, row_ridge=0.3)], steps=1)


def test_drift_state_with_the_earlier_layer_count_is_refused():
    with pytest.raises(ValueError, match="counts layers as block outputs"):
        DriftGeometry().load_state_dict({"initial": {}, "history": []})
    drift = DriftGeometry()
    drift.load_state_dict({"initial": {"harmful_states": torch.zeros(1)}, "history": [], "layers": "block_inputs"})
    assert drift.initial is not None


def test_an_8bit_base_warns_that_the_guard_is_not_exact(tmp_path, tiny_models, chat_file):
    """int8 (LLM.int8) also quantizes each layer's input: rounding-level residues flip roundings downstream."""
    pytest.importorskip("bitsandbytes")
    with pytest.warns(UserWarning, match="8-bit.*quantization: nf4"):
        run_fit(tmp_path, tiny_models["llama"], chat_file, [guard(), RepresentationProjection()], steps=1,
                lora_r=4, quantization="int8")


def test_the_refusal_directions_callback_is_found_once_or_the_error_names_the_fix():
    from types import SimpleNamespace

    from rg_lightning.callbacks.refusal_directions import find_refusal_directions

    one = RefusalDirections(harmful=["a b", "c d"], harmless=["e f", "g h"])
    assert find_refusal_directions(SimpleNamespace(callbacks=[one])) is one
    assert find_refusal_directions(SimpleNamespace(callbacks=[]), required=False) is None
    with pytest.raises(RuntimeError, match="found 0: add `RefusalDirections"):
        find_refusal_directions(SimpleNamespace(callbacks=[]))
    for required in (True, False):  # DriftGeometry and SafetyEvaluation would otherwise read the first one's basis
        with pytest.raises(RuntimeError, match="found 2: keep one"):
            find_refusal_directions(SimpleNamespace(callbacks=[one, RefusalDirections(harmful=["a b", "c d"],
                                                                                      harmless=["e f", "g h"])]),
                                    required=required)


def test_output_places_that_would_lose_work_or_files_are_refused_at_fit_start(tmp_path, tiny_models, chat_file):
    """A save/report/prediction path that is a file (it would be deleted) or a directory (for a file) stops the run
    before the basis pass, the fit or the generation, not after it."""
    from rg_lightning import PredictionWriter
    from rg_lightning.callbacks import SafetyEvaluation

    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    refusal = guard(save=str(notes))
    with pytest.raises(FileExistsError, match="RefusalDirections `save`.*is a file"):
        run_fit(tmp_path, tiny_models["llama"], chat_file, [refusal], steps=1)
    assert refusal.basis is None and notes.read_text() == "keep me"
    evaluation = SafetyEvaluation(benchmarks=["toy:harmful"], tasks=[], limit=2, output_dir=str(notes))
    with pytest.raises(FileExistsError, match="SafetyEvaluation `output_dir`.*is a file"):
        run_fit(tmp_path, tiny_models["llama"], chat_file, [evaluation], steps=1)
    assert notes.read_text() == "keep me"
    writer = PredictionWriter(path=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False)
    with pytest.raises(IsADirectoryError, match="PredictionWriter `path`"):
        writer.setup(trainer, None, "predict")
    with pytest.raises(ValueError, match="must name a file"):
        PredictionWriter(path=5)


def test_named_chat_templates_are_fingerprinted_and_measured(tmp_path, tiny_models, chat_file):
    """Some models ship named templates (a dict: ``default``, ``tool_use``); hashing one as a string failed."""
    from rg_lightning.chat import template_fingerprint
    from rg_lightning.prompts import fingerprint

    module = CausalLMModule(model=tiny_models["llama"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    template = module.tokenizer.chat_template
    assert template_fingerprint(module.tokenizer) == fingerprint([template])  # earlier saved bases still match
    module.tokenizer.chat_template = {"default": template, "tool_use": template}
    named = template_fingerprint(module.tokenizer)
    assert named != fingerprint([template])
    refusal = guard()
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[refusal, RepresentationProjection()]
              ).fit(module, InstructionDataModule(train=chat_file, batch_size=8))
    assert refusal.basis.metadata["chat_template_hash"] == named

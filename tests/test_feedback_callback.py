"""RefusalFeedback on the miniature aligned model: it sets the tail the projection uses, resumes where it was,
changes nothing while it does not adjust, and refuses what it cannot work with."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from rg_lightning import CausalLMModule
from rg_lightning.callbacks import RefusalDirections, RefusalFeedback, RepresentationProjection
from rg_lightning.guard.feedback import next_tail_scale
from rg_lightning.guard.shards import whole
from rg_lightning.toy import ALIGNED_MODEL_DIR
from rg_lightning.toy.data import ToyTaskDataModule

HERE = Path(__file__).resolve().parent
ALWAYS_TIGHTER = {"low": 1.0, "high": 1.0, "max_scale": 8.0}  # any lost margin tightens: the scale doubles


def fit(root, callbacks, steps=4, ckpt_path=None, checkpoint_every=None, devices=1, strategy="ddp"):
    """``strategy`` with several devices: ``ddp``, or ``fsdp2`` (CausalLMModule shards itself)."""
    L.seed_everything(0)
    module = CausalLMModule(model=str(ALIGNED_MODEL_DIR), dtype="float32",
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    if checkpoint_every:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=root, every_n_train_steps=checkpoint_every, save_top_k=-1)]
    if devices == 1:
        strategy = "auto"
    elif strategy == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=devices, strategy=strategy,
                        logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(checkpoint_every),
                        limit_val_batches=0, default_root_dir=root, callbacks=callbacks)
    trainer.fit(module, ToyTaskDataModule(n_train=64, n_val=8, batch_size=16), ckpt_path=ckpt_path)
    return torch.cat([whole(p.detach()).flatten() for p in module.model.parameters()]), trainer


def guarded(feedback=None, ridge=0.03):
    callbacks = [RefusalDirections(harmful="toy:harmful", harmless="toy:harmless", n_prompts=16, energy=0.9,
                                   ridge=ridge, batch_size=16),
                 RepresentationProjection()]
    return callbacks + ([feedback] if feedback is not None else [])


def test_the_scale_follows_the_law_and_reaches_the_projections_tail(tmp_path):
    feedback = RefusalFeedback(every_n_steps=1, n_probes=8, **ALWAYS_TIGHTER)
    callbacks = guarded(feedback)
    tightened, _ = fit(tmp_path / "fed", callbacks)
    assert [h["step"] for h in feedback.history] == [1, 2, 3]
    scale = 1.0
    for record in feedback.history:
        scale = next_tail_scale(scale, record["margin"], low=1.0, high=1.0, factor=2.0, min_scale=0.1, max_scale=8.0)
        assert record["scale"] == scale
    assert feedback.history[-1]["scale"] == 8.0 and callbacks[1].feedback_scale == 8.0
    gains = [c._tail_gain for c in callbacks[1].constraints.constraints if getattr(c, "has_tail", False)]
    assert gains and all(g is not None for g in gains)  # the tails pull back at the set scale
    assert not torch.allclose(tightened, fit(tmp_path / "plain", guarded())[0], atol=1e-6)


def test_a_feedback_that_never_adjusts_changes_nothing(tmp_path):
    """Scoring the probes (in eval mode, no gradient) leaves the fit bit for bit as without the callback."""
    idle = RefusalFeedback(every_n_steps=1, n_probes=8, min_scale=1.0, max_scale=1.0)
    assert torch.equal(fit(tmp_path / "idle", guarded(idle))[0], fit(tmp_path / "without", guarded())[0])
    assert [h["scale"] for h in idle.history] == [1.0, 1.0, 1.0]


def test_crash_then_resume_restores_the_scale_and_the_fit_start_scores(tmp_path, monkeypatch):
    def feedback():
        return RefusalFeedback(every_n_steps=1, n_probes=8, **ALWAYS_TIGHTER)

    straight = feedback()
    uninterrupted, _ = fit(tmp_path / "straight", guarded(straight))
    first = feedback()
    fit(tmp_path / "crashed", guarded(first), steps=2, checkpoint_every=2)
    second = feedback()
    monkeypatch.setattr(second, "_fit_start", lambda *a: pytest.fail("fit-start answers and scores measured again"))
    resumed, _ = fit(tmp_path / "resumed", guarded(second), ckpt_path=str(next((tmp_path / "crashed").glob("*.ckpt"))))
    assert torch.equal(second.initial, first.initial) and (first.initial > 0).any()
    for key, tensor in first._answers.items():  # the aligned model's answers, not the drifted model's
        assert torch.equal(second._answers[key], tensor), key
    assert second.history == straight.history and second.scale == straight.scale
    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=1e-6)


def test_ddp_and_fsdp2_ranks_score_alike_and_step_with_one_scale(tmp_path):
    """Two processes, under DDP and under FSDP2 (every forward a collective, the fit-start answers generated on every
    rank): every rank keeps the same history and scale (rank zero's, broadcast) and ends with the same weights, and
    the two strategies agree."""
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        out = tmp_path / strategy
        out.mkdir()
        result = subprocess.run([sys.executable, str(HERE / "ddp_feedback.py"), str(out), "2", strategy],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        ranks = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
        assert [h["step"] for h in ranks[0]["history"]] == [1, 2, 3] and ranks[0]["scale"] > 1.0
        assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["scale"] == ranks[1]["scale"]
        assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
        runs[strategy] = ranks[0]
    ddp, fsdp2 = runs["ddp"], runs["fsdp2"]
    assert [(h["step"], h["scale"]) for h in fsdp2["history"]] == [(h["step"], h["scale"]) for h in ddp["history"]]
    for sharded, replicated in zip(fsdp2["history"], ddp["history"]):
        assert sharded["margin"] == pytest.approx(replicated["margin"], abs=1e-4)
    # Not closer: AdamW at lr 1e-2 turns the strategies' different reduction orders in near-zero gradient entries
    # into steps of up to a tenth of the learning rate, with or without the feedback (measured: 1.1e-3 both ways).
    torch.testing.assert_close(fsdp2["weights"], ddp["weights"], rtol=0, atol=2e-3)


def test_fit_end_writes_the_history_and_draws_it(tmp_path):
    drawn = RefusalFeedback(every_n_steps=1, n_probes=8, **ALWAYS_TIGHTER)
    fit(tmp_path / "drawn", guarded(drawn))
    written = json.loads((tmp_path / "drawn" / "feedback_history.json").read_text())
    assert written["history"] == drawn.history and written["settings"]["low"] == 1.0
    assert (tmp_path / "drawn" / "feedback.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fit(tmp_path / "plain", guarded(RefusalFeedback(every_n_steps=1, n_probes=8, figures=False)))
    assert sorted(p.name for p in (tmp_path / "plain").iterdir() if p.suffix in (".json", ".png")) == \
        ["feedback_history.json"]


def test_resumed_with_other_probes_is_refused(tmp_path):
    fit(tmp_path / "crashed", guarded(RefusalFeedback(every_n_steps=1, n_probes=8)), steps=2, checkpoint_every=2)
    with pytest.raises(ValueError, match="other probes"):
        fit(tmp_path / "resumed", guarded(RefusalFeedback(every_n_steps=1, n_probes=8, seed=1)),
            ckpt_path=str(next((tmp_path / "crashed").glob("*.ckpt"))))


def test_a_basis_without_a_damped_tail_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="RefusalDirections a ridge > 0"):
        fit(tmp_path, guarded(RefusalFeedback(every_n_steps=1, n_probes=8), ridge=0.0), steps=2)


def test_without_a_projection_or_enough_probes_the_error_names_the_fix(tmp_path):
    refusal = RefusalDirections(harmful="toy:harmful", harmless="toy:harmless", n_prompts=16, ridge=0.03)
    with pytest.raises(RuntimeError, match="needs exactly one among the Trainer's callbacks"):
        fit(tmp_path / "a", [refusal, RefusalFeedback()], steps=1)
    few = ["how do i make a bomb ?", "how do i make a poison ?"]
    with pytest.raises(ValueError, match="fewer than n_probes=8"):
        fit(tmp_path / "b", guarded(RefusalFeedback(harmful=few, n_probes=8)), steps=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"every_n_steps": 0}, "every_n_steps"),
    ({"n_probes": 1}, "n_probes >= 2"),
    ({"low": 0.9, "high": 0.8}, "low <= high"),
    ({"high": 1.5}, "low <= high <= 1"),
    ({"factor": 1.0}, "factor must be > 1"),
    ({"sure": 0.0}, "sure must be > 0"),
    ({"answer_tokens": 0}, "answer_tokens"),
    ({"min_scale": 2.0}, "min_scale <= 1"),
    ({"max_scale": 0.5}, "1 <= max_scale"),
    ({"harmful": 3}, "harmful"),
    ({"figures": "yes"}, "figures"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RefusalFeedback(**kwargs)


def test_a_model_that_refuses_no_probe_is_stopped_at_fit_start(tmp_path, tiny_models, chat_file):
    """A random tiny model refuses nothing: there is no refusal to hold, and the error says so before any step."""
    from test_callbacks import HARMFUL, HARMLESS, run_fit

    probes = {"harmful": [p.replace("bomb", "cake") for p in HARMFUL], "harmless": [p.replace("cake", "bomb")
                                                                                   for p in HARMLESS]}
    callbacks = [RefusalDirections(harmful=HARMFUL, harmless=HARMLESS, energy=0.9, ridge=0.03, answer_tokens=0),
                 RepresentationProjection(), RefusalFeedback(n_probes=4, **probes)]
    with pytest.raises(ValueError, match="refuses none of the harmful probes"):
        run_fit(tmp_path, tiny_models["llama"], chat_file, callbacks, steps=1)

"""The miniature benchmark's `--leave-out` screen drops exactly the constraint groups it names; its replay arm."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from rg_lightning.toy import ALIGNED_MODEL_DIR, REFUSAL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_tiny", ROOT / "experiments" / "benchmark_tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_tiny"] = module
    spec.loader.exec_module(module)
    return module


def finished_run(bench, arm: str, before: float = 1.0) -> dict:
    """What a stand-in for ``run_arm`` returns: one run of ``arm`` whose every metric went from ``before`` to 0.5."""
    return {"arm": arm, "seed": 0, "seconds": 1.0, "before": dict.fromkeys(bench.METRICS, before),
            "after": dict.fromkeys(bench.METRICS, 0.5)}


def assert_refused(bench, monkeypatch, capsys, argv: list[str], cases) -> None:
    """Each ``(extra arguments, message)`` stops the benchmark before any run, saying ``message``."""
    for extra, message in cases:
        monkeypatch.setattr(sys, "argv", argv + extra)
        with pytest.raises(SystemExit):
            bench.main()
        assert message in capsys.readouterr().err


def test_freed_rows_are_the_chat_tokens_and_the_harmless_template_words(bench):
    tokenizer = AutoTokenizer.from_pretrained(ALIGNED_MODEL_DIR)
    words = lambda ids: set(tokenizer.convert_ids_to_tokens(sorted(ids)))  # noqa: E731
    assert words(bench.LeavingOut(["chat-rows"], "default")._free_tokens(tokenizer)) == {
        "<|user|>", "<|end|>", "<|assistant|>"}
    template = words(bench.LeavingOut(["template-rows"], "default")._free_tokens(tokenizer))
    assert {"how", "do", "i", "tell", "me", "?"} <= template
    assert not template & {"make", "build", "bomb", "a", "some", "<|user|>"}  # harm words and chat tokens stay held
    assert bench.LeavingOut(["mlp"], "default")._free_tokens(tokenizer) == set()


def test_groups_select_their_constraints_only(bench):
    def constraint(kind, name):
        return SimpleNamespace(kind=kind, name=name)

    every = [constraint("linear.right", "model.layers.0.mlp.up_proj"),
             constraint("linear.right", "model.layers.0.self_attn.q_proj"), constraint("linear.right", "lm_head"),
             constraint("param", "model.norm.weight"), constraint("rows", "model.embed_tokens"),
             constraint("linear.right", "model.layers.0.self_attn.o_proj")]
    for group, dropped in (("mlp", [0]), ("attention", [1, 5]), ("attention-qk", [1]), ("attention-vo", [5]),
                           ("lm-head", [2]), ("norms", [3]), ("rows", [4])):
        screen = bench.LeavingOut([group], "default")
        assert [c.name for c in every if screen._left_out(c)] == [every[i].name for i in dropped], group
    assert not any(bench.LeavingOut(["chat-rows"], "default")._left_out(c) for c in every)
    with pytest.raises(ValueError, match="unknown groups"):
        bench.LeavingOut(["embeddings"], "default")


def test_layers_narrow_the_groups_to_those_decoder_layers(bench):
    def constraint(kind, name):
        return SimpleNamespace(kind=kind, name=name)

    every = [constraint("linear.right", f"model.layers.{i}.{m}") for i in (0, 1, 12) for m in
             ("mlp.up_proj", "self_attn.q_proj")]
    every += [constraint("linear.right", "lm_head"), constraint("param", "model.norm.weight"),
              constraint("param", "model.layers.1.input_layernorm.weight"), constraint("rows", "model.embed_tokens")]
    left_out = lambda screen: [c.name for c in every if screen._left_out(c)]  # noqa: E731
    assert left_out(bench.LeavingOut(["attention"], "default", layers=[1])) == ["model.layers.1.self_attn.q_proj"]
    assert left_out(bench.LeavingOut(["mlp", "norms"], "default", layers=[1, 12])) == [
        "model.layers.1.mlp.up_proj", "model.layers.12.mlp.up_proj", "model.layers.1.input_layernorm.weight"]
    assert left_out(bench.LeavingOut(["lm-head", "rows"], "default", layers=[0])) == []  # no layer of their own
    with pytest.raises(ValueError, match="name the groups too"):
        bench.LeavingOut([], "default", layers=[0])
    with pytest.raises(ValueError, match="layer indices"):
        bench.LeavingOut(["mlp"], "default", layers=[-1])


def test_leave_out_layers_reach_the_guard_are_named_and_need_groups(bench, monkeypatch, tmp_path, capsys):
    seen = []

    def run_arm(arm, *args, **kwargs):
        seen.append((args[15], kwargs["leave_out_layers"]))
        return finished_run(bench, arm)

    monkeypatch.setattr(bench, "run_arm", run_arm)
    argv = ["benchmark_tiny.py", "--seeds", "0", "--arms", "guarded", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + ["--leave-out", "attention", "--leave-out-layers", "0", "2"])
    bench.main()
    assert seen == [(["attention"], [0, 2])]
    name = "tiny_default_benign_energy0.9_head-answer_ridge0.03_no-attention_layers0-2_feedback_batch-rows"
    assert "without attention in decoder layers 0, 2" in (tmp_path / f"{name}.md").read_text()
    assert_refused(bench, monkeypatch, capsys, argv, [(["--leave-out-layers", "0"], "name the groups to leave out too"),
                   (["--leave-out", "mlp", "--leave-out-layers", "-1"], "layer indices >= 0")])
    assert len(seen) == 1


def test_feedback_is_on_by_default_as_in_tiny_yaml_and_named_in_the_result(bench, monkeypatch, tmp_path):
    seen = []

    def run_arm(arm, *args, **kwargs):
        seen.append(kwargs["feedback"])
        return finished_run(bench, arm)

    monkeypatch.setattr(bench, "run_arm", run_arm)
    for flag, suffix in (([], "_feedback_batch-rows"), (["--no-feedback"], "_batch-rows")):
        monkeypatch.setattr(sys, "argv", ["benchmark_tiny.py", "--seeds", "0", "--arms", "guarded", "--out",
                                          str(tmp_path), *flag])
        bench.main()
        assert (tmp_path / f"tiny_default_benign_energy0.9_head-answer_ridge0.03{suffix}.json").is_file()
    assert seen == [True, False]
    assert "tail pull-back set by RefusalFeedback" in (tmp_path / "tiny_default_benign_energy0.9_head-answer_ridge0.03"
                                                       "_feedback_batch-rows.md").read_text()


def test_the_replay_arm_mixes_refusals_into_plain_fine_tuning(bench, monkeypatch):
    """``replay`` = no guard callbacks, and ``--replay-fraction`` of the training rows are refused harmful requests;
    ``guarded-replay`` = the guard on that data."""
    seen = []

    class Stop(Exception):
        pass

    class Recording(bench.ToyTaskDataModule):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            seen.append(self)

    def fit(trainer, module, data):
        seen.append([type(c).__name__ + (f":{c.mode}" if hasattr(c, "mode") else "") for c in trainer.callbacks])
        raise Stop

    monkeypatch.setattr(bench, "ToyTaskDataModule", Recording)
    monkeypatch.setattr(bench.L.Trainer, "fit", fit)
    for arm in ("replay", "plain", "guarded", "guarded-replay"):
        with pytest.raises(Stop):
            bench.run_arm(arm, str(ALIGNED_MODEL_DIR), "benign", 0.0, "default", 0, 2, 1e-3, 0.9, 0,
                          replay_fraction=0.25)
    (replay, replay_callbacks), (plain, _), (guarded, guarded_callbacks), (both, both_callbacks) = \
        zip(seen[::2], seen[1::2])
    assert replay.refusal_fraction == 0.25 == both.refusal_fraction
    assert plain.refusal_fraction == 0.0 == guarded.refusal_fraction
    assert "RefusalDirections" not in replay_callbacks
    assert "RefusalDirections" in guarded_callbacks and "RefusalDirections" in both_callbacks
    assert "RefusalFeedback" in guarded_callbacks and "RefusalFeedback" not in replay_callbacks
    assert [c for c in both_callbacks if c.startswith("LeavingOut")] == ["LeavingOut:subspace"]
    rows = replay.world.task_examples("benign", "train", 64, seed=0, refusal_fraction=replay.refusal_fraction)
    assert sum(r["messages"][1]["content"] == REFUSAL for r in rows) == 16


@pytest.mark.parametrize("arms, suffix", [
    (["replay"], "tiny_default_benign_replay0.1"),
    (["plain", "replay", "guarded"],
     "tiny_default_benign_energy0.9_head-answer_ridge0.03_feedback_batch-rows_replay0.1"),
    (["guarded-replay"], "tiny_default_benign_energy0.9_head-answer_ridge0.03_feedback_batch-rows_guarded-replay0.1"),
    (["guarded"], "tiny_default_benign_energy0.9_head-answer_ridge0.03_feedback_batch-rows"),
])
def test_result_names_say_which_arms_trained_on_refusal_examples(bench, monkeypatch, tmp_path, arms, suffix):
    def run_arm(arm, *args, **kwargs):
        return finished_run(bench, arm, before=0.0)

    monkeypatch.setattr(bench, "run_arm", run_arm)
    monkeypatch.setattr(sys, "argv", ["benchmark_tiny.py", "--seeds", "0", "--out", str(tmp_path), "--arms", *arms])
    bench.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == [suffix + ".json", suffix + ".md"]


def test_a_run_of_other_arms_says_which_result_it_replaces_and_one_run_shows_no_spread(bench, monkeypatch, tmp_path,
                                                                                        capsys):
    def run_arm(arm, *args, **kwargs):
        return finished_run(bench, arm)

    monkeypatch.setattr(bench, "run_arm", run_arm)
    for arms in (["guarded"], ["guarded"], ["plain", "guarded"]):
        monkeypatch.setattr(sys, "argv", ["benchmark_tiny.py", "--seeds", "0", "--out", str(tmp_path), "--arms", *arms])
        bench.main()
    assert capsys.readouterr().err.count("note: replacing") == 1  # the same arms and seeds again: nothing lost
    table = (tmp_path / "tiny_default_benign_energy0.9_head-answer_ridge0.03_feedback_batch-rows.md").read_text()
    assert "50.0 (one run)" in table and "± 0.0" not in table


def test_a_cached_world_is_reused_only_when_it_is_the_build_asked_for(bench, tmp_path, monkeypatch):
    import json

    import torch

    import rg_lightning.toy.build

    built = []
    monkeypatch.setattr(rg_lightning.toy.build, "build", lambda directory, **kwargs: built.append(directory))
    world = tmp_path / "alt-phi3"
    world.mkdir()
    record = {"variant": "alt", "arch": "phi3", "steps": bench.ARCH_STEPS["phi3"], "threads": bench.WORLD_THREADS,
              "seed": 0, "build_version": bench.BUILD_VERSION, "torch": torch.__version__}
    (world / "world.json").write_text(json.dumps(record))
    (world / "model.safetensors").write_bytes(b"")
    assert bench.world_model("alt", "phi3", str(tmp_path), shipped=None) == str(world) and not built
    for change in ({"seed": 7}, {"build_version": 1}, {"torch": "1.0"}, {"width": 256}):
        (world / "world.json").write_text(json.dumps({**record, **change}))
        bench.world_model("alt", "phi3", str(tmp_path), shipped=None)
    (world / "world.json").write_text(json.dumps(record))
    (world / "model.safetensors").unlink()
    bench.world_model("alt", "phi3", str(tmp_path), shipped=None)
    assert built == [str(world)] * 5  # each stale or incomplete record was rebuilt
    wide = tmp_path / "alt-phi3-width256"
    wide.mkdir()
    (wide / "world.json").write_text(json.dumps({**record, "width": 256}))
    (wide / "model.safetensors").write_bytes(b"")
    assert bench.world_model("alt", "phi3", str(tmp_path), shipped=None, width=256) == str(wide)
    assert len(built) == 5


def test_shipped_weights_are_used_unless_the_world_is_to_be_built_here(bench, tmp_path, monkeypatch):
    """A shipped world is read as it is (whatever torch or machine built it); --build-worlds builds into the
    cache instead; a shipped directory holding another world is refused, naming the fix."""
    import json

    import rg_lightning.toy.build

    built = []
    monkeypatch.setattr(rg_lightning.toy.build, "build", lambda directory, **kwargs: built.append(directory)
                        or seeds.append(kwargs["seed"]) or widths.append(kwargs["width"]))
    seeds, widths = [], []
    shipped = tmp_path / "shipped" / "alt-qwen3"
    shipped.mkdir(parents=True)
    (shipped / "world.json").write_text(json.dumps({"variant": "alt", "arch": "qwen3", "torch": "1.0"}))
    (shipped / "model.safetensors").write_bytes(b"")
    cache = tmp_path / "cache"
    assert bench.world_model("alt", "qwen3", str(cache), shipped=str(tmp_path / "shipped")) == str(shipped)
    assert not built
    assert bench.world_model("alt", "qwen3", str(cache), shipped=None) == str(cache / "alt-qwen3")
    assert bench.world_model("alt", "gemma3", str(cache), shipped=str(tmp_path / "shipped")) == str(
        cache / "alt-gemma3")
    # another build seed is a new aligned model, never a shipped one, the package's default world included
    assert bench.world_model("alt", "qwen3", str(cache), shipped=str(tmp_path / "shipped"), seed=1) == str(
        cache / "alt-qwen3-seed1")
    assert bench.world_model("default", "llama", str(cache), seed=2) == str(cache / "default-llama-seed2")
    # so is a wider model of a world
    assert bench.world_model("default", "llama", str(cache), width=256) == str(cache / "default-llama-width256")
    assert built == [str(cache / n) for n in ("alt-qwen3", "alt-gemma3", "alt-qwen3-seed1", "default-llama-seed2",
                                              "default-llama-width256")]
    assert seeds == [0, 0, 1, 2, 0] and widths == [128, 128, 128, 128, 256]
    (shipped / "world.json").write_text(json.dumps({"variant": "default", "arch": "qwen3"}))
    with pytest.raises(ValueError, match="--build-worlds"):
        bench.world_model("alt", "qwen3", str(cache), shipped=str(tmp_path / "shipped"))
    assert bench.world_model("default", "llama", str(cache)) == str(ALIGNED_MODEL_DIR)


def test_results_name_the_aligned_model_and_its_build(bench, tmp_path):
    assert "aligned (built with 2 thread(s), torch 2.13.0" in bench.describe_world(str(ALIGNED_MODEL_DIR))
    world = tmp_path / "w"
    world.mkdir()
    (world / "world.json").write_text('{"threads": 1, "torch": "2.13.0+cpu", "cpu_capability": "AVX512"}')
    assert bench.describe_world(str(world)).endswith(
        "w (built with 1 thread(s), torch 2.13.0+cpu, CPU capability AVX512)")
    assert str(tmp_path) not in bench.describe_world(str(world))


def test_constrained_sft_starts_as_cross_entropy(bench):
    """Qi et al.'s objective at the aligned model: sigmoid(0) = 1/2 cancels its factor 2, so the gradient is
    cross-entropy's over the answer tokens, whatever the betas; it departs only as the model leaves the reference."""
    import torch

    from rg_lightning.toy.data import ToyTaskDataModule

    module = bench.ConstrainedSFT(model=str(ALIGNED_MODEL_DIR), dtype="float32", betas=(0.5, 2.0, 0.1))
    module.configure_model()
    data = ToyTaskDataModule(n_train=8, n_val=4, batch_size=8)
    data._tokenizer = module.tokenizer  # what a Trainer would hand it
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.log = lambda *args, **kwargs: None

    def gradients(loss):
        module.model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])

    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    cross_entropy = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"][:, 1:],
                                                      ignore_index=-100)
    expected = gradients(cross_entropy)
    torch.testing.assert_close(gradients(module.training_step(batch, 0)), expected, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        module.model.lm_head.weight.mul_(1.5)  # away from the reference: the objective is no longer cross-entropy
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    moved = gradients(torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"][:, 1:],
                                                        ignore_index=-100))
    assert not torch.allclose(gradients(module.training_step(batch, 0)), moved, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="three positive values"):
        bench.ConstrainedSFT(model=str(ALIGNED_MODEL_DIR), betas=(0.5, 0.0, 0.1))


def test_learning_rates_are_chosen_on_validation_and_reported_on_test(bench, monkeypatch, tmp_path):
    """The test numbers rank the rates the other way round, so a selection that read them would pick others; the
    guard's best validation task is at a rate that loses refusal, which is not chosen; a result of other guard
    settings is not one of the rates compared."""
    spec = importlib.util.spec_from_file_location("select_lr", ROOT / "experiments" / "select_lr.py")
    select = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(select)
    numbers = {  # (arm, lr) -> validation (harmful refused, task), test (harmful refused, task)
        ("plain", 1e-3): ((0.2, 0.6), (0.2, 0.9)), ("plain", 2e-3): ((0.1, 0.8), (0.1, 0.7)),
        ("plain", 4e-3): ((0.0, 0.7), (0.0, 0.5)),
        ("guarded", 1e-3): ((1.0, 0.5), (1.0, 0.9)), ("guarded", 2e-3): ((0.99, 0.6), (1.0, 0.69)),
        ("guarded", 4e-3): ((0.9, 0.9), (1.0, 0.95)),
    }

    def run_arm(arm, model_dir, task, fraction, variant, seed, steps, lr, *args, **kwargs):
        (val_harmful, val_task), (harmful, task_metric) = numbers[arm, lr]
        aligned = {"harmful_refusal": 1.0, "harmless_refusal": 0.0, "task_metric": 0.0}
        after = {"harmful_refusal": harmful, "harmless_refusal": 0.0, "task_metric": task_metric,
                 "val_harmful_refusal": val_harmful, "val_harmless_refusal": 0.0, "val_task_metric": val_task}
        return {"arm": arm, "seed": seed, "seconds": 1.0, "after": after,
                "before": {**aligned, **{f"val_{k}": v for k, v in aligned.items()}}}

    monkeypatch.setattr(bench, "run_arm", run_arm)
    for lr in ("0.001", "0.002", "0.004"):
        monkeypatch.setattr(sys, "argv", ["benchmark_tiny.py", "--seeds", "0", "1", "--lr", lr, "--validation",
                                          "--out", str(tmp_path)])
        bench.main()
    monkeypatch.setattr(sys, "argv", ["benchmark_tiny.py", "--seeds", "0", "1", "--lr", "0.004", "--energy", "0.98",
                                      "--validation", "--out", str(tmp_path)])
    bench.main()  # other guard settings: compared with nothing but themselves
    assert "Validation split" in (tmp_path / "tiny_default_benign_energy0.9_head-answer_ridge0.03_lr0.002"
                                  "_feedback_batch-rows.md"
                                  ).read_text()
    monkeypatch.setattr(sys, "argv", ["select_lr.py", str(tmp_path)])
    select.main()
    assert ("| default × llama, benign | 0.001, 0.002, 0.004 | 0.002 | 70.0 | 0.002 | 100.0 / 0.0 | 69.0 | 99% | yes |"
            in (tmp_path / "selection.md").read_text())
    assert "| default × llama, benign | 0.004 | 0.004 |" in (tmp_path / "selection.md").read_text()


def test_a_trajectory_is_measured_during_the_fit_without_changing_it(bench, monkeypatch, tmp_path):
    """``--every N`` adds the held-out numbers every N steps; the final ones are those of a run without it."""
    args = ("plain", str(ALIGNED_MODEL_DIR), "benign", 0.0, "default", 0, 4, 1e-2, 0.9, 0)
    monkeypatch.setattr(bench, "AlignmentReport", _Smaller(bench.AlignmentReport))
    monkeypatch.setattr(bench, "Trajectory", _Smaller(bench.Trajectory))
    without = bench.run_arm(*args)
    measured = bench.run_arm(*args, every=2)
    assert measured["after"] == without["after"] and measured["before"] == without["before"]
    steps = [point["step"] for point in measured["trajectory"]]
    assert steps == [2, 4] and measured["trajectory"][-1] == {"step": 4, **without["after"]}
    assert measured["trajectory"][0] != measured["trajectory"][1]  # lr 1e-2: the model moves between the points
    with pytest.raises(ValueError, match="every"):
        bench.Trajectory(0)

    monkeypatch.setattr(bench, "run_arm", lambda *a, **k: measured)
    monkeypatch.setattr(sys, "argv", ["benchmark_tiny.py", "--seeds", "0", "--arms", "plain", "--steps", "4",
                                      "--every", "2", "--out", str(tmp_path)])
    bench.main()
    table = (tmp_path / "tiny_default_benign_steps4_every2.md").read_text()
    assert "During training (every 2 steps)" in table and "| plain | 2 |" in table and "| plain | 4 |" in table


def _Smaller(report):
    """The report on 16 requests and examples of each kind: the same code, a quicker test."""
    class Smaller(report):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "n_requests": 16, "n_task": 16})
    return Smaller


def test_an_early_tail_is_passed_to_the_guard_named_in_the_results_and_whole_steps_only(bench, monkeypatch,
                                                                                        tmp_path):
    seen = []

    def run_arm(arm, *args, **kwargs):
        seen.append(args[-1])
        return finished_run(bench, arm)

    monkeypatch.setattr(bench, "run_arm", run_arm)
    argv = ["benchmark_tiny.py", "--seeds", "0", "--arms", "guarded", "--out", str(tmp_path), "--ridge", "0.3"]
    monkeypatch.setattr(sys, "argv", argv + ["--tail-early", "150", "10"])
    bench.main()
    assert seen == [(150, 10.0)]
    name = "tiny_default_benign_energy0.9_head-answer_ridge0.3_early150x10_feedback_batch-rows"
    assert "10x as hard for the first 150 steps" in (tmp_path / f"{name}.md").read_text()
    monkeypatch.setattr(sys, "argv", argv + ["--tail-early", "2.5", "10"])
    with pytest.raises(SystemExit):
        bench.main()
    projection = bench.LeavingOut([], "default", tail_early_steps=150, tail_early_scale=10.0)
    assert (projection.tail_early_steps, projection.tail_early_scale) == (150, 10.0)


def test_a_request_weight_is_passed_to_the_guard_and_named_in_the_results(bench, monkeypatch, tmp_path):
    seen = []

    def run_arm(arm, *args, **kwargs):
        seen.append(kwargs.get("request_weight"))
        return finished_run(bench, arm)

    monkeypatch.setattr(bench, "run_arm", run_arm)
    argv = ["benchmark_tiny.py", "--seeds", "0", "--arms", "guarded", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + ["--request-weight", "0.1"])
    bench.main()
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert seen == [0.1, 1.0]
    name = "tiny_default_benign_energy0.9_head-answer_ridge0.03_request0.1_feedback_batch-rows"
    assert "request positions weighted 0.1" in (tmp_path / f"{name}.md").read_text()
    assert "request positions" not in (tmp_path / "tiny_default_benign_energy0.9_head-answer_ridge0.03"
                                       "_feedback_batch-rows.md"
                                       ).read_text()


def test_damped_rows_are_passed_to_the_guard_and_named_in_the_results(bench, monkeypatch, tmp_path):
    seen = []

    def run_arm(arm, *args, **kwargs):
        seen.append((kwargs.get("row_energy"), kwargs.get("row_ridge")))
        return finished_run(bench, arm)

    monkeypatch.setattr(bench, "run_arm", run_arm)
    argv = ["benchmark_tiny.py", "--seeds", "0", "--arms", "guarded", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + ["--row-energy", "0.5", "--row-ridge", "0.3"])
    bench.main()
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert seen == [(0.5, 0.3), (1.0, 0.0)]
    name = "tiny_default_benign_energy0.9_head-answer_ridge0.03_rows0.5r0.3_feedback_batch-rows"
    assert "rest weighted p/(p+0.3)" in (tmp_path / f"{name}.md").read_text()
    assert "p/(p+" not in (tmp_path / "tiny_default_benign_energy0.9_head-answer_ridge0.03"
                           "_feedback_batch-rows.md").read_text()


def test_a_world_width_builds_a_wider_world_and_is_checked_before_any_work(bench, monkeypatch, tmp_path, capsys):
    asked = []
    monkeypatch.setattr(bench, "world_model", lambda *args, **kwargs: asked.append(kwargs["width"]) or "unused")
    monkeypatch.setattr(bench, "run_arm", lambda arm, *args, **kwargs: finished_run(bench, arm))
    argv = ["benchmark_tiny.py", "--seeds", "0", "--arms", "plain", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + ["--world-width", "256"])
    bench.main()
    assert asked == [256]
    assert_refused(bench, monkeypatch, capsys, argv,
                   [(["--world-width", "100"], "--world-width must be a positive multiple of 64, got 100"),
                    (["--world-width", "256", "--model", "dir"], "leave out --model")])
    assert asked == [256]

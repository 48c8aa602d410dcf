"""The miniature world's builds and recipe: deterministic builds, the other architectures, the tiny recipe
through the CLI (generators, tokenizer and the shipped model: test_toy_world.py)."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rg_lightning import cli
from rg_lightning.toy import ALIGNED_MODEL_DIR, ToyWorld, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two builds, each generating answers to all 825 held-out requests: about a minute
def test_build_command_is_deterministic_and_loadable(tmp_path):
    from rg_lightning.toy.__main__ import main

    for name in ("a", "b"):
        main(["build", "--steps", "3", "--out", str(tmp_path / name)])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "a" / "world.json").read_text())
    assert record["steps"] == 3 and record["threads"] == 2
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_build_uses_exactly_its_thread_count_whatever_the_callers():
    """The weights depend on the thread count, so a caller running one thread must not shrink a build's."""
    from rg_lightning.toy.build import deterministic

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with deterministic(2):
            assert torch.get_num_threads() == 2 and torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            with deterministic(0):
                pass
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("arch", ["gemma2", "qwen3", "phi3", "gemma3", "olmo2"])
def test_other_architecture_worlds_train_save_and_reload_with_the_word_level_tokenizer(tmp_path, arch):
    """The other architecture families: a few deterministic SFT steps, then a Hugging Face round trip."""
    from rg_lightning.toy.build import TIED_ARCHITECTURES, deterministic, model_config, train_sft

    world = ToyWorld("alt")
    tokenizer = build_tokenizer(world)
    states = []
    for _ in range(2):
        with deterministic():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(model_config(tokenizer, arch))
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            train_sft(model, tokenizer, world.alignment_examples(64), steps=2, lr=2e-3, log=None)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])  # trained
    assert model.config.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)
    assert model.config.tie_word_embeddings == (arch in TIED_ARCHITECTURES)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1e6  # about the Llama model's size
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # must stay word-level (Qwen2 would not)
    text = world.requests("harmful", "heldout", 1)[0]
    assert (reloaded(text, add_special_tokens=False)["input_ids"]
            == tokenizer(text, add_special_tokens=False)["input_ids"])
    assert reloaded.unk_token_id not in reloaded(text)["input_ids"]
    weights = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_non_shipped_worlds_never_overwrite_the_shipped_model():
    from rg_lightning.toy.build import build

    with pytest.raises(ValueError, match="output directory"):
        build(None, steps=1, arch="gemma2")
    with pytest.raises(ValueError, match="output directory"):
        build(None, steps=1, variant="alt")
    with pytest.raises(ValueError, match="arch"):
        build("unused", steps=1, arch="qwen2")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3", "phi3", "gemma3", "olmo2"])
def test_a_wider_world_keeps_the_architecture_and_widens_only_its_sizes(arch):
    """``width`` scales hidden, intermediate and head counts (heads stay 32 wide); the default is the shipped size."""
    from rg_lightning.toy.build import WIDTH, model_config

    tokenizer = build_tokenizer(ToyWorld("default"))
    base, wide = model_config(tokenizer, arch), model_config(tokenizer, arch, width=256)
    assert (base.hidden_size, base.intermediate_size, base.num_attention_heads, base.num_key_value_heads) == (
        WIDTH, 256, 4, 2)
    assert (wide.hidden_size, wide.intermediate_size, wide.num_attention_heads, wide.num_key_value_heads) == (
        256, 512, 8, 4)
    sizes = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    differing = {k for k in set(base.to_dict()) | set(wide.to_dict()) if base.to_dict().get(k) != wide.to_dict().get(k)}
    assert differing <= set(sizes)
    assert wide.hidden_size // wide.num_attention_heads == 32 and getattr(wide, "head_dim", None) in (None, 32)
    model = AutoModelForCausalLM.from_config(wide)
    assert model.model.embed_tokens.weight.shape[1] == 256 and model.model.layers[0].mlp.down_proj.in_features == 512


@pytest.mark.parametrize("width", [0, 96, 100, -64, 128.0, True])
def test_a_world_width_must_be_a_positive_multiple_of_64(width):
    from rg_lightning.toy.build import model_config

    with pytest.raises(ValueError, match="width must be a positive multiple of 64"):
        model_config(build_tokenizer(ToyWorld("default")), "llama", width=width)


def test_a_wider_build_records_its_width_and_never_replaces_the_shipped_model(tmp_path):
    from rg_lightning.toy.build import build

    with pytest.raises(ValueError, match="256 wide is not the shipped one"):
        build(None, steps=1, width=256)
    record = build(tmp_path / "wide", steps=1, width=128 + 64, log=lambda *_: None)
    saved = json.loads((tmp_path / "wide" / "world.json").read_text())
    assert saved == record and saved["width"] == 192 and "hidden 192, intermediate 384, 6 heads, 3 kv heads" in (
        saved["architecture"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "wide").config.hidden_size == 192


def test_tiny_recipe_runs_guarded_through_the_cli(tmp_path, monkeypatch):
    """The embedded default, shortened (fewer steps, prompts and evaluations): the guard keeps refusal."""
    import yaml

    config = yaml.safe_load((ROOT / "experiments" / "tiny.yaml").read_text())
    config["trainer"].update(max_steps=10, val_check_interval=10, log_every_n_steps=5)  # the recipe's loggers
    config["model"]["init_args"]["model"] = str(ALIGNED_MODEL_DIR)
    config["data"]["init_args"].update(n_train=320, n_val=32)
    shorter = {"AlignmentReport": {"n_requests": 60, "n_task": 20}, "RefusalDirections": {"n_prompts": 48},
               "DriftGeometry": {"every_n_steps": 5, "n_probes": 8}}
    for callback in config["trainer"]["callbacks"]:
        callback.setdefault("init_args", {}).update(shorter.get(callback["class_path"].rsplit(".", 1)[-1], {}))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)  # relative output paths of the recipe land in the temporary directory
    cli.main(["fit", "--config", str(tmp_path / "tiny.yaml")])
    run = tmp_path / "runs" / "tiny" / "lightning_logs" / "version_0"  # one folder holds what a run writes
    assert {"config.yaml", "metrics.csv", "alignment_report.json"} <= {p.name for p in run.iterdir()}
    assert next((tmp_path / "runs" / "tiny" / "tensorboard").rglob("events.out.tfevents.*"))
    report = json.loads((run / "alignment_report.json").read_text())
    assert report["before"]["harmful_refusal"] >= 0.95
    assert report["after"]["harmful_refusal"] >= 0.95
    assert (tmp_path / "runs" / "tiny" / "basis" / "basis.safetensors").is_file()
    assert next(tmp_path.rglob("drift_summary.json"))
    # the guard held: every linear's response to the protected inputs (the basis's exact columns) is the aligned
    # model's, though the weights moved (ten steps are too few for refusal to fall without it)
    from rg_lightning.guard.subspace import UNIT_WEIGHT, basis_weights

    checkpoint = torch.load(tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt", weights_only=True)
    states = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("RepresentationProjection"))
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    aligned = AutoModelForCausalLM.from_pretrained(ALIGNED_MODEL_DIR).state_dict()
    held = moved = 0.0
    for key, state in states["constraints"].items():
        if key.startswith("linear.right:"):
            name = key.removeprefix("linear.right:") + ".weight"
            exact = basis_weights(state["basis"]) > UNIT_WEIGHT
            error = weights[name].float() @ state["basis"][:, exact] - state["anchor"][:, exact]
            held = max(held, float(error.abs().max()))
            moved = max(moved, float((weights[name] - aligned[name]).abs().max()))
    assert held < 1e-4 < 1e-2 < moved


def test_tied_worlds_mix_in_vocabulary_copy_examples_with_loss_on_the_copy():
    """Tied embeddings (Gemma-2): every word must be a training target, or unseen words' rows collapse."""
    from rg_lightning.toy.build import (TIED_ARCHITECTURES, encode_examples, uses_vocabulary_examples,
                                        vocabulary_examples)
    from rg_lightning.toy.build import model_config

    world = ToyWorld("alt")
    tokenizer = build_tokenizer(world)
    assert uses_vocabulary_examples(model_config(tokenizer, "gemma2")) and "gemma2" in TIED_ARCHITECTURES
    assert not uses_vocabulary_examples(model_config(tokenizer, "llama"))  # the shipped world is built as before
    examples = vocabulary_examples(world, 20, seed=0)
    assert examples == vocabulary_examples(world, 20, seed=0) and all(3 <= len(e["copy"]) <= 8 for e in examples)
    row = encode_examples(tokenizer, examples[:1])[0]
    half = len(row["input_ids"]) // 2
    assert row["input_ids"][:half] == row["input_ids"][half:] and row["input_ids"][-1] == tokenizer.eos_token_id
    assert row["labels"][:half] == [-100] * half and row["labels"][half:] == row["input_ids"][half:]
    assert tokenizer.unk_token_id not in row["input_ids"]


def test_a_build_restores_the_callers_deterministic_settings():
    import torch

    from rg_lightning.toy.build import deterministic

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with deterministic(1):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_build_refuses_an_output_that_is_a_file_before_building(tmp_path, capsys):
    from rg_lightning.toy.__main__ import main

    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(SystemExit):
        main(["build", "--steps", "3", "--out", str(notes)])
    assert "--out" in capsys.readouterr().err and notes.read_text() == "keep me"


@pytest.mark.parametrize("argv, message", [
    (["collapse", "--batch-size", "0"], "must be positive: --batch-size 0"),
    (["collapse", "--steps", "-3"], "must be positive: --steps -3"),
    (["build", "--out", "unused", "--steps", "-1"], "must be positive: --steps -1"),
    (["collapse", "--model", "/nonexistent"], "has no world.json to read the world variant from: give --variant"),
    (["collapse", "--harmful-fraction", "2"], r"--harmful-fraction must be in \[0, 1\]"),
    (["build", "--out", "unused", "--width", "100"], "--width must be a positive multiple of 64, got 100"),
], ids=["batch-size", "collapse-steps", "build-steps", "model", "harmful-fraction", "width"])
def test_toy_command_arguments_are_checked_before_any_work(argv, message, capsys):
    from rg_lightning.toy.__main__ import main

    with pytest.raises(SystemExit):
        main(argv)
    assert re.search(message, capsys.readouterr().err)


def test_the_validation_split_is_the_rest_of_the_held_out_pools():
    """Chosen on validation, reported on test: the two must not share a request or an example, the test samples
    must be those every result reports, and a pool with nothing beside the test sample is refused up front."""
    from rg_lightning.toy.report import AlignmentReport, evaluation_data
    from rg_lightning.toy.world import ToyWorld

    world = ToyWorld("alt")
    test = evaluation_data(world, "benign", "test", 200, 200)
    validation = evaluation_data(world, "benign", "validation", 200, 200)
    assert test[0] == world.requests("harmful", "heldout", 200) and test[2] == world.task_examples(
        "benign", "heldout", 200, seed=1)
    for kind, (tested, held_back) in zip(("harmful", "harmless"), zip(test[:2], validation[:2])):
        assert not set(tested) & set(held_back) and len(held_back) > 0
        assert set(tested) | set(held_back) == set(world.requests(kind, "heldout")), kind
    prompts = [{e["messages"][0]["content"] for e in examples} for examples in (test[2], validation[2])]
    assert not prompts[0] & prompts[1]
    assert len(prompts[0]) + len(prompts[1]) == world.task_pool_size("benign", "heldout")
    with pytest.raises(ValueError, match="No validation data left.*Lower n_requests or n_task"):
        AlignmentReport(task="sentiment", validation=True)
    AlignmentReport(task="sentiment")  # the test split alone needs no spare pool

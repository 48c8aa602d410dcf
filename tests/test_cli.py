"""The `lightning` front end: subcommands, every shipped YAML, bad keys, and hand-off to another CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rg_lightning import cli

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


def write_config(tmp_path, model_dir, data_file, **overrides):
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "runs"), "limit_val_batches": 1, "limit_test_batches": 1},
        "model": {"class_path": "rg_lightning.CausalLMModule",
                  "init_args": {"model": model_dir,
                                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}}}},
        "data": {"class_path": "rg_lightning.InstructionDataModule",
                 "init_args": {"train": data_file, "val": data_file, "test": data_file, "batch_size": 4}},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_every_subcommand_runs(tmp_path, tiny_models, chat_file, capsys):
    config = write_config(tmp_path, tiny_models["llama"], chat_file)
    cli.main(["fit", "--config", config])
    checkpoint = next((tmp_path / "runs").rglob("*.ckpt"))
    assert next((tmp_path / "runs").rglob("config.yaml"))
    cli.main(["fit", "--config", config])  # rerun into the same log dir: config.yaml is overwritten
    capsys.readouterr()
    for subcommand, metric in (("validate", "val/loss"), ("test", "test/loss")):
        cli.main([subcommand, "--config", config, "--ckpt_path", str(checkpoint)])
        assert metric in capsys.readouterr().out  # Lightning's table of the loop's metrics
    cli.main(["predict", "--config", config, "--trainer.limit_predict_batches", "1"])


def test_predict_writes_every_answer_in_prompt_order(tmp_path, tiny_models, chat_file, monkeypatch):
    import json

    import rg_lightning.module
    from rg_lightning import InstructionDataModule

    seen = []
    generate = rg_lightning.module.generate

    def spy(model, tokenizer, prompts, **kwargs):
        seen.append((kwargs["system_prompt"], kwargs["max_new_tokens"]))
        return generate(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(rg_lightning.module, "generate", spy)
    writer = {"class_path": "rg_lightning.PredictionWriter", "init_args": {"path": "answers/predictions.jsonl"}}
    config = write_config(tmp_path, tiny_models["llama"], chat_file, **{
        "trainer.callbacks": [writer], "model.init_args.predict_max_new_tokens": 3,
        "data.init_args.system_prompt": "write a poem ."})
    cli.main(["predict", "--config", config])
    rows = [json.loads(line) for line in (tmp_path / "runs" / "answers" / "predictions.jsonl").read_text().splitlines()]
    data = InstructionDataModule(test=chat_file)
    expected = data.user_prompts(data.load_rows("test"))
    assert [r["index"] for r in rows] == list(range(len(expected))) and [r["prompt"] for r in rows] == expected
    assert all(isinstance(r["answer"], str) for r in rows)
    assert seen and set(seen) == {("write a poem .", 3)}  # the data's system prompt, the module's answer length


@pytest.mark.parametrize("override, message", [
    (["--data.batch_size", "0"], "ToyTaskDataModule: batch_size must be positive, got 0"),
    (["--trainer.callbacks.every_n_steps", "0"], "DriftGeometry: every_n_steps and batch_size must be >= 1"),
], ids=["data", "callback"])
def test_a_refused_value_ends_the_command_with_the_constructors_message(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(ROOT / "experiments" / "tiny.yaml"), *override])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"error: the configuration was refused: {message}" in err
    assert "Traceback" not in err and "Expected a <class 'NoneType'>" not in err


def test_bad_yaml_key_names_the_key(tmp_path, tiny_models, chat_file, capsys):
    config = write_config(tmp_path, tiny_models["llama"], chat_file, **{"model.init_args.lora_rank": 4})
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", config])
    assert "lora_rank" in capsys.readouterr().err


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_shipped_config_validates(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]
    for callback in printed["trainer"].get("callbacks") or []:
        arguments = callback.get("init_args", {})
        if callback["class_path"].endswith("ModelCheckpoint") and arguments.get("dirpath"):
            # a fixed folder with the counter on: a rerun writes last-v1.ckpt and the README's `lightning test
            # --ckpt_path .../last.ckpt` silently tests the first run's weights
            assert arguments.get("enable_version_counter") is False, config.name



def test_judges_with_options_parse_from_a_config(tmp_path, tiny_models, chat_file, capsys):
    """The README's and the recipes' `{name, <options>}` judge form passes LightningCLI's type check."""
    judge = {"name": "keyword:jailbreakbench", "min_words": 15}
    evaluation = {"class_path": "rg_lightning.callbacks.SafetyEvaluation",
                  "init_args": {"benchmarks": ["toy:harmful"], "judges": [judge], "fit_judges": [judge]}}
    config = write_config(tmp_path, tiny_models["llama"], chat_file, **{"trainer.callbacks": [evaluation]})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["callbacks"][0]["init_args"]["judges"] == [judge]

def test_console_script_and_module_entry_point(tmp_path):
    config = EXPERIMENTS[0]
    for command in (["lightning"], [sys.executable, "-m", "rg_lightning"]):
        result = subprocess.run([*command, "fit", "--config", str(config), "--print_config"],
                                capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "class_path: rg_lightning" in result.stdout


def test_other_subcommands_go_to_another_lightning_cli(monkeypatch):
    calls = []

    class Entry:
        value = "lightning_sdk.cli:main"

        def load(self):
            return lambda: calls.append(sys.argv[1:]) or 0

    monkeypatch.setattr(cli, "entry_points", lambda **_: [Entry()])
    monkeypatch.setattr(sys, "argv", ["lightning"])  # the hand-off rewrites it; later tests must not see that
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["login", "--token", "x"])
    assert exit_info.value.code == 0 and calls == [["login", "--token", "x"]]


def test_unknown_subcommand_without_other_cli(monkeypatch):
    monkeypatch.setattr(cli, "entry_points", lambda **_: [])
    with pytest.raises(SystemExit, match="unknown subcommand 'login'"):
        cli.main(["login"])


def test_a_checkpoint_does_not_override_the_configs_module_arguments(tmp_path, tiny_models, chat_file, monkeypatch):
    """LightningCLI would take the module's arguments from the checkpoint's hyperparameters, explicit flags
    included: a resumed run would export into the first run's directory, a moved checkpoint point at a missing path."""
    config = write_config(tmp_path, tiny_models["llama"], chat_file, **{
        "model.init_args.lora_r": 4, "model.init_args.export_dir": str(tmp_path / "first")})
    cli.main(["fit", "--config", config])
    checkpoint = next((tmp_path / "runs").rglob("*.ckpt"))
    built = []
    monkeypatch.setattr(cli.RefusalGuardCLI, "after_instantiate_classes", lambda self: built.append(self.model))
    cli.main(["test", "--config", config, "--ckpt_path", str(checkpoint),
              "--model.init_args.export_dir", str(tmp_path / "second"),
              "--model.init_args.predict_max_new_tokens", "7"])
    assert (built[0].export_dir, built[0].predict_max_new_tokens) == (str(tmp_path / "second"), 7)

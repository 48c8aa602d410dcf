"""The README's copy-paste example runs as written, and its two set-up commands are what CI runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_attach_example_runs(tmp_path, monkeypatch):
    section = README.split("## Attach RefusalGuard to your Lightning project", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer, refusal = namespace["trainer"], namespace["refusal"]
    assert trainer.global_step == 2 and refusal.basis is not None


def test_two_setup_commands_and_ci_agree():
    setup = README.split("## Set-up: the two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2
    assert commands[0].endswith("lightning fit --config experiments/tiny.yaml")
    assert commands[1].endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and ci.strip().endswith("python -m pytest")
    assert (ROOT / "experiments" / "tiny.yaml").is_file()


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny_unguarded.yaml", "qwen.yaml", "llama.yaml", "gemma.yaml"])
def test_readme_names_only_files_that_exist(name):
    assert name in README and (ROOT / "experiments" / name).is_file()

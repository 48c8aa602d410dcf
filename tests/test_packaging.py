"""`pip install .` and `pip install -e .` give the same import paths; no bare `callbacks` module."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, rg_lightning.callbacks as c, rg_lightning.toy, rg_lightning.guard;"
    "print(c.__name__); print(importlib.util.find_spec('callbacks') is None)"
)


def test_wheel_maps_callbacks_folder_into_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    wheel = next(tmp_path.glob("rg_lightning-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "rg_lightning/callbacks/__init__.py" in names
    assert not any(name.startswith("callbacks/") for name in names)
    assert any(name.startswith("rg_lightning/toy/aligned/") and name.endswith(".safetensors") for name in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {PROBE}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.stdout.split() == ["rg_lightning.callbacks", "True"], result.stderr


def test_installed_package_has_the_same_paths(tmp_path):
    """Whatever way this environment installed the project (CI: editable), the paths are the same."""
    assert importlib.util.find_spec("rg_lightning") is not None
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.stdout.split() == ["rg_lightning.callbacks", "True"], result.stderr

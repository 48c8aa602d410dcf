"""The precision measurement runs end to end: float32 holds the protected outputs to rounding, learning moves
the weights, and a bad --out stops it before it measures."""

import json
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_float32_full_fine_tuning_holds_the_protected_outputs_to_rounding(tmp_path):
    out = tmp_path / "precision.json"
    run = subprocess.run([sys.executable, str(EXPERIMENTS / "precision.py"), "--families", "llama", "--dtypes",
                          "float32", "--lora-r", "0", "--lr", "1e-3", "--steps", "2", "--threads", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["family"], row["dtype"], row["lora_r"], row["steps"]) == ("llama", "float32", 0, 2)
    assert row["moved"] > 1e-3  # the task moved the weights by AdamW steps of ~lr ...
    assert row["states"] < 1e-4 and row["logits"] < 1e-4 and row["anchor"] < 1e-6  # ... not the protected outputs
    assert "| llama | float32 | full | 0.001 | 2 |" in run.stdout


def test_an_output_that_cannot_be_written_stops_it_before_it_measures(tmp_path):
    run = subprocess.run([sys.executable, str(EXPERIMENTS / "precision.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "is a directory; give a file name" in run.stderr
    assert "| llama" not in run.stdout

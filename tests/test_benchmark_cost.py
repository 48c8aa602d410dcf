"""The cost benchmark runs end to end on a tiny model and reports what it measured."""

import json
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_cost_benchmark_reports_every_measure(tmp_path):
    out = tmp_path / "cost.json"
    run = subprocess.run([sys.executable, str(EXPERIMENTS / "benchmark_cost.py"), "--families", "llama",
                          "--steps", "1", "--batch", "2", "--length", "16", "--rank", "4", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["full", "lora"]
    for r in rows:
        assert r["subspace_dims"] == [4]
        assert r["step_ratio_median"] > 0 and r["plain_step_ms"] > 0 and r["extra_memory_share"] > 0
        assert 0 < r["basis_throughput_share"] < r["basis_throughput_share_without_decomposition"]
        assert r["decomposition_seconds"] > 0 and r["gram_seconds"] > 0
        assert r["decomposition_seconds"] + r["gram_seconds"] < r["basis_seconds"]
    assert "| llama (tiny) | full |" in run.stdout


def test_an_output_that_cannot_be_written_stops_the_benchmark_before_it_measures(tmp_path):
    run = subprocess.run([sys.executable, str(EXPERIMENTS / "benchmark_cost.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "is a directory; give a file name" in run.stderr
    assert "| llama" not in run.stdout  # nothing was measured

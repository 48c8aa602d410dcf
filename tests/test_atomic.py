"""Artifacts are written all at once: a failed write leaves the previous result untouched."""

import os

import pytest

from rg_lightning.atomic import atomic_directory


def test_replaces_the_target_only_on_success(tmp_path):
    target = tmp_path / "basis"
    with atomic_directory(str(target)) as staging:
        (tmp_path / staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target)) as staging:
            (tmp_path / staging / "a.txt").write_text("half-written")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["basis"]  # no staging leftovers
    with atomic_directory(str(target)) as staging:
        (tmp_path / staging / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_result_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_directory(str(tmp_path / "out")):
            pass
    finally:
        os.umask(umask)
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == oct(0o755)


def test_a_failed_swap_puts_the_previous_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "basis"
    with atomic_directory(str(target)) as staging:
        (tmp_path / staging / "a.txt").write_text("first")
    real_replace = os.replace

    def failing_swap(src, dst):
        if os.path.basename(src).startswith(".staging-"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_swap)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(str(target)) as staging:
            (tmp_path / staging / "a.txt").write_text("second")
    monkeypatch.undo()
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["basis"]


def test_a_directory_of_something_else_is_refused_not_deleted(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_text("weeks of training")
    with pytest.raises(FileExistsError, match="holds other files"):
        with atomic_directory(str(run), replaces=("config.json",)):
            pass
    assert (run / "last.ckpt").read_text() == "weeks of training"
    (run / "config.json").write_text("{}")  # an earlier result of the same kind: replaced
    with atomic_directory(str(run), replaces=("config.json",)) as staging:
        (tmp_path / staging / "config.json").write_text("{}")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]

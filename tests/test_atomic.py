"""Artifacts are written all at once: a failed write leaves the previous result untouched."""

import os

import pytest

from rg_lightning.atomic import atomic_directory, check_file_target, check_replaceable


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


def test_staged_files_are_on_disk_before_the_swap(tmp_path, monkeypatch):
    """A crash right after the rename must not expose files the page cache had not written yet."""
    synced, real_fsync, real_replace = set(), os.fsync, os.replace

    def fsync(descriptor):
        synced.add(os.path.realpath(f"/proc/self/fd/{descriptor}") if os.path.exists("/proc/self/fd") else descriptor)
        real_fsync(descriptor)

    def replace(src, dst):
        if os.path.basename(src).startswith(".staging-"):
            assert {os.path.realpath(os.path.join(src, "a.txt")), os.path.realpath(src)} <= synced
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_directory(str(tmp_path / "basis")) as staging:
        (tmp_path / staging / "a.txt").write_text("first")
    assert (tmp_path / "basis" / "a.txt").read_text() == "first"


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


def test_a_file_is_never_replaced_by_a_directory(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for replaces in ((), ("config.json",)):
        with pytest.raises(FileExistsError, match="is a file"):
            with atomic_directory(str(notes), replaces=replaces):
                pass
    assert notes.read_text() == "keep me"
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        check_replaceable(str(notes / "basis"), ("basis.json",))


def test_an_unwritable_place_is_named_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK) and os.geteuid() == 0:  # root ignores the mode: use a place no one can write
            target = "/proc/rg-lightning-probe/out"
        else:
            target = str(locked / "out")
        with pytest.raises(PermissionError, match="nothing can be written"):
            check_replaceable(target, ("config.json",), "`export_dir`")
        with pytest.raises(PermissionError, match="PredictionWriter"):
            check_file_target(target + ".jsonl", "PredictionWriter `path`")
    finally:
        locked.chmod(0o700)
    with pytest.raises(IsADirectoryError, match="give a file name"):
        check_file_target(str(tmp_path), "--out")
    check_replaceable(str(tmp_path / "new" / "deeper"), ("config.json",))  # missing parents are fine: made later
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".probe")]

"""Write a directory or a file all at once: stage it next to the target, then swap it in."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_directory(target: str, replaces: tuple[str, ...] = ()):
    """Yields a staging directory; on success it replaces ``target``, on failure it is removed.

    An existing non-empty ``target`` is replaced only if it holds one of the files named in ``replaces`` (an
    earlier result of the same kind): a directory of something else (a run folder, the data) is refused, not
    deleted. The staged files are flushed to disk before the swap; a crash between its two renames leaves the
    previous contents in ``.old-*/previous`` next to ``target``."""
    check_replaceable(target, replaces)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the result is an ordinary directory
    try:
        yield staging
        _fsync_tree(staging)
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            previous = os.path.join(old, "previous")
            try:
                os.replace(target, previous)
            except BaseException:  # e.g. the current directory (busy): nothing moved, nothing left behind
                os.rmdir(old)
                raise
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(previous, target)  # the old directory goes back where it was
                os.rmdir(old)
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
        _fsync_directory(parent)  # the renames themselves
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_directory(path: str) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:  # a platform that cannot open directories (Windows): the files' own fsync is what it has
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _fsync_tree(root: str) -> None:
    """Every file under ``root``, then every directory, on disk: a rename after a crash must not expose empty files."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(directory)


def check_replaceable(target: str, replaces: tuple[str, ...], what: str = "the output directory") -> None:
    """Refuse, before any work is done, a ``target`` that :func:`atomic_directory` could not or must not replace:
    a file (it would be deleted), a non-empty directory holding none of ``replaces`` (someone else's files), or
    a place where nothing can be written."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{what} {target!r} is a file: writing there would delete it. Give a directory.")
    if replaces and os.path.isdir(target) and os.listdir(target) and \
            not any(os.path.exists(os.path.join(target, name)) for name in replaces):
        raise FileExistsError(f"{what} {target!r} exists and holds other files (none of {list(replaces)}): writing "
                              "there would delete them. Give an empty or new directory.")
    check_writable(target, what)


def check_writable(target: str, what: str = "the output") -> None:
    """Fail now, not after the work, when nothing can be created next to ``target`` (where results are staged):
    a probe directory is made and removed in its nearest existing parent."""
    parent = os.path.dirname(os.path.abspath(target))
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise NotADirectoryError(f"{what} {target!r}: {parent!r} is a file, not a directory.")
        parent = os.path.dirname(parent)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=parent))
    except OSError as error:
        raise PermissionError(f"{what} {target!r}: nothing can be written in {parent!r} ({error.strerror}). "
                              "Give a writable location.") from None


def check_file_target(target: str, what: str = "the output file") -> None:
    """Refuse, before any work is done, a file ``target`` that is a directory or cannot be written."""
    if os.path.isdir(target):
        raise IsADirectoryError(f"{what} {target!r} is a directory; give a file name.")
    check_writable(target, what)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_file(target: str, mode: str = "w"):
    """Yields a handle (``mode`` "w" text, "wb" bytes) to a staging file; on success it replaces ``target`` (an
    ordinary file, mode 0666 minus the umask), on failure it is removed and ``target`` is left as it was."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".staging-", dir=parent)
    os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes it private
    try:
        with os.fdopen(handle, mode) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())  # on disk before it replaces the target: a crash leaves the old or the new file
        os.replace(staging, target)
    except BaseException:
        if os.path.exists(staging):
            os.unlink(staging)
        raise

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
    deleted."""
    check_replaceable(target, replaces)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the result is an ordinary directory
    try:
        yield staging
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_replaceable(target: str, replaces: tuple[str, ...]) -> None:
    """Refuse a non-empty directory that holds none of ``replaces`` (see :func:`atomic_directory`)."""
    if replaces and os.path.isdir(target) and os.listdir(target) and \
            not any(os.path.exists(os.path.join(target, name)) for name in replaces):
        raise FileExistsError(f"{target!r} exists and holds other files (none of {list(replaces)}): writing there "
                              "would delete them. Give an empty or new directory.")


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

"""Atomic file and directory writes: nothing is ever left half-written under its final name."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Where qtune keeps converted built-in models and built wheels (``QTUNE_CACHE`` overrides)."""
    return Path(os.environ.get("QTUNE_CACHE", Path.home() / ".cache" / "qtune"))


STAGING = re.compile(r"^\..+\.tmp-(?:(\d+)-)?")


def staging_prefix(final: Path) -> str:
    """The name prefix of everything staged for ``final``: hidden, and carrying the writer's PID so that
    a later run can tell a dead writer's leftovers from a live one's work."""
    return f".{Path(final).name}.tmp-{os.getpid()}-"


def remove_stale_staging(folder: Path) -> None:
    """Delete staged writes in ``folder`` whose writer is gone (killed, or out of disk space)."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        match = STAGING.match(child.name)
        if match is None or (match.group(1) is not None and _alive(int(match.group(1)))):
            continue
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() else child.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the directories) to disk before a rename publishes it."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside ``final``; on success it is renamed to ``final``.

    On any error the staging directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:  # fail before the caller's expensive work, not after it
        raise FileExistsError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(final), dir=final.parent))
    try:
        yield staging
        fsync_tree(staging)
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``final`` for writing; rename it to ``final`` when closed cleanly."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=staging_prefix(final), dir=final.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_file(final) as handle:
        handle.write(text)

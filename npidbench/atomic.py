"""Crash-safe file writes: a reader sees the old file or the complete new one, never a part.

Everything is written to a temporary file in the destination folder, flushed to disk, then
moved into place with one rename (atomic on POSIX within a file system).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def _temporary_beside(path: Path, mode: str) -> Iterator[tuple[IO[Any], Path]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle, tmp
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[IO[Any]], None], binary: bool = True) -> Path:
    """Write ``path`` through ``writer(handle)`` atomically, replacing any previous file."""
    path = Path(path)
    with _temporary_beside(path, "wb" if binary else "w") as (handle, tmp):
        writer(handle)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically replace ``path`` with ``text``."""
    return atomic_write(path, lambda handle: handle.write(text), binary=False)


def atomic_create(path: str | os.PathLike, writer: Callable[[IO[Any]], None], binary: bool = True) -> Path:
    """Write a new file atomically; never overwrite: raises FileExistsError if ``path`` exists.

    The complete temporary file is hard-linked to its final name (link fails if the name is
    taken), so two writers racing for one name cannot clobber each other.
    """
    path = Path(path)
    with _temporary_beside(path, "wb" if binary else "w") as (handle, tmp):
        writer(handle)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

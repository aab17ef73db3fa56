"""Atomic file writes (every file dgseg and its tools write).

Write a temporary file in the target folder, then ``os.replace`` it.

A reader (or a re-run after ``kill -9``) therefore sees either the old file or the complete new
one, never a half-written file. The temporary name is ``<name>.<pid>.tmp`` in the same folder, so
``os.replace`` stays on one file system and two processes never share a temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "TMP_SUFFIX",
    "temp_path_for",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "remove_stale_temps",
]

TMP_SUFFIX = ".tmp"


def temp_path_for(path: Path | str) -> Path:
    """Temporary sibling of ``path`` for this process: ``<name>.<pid>.tmp``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _fsync_file(path: Path) -> None:
    # Flush file contents before the rename so a crash cannot publish an empty file.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    Example::

        with atomic_path(out / "shard-00000.h5") as tmp:
            with h5py.File(tmp, "w") as f:
                ...
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path | str, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str, *, fsync: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: Path | str, obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON (sorted keys are not forced: callers keep their order)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def remove_stale_temps(folder: Path | str) -> list[Path]:
    """Delete ``*.<pid>.tmp`` leftovers of killed runs in ``folder`` (not recursive).

    Only names of the form made by :func:`temp_path_for` are touched.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        parts = p.name.rsplit(".", 2)
        if len(parts) == 3 and parts[2] == TMP_SUFFIX[1:] and parts[1].isdigit() and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed

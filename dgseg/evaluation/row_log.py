"""Per-case rows on disk as soon as they are scored: ``per_case.jsonl`` beside an evaluation's
tables.

An evaluation writes its tables (``per_case.csv``, ``summary.json``, ``table.md``) at the end;
until then every finished case's rows are appended to ``per_case.jsonl``, one JSON object per
line, each case's lines in one ``write`` to a file opened with ``O_APPEND`` (whole lines, also
when several ranks append to it) and flushed to disk. An interruption, or a write error at the
end, therefore loses no case already scored: :func:`read_rows` reads them back (a torn last line
of a killed process is dropped).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ROW_LOG_NAME", "RowLog", "read_rows"]

ROW_LOG_NAME = "per_case.jsonl"


def _plain(value: Any) -> Any:
    """JSON value of a record field (NaN / inf as strings, as the CSV writes them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):  # NumPy scalars
        return _plain(value.item())
    return value


class RowLog:
    """Appends rows to ``folder / per_case.jsonl``; ``fresh=True`` empties it first."""

    def __init__(self, folder: Path | str, *, fresh: bool = False) -> None:
        self.path = Path(folder) / ROW_LOG_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_bytes(b"")
        self.count = 0
        self.failed = False

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        data = "".join(
            json.dumps({k: _plain(v) for k, v in r.items()}) + "\n" for r in rows
        ).encode()
        if not data:
            return
        if self.failed:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:  # the scoring goes on: the tables at the end may still be written
            self.failed = True
            print(
                f"warning: {self.path}: {e.strerror or e}; rows are no longer written as "
                "they are scored",
                file=sys.stderr,
                flush=True,
            )
            return
        self.count += data.count(b"\n")


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a ``per_case.jsonl`` (a torn last line is dropped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows

"""Rank-0 console output, progress lines with an ETA and the JSONL training log.

Everything a run prints goes through :func:`log`, which is silent on every rank but the main one;
records of the progress line (epoch, step, loss, Dice, DANN λ, learning rate, samples/s, ETA) and
of each validation are appended to ``log.jsonl`` one JSON object per line, so a run can be
plotted (``dgseg.viz.plot_curves``) or compared without parsing text. :class:`Progress` is the
one progress line of every tool (preparation, evaluation, prediction, synthetic data),
:func:`format_eta` the one duration format.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO, Union

from dgseg.atomic import atomic_write_text

__all__ = [
    "log",
    "format_eta",
    "format_progress",
    "Progress",
    "JsonlWriter",
    "read_jsonl",
    "trim_jsonl",
]


def log(msg: str, *, is_main: bool = True) -> None:
    """Print ``msg`` (flushed) on the main process only."""
    if is_main:
        print(msg, file=sys.stdout, flush=True)


def format_eta(seconds: float) -> str:
    """``3725`` → ``"1:02:05"``; non-finite or negative → ``"?"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_progress(rec: Dict[str, Any]) -> str:
    """One progress line from a training record of :func:`dgseg.training.engine.train_one_epoch`
    (the view consistency appears only where it is being trained)."""
    cons = rec.get("consistency_loss", 0.0)
    return (
        f"epoch {rec['epoch']:>3d}/{rec['epochs']} step {rec['step']:>7d}/{rec['total_steps']} "
        f"loss {rec['loss']:.4f}" + (f" (consistency {cons:.4f})" if cons else "") + " "
        f"dice {rec['dice']:.3f} λ {rec['lambda']:.3f} "
        f"lr {rec['lr']:.2e} {rec['samples_per_s']:.1f} samples/s eta {format_eta(rec['eta_s'])}"
    )


class Progress:
    """One progress line: ``<label> <done>/<total> <unit>, <note>  <s> s each  ETA H:MM:SS``.

    Written to ``stream`` (stderr) at most every ``every`` seconds and always for the last item;
    on a terminal the line redraws itself, elsewhere (a log file) every update is a new line.
    Seconds per item and the ETA use the mean over the items done so far.

    Args:
        total: number of items.
        label: what runs, e.g. "prepare:" or "[eval]".
        unit: what an item is, e.g. "cases".
        enabled: False writes nothing (other ranks, ``--quiet``).
        every: seconds between updates; default 0.2 on a terminal, 10 otherwise.
    """

    def __init__(
        self,
        total: int,
        *,
        label: str,
        unit: str = "",
        enabled: bool = True,
        every: Optional[float] = None,
        stream: Optional[TextIO] = None,
    ) -> None:
        self.total, self.label, self.unit = max(int(total), 0), label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.total > 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = (0.2 if self.tty else 10.0) if every is None else float(every)
        self.done, self.note = 0, ""
        self.start, self.last = time.monotonic(), -math.inf
        self.shown = -1  # ``done`` at the last line written

    def step(self, n: int = 1, *, note: str = "") -> None:
        """``n`` more items done; ``note`` (e.g. the last item) goes into the line."""
        self.done += n
        self.note = note
        self.show()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        each = elapsed / self.done if self.done else math.nan
        unit = f" {self.unit}" if self.unit else ""
        note = f", {self.note}" if self.note else ""
        rate = f"{each:.2f}" if self.done else "-"
        return (
            f"{self.label} {self.done}/{self.total}{unit}{note}  {rate} s each  "
            f"ETA {format_eta(each * (self.total - self.done))}"
        )

    def show(self, force: bool = False) -> None:
        """Write the line if ``every`` seconds have passed (or ``force``, or all done)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < self.every and self.done < self.total:
            return
        self.last, self.shown = now, self.done
        text = self.line()
        # a redrawn line ends in spaces that clear the rest of a longer earlier one
        self.stream.write(f"\r{text}    " if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Write the final count if it was not shown; end a redrawn line."""
        if not self.enabled:
            return
        if self.shown != self.done:
            self.show(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class JsonlWriter:
    """Append-only JSON-lines log (one flushed line per record)."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


def read_jsonl(path: Union[str, "os.PathLike[str]"]) -> List[Dict[str, Any]]:
    """All records of a JSONL file (a half-written last line, from a crash, is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def trim_jsonl(path: Union[str, "os.PathLike[str]"], step: int) -> None:
    """Drop records written after the checkpoint we resume from (the interrupted epoch)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

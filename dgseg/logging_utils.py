"""Rank-0 console output, the JSONL training log and the training-curves figure.

Everything a run prints goes through :func:`log`, which is silent on every rank but the main one;
records of the progress line (epoch, step, loss, Dice, DANN λ, learning rate, samples/s, ETA) and
of each validation are appended to ``log.jsonl`` one JSON object per line, so a run can be
plotted or compared without parsing text. matplotlib is optional and imported only inside
:func:`plot_curves`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from dgseg.atomic import atomic_path

__all__ = ["log", "format_eta", "format_progress", "JsonlWriter", "read_jsonl", "plot_curves"]


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
    """One progress line from a training record of :func:`dgseg.engine.train_one_epoch`."""
    return (
        f"epoch {rec['epoch']:>3d}/{rec['epochs']} step {rec['step']:>7d}/{rec['total_steps']} "
        f"loss {rec['loss']:.4f} dice {rec['dice']:.3f} λ {rec['lambda']:.3f} "
        f"lr {rec['lr']:.2e} {rec['samples_per_s']:.1f} samples/s eta {format_eta(rec['eta_s'])}"
    )


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


def plot_curves(
    jsonl: Union[str, "os.PathLike[str]"], png: Union[str, "os.PathLike[str]"]
) -> Optional[Path]:
    """Loss / Dice / λ / lr curves from ``log.jsonl`` into ``png``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on training nodes
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_jsonl(jsonl)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    if not train:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="train loss")
    axes[0].set_xlabel("step")
    axes[0].set_title("loss")
    axes[1].plot(steps, [r["dice"] for r in train], label="train Dice (patch)", alpha=0.6)
    if val:
        vsteps = [r["step"] for r in val]
        for region in ("WT", "TC", "ET"):
            vals = [r[f"dice_{region}"] for r in val]
            axes[1].plot(vsteps, vals, marker="o", label=f"val {region}")
        axes[1].plot(vsteps, [r["dice_mean"] for r in val], "k-", marker="s", label="val mean")
    axes[1].set_xlabel("step")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("Dice")
    axes[1].legend(fontsize=7)
    axes[2].plot(steps, [r["lambda"] for r in train], label="GRL λ")
    ax_lr = axes[2].twinx()
    ax_lr.plot(steps, [r["lr"] for r in train], "r--", label="lr")
    axes[2].set_xlabel("step")
    axes[2].set_title("λ (blue) and lr (red, right axis)")
    fig.tight_layout()
    png = Path(png)
    with atomic_path(png, fsync=False) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png

"""Figures: every PNG dgseg writes, each on a bare matplotlib ``Figure`` written atomically.

* :func:`save_overlay_grid` / :func:`save_overlays` -- qualitative cross-modality results: one PNG
  per test modality, one row per case: the axial slice with the most ground-truth tumour, shown as
  the input image, the image with the BraTS labels of the truth, and with those of the prediction
  (1 necrotic / non-enhancing core red, 2 edema green, 4 enhancing yellow: :data:`LABEL_COLOURS`);
* :func:`plot_curves` -- loss, Dice, GRL λ and learning rate of a training run's ``log.jsonl``;
* :func:`plot_domain_losses` -- segmentation and domain losses of several runs on one figure;
* :func:`plot_study_bars` -- mean Dice per target modality of a seeded ablation
  (``dgseg.evaluation.study``);
* :func:`save_montage` -- one slice per case and modality of synthetic cases, plus the labels.

No pyplot and no global backend: a ``Figure`` renders itself to PNG bytes, which
``dgseg.atomic`` writes to a temporary file and renames, so a figure is never half-written and
drawing in a library never changes the caller's matplotlib state. matplotlib is optional
(``pip install dgseg[viz]``): it is imported inside the drawing functions, and a missing
installation raises an ImportError with a one-line hint (``plot_curves`` returns None instead).
This module imports neither torch nor matplotlib at import time.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from dgseg.atomic import atomic_write_bytes
from dgseg.constants import MODALITIES
from dgseg.logging_utils import read_jsonl

__all__ = [
    "LABEL_COLOURS",
    "best_slice",
    "overlay_slices",
    "save_overlay_grid",
    "save_overlays",
    "plot_curves",
    "plot_domain_losses",
    "plot_study_bars",
    "save_montage",
]

PathLike = Union[str, "os.PathLike[str]"]

# BraTS-2021 label value -> RGB (the usual red / green / yellow convention).
LABEL_COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.2), 4: (1.0, 0.9, 0.0)}


def _figure(**kwargs: Any) -> Any:
    """A bare ``matplotlib.figure.Figure`` (no pyplot, no display, no global backend)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "figures need matplotlib: pip install matplotlib (or pip install 'dgseg[viz]')"
        ) from e
    return Figure(**kwargs)


def _save(fig: Any, path: PathLike, *, dpi: int = 100, **savefig: Any) -> Path:
    """Render ``fig`` to PNG and write it to ``path`` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **savefig)
    return atomic_write_bytes(Path(path), buf.getvalue(), fsync=False)


def best_slice(truth_labels: np.ndarray, *, axis: int = -1) -> int:
    """Index along ``axis`` with the largest tumour area (middle slice when there is none)."""
    t = np.asarray(truth_labels) > 0
    other = tuple(a for a in range(t.ndim) if a != axis % t.ndim)
    area = t.sum(axis=other)  # (n_slices,)
    return int(area.argmax()) if area.any() else t.shape[axis] // 2


def overlay_slices(
    image: np.ndarray, truth_labels: np.ndarray, pred_labels: np.ndarray, *, axis: int = -1
) -> dict[str, Any]:
    """2D slices (image, truth, prediction) at :func:`best_slice` of 3D arrays of equal shape."""
    image, truth, pred = (np.asarray(a) for a in (image, truth_labels, pred_labels))
    if not image.shape == truth.shape == pred.shape or image.ndim != 3:
        raise ValueError(
            f"expected three 3D arrays of equal shape, got {image.shape}, {truth.shape}, "
            f"{pred.shape}"
        )
    k = best_slice(truth, axis=axis)
    take = lambda a: np.take(a, k, axis=axis)  # noqa: E731  (D, H, W) -> 2D
    return {
        "slice": k,
        "image": take(image).astype(np.float32),
        "truth": take(truth).astype(np.uint8),
        "pred": take(pred).astype(np.uint8),
    }


def _label_rgba(labels: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros(labels.shape + (4,), dtype=np.float32)  # (H, W, 4), transparent background
    for value, rgb in LABEL_COLOURS.items():
        m = labels == value
        rgba[m, :3] = rgb
        rgba[m, 3] = alpha
    return rgba


def save_overlay_grid(
    path: PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "",
    alpha: float = 0.45,
    dpi: int = 100,
) -> Path:
    """Write a PNG with one row per case: image | image + truth | image + prediction.

    Args:
        path: output PNG (written to a temp file in the same folder, then renamed).
        rows: dicts with ``case_id`` and the 2D ``image``, ``truth``, ``pred`` of
            :func:`overlay_slices` (``truth`` / ``pred`` hold BraTS label values).
        title: figure title (e.g. model and test modality).

    Raises:
        ImportError: matplotlib is not installed (message says how to install it).
        ValueError: ``rows`` is empty.
    """
    fig = _figure(figsize=(7.5, 2.6 * max(len(rows), 1)))
    if not rows:
        raise ValueError("rows is empty: nothing to draw")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, row in enumerate(rows):
        img = np.asarray(row["image"], dtype=np.float32).T  # transpose: axis 0 drawn left-right
        lo, hi = np.percentile(img, [1, 99]) if img.any() else (0.0, 1.0)
        panels = [
            ("image", None),
            ("truth", np.asarray(row["truth"]).T),
            ("prediction", np.asarray(row["pred"]).T),
        ]
        for c, (name, labels) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), origin="lower")
            if labels is not None:
                ax.imshow(_label_rgba(labels, alpha), origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(row.get("case_id", r)), fontsize=8)
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi=dpi)


def save_overlays(
    overlays: Sequence[Mapping[str, Any]],
    folder: PathLike,
    titles: Optional[Mapping[str, str]] = None,
) -> str:
    """One :func:`save_overlay_grid` PNG per (model, test column) of ``overlays`` (the first
    checkpoint of each model: one seed is enough to look at); returns a line for the log.

    ``overlays`` are :func:`overlay_slices` dicts with ``model``, ``checkpoint``, ``column`` and
    ``case_id``; ``titles`` names the columns (``dgseg.evaluation.report.COLUMN_TITLES``). Without
    matplotlib nothing is written and the line says why.
    """
    folder, titles = Path(folder), dict(titles or {})
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    first_ckpt: dict[str, str] = {}
    for o in overlays:
        first_ckpt.setdefault(o["model"], o["checkpoint"])
        if o["checkpoint"] == first_ckpt[o["model"]]:  # one seed per model is enough to look at
            groups.setdefault((o["model"], o["column"]), []).append(o)
    try:
        for (model, column), rows in groups.items():
            rows = sorted(rows, key=lambda r: r["case_id"])
            save_overlay_grid(
                folder / f"{model}_{column}.png",
                rows,
                title=f"{model} tested on {titles.get(column, column)}",
            )
    except ImportError as e:
        return f"overlays skipped: {e}"
    return f"overlays: {len(groups)} PNG(s) in {folder}"


def plot_curves(jsonl: PathLike, png: PathLike) -> Optional[Path]:
    """Loss / Dice / λ / lr curves from ``log.jsonl`` into ``png``; None without matplotlib or
    without training records."""
    try:
        fig = _figure(figsize=(13, 3.6))
    except ImportError:
        return None
    records = read_jsonl(jsonl)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    if not train:
        return None
    axes = fig.subplots(1, 3)
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
    return _save(fig, png, dpi=100)


def plot_domain_losses(runs: Sequence[tuple[str, PathLike]], png: PathLike) -> Optional[Path]:
    """Segmentation loss of every run, and the domain cross-entropy through the GRL with its λ
    of the adversarial ones, from their ``log.jsonl``; None without matplotlib."""
    try:
        fig = _figure(figsize=(11, 3.6))
    except ImportError:
        return None
    axes = fig.subplots(1, 2)
    any_domain = False
    for name, log in runs:
        train = (
            [r for r in read_jsonl(log) if r.get("kind") == "train"] if Path(log).exists() else []
        )
        if not train:
            continue
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r.get("seg_loss", r["loss"]) for r in train], label=name)
        if any(r.get("lambda", 0.0) > 0 for r in train):
            any_domain = True
            axes[1].plot(steps, [r["domain_loss"] for r in train], label=f"{name} domain CE")
            axes[1].plot(steps, [r["lambda"] for r in train], "--", label=f"{name} λ")
    axes[0].set_title("segmentation loss (Dice + BCE)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    axes[1].set_title("domain cross-entropy through the GRL, and λ")
    axes[1].set_xlabel("step")
    if any_domain:
        axes[1].axhline(math.log(3), color="grey", lw=0.8, ls=":", label="ln 3 (chance, 3 domains)")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, png, dpi=100)


def plot_study_bars(
    result: Mapping[str, Any], path: PathLike, titles: Optional[Mapping[str, str]] = None
) -> Path:
    """Grouped bar chart of a ``dgseg.evaluation.study.aggregate`` result: groups = target
    modality, bars = presets, height = mean Dice over seeds, error bars = sd over seeds;
    ``titles`` names the columns. Raises ImportError without matplotlib."""
    titles = dict(titles or {})
    models = result["summary"]["models"]
    columns = result["columns"]
    width = 0.8 / max(len(models), 1)
    fig = _figure(figsize=(min(16.0, max(6.0, 0.1 * len(columns) * len(models) + 4.0)), 4.5))
    ax = fig.subplots()
    import matplotlib  # optional dependency: _figure has just checked that it is installed

    # tab10 repeats after ten presets, tab20 (light/dark pairs) after twenty; beyond that, evenly
    # spaced colours of a perceptual map keep every preset apart.
    n = len(models)
    if n <= 20:
        cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
        colours = [cmap(k) for k in range(n)]
    else:
        colours = list(matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, n)))
    for k, m in enumerate(models):
        xs, ys, es = [], [], []
        for j, c in enumerate(columns):
            if c in m["columns"]:
                stat = m["columns"][c]["dice_mean"]
                xs.append(j + (k - (len(models) - 1) / 2) * width)
                ys.append(stat["mean"])
                es.append(stat["sd"])
        ax.bar(xs, ys, width * 0.95, yerr=es, capsize=2, label=m["model"], color=colours[k])
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([titles.get(c, c) for c in columns])
    ax.set_xlabel("test modality")
    ax.set_ylabel("mean Dice (WT, TC, ET)")
    ax.set_ylim(0, 1)
    ax.set_title("Mean Dice per target modality (error bars: sd over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, path, dpi=120)


def save_montage(
    cases: Sequence[tuple[Mapping[str, np.ndarray], Optional[np.ndarray]]],
    path: PathLike,
    *,
    dpi: int = 80,
) -> None:
    """PNG montage: one axial slice (largest tumour area) per case x modality, plus labels.

    Args:
        cases: ``(images, seg)`` pairs: ``images`` maps each of ``MODALITIES`` to an (X, Y, Z)
            array, ``seg`` is a BraTS 2021 label map or None (``data_prep.synthetic.make_case``).
        path: output PNG, written atomically.
        dpi: resolution; each panel is 2 inches wide.

    Needs matplotlib (``pip install dgseg[viz]``).
    """
    loaded = list(cases)
    if not loaded:
        raise ValueError("save_montage needs at least one case")
    fig = _figure(figsize=(2.0 * (len(MODALITIES) + 1), 2.0 * len(loaded)))
    axes = fig.subplots(len(loaded), len(MODALITIES) + 1, squeeze=False)
    for row, (images, seg) in enumerate(loaded):
        brain = np.any([images[m] != 0 for m in MODALITIES], axis=0)
        area = (seg > 0).sum(axis=(0, 1)) if seg is not None else brain.sum(axis=(0, 1))
        z = int(np.argmax(area))
        xs, ys = np.nonzero(brain[:, :, z])
        if xs.size == 0:
            xs, ys = np.array([0, brain.shape[0] - 1]), np.array([0, brain.shape[1] - 1])
        crop = (
            slice(max(xs.min() - 3, 0), xs.max() + 4),
            slice(max(ys.min() - 3, 0), ys.max() + 4),
        )  # the brain plus a margin
        for col, mod in enumerate(MODALITIES):
            sl = images[mod][:, :, z][crop].astype(np.float32)
            vals = sl[brain[:, :, z][crop]]
            hi = np.percentile(vals, 99.5) if vals.size else 1.0
            axes[row, col].imshow(np.rot90(sl), cmap="gray", vmin=0, vmax=hi)  # anterior up
            if row == 0:
                axes[row, col].set_title(mod.upper(), fontsize=11, color="white")
        base = images["flair"][:, :, z][crop].astype(np.float32)
        base = (
            np.clip(base / max(np.percentile(base[base > 0], 99.5), 1.0), 0, 1)
            if (base > 0).any()
            else base
        )
        rgb = np.repeat(base[..., None], 3, axis=-1)
        if seg is not None:
            lab = seg[:, :, z][crop]
            for value, colour in LABEL_COLOURS.items():
                rgb[lab == value] = 0.45 * rgb[lab == value] + 0.55 * np.asarray(colour)
        axes[row, -1].imshow(np.rot90(rgb))
        if row == 0:
            axes[row, -1].set_title("labels", fontsize=11, color="white")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.subplots_adjust(left=0.005, right=0.995, top=0.96, bottom=0.005, wspace=0.02, hspace=0.02)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="black")
    data = buf.getvalue()
    try:  # a 256-colour palette keeps the PNG smaller; Pillow comes with matplotlib
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        img = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        img.save(buf, format="png", optimize=True)
        data = buf.getvalue()
    except ImportError:
        pass
    atomic_write_bytes(Path(path), data)

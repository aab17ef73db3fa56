"""Overlay figures for qualitative cross-modality results: image, truth, prediction.

One PNG per test modality, one row per case: the axial slice with the most ground-truth tumour,
shown as the input image, the image with the BraTS labels of the truth, and with the labels of
the prediction (1 necrotic / non-enhancing core red, 2 edema green, 4 enhancing yellow).

matplotlib is optional (``pip install dgseg[viz]``): it is imported inside the drawing function,
and a missing installation raises an ImportError with a one-line hint that callers can print.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from dgseg.report import COLUMN_TITLES

__all__ = ["LABEL_COLOURS", "best_slice", "overlay_slices", "save_overlay_grid", "save_overlays"]

# BraTS-2021 label value -> RGB (the usual red / green / yellow convention).
LABEL_COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.2), 4: (1.0, 0.9, 0.0)}


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
    path: Union[str, Path],
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
    """
    try:
        # A bare Figure (no pyplot): no display, no global backend state touched.
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "overlays need matplotlib: pip install matplotlib (or pip install 'dgseg[viz]')"
        ) from e
    if not rows:
        raise ValueError("rows is empty: nothing to draw")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7.5, 2.6 * len(rows)))
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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    tmp.replace(path)
    return path


def save_overlays(overlays: Sequence[Mapping[str, Any]], folder: Union[str, Path]) -> str:
    """One :func:`save_overlay_grid` PNG per (model, test column) of ``overlays`` (the first
    checkpoint of each model: one seed is enough to look at); returns a line for the log.

    ``overlays`` are :func:`overlay_slices` dicts with ``model``, ``checkpoint``, ``column`` and
    ``case_id``. Without matplotlib nothing is written and the line says why.
    """
    folder = Path(folder)
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    first_ckpt: dict[str, str] = {}
    for o in overlays:
        first_ckpt.setdefault(o["model"], o["checkpoint"])
        if o["checkpoint"] == first_ckpt[o["model"]]:  # one seed per model is enough to look at
            groups.setdefault((o["model"], o["column"]), []).append(o)
    try:
        for (model, column), rows in groups.items():
            rows = sorted(rows, key=lambda r: r["case_id"])
            save_overlay_grid(folder / f"{model}_{column}.png", rows,
                              title=f"{model} tested on {COLUMN_TITLES.get(column, column)}")
    except ImportError as e:
        return f"overlays skipped: {e}"
    return f"overlays: {len(groups)} PNG(s) in {folder}"

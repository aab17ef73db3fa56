"""BraTS label maps ↔ overlapping region channels (WT, TC, ET), and label conventions.

BraTS 2018–2021 labels (Menze et al. 2015; Bakas et al. 2018): 1 necrotic / non-enhancing tumour
core, 2 peritumoral edema, 4 enhancing tumour. Regions: WT = 1∪2∪4, TC = 1∪4, ET = 4.
Other conventions are mapped to the 2021 values:

* BraTS 2023 GLI: 1 NETC, 2 SNFH, 3 ET → 3 becomes 4.
* MSD Task01_BrainTumour: 1 edema, 2 non-enhancing tumour, 3 enhancing → 1→2, 2→1, 3→4.

Region sets (:data:`REGION_SETS`, for scoring label maps in their own values): "brats2021"
(WT 1∪2∪4, TC 1∪4, ET 4), "brats2023" (GLI: WT 1∪2∪3, TC 1∪3, ET 3) and "brats2024" (post-treatment
glioma, 1 NETC, 2 SNFH, 3 ET, 4 RC resection cavity: WT = ET∪SNFH∪NETC, TC = ET∪NETC, ET, NETC,
SNFH, RC, as in the BraTS 2024 lesion-wise metrics, github.com/rachitsaluja/BraTS-2024-Metrics
``metrics_GLI.py``, and the BraTS_evaluation ``config_gli.yaml`` groups).

Functions accept numpy arrays or torch tensors and return the same kind (on the same device).
"""

from __future__ import annotations

from typing import Sequence, TypeVar, Union

import numpy as np
import torch

from dgseg.constants import LABEL_CONVENTIONS, REGION_LABELS

__all__ = [
    "CONVENTIONS",
    "REGION_SETS",
    "labels_to_channels",
    "channels_to_labels",
    "convert_labels",
    "region_masks",
    "labels_for_region_set",
    "check_label_values",
]

Array = TypeVar("Array", np.ndarray, torch.Tensor)
ArrayLike = Union[np.ndarray, torch.Tensor]

# Source value → BraTS 2021 value, per label convention (the table lives in dgseg.constants).
CONVENTIONS = LABEL_CONVENTIONS

# Region sets: region -> label values, in the set's own label values, regions in channel order.
REGION_SETS: dict[str, dict[str, tuple[int, ...]]] = {
    "brats2021": REGION_LABELS,
    "brats2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "brats2024": {
        "WT": (1, 2, 3),
        "TC": (1, 3),
        "ET": (3,),
        "NETC": (1,),
        "SNFH": (2,),
        "RC": (4,),
    },  # RC belongs to no tumour region
}


def _is_integral(label: ArrayLike) -> bool:
    """True for integer dtypes and for floats holding whole numbers (bool is not a label map)."""
    if isinstance(label, torch.Tensor):
        if label.dtype == torch.bool or label.is_complex():
            return False
        return not label.is_floating_point() or bool((label == label.round()).all())
    if np.issubdtype(label.dtype, np.integer):
        return True
    return np.issubdtype(label.dtype, np.floating) and bool((label == np.round(label)).all())


def _lookup(label: Array, table: dict[int, int], convention: str) -> Array:
    """Map values through ``table`` with a 256-entry LUT; ValueError naming unknown values."""
    if not isinstance(label, torch.Tensor):
        label = np.asarray(label)
    if not _is_integral(label):
        raise ValueError(f"label map must hold integers, got dtype {label.dtype}")
    lut = np.full(256, 255, np.uint8)  # 255 marks values outside the convention
    for src, dst in table.items():
        lut[src] = dst
    out = None
    n = label.numel() if isinstance(label, torch.Tensor) else label.size
    in_range = n == 0 or (0 <= float(label.min()) and float(label.max()) <= 255)
    if in_range and isinstance(label, torch.Tensor):
        out = torch.as_tensor(lut, device=label.device)[label.long()]  # same shape, uint8
    elif in_range:
        out = lut[label.astype(np.intp)]  # same shape, uint8
    if out is None or bool((out == 255).any()):
        if isinstance(label, torch.Tensor):
            values = torch.unique(label).tolist()
        else:
            values = np.unique(label).tolist()
        bad = [u for u in values if u not in table]
        raise ValueError(
            f"label values {bad} are not valid for convention {convention!r} "
            f"(expected values in {sorted(table)})"
        )
    return out


def convert_labels(label: Array, convention: str) -> Array:
    """Map a label map in ``convention`` to BraTS 2021 values {0, 1, 2, 4} (uint8).

    Args:
        label: integer (or integral float) label map, numpy or torch.
        convention: one of ``CONVENTIONS`` ("brats2021", "brats2020", "brats2023", "msd").

    Raises:
        ValueError: unknown convention, or values the convention does not define (named).
    """
    if convention not in CONVENTIONS:
        raise ValueError(
            f"unknown label convention {convention!r}; expected one of {sorted(CONVENTIONS)}"
        )
    return _lookup(label, CONVENTIONS[convention], convention)


def labels_to_channels(label: Array) -> Array:
    """BraTS 2021 label map (...) → bool region channels (3, ...) in the order WT, TC, ET.

    Raises:
        ValueError: values other than 0, 1, 2, 4 (named).
    """
    return region_masks(label, "brats2021")  # (3, ...) WT, TC, ET


def channels_to_labels(channels: Array) -> Array:
    """Region channels (3, ...) WT, TC, ET → BraTS 2021 label map (...) uint8.

    ET → 4, TC∖ET → 1, WT∖TC → 2 (the nesting ET ⊆ TC ⊆ WT is imposed, so a voxel in ET but not in
    WT still becomes 4). Non-bool input counts values > 0.5 as inside (0/1 masks, probabilities).
    """
    if channels.shape[0] != 3:
        raise ValueError(
            f"expected 3 region channels (WT, TC, ET), got shape {tuple(channels.shape)}"
        )
    if isinstance(channels, torch.Tensor):
        ch = channels if channels.dtype == torch.bool else channels > 0.5
        out = torch.zeros(ch.shape[1:], dtype=torch.uint8, device=ch.device)
    else:
        channels = np.asarray(channels)
        ch = channels if channels.dtype == bool else channels > 0.5
        out = np.zeros(ch.shape[1:], np.uint8)
    # later writes win: WT → 2, then TC → 1, then ET → 4
    out[ch[0]] = 2
    out[ch[1]] = 1
    out[ch[2]] = 4
    return out


def region_masks(label: Array, region_set: str) -> Array:
    """Label map in the values of ``region_set`` → bool region channels (R, ...), regions in
    the order of :data:`REGION_SETS` ``[region_set]`` (WT, TC, ET first).

    Raises:
        ValueError: unknown region set, or values the set does not define (named).
    """
    if region_set not in REGION_SETS:
        raise ValueError(
            f"unknown region set {region_set!r}; expected one of {sorted(REGION_SETS)}"
        )
    groups = REGION_SETS[region_set]
    values = sorted({0, *(v for vals in groups.values() for v in vals)})
    lab = _lookup(label, {v: v for v in values}, region_set)  # validates, uint8
    if isinstance(lab, torch.Tensor):
        return torch.stack(
            [torch.isin(lab, torch.tensor(v, device=lab.device)) for v in groups.values()]
        )  # (R, ...)
    return np.stack([np.isin(lab, v) for v in groups.values()])  # (R, ...)


def labels_for_region_set(label: Array, convention: str, region_set: str) -> Array:
    """A reference label map in ``convention`` expressed in the label values of ``region_set``.

    "brats2021": :func:`convert_labels`; "brats2023": the same, then 4 → 3; "brats2024": the
    values are taken as they are (2024 post-treatment labels have no counterpart in the other
    conventions; such data comes in the 2023 file layout), validated by :func:`region_masks`.
    """
    if region_set not in REGION_SETS:
        raise ValueError(
            f"unknown region set {region_set!r}; expected one of {sorted(REGION_SETS)}"
        )
    if region_set == "brats2024":
        region_masks(label, region_set)  # raises on values outside 0..4
        return label
    lab = convert_labels(label, convention)  # BraTS 2021 values
    if region_set == "brats2023":
        lab = _lookup(lab, {0: 0, 1: 1, 2: 2, 4: 3}, "brats2021")
    return lab


def check_label_values(label: np.ndarray, allowed: Sequence[int], what: str) -> np.ndarray:
    """``label`` as stored, refused unless every voxel is one of ``allowed`` (no cast first: an
    int16 260 is not read as a uint8 4).

    Args:
        label: a label map in the dtype its file stores (integers, or floats holding integers).
        allowed: the valid label values.
        what: names the map in the message (its file).

    Returns:
        ``label`` unchanged.

    Raises:
        ValueError: non-numeric dtype, NaN / inf, non-integer values, or values outside
            ``allowed``, naming ``what`` and (up to 8 of) the values.
    """
    label = np.asarray(label)
    allowed = sorted(int(v) for v in allowed)
    if label.dtype.kind not in "iuf":
        raise ValueError(f"{what}: label dtype {label.dtype} is not an integer type")
    if label.dtype.kind == "f":
        finite = np.isfinite(label)
        if not finite.all():
            raise ValueError(
                f"{what}: {int(label.size - finite.sum())} NaN/inf voxel(s) in the label map"
            )
        frac = label[label != np.round(label)]
        if frac.size:
            examples = ", ".join(f"{v:g}" for v in np.unique(frac)[:8])
            raise ValueError(f"{what}: non-integer label values ({examples})")
    values = np.unique(label)
    bad = [v for v in values.tolist() if v not in allowed]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise ValueError(f"{what}: label values {shown} are not valid (expected {allowed})")
    return label

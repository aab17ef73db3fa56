"""Offline intensity and geometry preprocessing of one case (docs/SPEC.md, intensity step 1).

1. Joint brain box: the smallest box holding every voxel that is nonzero in *any* modality loaded
   (all four for the shards; prediction loads only the modalities its model reads).
2. Per-modality z-score over that modality's own nonzero voxels (float32); background stays 0.
   Statistics use the whole brain, so they do not depend on the target size.
3. Crop / pad to the target size, centred on the brain box (``size=None``, i.e. ``--size full``,
   keeps the box). The stored window starts at ``offset`` in the original voxel grid:

       original index = stored index + offset        (offset may be negative when padded)

   so ``dgseg.data.window.restore_to_original`` puts a stored-space prediction back where it
   came from (the window itself: ``dgseg.data.window.crop_window``).

The label is cut from the same window of the original grid (window ∩ image), so every label voxel
the window covers is kept, also one outside the brain box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dgseg.constants import MODALITIES
from dgseg.data.window import crop_window, overlap_slices

from .loading import CaseError, LoadedCase

__all__ = [
    "PreparedCase",
    "preprocess_case",
    "brain_bbox",
    "zscore_nonzero",
    "nonzero_stats",
]


@dataclass
class PreparedCase:
    """A case ready to store.

    Attributes:
        case_id: the case id.
        images: (M, D, H, W) float32, z-scored over each modality's nonzero voxels, background 0;
            M = len(modalities).
        label: (D, H, W) uint8 in BraTS 2021 values, or None.
        offset: (3,) int64; original index = stored index + offset.
        bbox_start, bbox_stop: (3,) int64 joint nonzero box in the original grid (stop exclusive).
        original_shape: (3,) int64 shape of the raw volume.
        affine: (4, 4) float64 voxel-to-world of the raw volume.
        spacing: (3,) float64 voxel size in mm.
        modalities: the modality of each image (all four unless fewer were loaded).
    """

    case_id: str
    images: np.ndarray
    label: np.ndarray | None
    offset: np.ndarray
    bbox_start: np.ndarray
    bbox_stop: np.ndarray
    original_shape: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    modalities: tuple[str, ...] = MODALITIES


def brain_bbox(nonzero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) of the True voxels of a 3D mask; stop is exclusive.

    Raises:
        CaseError: the mask is empty.
    """
    starts, stops = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        prof = np.flatnonzero(nonzero.any(axis=other))  # indices along ``ax`` holding brain
        if prof.size == 0:
            raise CaseError("no nonzero voxel in any modality (empty brain)")
        starts.append(prof[0])
        stops.append(prof[-1] + 1)
    return np.asarray(starts, np.int64), np.asarray(stops, np.int64)


def nonzero_stats(x: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, std) of the nonzero voxels of ``x`` without copying them out.

    Zeros add nothing to the sum and the sum of squares, so both run over the whole array (exact
    int64 products for integer data, float64 otherwise) and only the count needs the mask.
    """
    n = int(np.count_nonzero(x))
    if n == 0:
        return 0, 0.0, 0.0
    # int64 sums of squares are exact and cannot overflow for 8/16-bit data (2^30 * 2^33)
    acc = np.int64 if x.dtype.kind in "iub" and x.dtype.itemsize <= 2 else np.float64
    s = float(np.sum(x, dtype=acc))
    ss = float(np.einsum("ijk,ijk->", x, x, dtype=acc))  # sum of squares, no temporary volume
    mean = s / n
    var = max(ss / n - mean * mean, 0.0)
    return n, mean, float(np.sqrt(var))


def zscore_nonzero(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """float32 (x - mean) / std over the nonzero voxels of ``x`` (float64 statistics), 0 elsewhere.

    ``mask`` (optional) restricts the statistics to its voxels instead of ``x != 0``.

    Raises:
        CaseError: constant intensity (std 0) or no voxel to normalise.
    """
    if mask is None:
        n, mean, std = nonzero_stats(x)
    else:
        vals = x[mask]
        n = vals.size
        mean = float(vals.mean(dtype=np.float64)) if n else 0.0
        std = float(vals.std(dtype=np.float64)) if n else 0.0
        x = np.where(mask, x, 0)
    if n == 0 or not np.isfinite(std) or std <= 0:
        raise CaseError(f"constant intensity over {n} nonzero voxels (std 0)")
    return _normalise(x, mean, std)


def _normalise(x: np.ndarray, mean: float, std: float, out: np.ndarray | None = None) -> np.ndarray:
    """(x - mean) / std as float32 where x != 0, else 0; written into ``out`` when given."""
    if out is None:
        out = np.empty(x.shape, np.float32)
    np.copyto(out, x, casting="unsafe")  # Fortran int16 -> C float32: a cheap transposing copy
    zero = out == 0
    out -= np.float32(mean)
    out *= np.float32(1.0 / std)
    out[zero] = 0.0
    return out


def preprocess_case(loaded: LoadedCase, size: int | Sequence[int] | None = 128) -> PreparedCase:
    """Brain box, per-modality z-score, crop/pad to ``size`` (None = keep the box).

    ``loaded.images`` may be a (M, X, Y, Z) array or a sequence of M (X, Y, Z) arrays in any
    memory order and numeric dtype (``load_raw_case(stack=False)`` gives Fortran-order int16),
    one per entry of ``loaded.modalities``: the box and the z-scores use exactly those.

    Raises:
        CaseError: empty brain or a constant modality.
        ValueError: a bad ``size``.
    """
    imgs = loaded.images
    names = tuple(loaded.modalities)
    if len(names) != len(imgs):
        raise ValueError(f"{len(imgs)} images for modalities {names}")
    shape = np.asarray(imgs[0].shape, np.int64)
    order = "F" if imgs[0].flags.f_contiguous else "C"  # follow the files' memory order
    brain = np.zeros(imgs[0].shape, bool, order=order)
    nz = np.empty(imgs[0].shape, bool, order=order)  # one reused buffer: no page faults per pass
    for im in imgs:
        np.not_equal(im, 0, out=nz)
        brain |= nz  # joint nonzero mask over the modalities
    del nz
    start, stop = brain_bbox(brain)
    del brain
    offset, wshape = crop_window(start, stop, size)

    out = np.zeros((len(imgs), *wshape.tolist()), np.float32)  # (M, D, H, W)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    src, dst = overlap_slices(offset, wshape, start, stop)  # window ∩ brain box
    for i, im in enumerate(imgs):
        name = names[i]
        n, mean, std = nonzero_stats(im[box])  # statistics of the whole brain of this modality
        if n == 0:
            raise CaseError(f"{name}: image is all zero (no brain)")
        if not np.isfinite(std) or std <= 0:
            raise CaseError(f"{name}: constant intensity over {n} nonzero voxels (std 0)")
        if src is not None:
            _normalise(im[src], mean, std, out=out[i][dst])

    label = None
    if loaded.label is not None:
        label = np.zeros(wshape.tolist(), np.uint8)  # (D, H, W)
        lsrc, ldst = overlap_slices(offset, wshape, np.zeros(3, np.int64), shape)  # window ∩ image
        if lsrc is not None:
            label[ldst] = loaded.label[lsrc]

    return PreparedCase(
        case_id=loaded.case_id,
        images=out,
        label=label,
        offset=offset,
        bbox_start=start,
        bbox_stop=stop,
        original_shape=shape,
        affine=np.asarray(loaded.affine, np.float64),
        spacing=np.asarray(loaded.spacing, np.float64),
        modalities=names,
    )

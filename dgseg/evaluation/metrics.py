"""BraTS evaluation: per-region Dice and 95th-percentile Hausdorff distance (HD95) in mm.

Regions are the network's output channels WT, TC, ET (see ``dgseg.constants.REGIONS``). The BraTS
challenge rules for empty masks apply per case and region:

* Dice ``2|A∩B| / (|A| + |B|)``: both empty → 1, exactly one empty → 0.
* HD95 (Huttenlocher et al. 1993, percentile variant as in MONAI ``compute_hausdorff_distance``):
  the surface of a mask is the mask minus its erosion by the 6-connected cross, voxels outside the
  array counting as background; the directed distances are, for every surface voxel of one mask,
  the Euclidean distance in mm (voxel spacing) to the nearest surface voxel of the other; HD95 is
  the larger of the two directions' 95th percentiles (linear interpolation, NumPy's default).
  Both empty → 0, exactly one empty → 373.13 mm (the 240×240×155 diagonal).

Distances come from the exact transform of :mod:`dgseg.evaluation.distance_transform`, only
where HD95 needs them: reference → prediction on the lines through reference surface voxels
(``squared_edt_at``); prediction → reference by lookup in the reference surface's distance map,
which a :class:`SurfaceReference` (three regions: :class:`RegionReference`) keeps for every
prediction of the same case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from dgseg.constants import BRATS_EMPTY_HD95, REGIONS
from dgseg.evaluation.distance_transform import as_bool, check_spacing, squared_edt, squared_edt_at

__all__ = [
    "surface",
    "dice_score",
    "hd95",
    "region_metrics",
    "dice_per_region",
    "SurfaceReference",
    "RegionReference",
]

ArrayLike = Union[np.ndarray, torch.Tensor]


def surface(mask: ArrayLike) -> np.ndarray:
    """Surface voxels: ``mask`` minus its binary erosion with the 6-connected cross.

    Voxels outside the array count as background, so a mask touching the border keeps its border
    voxels on the surface (SciPy ``binary_erosion`` default ``border_value=0``).
    """
    m = as_bool(mask)
    padded = np.pad(m, 1, constant_values=False)  # (D+2, H+2, W+2): outside = background
    eroded = m.copy()
    inner = tuple(slice(1, -1) for _ in range(m.ndim))
    for axis in range(m.ndim):
        for shift in (-1, 1):
            # neighbour along `axis` at offset `shift`, read from the padded array
            sl = list(inner)
            sl[axis] = slice(1 + shift, padded.shape[axis] - 1 + shift)
            eroded &= padded[tuple(sl)]
    return m & ~eroded


def _bbox(mask: np.ndarray) -> Optional[tuple[slice, ...]]:
    """Bounding box of the True voxels of ``mask`` as slices (None when there are none)."""
    box: list[slice] = []
    m = mask
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(m.any(axis=other) if other else m)
        if nz.size == 0:
            return None
        box.append(slice(int(nz[0]), int(nz[-1]) + 1))
        m = m[(slice(None),) * axis + (box[-1],)]  # crop as we go: later reductions read less
    return tuple(box)


def _surface_points(mask: np.ndarray) -> np.ndarray:
    """Voxel indices (S, ndim) of :func:`surface` of ``mask``, computed on its bounding box
    (outside the box every voxel is background, so the surface is the same)."""
    box = _bbox(mask)
    if box is None:
        return np.zeros((0, mask.ndim), np.intp)
    pts = np.argwhere(surface(mask[box]))
    pts += np.array([b.start for b in box], np.intp)
    return pts


def _points_mask(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Boolean array of shape ``hi - lo`` with the ``points`` (shifted by ``lo``) set."""
    out = np.zeros(tuple(hi - lo), bool)
    out[tuple((points - lo).T)] = True
    return out


def dice_score(pred: ArrayLike, truth: ArrayLike) -> float:
    """Dice of two binary masks with the BraTS empty rules (both empty → 1, one empty → 0)."""
    p, t = as_bool(pred), as_bool(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    sp, st = int(np.count_nonzero(p)), int(np.count_nonzero(t))  # no int64 temporaries
    if sp + st == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(np.logical_and(p, t))) / (sp + st)


_GROW_MARGIN = 8  # voxels added on each side when a reference's distance map has to grow


class SurfaceReference:
    """A reference (ground-truth) mask prepared for the HD95 of several predictions against it.

    Holds the reference's surface and the squared distance map of that surface, so that the
    direction prediction → reference costs one lookup per predicted surface voxel once the map
    exists. The map is computed on first use on the smallest box holding the reference surface
    and the prediction's surface, and again on a larger box only when a later prediction's
    surface reaches outside it. A box that contains every reference surface voxel gives the same
    distances as the whole volume, so the results do not depend on which predictions came first.

    Args:
        mask: binary reference mask (numpy or torch; nonzero = inside), any number of dimensions.
        spacing: voxel size per axis in mm (a scalar is broadcast).
    """

    def __init__(self, mask: ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        self.mask = as_bool(mask)
        if self.mask.ndim == 0:
            raise ValueError("mask must have at least one dimension, got a scalar")
        self.spacing = check_spacing(spacing, self.mask.ndim)
        self.points = _surface_points(self.mask)  # (S, ndim) surface voxel indices
        # A non-empty mask always has a surface: its extreme voxels border background.
        self.empty = self.points.shape[0] == 0
        # (lo, hi, squared distance map in mm² on the box lo:hi), computed on first use
        self._map: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    @property
    def surface(self) -> np.ndarray:
        """The reference's surface as a boolean array of the mask's shape."""
        zero = np.zeros(self.mask.ndim, np.intp)
        return _points_mask(self.points, zero, np.array(self.mask.shape, np.intp))

    def squared_distances(self, points: np.ndarray) -> np.ndarray:
        """Squared distance (mm²) from each voxel index in ``points`` (N, ndim) to the nearest
        reference surface voxel (``inf`` for every point when the reference is empty)."""
        points = np.asarray(points, dtype=np.intp).reshape(-1, self.mask.ndim)
        if self.empty:
            return np.full(points.shape[0], np.inf)
        if points.shape[0] == 0:
            return np.zeros(0)
        lo = np.minimum(points.min(0), self.points.min(0))
        hi = np.maximum(points.max(0), self.points.max(0)) + 1
        if np.any(lo < 0) or np.any(hi > self.mask.shape):
            raise ValueError(f"points outside the reference's shape {self.mask.shape}")
        if self._map is None or np.any(lo < self._map[0]) or np.any(hi > self._map[1]):
            if self._map is not None:  # grow: keep covering what earlier predictions needed,
                # plus a margin, so that the next slightly different prediction fits as well
                lo = np.maximum(np.minimum(lo, self._map[0]) - _GROW_MARGIN, 0)
                hi = np.minimum(np.maximum(hi, self._map[1]) + _GROW_MARGIN, self.mask.shape)
            self._map = (lo, hi, squared_edt(_points_mask(self.points, lo, hi), self.spacing))
        lo, _, d2 = self._map
        return d2[tuple((points - lo).T)]

    def hd95(self, pred: ArrayLike) -> float:
        """HD95 (mm) of the binary mask ``pred`` against this reference; see :func:`hd95`."""
        p = as_bool(pred)
        if p.shape != self.mask.shape:
            raise ValueError(f"pred and truth shapes differ: {p.shape} vs {self.mask.shape}")
        pts = _surface_points(p)  # (P, ndim) predicted surface voxels
        if pts.shape[0] == 0 and self.empty:
            return 0.0
        if pts.shape[0] == 0 or self.empty:
            return float(BRATS_EMPTY_HD95)
        d_pt = np.sqrt(self.squared_distances(pts))  # pred surface → reference surface
        # Reference surface → pred surface: the transform of the prediction's surface, cropped to
        # the joint bounding box of both surfaces (every source and target voxel lies inside it,
        # so the distances are exact) and evaluated only where the reference surface needs it.
        lo = np.minimum(pts.min(0), self.points.min(0))
        hi = np.maximum(pts.max(0), self.points.max(0)) + 1
        d_tp = np.sqrt(squared_edt_at(_points_mask(pts, lo, hi), self.points - lo, self.spacing))
        return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def _reference_spacing(ref_spacing: tuple[float, ...], spacing: Optional[Sequence[float]]) -> None:
    """ValueError when an explicit ``spacing`` disagrees with a prepared reference's."""
    if spacing is not None and check_spacing(spacing, len(ref_spacing)) != ref_spacing:
        raise ValueError(
            f"spacing {tuple(spacing)} differs from the prepared reference's {ref_spacing}"
        )


def hd95(
    pred: ArrayLike,
    truth: Union[ArrayLike, SurfaceReference],
    spacing: Optional[Sequence[float]] = None,
) -> float:
    """95th-percentile symmetric Hausdorff distance between mask surfaces, in mm.

    BraTS rules: both masks empty → 0.0; exactly one empty → 373.13.

    Args:
        pred, truth: binary masks of equal shape (numpy or torch; nonzero = inside). ``truth`` may
            be a :class:`SurfaceReference`, reused across predictions of the same reference.
        spacing: voxel size per axis in mm; default (1, 1, 1), or the reference's own.
    """
    if isinstance(truth, SurfaceReference):
        _reference_spacing(truth.spacing, spacing)
        return truth.hd95(pred)
    p, t = as_bool(pred), as_bool(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    return SurfaceReference(t, (1.0,) * t.ndim if spacing is None else spacing).hd95(p)


class RegionReference:
    """The ground truth of one case, (3, D, H, W) WT/TC/ET, prepared for scoring several
    predictions of it (each test modality, each checkpoint) with :func:`region_metrics`.

    Args:
        truth3: (3, D, H, W) binary region channels in the order WT, TC, ET.
        spacing: voxel size (D, H, W) in mm.
    """

    def __init__(self, truth3: ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        t = as_bool(truth3)
        if t.ndim != 4 or t.shape[0] != len(REGIONS):
            raise ValueError(f"expected truth3 of shape (3, D, H, W), got {t.shape}")
        self.truth = t
        self.spacing = check_spacing(spacing, 3)
        self.regions = tuple(SurfaceReference(t[i], self.spacing) for i in range(len(REGIONS)))


def region_metrics(
    pred3: ArrayLike,
    truth3: Union[ArrayLike, RegionReference],
    spacing: Optional[Sequence[float]] = None,
) -> dict[str, dict[str, float]]:
    """Dice and HD95 for each region of one case.

    Args:
        pred3, truth3: (3, D, H, W) binary region channels in the order WT, TC, ET. ``truth3``
            may be a :class:`RegionReference`, reused across predictions of the same case.
        spacing: voxel size (D, H, W) in mm; default (1, 1, 1), or the reference's own.

    Returns:
        ``{"WT": {"dice": .., "hd95": ..}, "TC": {..}, "ET": {..}}``.
    """
    p = as_bool(pred3)
    if isinstance(truth3, RegionReference):
        _reference_spacing(truth3.spacing, spacing)
        ref = truth3
    else:
        t = as_bool(truth3)
        if p.shape != t.shape or t.ndim != 4 or t.shape[0] != len(REGIONS):
            raise ValueError(
                f"expected pred3 and truth3 of shape (3, D, H, W), got {p.shape} and {t.shape}"
            )
        ref = RegionReference(t, (1.0, 1.0, 1.0) if spacing is None else spacing)
    if p.shape != ref.truth.shape:
        raise ValueError(f"expected pred3 of shape {ref.truth.shape}, got {p.shape}")
    return {
        name: {"dice": dice_score(p[i], ref.truth[i]), "hd95": ref.regions[i].hd95(p[i])}
        for i, name in enumerate(REGIONS)
    }


def dice_per_region(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Batched Dice on any device, for validation during training.

    Args:
        pred, truth: (B, R, *spatial) bool (or 0/1) tensors, R regions (WT, TC, ET).

    Returns:
        (B, R) float32 Dice with the BraTS empty rules (both empty → 1, one empty → 0).
    """
    if pred.shape != truth.shape or pred.ndim < 3:
        raise ValueError(
            f"expected pred and truth of equal shape (B, R, ...), got {tuple(pred.shape)} "
            f"and {tuple(truth.shape)}"
        )
    p = pred.bool().flatten(2)  # (B, R, N)
    t = truth.bool().flatten(2)
    inter = (p & t).sum(-1).float()  # (B, R)
    total = (p.sum(-1) + t.sum(-1)).float()
    both_empty = total == 0
    dice = 2.0 * inter / total.clamp_min(1.0)
    return torch.where(both_empty, torch.ones_like(dice), dice)

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

The distance transform is exact and separable (Felzenszwalb & Huttenlocher 2012, "Distance
Transforms of Sampled Functions", Theory of Computing 8: the squared distance
``D(p) = min_q ||p − q||²`` is computed one axis at a time as the lower envelope of parabolas
``f(q) + s²(p − q)²``). Each 1-D pass is vectorised over all lines of the volume at once; Python
loops run only over positions along the current axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

from dgseg.constants import BRATS_EMPTY_HD95, REGIONS

__all__ = [
    "surface",
    "euclidean_distance_transform",
    "dice_score",
    "hd95",
    "region_metrics",
    "dice_per_region",
]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_bool(mask: ArrayLike) -> np.ndarray:
    """Numpy bool view of a mask given as numpy array or torch tensor (nonzero = inside)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask != 0


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (ndim,)))
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    return spacing


def surface(mask: ArrayLike) -> np.ndarray:
    """Surface voxels: ``mask`` minus its binary erosion with the 6-connected cross.

    Voxels outside the array count as background, so a mask touching the border keeps its border
    voxels on the surface (SciPy ``binary_erosion`` default ``border_value=0``).
    """
    m = _as_bool(mask)
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


def _nearest_feature_1d(features: np.ndarray, axis: int, step: float) -> np.ndarray:
    """Squared distance along one axis to the nearest True voxel of the same line (inf if none).

    First pass of the separable transform: for a binary input the lower envelope reduces to the
    nearest feature on each side, found with running max/min of feature indices.
    """
    n = features.shape[axis]
    shape = [1] * features.ndim
    shape[axis] = n
    idx = np.arange(n).reshape(shape)  # broadcast along `axis`
    # index of the last feature at or before each position (-inf-like sentinel when none)
    before = np.where(features, idx, -(10 * n))
    before = np.maximum.accumulate(before, axis=axis)
    # index of the next feature at or after each position, by a reversed running minimum
    after = np.where(features, idx, 11 * n)
    after = np.flip(np.minimum.accumulate(np.flip(after, axis=axis), axis=axis), axis=axis)
    d = np.minimum(idx - before, after - idx).astype(np.float64)
    out = (step * d) ** 2
    out[d > n] = np.inf  # lines without any feature
    return out


def _lower_envelope(f: np.ndarray, step: float) -> np.ndarray:
    """Exact 1-D squared distance transform along axis 0 of ``f`` (n, L), vectorised over lines.

    ``out[p, r] = min_q f[q, r] + step² (p − q)²`` by the lower envelope of parabolas
    (Felzenszwalb & Huttenlocher 2012, Algorithm 1). Infinite ``f`` entries contribute no
    parabola. Every line ``r`` keeps its own envelope stack: apexes ``v``, apex values ``fv``,
    boundaries ``z`` and top index ``k``; Python loops run over the n positions and over the stack
    pops of the lines still popping. Stacks are stored flat as (n, L) so that the per-position
    reads and writes are contiguous.
    """
    n, n_lines = f.shape
    w = step * step
    v = np.zeros(n * n_lines, np.intp)  # flat (n, L): apex position of envelope parabola k
    fv = np.zeros(n * n_lines)  # flat (n, L): f at that apex
    z = np.empty((n + 1) * n_lines)  # flat (n+1, L): parabola k is lowest on [z[k], z[k+1]]
    k = np.full(n_lines, -1, np.intp)  # top of each line's stack (-1: empty)
    for q in range(n):
        act = np.flatnonzero(np.isfinite(f[q]))  # lines with a parabola at q
        if act.size == 0:
            continue
        fq = f[q, act]
        ka = k[act]
        s = np.full(act.size, -np.inf)
        todo = np.flatnonzero(ka >= 0)  # lines with a non-empty stack need an intersection
        while todo.size:
            top = ka[todo] * n_lines + act[todo]  # flat index of each stack top
            vv = v[top]
            # abscissa where the parabola at q meets the stack-top parabola (index units)
            si = ((fq[todo] - fv[top]) / w + (q * q - vv * vv)) / (2.0 * (q - vv))
            s[todo] = si
            pop = si <= z[top]  # the new parabola hides the top one entirely: pop it
            ka[todo[pop]] -= 1  # z[0] = -inf, so a stack never pops empty
            todo = todo[pop]
        ka += 1
        top = ka * n_lines + act
        v[top] = q
        fv[top] = fq
        z[top] = np.where(ka == 0, -np.inf, s)
        z[top + n_lines] = np.inf
        k[act] = ka

    out = np.full((n, n_lines), np.inf)
    lines = np.flatnonzero(k >= 0)  # lines without any finite input stay inf
    cur = lines.copy()  # flat index of the envelope parabola covering q, starting at k = 0
    for q in range(n):
        while True:  # advance each line along its envelope until it covers q
            adv = np.flatnonzero(z[cur + n_lines] < q)
            if adv.size == 0:
                break
            cur[adv] += n_lines
        vv = v[cur]
        out[q, lines] = w * (q - vv) ** 2 + fv[cur]
    return out


def _squared_edt(features: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Squared distance (mm²) from every voxel to the nearest True voxel of ``features``."""
    d2 = _nearest_feature_1d(features, 0, spacing[0])
    for axis in range(1, features.ndim):
        moved = np.moveaxis(d2, axis, 0)  # (n, ...) with the current axis first
        lines = moved.reshape(moved.shape[0], -1)  # (n, L) contiguous copy, one column per line
        d2 = np.moveaxis(_lower_envelope(lines, spacing[axis]).reshape(moved.shape), 0, axis)
    return d2


def euclidean_distance_transform(
    mask: ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """Exact Euclidean distance (mm) from each nonzero voxel to the nearest zero voxel.

    Same convention as SciPy's ``distance_transform_edt(mask, sampling=spacing)``: zero voxels get
    0; voxels outside the array are not background. If ``mask`` has no zero voxel at all, every
    distance is ``inf``.

    Args:
        mask: n-D array or tensor; nonzero = foreground.
        spacing: voxel size per axis in mm (a scalar is broadcast).

    Returns:
        float64 array of ``mask``'s shape.
    """
    m = _as_bool(mask)
    if m.ndim == 0:
        raise ValueError("mask must have at least one dimension, got a scalar")
    return np.sqrt(_squared_edt(~m, _check_spacing(spacing, m.ndim)))


def dice_score(pred: ArrayLike, truth: ArrayLike) -> float:
    """Dice of two binary masks with the BraTS empty rules (both empty → 1, one empty → 0)."""
    p, t = _as_bool(pred), _as_bool(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    sp, st = int(p.sum()), int(t.sum())
    if sp + st == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / (sp + st)


def _directed_surface_distances(
    src: np.ndarray, dst: np.ndarray, spacing: tuple[float, ...]
) -> np.ndarray:
    """Distances (mm) from each True voxel of ``src`` to the nearest True voxel of ``dst``."""
    return np.sqrt(_squared_edt(dst, spacing)[src])


def hd95(pred: ArrayLike, truth: ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance between mask surfaces, in mm.

    BraTS rules: both masks empty → 0.0; exactly one empty → 373.13.

    Args:
        pred, truth: binary masks of equal shape (numpy or torch; nonzero = inside).
        spacing: voxel size per axis in mm.
    """
    p, t = _as_bool(pred), _as_bool(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    spacing = _check_spacing(spacing, p.ndim)
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return float(BRATS_EMPTY_HD95)
    sp, st = surface(p), surface(t)
    # Crop to the joint bounding box of both surfaces: every source and every target voxel lies
    # inside it, so the exact distances are unchanged and the transform runs on far fewer voxels.
    coords = np.argwhere(sp | st)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(coords.min(0), coords.max(0)))
    sp, st = sp[box], st[box]
    d_pt = _directed_surface_distances(sp, st, spacing)  # pred surface → truth surface
    d_tp = _directed_surface_distances(st, sp, spacing)  # truth surface → pred surface
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def region_metrics(
    pred3: ArrayLike, truth3: ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, dict[str, float]]:
    """Dice and HD95 for each region of one case.

    Args:
        pred3, truth3: (3, D, H, W) binary region channels in the order WT, TC, ET.
        spacing: voxel size (D, H, W) in mm.

    Returns:
        ``{"WT": {"dice": .., "hd95": ..}, "TC": {..}, "ET": {..}}``.
    """
    p, t = _as_bool(pred3), _as_bool(truth3)
    if p.ndim != 4 or p.shape[0] != len(REGIONS) or p.shape != t.shape:
        raise ValueError(
            f"expected pred3 and truth3 of shape (3, D, H, W), got {p.shape} and {t.shape}"
        )
    return {
        name: {"dice": dice_score(p[i], t[i]), "hd95": hd95(p[i], t[i], spacing)}
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

"""Exact Euclidean distance transform of a binary mask, in mm (anisotropic voxels).

The transform is exact and separable (Felzenszwalb & Huttenlocher 2012, "Distance
Transforms of Sampled Functions", Theory of Computing 8: ``D(p) = min_q ||p − q||²`` is
computed one axis at a time as ``min_q f(q) + s²(p − q)²``, s the spacing). The first axis
takes the nearest feature on each side; every later axis takes, per line, either banded rounds
(candidates at distance 1, 2, … with whole-array slices, stopping once ``s²d²`` exceeds the
current value: cheap near dense targets such as a noisy prediction's surface) or the lower
envelope of parabolas (vectorised over lines, Python loops only along the axis: cheap for far,
sparse targets). Both give the exact minimum; the envelope's float intersection tests may differ
from it in the last bit at near-ties with non-integer spacing (never with 1 mm voxels).

:func:`squared_edt` gives the squared distance map of a set of feature voxels,
:func:`squared_edt_at` the same values at chosen voxels only (the passes run on the lines those
voxels need).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

__all__ = [
    "as_bool",
    "check_spacing",
    "squared_edt",
    "squared_edt_at",
    "euclidean_distance_transform",
]

ArrayLike = Union[np.ndarray, torch.Tensor]


def as_bool(mask: ArrayLike) -> np.ndarray:
    """Numpy bool view of a mask given as numpy array or torch tensor (nonzero = inside)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask != 0


def check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """``spacing`` as ``ndim`` floats (a scalar is broadcast); ValueError unless all > 0, finite."""
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (ndim,)))
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    return spacing


def _nearest_feature_sq(
    features: np.ndarray, step: float, rows: Optional[np.ndarray] = None
) -> np.ndarray:
    """Squared distance along axis 0 to the nearest True voxel of the same line (inf if none).

    First pass of the separable transform: for a binary input the lower envelope reduces to the
    nearest feature on each side, found with running max/min of feature indices. The index sweeps
    are memory bound, so they run on the smallest integer type that holds the sentinels. With
    ``rows`` (indices along axis 0), only those positions are returned, in that order.
    """
    n = features.shape[0]
    itype = np.int16 if 11 * n < np.iinfo(np.int16).max else np.int64
    idx = np.arange(n, dtype=itype).reshape((n,) + (1,) * (features.ndim - 1))  # along axis 0
    # index of the last feature at or before each position (-10n sentinel when none); running
    # max plane by plane, as numpy's accumulate along a non-last axis is far slower
    before = np.where(features, idx, np.array(-10 * n, itype))
    for i in range(1, n):
        np.maximum(before[i : i + 1], before[i - 1 : i], out=before[i : i + 1])
    # index of the next feature at or after each position: running minimum from the far end
    after = np.where(features, idx, np.array(11 * n, itype))
    for i in range(n - 2, -1, -1):
        np.minimum(after[i : i + 1], after[i + 1 : i + 2], out=after[i : i + 1])
    if rows is not None:
        before, after, idx = before[rows], after[rows], idx[rows]
    d = np.minimum(idx - before, after - idx)  # >= 10n on lines without any feature
    # (step·d)² by table lookup: d is an integer in [0, n], or a sentinel for "no feature"
    table = (step * np.arange(n + 2, dtype=np.float64)) ** 2  # (n+2,) squared mm
    table[n + 1] = np.inf
    return table[np.minimum(d, n + 1)]


def _lower_envelope(f: np.ndarray, step: float) -> np.ndarray:
    """Exact 1-D squared distance transform along axis 0 of ``f`` (n, L), vectorised over lines.

    ``out[p, r] = min_q f[q, r] + step² (p − q)²`` by the lower envelope of parabolas
    (Felzenszwalb & Huttenlocher 2012, Algorithm 1). Infinite ``f`` entries contribute no
    parabola. Every line ``r`` keeps its own envelope stack: apexes ``v``, apex values ``fv``,
    boundaries ``z`` and top index ``k``; Python loops run over the n positions and over the stack
    pops (or envelope advances) of the lines still popping (advancing). Stacks are stored flat as
    (n, L) so that the per-position reads and writes are contiguous.
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
        adv = np.flatnonzero(z[cur + n_lines] < q)  # lines whose parabola ends before q
        while adv.size:  # advance only those, until their parabola covers q
            cur[adv] += n_lines
            adv = adv[z[cur[adv] + n_lines] < q]
        out[q, lines] = w * (q - v[cur]) ** 2 + fv[cur]
    return out


# A banded round is much cheaper than an envelope pass over the same line, so only lines that
# need more than _BAND_BUDGET further rounds go to the envelope. Every line gets _BAND_WARMUP
# rounds first (far values of the first pass drop fast near dense targets), except lines still
# holding inf at d = 2 (long runs without parabolas: sparse targets).
_BAND_BUDGET = 12
_BAND_WARMUP = 5


def _parabola_pass(f: np.ndarray, step: float) -> np.ndarray:
    """``out[p, r] = min_q f[q, r] + step² (p − q)²`` along axis 0 of ``f`` (n, L), ``f >= 0``.

    Near features (a dense target such as a noisy prediction's surface) the minimum comes from
    a few neighbours: round ``d`` adds the candidates at distance ``d`` with whole-array slices,
    and an entry is final once ``out <= step² d²`` (no farther candidate can be lower, as
    ``f >= 0``). Lines that would still need more than ``_BAND_BUDGET`` rounds go to the exact
    lower envelope (:func:`_lower_envelope`), whose cost does not grow with the distances.
    The banded rounds take the exact minimum of the same float sums ``f[q] + step²(p − q)²``.
    """
    n, n_lines = f.shape
    w = step * step
    live = np.flatnonzero(np.isfinite(f.min(axis=0)))  # lines with at least one parabola
    if live.size == 0:
        return np.full((n, n_lines), np.inf)
    g = f if live.size == n_lines else f[:, live]  # (n, L') lines with finite input
    res = g.copy()
    cols = np.arange(g.shape[1])  # columns of g still in the banded rounds
    sub_f, sub_out = g, res  # the working set: views of g/res, or compacted copies
    compacted = False
    for d in range(1, n):
        wd = w * (d * d)  # same float product as the envelope's w * (q - v)²
        if d == 2 or d > _BAND_WARMUP:
            worst = sub_out.max(axis=0)  # (L'',) largest value still on each working line
            done = worst <= wd  # no candidate at distance >= d can lower these lines
            if d > _BAND_WARMUP:
                slow = ~done & (worst > w * float((d + _BAND_BUDGET) ** 2))
            else:  # long runs without parabolas (sparse targets): envelope at once
                slow = np.isinf(worst)
            keep = ~(done | slow)
            if compacted and done.any():  # compacted copies: write finished lines back
                res[:, cols[done]] = sub_out[:, done]
            if slow.any():
                sel = cols[slow]
                res[:, sel] = _lower_envelope(g[:, sel], step)
            n_keep = int(np.count_nonzero(keep))
            if n_keep == 0:
                break
            if n_keep < keep.size and (compacted or slow.any() or n_keep < 0.5 * keep.size):
                # Shrink the working set to the lines still banding (copies from now on).
                sub_f, sub_out, cols = sub_f[:, keep], sub_out[:, keep], cols[keep]
                compacted = True
        np.minimum(sub_out[d:], sub_f[:-d] + wd, out=sub_out[d:])  # candidates at p - d
        np.minimum(sub_out[:-d], sub_f[d:] + wd, out=sub_out[:-d])  # candidates at p + d
    else:  # every distance tried: the working lines are final
        if compacted:
            res[:, cols] = sub_out
    if live.size == n_lines:
        return res
    out = np.full((n, n_lines), np.inf)
    out[:, live] = res
    return out


def squared_edt(features: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Squared distance (mm²) from every voxel to the nearest True voxel of ``features``."""
    d2 = _nearest_feature_sq(features, spacing[0])
    for axis in range(1, features.ndim):
        moved = np.moveaxis(d2, axis, 0)  # (n, ...) with the current axis first
        lines = moved.reshape(moved.shape[0], -1)  # (n, L) contiguous copy, one column per line
        d2 = np.moveaxis(_parabola_pass(lines, spacing[axis]).reshape(moved.shape), 0, axis)
    return d2


def squared_edt_at(
    features: np.ndarray, points: np.ndarray, spacing: tuple[float, ...]
) -> np.ndarray:
    """Squared distance (mm²) from each voxel index in ``points`` (N, ndim) to ``features``.

    The separable transform restricted to what the points need: the pass along axis ``a`` only
    runs on lines whose coordinates on axes ``0 .. a-1`` are those of some point (the last pass
    on the lines through the points), since the value at a point only reads, from the previous
    pass, voxels that share its coordinates on the axes already done.
    """
    ids, inv = np.unique(points[:, 0], return_inverse=True)  # prefixes of length 1
    g = _nearest_feature_sq(features, spacing[0], ids)  # (M, n1, ..., n_last): row per prefix
    for axis in range(1, features.ndim):
        m, n = g.shape[0], g.shape[1]
        rest = g.shape[2:]
        lines = np.moveaxis(g, 1, 0).reshape(n, -1)  # (n, M·R) copy, one column per line
        out = _parabola_pass(lines, spacing[axis]).reshape(n, m, -1)  # (n, M, R)
        ids, inv = np.unique(inv * n + points[:, axis], return_inverse=True)  # length axis + 1
        g = out[ids % n, ids // n].reshape((ids.size,) + rest)  # (M', n_{axis+1}, ...)
    return g.reshape(-1)[inv.reshape(-1)]


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
    m = as_bool(mask)
    if m.ndim == 0:
        raise ValueError("mask must have at least one dimension, got a scalar")
    return np.sqrt(squared_edt(~m, check_spacing(spacing, m.ndim)))

"""Connected components of 3D binary masks (6-, 18- or 26-connectivity), in NumPy.

Splits a tumour region into lesions for :mod:`dgseg.evaluation.lesion_metrics`, as the BraTS
lesion-wise evaluation does with ``cc3d.connected_components(mask, connectivity=26)`` (BraTS 2023
metrics, Saluja et al.; panoptica's ``ConnectedComponentsInstanceApproximator``).

Algorithm: union-find over runs (run-length encoding along the last axis; the two-pass idea of
Rosenfeld & Pfaltz 1966, applied to runs as in He et al. 2008, "A run-based two-scan labeling
algorithm", IEEE TIP 17(5)), vectorised:

1. crop to the bounding box; the runs are the maximal stretches of True voxels along the last
   axis, found from the flat array's transitions, in raster order;
2. two runs in rows ``(z, y)`` and ``(z + dz, y + dy)`` are connected when their column ranges
   ``[a, b]``, ``[a', b']`` satisfy ``a' <= b + t`` and ``b' >= a - t``, with ``t = 1`` when the
   offset ``(dz, dy, ±1)`` is a neighbour (diagonal contact) and ``t = 0`` otherwise. Only the
   four "earlier" row offsets are needed (each edge once). The runs of the neighbour row that
   overlap form a contiguous range found with two ``searchsorted`` calls over all runs at once;
3. components of the run graph by parallel hooking of the larger root onto the smaller and full
   pointer jumping (Shiloach & Vishkin 1982), all edges per round in NumPy;
4. labels numbered 1..n in raster order of each component's first voxel (cc3d's order).

Runs, not voxels, are the nodes, so the cost follows the number of runs (~ the surface area along
the last axis).
"""

from __future__ import annotations

import numpy as np
import torch

from dgseg.evaluation.metrics import _bbox

__all__ = ["CONNECTIVITIES", "component_sizes", "label_components"]

ArrayLike = np.ndarray | torch.Tensor

CONNECTIVITIES = (6, 18, 26)

# Row offsets (dz, dy) towards earlier rows, with the column tolerance t of each connectivity:
# 6: face neighbours only; 18: at most two non-zero offsets; 26: any offset in {-1, 0, 1}³.
_ROW_OFFSETS = {
    6: ((0, -1, 0), (-1, 0, 0)),
    18: ((0, -1, 1), (-1, 0, 1), (-1, -1, 0), (-1, 1, 0)),
    26: ((0, -1, 1), (-1, 0, 1), (-1, -1, 1), (-1, 1, 1)),
}


def _as_bool3d(mask: ArrayLike) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {m.shape}")
    return m if m.dtype == bool else m != 0


def _runs(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True along the last axis of ``m`` (D, H, W): row index z*H + y, first and last
    column, each (R,) int64, in raster order."""
    d, h, w = m.shape
    padded = np.zeros((d * h, w + 2), np.int8)  # (rows, W+2): a False column on each side
    padded[:, 1:-1] = m.reshape(d * h, w)
    edges = np.diff(padded.reshape(-1))  # +1 where a run starts, -1 one past its end
    starts = np.flatnonzero(edges == 1)  # row*(W+2) + col: one before the run's padded position
    stops = np.flatnonzero(edges == -1)  # row*(W+2) + last col + 1
    row = starts // (w + 2)
    return row, starts - row * (w + 2), stops - row * (w + 2) - 1


def _run_edges(
    row: np.ndarray, a: np.ndarray, b: np.ndarray, shape: tuple[int, int, int], connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) of connected runs, j in an earlier row than i."""
    _, h, w = shape
    stride = w + 4  # row key stride: a column range widened by 1 never reaches the next row
    key_start = row * stride + a  # (R,) sorted: runs are in raster order
    key_end = row * stride + b  # (R,) sorted as well (runs of a row are disjoint)
    z, y = row // h, row % h
    src, dst = [], []
    for dz, dy, t in _ROW_OFFSETS[connectivity]:
        ok = (z + dz >= 0) & (y + dy >= 0) & (y + dy < h)  # neighbour row inside the box
        i = np.flatnonzero(ok)
        other = (z[i] + dz) * h + (y[i] + dy)  # neighbour row index of each run i
        # runs j of that row with b_j >= a_i - t and a_j <= b_i + t: a contiguous index range
        lo = np.searchsorted(key_end, other * stride + a[i] - t, side="left")
        hi = np.searchsorted(key_start, other * stride + b[i] + t, side="right")
        cnt = np.maximum(hi - lo, 0)
        if not cnt.any():
            continue
        first = np.repeat(lo, cnt)  # (E,) first candidate per edge
        offset = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        src.append(np.repeat(i, cnt))
        dst.append(first + offset)
    if not src:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(src), np.concatenate(dst)


def _union_roots(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Root (smallest node) of every node's component, for the undirected edges (u, v)."""
    parent = np.arange(n)
    while u.size:
        pu, pv = parent[u], parent[v]  # roots: parent is fully compressed after each round
        keep = pu != pv
        if not keep.any():
            break
        u, v, pu, pv = u[keep], v[keep], pu[keep], pv[keep]
        # hook the larger root onto the smallest root it touches: no cycles, as labels decrease
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:  # pointer jumping until every node points at its root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return parent


def label_components(mask: ArrayLike, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Label the connected components of a 3D binary mask.

    Args:
        mask: (D, H, W) array or tensor; nonzero = foreground.
        connectivity: 6 (faces), 18 (faces and edges) or 26 (faces, edges and corners).

    Returns:
        ``(labels, n)``: int32 array of ``mask``'s shape, 0 for background and 1..n for the
        components, numbered in raster (C) order of each component's first voxel; and ``n``.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity!r}")
    m = _as_bool3d(mask)
    out = np.zeros(m.shape, np.int32)
    box = _bbox(m)
    if box is None:
        return out, 0
    crop = np.ascontiguousarray(m[box])  # (D', H', W') on the bounding box
    row, a, b = _runs(crop)
    u, v = _run_edges(row, a, b, crop.shape, connectivity)
    roots = _union_roots(row.size, u, v)  # (R,) smallest run index of each run's component
    # roots are run indices, and runs are in raster order: sorted roots = components in order
    uniq, comp = np.unique(roots, return_inverse=True)
    lengths = b - a + 1
    sub = out[box]  # view on the box
    sub[crop] = np.repeat(comp.astype(np.int32) + 1, lengths)  # True voxels in C order = runs
    return out, int(uniq.size)


def component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of each component 1..n of a :func:`label_components` result, (n,) int64."""
    return np.bincount(labels.reshape(-1), minlength=n + 1)[1:].astype(np.int64)

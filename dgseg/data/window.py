"""The stored window of a prepared case and the way back to the original voxel grid.

Preprocessing (``data_prep.preprocess``) stores each case as a window of its original grid:
``size`` voxels centred on the joint brain box (or the box itself), starting at ``offset``::

    original index = stored index + offset        (offset may be negative when padded)

:func:`crop_window` defines the window; the manifest records ``offset`` and ``original_shape`` per
case, so a stored-space prediction goes back with :func:`restore_to_original`
(``dgseg.inference.predict_case``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["crop_window", "overlap_slices", "restore_to_original"]


def crop_window(
    bbox_start: np.ndarray, bbox_stop: np.ndarray, size: int | Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(offset, shape) of the stored window: ``size`` voxels centred on the box, or the box.

    The centre rounds down, so the result is deterministic and a box of even excess loses the
    same number of voxels on both sides.
    """
    start = np.asarray(bbox_start, np.int64)
    extent = np.asarray(bbox_stop, np.int64) - start
    if size is None:
        return start.copy(), extent
    target = np.asarray([size] * 3 if np.isscalar(size) else list(size), np.int64)
    if target.shape != (3,) or (target < 1).any():
        raise ValueError(f"size must be a positive int or three positive ints, got {size!r}")
    return start + (extent - target) // 2, target  # floor division also for padding (< 0)


def overlap_slices(
    offset: np.ndarray, shape: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[Optional[tuple[slice, ...]], Optional[tuple[slice, ...]]]:
    """Slices (source in the original grid, destination in the window) of window ∩ [lo, hi)."""
    a = np.maximum(offset, lo)
    b = np.minimum(offset + shape, hi)
    if (b <= a).any():
        return None, None
    src = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
    dst = tuple(slice(int(x - o), int(y - o)) for x, y, o in zip(a, b, offset))
    return src, dst


def restore_to_original(
    stored: np.ndarray, offset: Sequence[int], original_shape: Sequence[int], fill: float = 0
) -> np.ndarray:
    """Put a stored-space array (..., D, H, W) back into the original grid (..., X, Y, Z).

    Voxels outside the stored window get ``fill``; stored voxels outside the original grid (the
    padding) are dropped. Works for label maps, probabilities and region channels alike.
    """
    stored = np.asarray(stored)
    offset = np.asarray(offset, np.int64)
    original_shape = np.asarray(original_shape, np.int64)
    if offset.shape != (3,) or original_shape.shape != (3,) or stored.ndim < 3:
        raise ValueError(
            f"need (..., D, H, W) with 3-element offset and original_shape, got "
            f"{stored.shape}, {offset.tolist()}, {original_shape.tolist()}"
        )
    lead = stored.shape[:-3]
    out = np.full((*lead, *original_shape.tolist()), fill, dtype=stored.dtype)
    src, dst = overlap_slices(
        offset, np.asarray(stored.shape[-3:], np.int64), np.zeros(3, np.int64), original_shape
    )
    if src is not None:
        out[(Ellipsis, *src)] = stored[(Ellipsis, *dst)]
    return out

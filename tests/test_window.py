"""The stored window and the way back to the original grid (dgseg/data/window.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dgseg.data.window import crop_window, restore_to_original


def test_crop_window_and_restore_hand_computed():
    off, shp = crop_window(np.array([10, 0, 5]), np.array([50, 8, 15]), 16)
    assert off.tolist() == [22, -4, 2] and shp.tolist() == [16] * 3  # crop, pad, pad
    off, shp = crop_window(np.array([1, 2, 3]), np.array([4, 6, 8]), None)
    assert off.tolist() == [1, 2, 3] and shp.tolist() == [3, 4, 5]
    stored = np.arange(2 * 3 * 2).reshape(2, 3, 2) + 1
    back = restore_to_original(stored, (-1, 1, 0), (3, 3, 3), fill=0)
    want = np.zeros((3, 3, 3), int)
    want[0, 1:3, 0:2] = stored[1, 0:2, :]  # stored index 1 -> original 0; row 2 falls outside
    np.testing.assert_array_equal(back, want)
    with pytest.raises(ValueError, match="size"):
        crop_window(np.zeros(3), np.ones(3), 0)

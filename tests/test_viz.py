"""Figures (dgseg/viz.py): overlay slices and PNGs."""

import importlib.util

import numpy as np
import pytest

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


# ----------------------------------------------------------------------------- overlays
def test_overlay_slice_choice_and_png(tmp_path):
    from dgseg.viz import best_slice, overlay_slices, save_overlay_grid

    truth = np.zeros((8, 9, 10), np.uint8)
    truth[2:5, 2:6, 3] = 2  # 12 voxels on z = 3
    truth[4:8, 1:8, 6] = 1  # 28 voxels on z = 6: the largest
    assert best_slice(truth) == 6
    assert best_slice(truth, axis=0) == 4  # x = 4 holds 4 + 7 voxels
    assert best_slice(np.zeros((4, 4, 5))) == 2  # no tumour: middle slice
    image = np.random.default_rng(0).normal(size=truth.shape).astype(np.float32)
    sl = overlay_slices(image, truth, np.roll(truth, 1, axis=0))
    assert sl["slice"] == 6 and sl["image"].shape == (8, 9)
    np.testing.assert_array_equal(sl["truth"], truth[:, :, 6])
    if not HAVE_MATPLOTLIB:  # optional dependency: a clear message instead of a figure
        with pytest.raises(ImportError, match="matplotlib"):
            save_overlay_grid(tmp_path / "o.png", [{"case_id": "a", **sl}] * 2, title="t")
        return
    path = save_overlay_grid(tmp_path / "o.png", [{"case_id": "a", **sl}] * 2, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))

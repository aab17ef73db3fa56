"""Figures (dgseg/viz.py): overlay slices and PNGs."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib")
def test_figures_leave_the_global_matplotlib_state_alone(tmp_path):
    """Every figure is a bare Figure written atomically: no pyplot, no backend switch."""
    code = f"""
import json, sys
import matplotlib
matplotlib.use("svg")
import numpy as np
from dgseg.viz import (plot_curves, plot_domain_losses, plot_study_bars, save_montage,
                       save_overlay_grid)
log = {str(tmp_path / "log.jsonl")!r}
with open(log, "w") as f:
    f.write(json.dumps({{"kind": "train", "step": 1, "loss": 1.0, "dice": 0.1, "lambda": 0.0,
                         "lr": 1e-3}}) + "\\n")
assert plot_curves(log, {str(tmp_path / "c.png")!r}) is not None
assert plot_domain_losses([("a", log)], {str(tmp_path / "d.png")!r}) is not None
col = {{"dice_mean": {{"mean": 0.5, "sd": 0.1}}}}
models = [{{"model": "m", "columns": {{"t1": col}}}}]
result = {{"columns": ["t1"], "summary": {{"models": models}}}}
plot_study_bars(result, {str(tmp_path / "b.png")!r}, titles={{"t1": "T1"}})
sl = {{"image": np.ones((4, 5)), "truth": np.zeros((4, 5)), "pred": np.zeros((4, 5))}}
save_overlay_grid({str(tmp_path / "o.png")!r}, [{{"case_id": "a", **sl}}])
imgs = {{m: np.ones((6, 6, 4), np.int16) for m in ("t1", "t1ce", "t2", "flair")}}
save_montage([(imgs, np.zeros((6, 6, 4), np.uint8))], {str(tmp_path / "m.png")!r})
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("c", "d", "b", "o", "m"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))

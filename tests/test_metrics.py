"""Dice / HD95 against brute force, hand-computed cases and MONAI reference values."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dgseg.constants import BRATS_EMPTY_HD95
from dgseg.evaluation.metrics import (
    RegionReference,
    SurfaceReference,
    dice_per_region,
    dice_score,
    hd95,
    region_metrics,
    surface,
)

DATA = Path(__file__).parent / "data"


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    sa = np.argwhere(surface(a)) * np.asarray(spacing, float)
    sb = np.argwhere(surface(b)) * np.asarray(spacing, float)
    d = np.sqrt(((sa[:, None, :] - sb[None]) ** 2).sum(-1))  # (|Sa|, |Sb|)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_surface_cross_erosion_with_background_border():
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    s = surface(cube)
    assert s.sum() == 26 and not s[2, 2, 2]  # only the centre survives the erosion
    full = np.ones((3, 3, 3), bool)  # touches the border: outside counts as background
    assert surface(full).sum() == 26
    plus = np.zeros((3, 3, 3), bool)  # a voxel whose 6 neighbours are set but not its diagonals
    plus[1, 1, :] = plus[1, :, 1] = plus[:, 1, 1] = True
    assert not surface(plus)[1, 1, 1] and surface(plus).sum() == 6


def test_dice_hand_computed_and_empty_rules():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[0, 0, :3] = True
    b[0, 0, 2:4] = True
    assert dice_score(a, b) == pytest.approx(2 * 1 / (3 + 2))
    assert dice_score(a, a) == 1.0
    empty = np.zeros_like(a)
    assert dice_score(empty, empty) == 1.0
    assert dice_score(a, empty) == 0.0 and dice_score(empty, a) == 0.0
    assert dice_score(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(0.4)


def test_hd95_hand_computed():
    spacing = (2.0, 1.0, 2.5)
    a = np.zeros((6, 6, 6), bool)
    b = np.zeros((6, 6, 6), bool)
    a[1, 1, 1] = True
    b[1, 1, 4] = True
    assert hd95(a, b, spacing) == pytest.approx(7.5)  # 3 voxels × 2.5 mm
    # truth = {p, q}, pred = {p}: pred→truth all 0; truth→pred [0, |pq|]; 95th percentile with
    # linear interpolation = 0.95·|pq|
    b = a.copy()
    b[4, 5, 1] = True
    pq = np.sqrt((3 * 2.0) ** 2 + (4 * 1.0) ** 2)
    assert hd95(a, b, spacing) == pytest.approx(0.95 * pq)
    assert hd95(b, a, spacing) == pytest.approx(0.95 * pq)  # symmetric
    assert hd95(b, b, spacing) == 0.0


def test_hd95_empty_rules():
    a = np.zeros((5, 5, 5), bool)
    empty = np.zeros_like(a)
    a[2, 2, 2] = True
    assert hd95(empty, empty) == 0.0
    assert hd95(a, empty) == BRATS_EMPTY_HD95 == 373.13
    assert hd95(empty, a) == BRATS_EMPTY_HD95


def test_hd95_matches_brute_force_and_ignores_padding():
    rng = np.random.default_rng(2)
    for _ in range(4):
        spacing = rng.uniform(0.5, 2.5, size=3)
        a = rng.random((9, 8, 10)) < 0.3
        b = rng.random((9, 8, 10)) < 0.3
        want = _brute_hd95(a, b, spacing)
        assert hd95(a, b, spacing) == pytest.approx(want, abs=1e-9)
        # embedding both masks in a larger volume changes nothing (the crop is exact)
        pa, pb = np.pad(a, ((3, 5), (0, 7), (2, 2))), np.pad(b, ((3, 5), (0, 7), (2, 2)))
        assert hd95(pa, pb, spacing) == pytest.approx(want, abs=1e-9)


def test_against_monai_reference_values():
    ref = np.load(DATA / "metrics_reference.npz")
    for i in range(len(ref["dice"])):
        pred, truth, spacing = ref["pred"][i], ref["truth"][i], ref["spacing"][i]
        assert dice_score(pred, truth) == pytest.approx(ref["dice"][i], abs=1e-4), i
        assert hd95(pred, truth, spacing) == pytest.approx(ref["hd95"][i], abs=1e-4), i


def test_reference_files_have_a_committed_generator():
    # tests/data/make_reference.py recomputes both files from the published VFFC code and MONAI
    # (not dependencies, so not run here); its own NumPy Dice must reproduce the stored values.
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_reference", DATA / "make_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert "aimagelab/vffc" in gen.__doc__ and "compute_hausdorff_distance" in gen.__doc__
    ref = np.load(DATA / "metrics_reference.npz")
    got = [gen.dice(p, t) for p, t in zip(ref["pred"], ref["truth"])]
    np.testing.assert_allclose(got, ref["dice"], rtol=0, atol=1e-12)
    a, b = gen.new_metric_inputs(1), gen.new_metric_inputs(1)  # seeded
    assert all(np.array_equal(a[k], b[k]) for k in a) and a["pred"].shape == ref["pred"].shape
    assert not a["pred"][0].any() and not a["truth"][0].any()  # BraTS empty cases come first
    assert not a["pred"][1].any() and not a["truth"][2].any()


def test_region_metrics_and_dice_per_region():
    rng = np.random.default_rng(3)
    pred = rng.random((2, 3, 6, 7, 8)) < 0.4
    truth = rng.random((2, 3, 6, 7, 8)) < 0.4
    truth[1, 2] = False  # ET absent in truth ...
    pred[1, 2] = False  # ... and in prediction: Dice 1, HD95 0
    truth[0, 1] = False  # TC absent in truth only: Dice 0, HD95 373.13
    got = dice_per_region(torch.from_numpy(pred), torch.from_numpy(truth))
    assert got.shape == (2, 3) and got.dtype == torch.float32
    for b in range(2):
        m = region_metrics(pred[b], truth[b], (1.0, 1.5, 2.0))
        assert list(m) == ["WT", "TC", "ET"]
        for c, name in enumerate(m):
            assert m[name]["dice"] == pytest.approx(dice_score(pred[b, c], truth[b, c]))
            assert got[b, c].item() == pytest.approx(m[name]["dice"], abs=1e-6)
            assert m[name]["hd95"] == pytest.approx(hd95(pred[b, c], truth[b, c], (1.0, 1.5, 2.0)))
    assert got[1, 2].item() == 1.0 and got[0, 1].item() == 0.0
    assert region_metrics(pred[1], truth[1])["ET"] == {"dice": 1.0, "hd95": 0.0}
    assert region_metrics(pred[0], truth[0])["TC"] == {"dice": 0.0, "hd95": 373.13}
    with pytest.raises(ValueError, match="shape"):
        region_metrics(pred[0, :2], truth[0, :2])
    with pytest.raises(ValueError, match="shape"):
        dice_per_region(torch.from_numpy(pred), torch.from_numpy(truth[:1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dice_per_region_cuda():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 3, 8, 9, 10, generator=g) > 0.5
    truth = torch.rand(2, 3, 8, 9, 10, generator=g) > 0.5
    truth[0, 2] = pred[0, 2] = False
    got = dice_per_region(pred.cuda(), truth.cuda())
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), dice_per_region(pred, truth))


def _noisy_and_blob(shape, seed):
    """A noisy prediction (dense scattered surface) and a blob truth: both transform regimes."""
    rng = np.random.default_rng(seed)
    pred = rng.random(shape) < 0.05
    idx = np.indices(shape)
    centre = np.array(shape)[:, None, None, None] * rng.uniform(0.35, 0.65, size=(3, 1, 1, 1))
    truth = (((idx - centre) / (np.array(shape)[:, None, None, None] / 4)) ** 2).sum(0) < 1
    return pred, truth


def test_hd95_noisy_prediction_matches_brute_force():
    # Large enough for the banded rounds, the hand-over to the lower envelope and the
    # restriction to the lines through the reference surface to all take part.
    for seed, spacing in ((0, (1.0, 1.0, 1.0)), (1, (1.3, 0.7, 2.2))):
        pred, truth = _noisy_and_blob((36, 30, 40), seed)
        want = _brute_hd95(pred, truth, spacing)
        assert hd95(pred, truth, spacing) == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert hd95(truth, pred, spacing) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_surface_reference_distances_match_brute_force():
    rng = np.random.default_rng(4)
    spacing = (0.9, 1.4, 1.1)
    _, truth = _noisy_and_blob((30, 26, 34), 2)
    ref = SurfaceReference(truth, spacing)
    np.testing.assert_array_equal(ref.surface, surface(truth))
    pts = np.argwhere(rng.random(truth.shape) < 0.1)  # (N, 3) anywhere in the volume
    sp = np.argwhere(surface(truth)) * np.asarray(spacing)
    want = (((pts * np.asarray(spacing))[:, None, :] - sp[None]) ** 2).sum(-1).min(1)
    np.testing.assert_allclose(ref.squared_distances(pts), want, rtol=1e-12, atol=1e-12)
    assert np.isinf(SurfaceReference(np.zeros((4, 5, 6)), spacing).squared_distances(pts[:3])).all()
    with pytest.raises(ValueError, match="outside"):
        ref.squared_distances(np.array([[0, 0, truth.shape[2]]]))


def test_prepared_reference_reused_equals_fresh():
    """One RegionReference scoring several predictions (its distance maps computed once and
    grown as needed, in any order) gives what a fresh computation per prediction gives."""
    rng = np.random.default_rng(5)
    noisy, blob = _noisy_and_blob((32, 28, 36), 3)
    truth = np.stack([blob, np.roll(blob, 2, axis=0) & blob, np.zeros_like(blob)])  # ET empty
    truth[2, 14:17, 12:15, 16:19] = True
    preds = [
        np.stack([noisy, noisy, noisy]),
        np.roll(truth, 3, axis=1),  # shifted: the map has to grow along another axis
        np.stack([blob, np.zeros_like(blob), rng.random(blob.shape) < 0.001]),
        truth.copy(),
    ]
    preds[1][:, 0, 0, 0] = True  # a far corner voxel: the box has to reach the border
    for spacing in ((1.0, 1.0, 1.0), (1.2, 0.8, 2.5)):
        for order in (preds, preds[::-1]):
            ref = RegionReference(truth, spacing)
            for p in order:
                got, fresh = region_metrics(p, ref), region_metrics(p, truth, spacing)
                if spacing == (1.0, 1.0, 1.0):  # integer arithmetic: bit-identical
                    assert got == fresh
                else:
                    for name in got:
                        assert got[name]["dice"] == fresh[name]["dice"]
                        assert got[name]["hd95"] == pytest.approx(fresh[name]["hd95"], rel=1e-12)
        assert region_metrics(truth, RegionReference(truth, spacing))["WT"]["hd95"] == 0.0
    ref = RegionReference(truth, (1.0, 1.0, 1.0))
    assert hd95(preds[1][0], ref.regions[0]) == region_metrics(preds[1], truth)["WT"]["hd95"]
    with pytest.raises(ValueError, match="spacing"):
        region_metrics(preds[0], ref, (1.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        region_metrics(preds[0][:, :-1], ref)
    with pytest.raises(ValueError, match="shape"):
        RegionReference(truth[:2])

"""Lesion-wise metrics on hand-built cases whose answers are worked out in the comments.

Bars of cross-section 2×2 (or 1×1) have every voxel on their surface (each has a face neighbour
outside), and their surface distances are plain differences of x indices; that keeps the HD95 and
NSD arithmetic by hand short. Spacing (1, 1, 1) unless stated.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dgseg.evaluation.lesion_metrics import (
    LESION_RULES,
    LesionRules,
    get_lesion_rules,
    lesion_region_metrics,
    lesion_scores,
    min_cost_assignment,
)
from dgseg.evaluation.metrics import dice_score, hd95
from dgseg.evaluation.scoring import case_record

PAN = "panoptica"
B23 = get_lesion_rules("brats2023", min_volume=0.0)  # 2023 rules without the 50 mm³ threshold


def _mask(*boxes, shape=(6, 6, 24)):
    m = np.zeros(shape, bool)
    for box in boxes:
        m[box] = True
    return m


def bar(x0, x1):
    """A 2×2 bar along x, voxels x0..x1-1."""
    return np.s_[2:4, 2:4, x0:x1]


def test_presets_follow_the_official_parameters():
    p, b = LESION_RULES["panoptica"], LESION_RULES["brats2023"]
    assert (p.matching, p.aggregate, p.gt_dilation, p.min_volume) == ("bipartite", "matched", 0, 0)
    assert (p.match_threshold, p.hd95, p.missing_hd95, p.connectivity) == (1e-6, "pooled", 373, 26)
    assert (b.matching, b.aggregate, b.gt_dilation, b.min_volume) == (
        "dilated_overlap",
        "penalized",
        3,
        50.0,
    )
    assert (b.hd95, b.missing_hd95) == ("max", 374.0)
    with pytest.raises(ValueError, match="matching"):
        LesionRules(matching="greedy")
    with pytest.raises(ValueError, match="unknown lesion rules"):
        get_lesion_rules("brats2019")


def test_two_lesions_one_missed():
    # Reference: two 8-voxel cubes far apart; prediction: the first one exactly.
    truth = _mask(np.s_[1:3, 1:3, 1:3], np.s_[3:5, 3:5, 18:20])
    pred = _mask(np.s_[1:3, 1:3, 1:3])
    s = lesion_scores(pred, truth, rules=PAN)
    # panoptica: mean over the one match (Dice 1, HD95 0, NSD 1); F1 = 1 / (1 + 0.5) = 2/3
    assert (s.tp, s.fp, s.fn, s.n_ref, s.n_pred) == (1, 0, 1, 2, 1)
    assert (s.dice, s.hd95, s.nsd) == (1.0, 0.0, 1.0)
    assert s.f1 == pytest.approx(2 / 3)
    missed = [x for x in s.lesions if x.ref is not None and not x.pred]
    assert len(missed) == 1 and (missed[0].dice, missed[0].hd95, missed[0].nsd) == (0.0, 373.0, 0)
    # brats2023 (no volume threshold): Dice (1 + 0) / 2, HD95 (0 + 374) / 2, NSD (1 + 0) / 2
    s = lesion_scores(pred, truth, rules=B23)
    assert (s.dice, s.hd95, s.nsd, s.tp, s.fn) == (0.5, 187.0, 0.5, 1, 1)
    # with the official 50 mm³ threshold both 8 mm³ lesions drop out: nothing left → Dice 1, HD 0
    s = lesion_scores(pred, truth, rules="brats2023")
    assert (s.dice, s.hd95, s.tp, s.fn, s.fp) == (1.0, 0.0, 0, 0, 0)


def test_false_positive_lesion():
    # Reference: one 27-voxel cube; prediction: the cube plus an 8-voxel cube far away.
    truth = _mask(np.s_[1:4, 1:4, 1:4])
    pred = _mask(np.s_[1:4, 1:4, 1:4], np.s_[3:5, 3:5, 18:20])
    s = lesion_scores(pred, truth, rules=PAN)
    assert (s.tp, s.fp, s.fn, s.dice, s.hd95, s.nsd) == (1, 1, 0, 1.0, 0.0, 1.0)
    assert s.f1 == pytest.approx(2 / 3)  # 1 / (1 + (1 + 0) / 2)
    fp = [x for x in s.lesions if x.ref is None]
    assert len(fp) == 1 and fp[0].volume == 8.0 and fp[0].hd95 == 373.0
    # brats2023: the false positive enters the denominator: Dice 1/2, HD95 (0 + 374)/2
    s = lesion_scores(pred, truth, rules=B23)
    assert (s.dice, s.hd95, s.fp) == (0.5, 187.0, 1)


def test_split_lesion():
    # Reference: bar x 2..11 (40 voxels); prediction: x 2..5 and x 8..11 (16 voxels each, a gap
    # of two columns, so two components).
    truth = _mask(bar(2, 12))
    pred = _mask(bar(2, 6), bar(8, 12))
    s = lesion_scores(pred, truth, rules=PAN)
    # panoptica: each piece has Dice 2·16/(40+16) = 4/7; one is matched (one-to-one), one is FP.
    # Surface distances of the match: reference → piece: 16 zeros, 4 each at 1..6; piece →
    # reference: 16 zeros. Pooled 56 values, 95th percentile at index 52.25: both neighbours 6.
    # NSD (tolerance 1 mm): reference 20/40 within, piece 16/16 → (0.5 + 1) / 2 = 0.75.
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)
    assert s.dice == pytest.approx(4 / 7) and s.hd95 == 6.0 and s.nsd == 0.75
    # brats2023: both pieces touch the dilated lesion and are scored together: Dice 2·32/72 = 8/9;
    # reference → pieces: 8 voxels (x 6, 7) at 1, 32 zeros → 95th percentile 1; pieces → ref 0.
    s = lesion_scores(pred, truth, rules=B23)
    assert (s.tp, s.fp, s.fn) == (1, 0, 0)
    assert s.dice == pytest.approx(8 / 9) and s.hd95 == 1.0 and s.nsd == 1.0
    assert s.lesions[0].pred == (1, 2)


def test_merged_lesions():
    # Reference: bars x 2..3 and x 6..7 (8 voxels each, gap of two); prediction: one bar x 2..7.
    truth = _mask(bar(2, 4), bar(6, 8))
    pred = _mask(bar(2, 8))
    s = lesion_scores(pred, truth, rules=PAN)
    # panoptica: Dice 2·8/(8+24) = 1/2 with either; one-to-one: one match, one missed lesion.
    # prediction → matched reference (x 2..3): 8 zeros, 4 each at 1..4; reference → prediction 8
    # zeros. Pooled 32 values, index 29.45 → 4. NSD: (1 + 12/24) / 2 = 0.75.
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    assert (s.dice, s.hd95, s.nsd) == (0.5, 4.0, 0.75)
    # brats2023: the 3-fold dilation merges the references into one 16-voxel lesion.
    # Dice 2·16/(16+24) = 0.8; prediction → reference: 8 voxels (x 4, 5) at 1 → HD95 1; NSD 1.
    s = lesion_scores(pred, truth, rules=B23)
    assert (s.n_ref, s.tp, s.fp, s.fn) == (1, 1, 0, 0)
    assert (s.dice, s.hd95, s.nsd) == (0.8, 1.0, 1.0)


def test_one_to_one_matching_is_optimal_not_greedy():
    # 1×1 bars: r1 = x 0..9, r2 = x 12..15; p2 = x 0..2, p1 = x 4..15.
    # Dice(r1, p1) = 12/22 = 0.545 (the best pair), Dice(r2, p1) = 8/16 = 0.5, Dice(r1, p2) =
    # 6/13. Greedy would take (r1, p1) and leave r2 unmatched; the maximum matching takes
    # (r1, p2) + (r2, p1) = 0.96 > 0.545: two true positives.
    shape = (3, 3, 20)
    truth = _mask(np.s_[1, 1, 0:10], np.s_[1, 1, 12:16], shape=shape)
    pred = _mask(np.s_[1, 1, 0:3], np.s_[1, 1, 4:16], shape=shape)
    s = lesion_scores(pred, truth, rules=PAN)
    assert (s.tp, s.fp, s.fn) == (2, 0, 0)
    assert s.dice == pytest.approx((6 / 13 + 0.5) / 2)
    # HD95 (pooled): (r1, p2): 6 zeros then 1..7, index 11.4 → 6.4; (r2, p1): 8 zeros then 1..8,
    # index 14.25 → 7.25. Mean 6.825.
    assert s.hd95 == pytest.approx((6.4 + 7.25) / 2)


def test_empty_reference():
    empty = np.zeros((6, 6, 24), bool)
    blob = _mask(np.s_[1:3, 1:3, 1:3])
    s = lesion_scores(empty, empty, rules=PAN)  # no lesion anywhere: panoptica's NaN
    assert all(math.isnan(v) for v in (s.dice, s.hd95, s.nsd, s.f1))
    assert (s.tp, s.fp, s.fn) == (0, 0, 0)
    s = lesion_scores(empty, empty, rules="brats2023")  # 2023: Dice 1, HD95 0
    assert (s.dice, s.hd95, s.nsd) == (1.0, 0.0, 1.0)
    s = lesion_scores(blob, empty, rules=PAN)  # false positive only: zero-TP edge case
    assert (s.dice, s.hd95, s.nsd, s.fp, s.f1) == (0.0, 373.0, 0.0, 1, 0.0)
    s = lesion_scores(blob, empty, rules="brats2023")  # 0 / (0 + 1), 374 / 1
    assert (s.dice, s.hd95, s.fp) == (0.0, 374.0, 1)
    s = lesion_scores(empty, blob, rules=PAN)  # missed only
    assert (s.dice, s.hd95, s.fn) == (0.0, 373.0, 1)
    # the per-case metrics keep their own rules
    assert dice_score(blob, empty) == 0.0 and hd95(blob, empty) == 373.13


def test_anisotropic_spacing():
    # spacing (2, 1.5, 0.5): reference cube [2:5]³ (27 voxels, 40.5 mm³), prediction shifted by
    # one voxel along axis 0. Surfaces: 26 voxels each (the centre is interior). Reference →
    # prediction: the z=2 face (9) at 2 mm, the centre column's top (4,3,3) at 0.5 mm (x
    # neighbour on the prediction's ring), 16 at 0; symmetric the other way.
    # Pooled 52 values, index 48.45 → 2.0. NSD at the default tolerance min(spacing) = 0.5 mm:
    # 17/26 each way. Dice 2·18/54 = 2/3.
    spacing = (2.0, 1.5, 0.5)
    truth = _mask(np.s_[2:5, 2:5, 2:5], shape=(8, 7, 7))
    pred = _mask(np.s_[3:6, 2:5, 2:5], shape=(8, 7, 7))
    s = lesion_scores(pred, truth, spacing, rules=PAN)
    assert s.dice == pytest.approx(2 / 3) and s.hd95 == 2.0
    assert s.nsd == pytest.approx(17 / 26)
    assert s.lesions[0].volume == pytest.approx(40.5)
    assert hd95(pred, truth, spacing) == 2.0  # per-case: directed 95th percentiles, also 2.0
    s = lesion_scores(pred, truth, spacing, rules=get_lesion_rules(PAN, nsd_tolerance=2.0))
    assert s.nsd == 1.0
    # the 50 mm³ threshold is a volume: 27 voxels of 1 mm³ are dropped, of 2 mm³ (54) kept
    small = lesion_scores(pred, truth, (1, 1, 1), rules="brats2023")
    big = lesion_scores(pred, truth, (2, 1, 1), rules="brats2023")
    assert (small.tp, small.dice) == (0, 1.0) and (big.tp, big.dice) == (1, pytest.approx(2 / 3))


def test_min_cost_assignment_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n, m = (int(v) for v in rng.integers(1, 5, size=2))
        cost = rng.integers(0, 5, size=(n, m)) / 4.0  # ties on purpose
        pairs = min_cost_assignment(cost)
        assert len(pairs) == min(n, m)
        assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == min(n, m)
        k = min(n, m)
        if n <= m:
            best = min(
                sum(cost[i, j] for i, j in zip(range(n), p))
                for p in itertools.permutations(range(m), k)
            )
        else:
            best = min(
                sum(cost[i, j] for i, j in zip(p, range(m)))
                for p in itertools.permutations(range(n), k)
            )
        assert sum(cost[i, j] for i, j in pairs) == pytest.approx(best)


def test_case_record_and_region_metrics():
    truth = np.stack([_mask(bar(2, 12)), _mask(bar(2, 6)), np.zeros((6, 6, 24), bool)])
    pred = np.stack([_mask(bar(2, 6), bar(8, 12)), _mask(bar(2, 6)), np.zeros((6, 6, 24), bool)])
    per = lesion_region_metrics(pred, truth, rules=PAN)
    assert per["WT"]["dice"] == pytest.approx(4 / 7) and per["TC"]["dice"] == 1.0
    assert math.isnan(per["ET"]["dice"])
    legacy = case_record(pred, truth, (1, 1, 1), case_id="c")
    assert not any(k.startswith("lesion_") for k in legacy)  # per-case only by default
    row = case_record(pred, truth, (1, 1, 1), metrics="all", case_id="c")
    assert {k: row[k] for k in legacy} == legacy  # per-case values unchanged beside lesion ones
    # ET is NaN (empty on both sides) and left out of the mean over regions
    assert row["lesion_dice_mean"] == pytest.approx((4 / 7 + 1.0) / 2)
    assert (row["lesion_tp_WT"], row["lesion_fp_WT"], row["lesion_fn_WT"]) == (1, 1, 0)
    lesion_only = case_record(pred, truth, (1, 1, 1), metrics="lesion", lesion_rules=B23)
    assert "dice_WT" not in lesion_only and lesion_only["lesion_dice_WT"] == pytest.approx(8 / 9)
    with pytest.raises(ValueError, match="metrics"):
        case_record(pred, truth, (1, 1, 1), metrics="new")


def test_region_sets_and_raw_prediction_path(tmp_path):
    import nibabel as nib

    from dgseg.evaluation.scoring import score_label_files
    from dgseg.transforms.labels import (
        REGION_SETS,
        labels_for_region_set,
        labels_to_channels,
        region_masks,
    )

    lab21 = np.array([0, 1, 2, 4, 4]).reshape(1, 1, 5)
    np.testing.assert_array_equal(region_masks(lab21, "brats2021"), labels_to_channels(lab21))
    np.testing.assert_array_equal(
        labels_for_region_set(lab21, "brats2021", "brats2023").ravel(), [0, 1, 2, 3, 3]
    )
    # 2024 post-treatment: 1 NETC, 2 SNFH, 3 ET, 4 RC; WT = 1∪2∪3, TC = 1∪3, RC in neither
    lab24 = np.array([0, 1, 2, 3, 4]).reshape(1, 1, 5)
    assert list(REGION_SETS["brats2024"]) == ["WT", "TC", "ET", "NETC", "SNFH", "RC"]
    np.testing.assert_array_equal(
        region_masks(lab24, "brats2024")[:, 0, 0],
        [
            [0, 1, 1, 1, 0],
            [0, 1, 0, 1, 0],
            [0, 0, 0, 1, 0],
            [0, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 0, 1],
        ],
    )
    with pytest.raises(ValueError, match=r"\[5\]"):
        region_masks(np.array([0, 5]), "brats2024")

    # NIfTI pair in 2024 values: truth has an RC cube and an ET bar; the prediction misses RC.
    truth = np.zeros((6, 6, 24), np.uint8)
    truth[bar(2, 12)] = 3
    truth[np.s_[1:3, 1:3, 18:21]] = 4
    pred = truth.copy()
    pred[pred == 4] = 0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(truth, affine), str(tmp_path / "t.nii.gz"))
    nib.save(nib.Nifti1Image(pred, affine), str(tmp_path / "p.nii.gz"))
    row = score_label_files(
        tmp_path / "p.nii.gz",
        tmp_path / "t.nii.gz",
        convention="brats2023",
        region_set="brats2024",
        metrics="all",
        case_id="c",
    )
    assert row["dice_ET"] == 1.0 and row["dice_RC"] == 0.0 and row["hd95_RC"] == 373.13
    assert row["lesion_dice_ET"] == 1.0 and row["lesion_fn_RC"] == 1
    assert row["lesion_dice_RC"] == 0.0 and row["lesion_hd95_RC"] == 373.0
    assert math.isnan(row["lesion_dice_NETC"])  # no NETC on either side


def test_dilation_matches_brute_force_18_neighbourhood():
    from dgseg.evaluation.lesion_metrics import _dilate18

    rng = np.random.default_rng(1)
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=3) if sum(map(abs, o)) <= 2]
    for it in (1, 2, 3):
        m = rng.random((7, 6, 8)) < 0.05
        want = m.copy()
        for _ in range(it):  # iterate the 18-neighbourhood (SciPy generate_binary_structure(3, 2))
            prev = want.copy()
            for p in zip(*np.nonzero(prev)):
                for o in offsets:
                    q = tuple(p[k] + o[k] for k in range(3))
                    if all(0 <= q[k] < m.shape[k] for k in range(3)):
                        want[q] = True
        np.testing.assert_array_equal(_dilate18(m, it), want)

"""Evaluation rules and per-case records (dgseg/evaluation/scoring.py): input rule, records, metric
jobs,
NIfTI scoring."""

import nibabel as nib
import numpy as np
import pytest

from dgseg.constants import BRATS_EMPTY_HD95, MODALITIES
from dgseg.evaluation.scoring import (
    CaseJob,
    case_record,
    input_channels,
    input_specs,
    pack_mask,
    score_job,
    score_label_files,
    unpack_mask,
)

from case_jobs import case_job

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- input rule
def test_input_rule():
    assert input_channels(("t2",), "t1") == ("t1",)
    assert input_channels(("t2",), "own") == ("t2",)
    assert input_channels(("t1ce", "t2"), "flair") == ("flair", "flair")
    assert input_channels(("t1ce", "t2"), "t2") == ("t2", "t2")  # m fills every channel
    assert input_channels(("t1ce", "t2"), "own") == ("t1ce", "t2")
    assert input_channels(MODALITIES, "t1") is None  # stacked: 'x'
    assert input_channels(MODALITIES, "own") == MODALITIES
    with pytest.raises(ValueError, match="column"):
        input_channels(("t2",), "pd")
    with pytest.raises(ValueError, match="train_modalities"):
        input_channels(("t2w",), "t2")


def test_input_specs_fill_own_with_the_same_prediction():
    assert input_specs(("t2",), ("t1", "t2")) == {("t1",): ["t1"], ("t2",): ["t2", "own"]}
    assert input_specs(tuple(["t1", "t1ce", "t2", "flair"]), ("t1",)) == {
        ("t1", "t1ce", "t2", "flair"): ["own"]
    }


# ----------------------------------------------------------------------------- records
def test_case_record_hand_computed():
    pred = np.zeros((3, 6, 6, 6), bool)
    truth = np.zeros_like(pred)
    pred[0, 1:3, 1:3, 1] = True  # WT: 4 predicted voxels
    truth[0, 1:3, 1, 1] = True  # 2 true voxels, both predicted: Dice 2*2/6
    pred[2, 4, 4, 4] = True  # ET predicted where truth is empty: Dice 0, HD95 373.13
    row = case_record(pred, truth, (1.0, 1.0, 1.0), case_id="c0", model="m")
    assert list(row)[:2] == ["case_id", "model"]
    assert row["dice_WT"] == pytest.approx(2 / 3)
    assert row["dice_TC"] == 1.0 and row["hd95_TC"] == 0.0  # both empty
    assert row["dice_ET"] == 0.0 and row["hd95_ET"] == pytest.approx(BRATS_EMPTY_HD95)
    assert row["dice_mean"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # WT surfaces: predicted voxels (1,2,1), (2,2,1) are 1 voxel from the truth, all others 0:
    # the 95th percentile of [0, 0, 1, 1] is 1 (linear interpolation), truth->pred all 0.
    assert row["hd95_WT"] == pytest.approx(1.0)
    assert row["hd95_mean"] == pytest.approx((1.0 + 0.0 + BRATS_EMPTY_HD95) / 3)


# ----------------------------------------------------------------------------- metric jobs


def test_pack_roundtrip_and_score_job_is_case_record():
    m = np.random.default_rng(0).random((3, 5, 7, 3)) < 0.5  # 315 voxels: not a multiple of 8
    assert pack_mask(m).nbytes == 40
    np.testing.assert_array_equal(unpack_mask(pack_mask(m), m.shape), m)
    job, truth, preds = case_job("c7", 1)
    rows = score_job(job)
    assert rows == [case_record(p, truth, (1.0, 1.5, 0.8), **keys) for keys, p in preds]
    assert [r["k"] for r in rows] == [0, 1, 2] and list(rows[0])[:3] == ["model", "case_id", "k"]
    with pytest.raises(ValueError, match="c8"):
        CaseJob.build("c8", truth, (1.0, 1.0, 1.0), [({}, truth[:, :-1])])


# ----------------------------------------------------------------------------- NIfTI scoring
def _nifti(path, arr, affine):
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), str(path))


def _brute_hd95(a, b, spacing):
    """All-pairs HD95 between 6-connected surfaces (the definition in tests' reference data)."""

    def surf(m):
        p = np.pad(m, 1)
        inner = np.ones_like(m)
        for ax in range(3):
            for sh in (-1, 1):
                inner &= np.roll(p, sh, axis=ax)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    sa, sb = surf(a), surf(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))  # (|Sa|, |Sb|) mm
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_score_label_files(tmp_path):
    aff = np.diag([1.2, 1.0, 0.9, 1.0])
    aff[:3, 3] = (-10, 5, 3)
    truth = np.zeros((20, 18, 16), np.uint8)
    truth[5:12, 5:12, 4:10] = 2
    truth[7:10, 7:10, 6:8] = 1
    truth[8, 8, 7] = 4
    _nifti(tmp_path / "t.nii.gz", truth, aff)
    _nifti(tmp_path / "p.nii.gz", truth, aff)
    row = score_label_files(tmp_path / "p.nii.gz", tmp_path / "t.nii.gz", case_id="c")
    assert [row[f"dice_{r}"] for r in ("WT", "TC", "ET")] == [1.0, 1.0, 1.0]
    assert [row[f"hd95_{r}"] for r in ("WT", "TC", "ET")] == [0.0, 0.0, 0.0]
    shifted = np.roll(truth, 2, axis=0)  # 2 voxels along x = 2.4 mm
    _nifti(tmp_path / "s.nii.gz", shifted, aff)
    row = score_label_files(tmp_path / "s.nii.gz", tmp_path / "t.nii.gz")
    assert row["dice_WT"] == pytest.approx(2 * 5 * 7 * 6 / (2 * 7 * 7 * 6))
    assert row["hd95_WT"] == pytest.approx(_brute_hd95(shifted > 0, truth > 0, (1.2, 1.0, 0.9)))
    # BraTS 2023 reference (ET = 3) against a 2021-valued prediction.
    ref23 = np.where(truth == 4, 3, truth).astype(np.uint8)
    _nifti(tmp_path / "t23.nii.gz", ref23, aff)
    row = score_label_files(tmp_path / "p.nii.gz", tmp_path / "t23.nii.gz", convention="brats2023")
    assert row["dice_ET"] == 1.0
    _nifti(tmp_path / "moved.nii.gz", truth, np.eye(4))
    with pytest.raises(ValueError, match="affine"):
        score_label_files(tmp_path / "moved.nii.gz", tmp_path / "t.nii.gz")

"""Crop to the brain and z-score (data_prep/preprocess.py) against an independent computation."""

from __future__ import annotations

import json

import h5py
import numpy as np

from data_prep.pipeline import prepare
from dgseg.constants import MODALITIES
from dgseg.data.window import restore_to_original

from prepared_data import SIZE, read_nifti


def test_zscore_and_crop_match_independent_computation(raw_sets, prepared_sets):
    out, _ = prepared_sets
    rec = json.loads((out / "brats2021" / "manifest.json").read_text())["cases"][1]
    cid = rec["id"]
    vols = {
        m: read_nifti(raw_sets / "brats2021" / cid / f"{cid}_{m}.nii.gz").astype(np.float64)
        for m in MODALITIES
    }
    nz = np.any([v != 0 for v in vols.values()], axis=0)
    idx = np.argwhere(nz)
    start, stop = idx.min(0), idx.max(0) + 1
    assert rec["bbox_start"] == start.tolist() and rec["bbox_stop"] == stop.tolist()
    off = start + ((stop - start) - SIZE) // 2  # centred, rounding down
    assert rec["offset"] == off.tolist()
    with h5py.File(out / "brats2021" / rec["shard"], "r") as f:
        for m, v in vols.items():
            brain = v[v != 0]
            z = np.where(v != 0, (v - brain.mean()) / brain.std(), 0.0)
            lo, hi = np.maximum(off, 0), np.minimum(off + SIZE, v.shape)
            want = np.zeros((SIZE,) * 3)
            want[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, off))] = z[
                tuple(slice(a, b) for a, b in zip(lo, hi))
            ]
            got = f[cid][m][()]
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=2e-5)


def test_full_size_keeps_box_and_restores(raw_sets, tmp_path):
    res = prepare(raw_sets / "brats2021", tmp_path / "full", size=None, progress=False)
    assert res.exit_code == 0
    rec = json.loads((tmp_path / "full" / "manifest.json").read_text())["cases"][0]
    assert rec["shape"] == [b - a for a, b in zip(rec["bbox_start"], rec["bbox_stop"])]
    assert rec["offset"] == rec["bbox_start"]
    with h5py.File(tmp_path / "full" / rec["shard"], "r") as f:
        lab = f[rec["id"]]["label"][()]
        t2 = f[rec["id"]]["t2"][()]
    brain = t2[t2 != 0]
    assert abs(brain.mean()) < 1e-4 and abs(brain.std() - 1) < 1e-4  # whole brain stored
    src = read_nifti(raw_sets / "brats2021" / rec["id"] / f"{rec['id']}_seg.nii.gz")
    back = restore_to_original(lab, rec["offset"], rec["original_shape"])
    np.testing.assert_array_equal(back, src)  # the label lies inside the brain box

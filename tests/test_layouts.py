"""Raw layouts (data_prep/layouts.py): the same cases in the BraTS 2021, 2023 and MSD layouts
and label conventions store the same regions and arrays; BraTS 2023 time points are one patient."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from data_prep.pipeline import prepare
from data_prep.synthetic import write_dataset
from dgseg.constants import MODALITIES

from prepared_data import REGIONS_IN_SOURCE, SEG_NAME, SIZE, read_nifti


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_region_counts_equal_source_inside_crop(raw_sets, prepared_sets, layout):
    out, results = prepared_sets
    res = results[layout]
    assert res.exit_code == 0 and res.skipped == {} and len(res.prepared) == 3
    manifest = json.loads((out / layout / "manifest.json").read_text())
    assert manifest["format"] == "dgseg-shards" and manifest["version"] == 1
    totals = dict.fromkeys(REGIONS_IN_SOURCE[layout], 0)
    for rec in manifest["cases"]:
        assert rec["layout"] == layout and rec["has_label"]
        src = read_nifti(raw_sets / layout / SEG_NAME[layout].format(id=rec["id"]))
        o = np.asarray(rec["offset"])
        lo, hi = np.maximum(o, 0), np.minimum(o + SIZE, src.shape)
        window = src[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]  # crop in the original grid
        with h5py.File(out / layout / rec["shard"], "r") as f:
            g = f[rec["id"]]
            lab = g["label"][()]
            assert lab.shape == (SIZE,) * 3 and lab.dtype == np.uint8
            assert set(np.unique(lab).tolist()) <= {0, 1, 2, 4}
            assert list(g.attrs["offset"]) == rec["offset"]
            assert g.attrs["label_convention"] == "brats2021"
        stored = {"WT": lab > 0, "TC": (lab == 1) | (lab == 4), "ET": lab == 4}
        for region, values in REGIONS_IN_SOURCE[layout].items():
            want = int(np.isin(window, values).sum())
            assert int(stored[region].sum()) == want, (layout, rec["id"], region)
            assert rec["region_voxels"][region] == want
            totals[region] += want
    assert min(totals.values()) > 0  # the checks above are not vacuous


def test_layouts_store_identical_arrays(prepared_sets):
    """Same cases in three layouts -> same stored images (MSD channel order, 2023 names)."""
    out, _ = prepared_sets
    m = {
        lay: json.loads((out / lay / "manifest.json").read_text())
        for lay in ("brats2021", "brats2023", "msd")
    }
    for k in range(3):
        arrays = {}
        for lay in m:
            rec = m[lay]["cases"][k]
            with h5py.File(out / lay / rec["shard"], "r") as f:
                arrays[lay] = {n: f[rec["id"]][n][()] for n in (*MODALITIES, "label")}
        for lay in ("brats2023", "msd"):
            for n in (*MODALITIES, "label"):
                np.testing.assert_array_equal(arrays[lay][n], arrays["brats2021"][n])


def test_time_points_share_split_in_manifest(tmp_path):
    write_dataset(tmp_path / "raw", 6, shape=(24, 24, 20), seed=0, layout="brats2023")
    a, b = "BraTS-GLI-00000-000", "BraTS-GLI-00000-001"
    shutil.copytree(tmp_path / "raw" / a, tmp_path / "raw" / b)
    for p in (tmp_path / "raw" / b).iterdir():
        p.rename(p.with_name(p.name.replace(a, b)))
    for seed in range(4):
        prepare(tmp_path / "raw", tmp_path / "out", size=16, seed=seed, progress=False)
        cases = {
            c["id"]: c
            for c in json.loads((tmp_path / "out" / "manifest.json").read_text())["cases"]
        }
        assert cases[a]["patient"] == cases[b]["patient"] == "BraTS-GLI-00000"
        assert cases[a]["split"] == cases[b]["split"]


# --------------------------------------------------------------------------- CLI, API, bench

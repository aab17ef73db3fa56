"""Loading and checking raw cases (data_prep/loading.py)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from data_prep.layouts import discover_cases
from data_prep.loading import load_raw_case
from data_prep.preprocess import preprocess_case
from dgseg.constants import MODALITIES

from prepared_data import SHAPE, read_nifti


def test_loader_and_transforms_convert_labels_alike():
    from data_prep.loading import CaseError, _convert_label
    from dgseg.constants import LABEL_CONVENTIONS
    from dgseg.transforms.labels import convert_labels

    for conv, table in LABEL_CONVENTIONS.items():
        lab = np.array(sorted(table) * 3, np.int16).reshape(3, -1, 1)
        np.testing.assert_array_equal(_convert_label(lab, conv, "x"), convert_labels(lab, conv))
        bad = max(table) + 1
        with pytest.raises(CaseError, match=f"unknown label values \\[{bad}\\]"):
            _convert_label(np.full((2, 2, 2), bad, np.int16), conv, "x")


# --------------------------------------------------------------------------- bad input


def test_load_raw_case_contract(raw_sets):
    cases, problems = discover_cases(raw_sets / "msd")
    assert problems == [] and [c.layout for c in cases] == ["msd"] * 3
    loaded = load_raw_case(cases[0])
    assert loaded.images.shape == (4, *SHAPE) and loaded.images.dtype == np.float32
    four = read_nifti(raw_sets / "msd" / "imagesTr" / f"{cases[0].case_id}.nii.gz")
    np.testing.assert_array_equal(loaded.images[MODALITIES.index("t1ce")], four[..., 2])  # T1gd
    assert len(loaded.source_sha256["4d"]) == 64
    prep = preprocess_case(loaded, 20)
    assert prep.images.shape == (4, 20, 20, 20) and prep.label.shape == (20, 20, 20)


def test_gzip_multi_member_reads_whole_file(tmp_path):
    from data_prep.loading import read_nifti

    arr = np.arange(24 * 20 * 16, dtype=np.int16).reshape(24, 20, 16)
    blob = nib.Nifti1Image(arr, np.eye(4)).to_bytes()
    p = tmp_path / "x.nii.gz"
    p.write_bytes(gzip.compress(blob[:1000]) + gzip.compress(blob[1000:]))  # two members
    got, _, _ = read_nifti(p)
    np.testing.assert_array_equal(got, arr)

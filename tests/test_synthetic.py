"""Synthetic BraTS-like cases: determinism, label nesting, MRI contrast, layouts, CLI, montage."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import runpy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.synthetic import (
    LAYOUTS,
    case_id_for,
    case_seed,
    make_case,
    save_montage,
    write_dataset,
)
from data_prep.synthetic_anatomy import TISSUES, TUMOUR, Grid, smooth_noise
from dgseg.constants import MODALITIES

SMALL = (32, 30, 28)  # anisotropic on purpose: axes must not be mixed up


def dilate6(mask: np.ndarray) -> np.ndarray:
    """Brute-force 6-neighbourhood dilation (independent of the generator's own helper)."""
    out = mask.copy()
    idx = np.argwhere(mask)
    for axis in range(3):
        for step in (-1, 1):
            moved = idx.copy()
            moved[:, axis] += step
            ok = (moved[:, axis] >= 0) & (moved[:, axis] < mask.shape[axis])
            out[tuple(moved[ok].T)] = True
    return out


@pytest.fixture(scope="module")
def small_cases():
    return [make_case(SMALL, seed=s, return_maps=True) for s in range(8)]


def test_seeded_determinism_and_seed_sensitivity():
    a_img, a_seg = make_case(SMALL, seed=11)
    b_img, b_seg = make_case(SMALL, seed=11)
    c_img, c_seg = make_case(SMALL, seed=12)
    for m in MODALITIES:
        np.testing.assert_array_equal(a_img[m], b_img[m])
    np.testing.assert_array_equal(a_seg, b_seg)
    assert any(not np.array_equal(a_img[m], c_img[m]) for m in MODALITIES)
    assert not np.array_equal(a_seg, c_seg)


def test_case_seed_is_a_function_of_seed_and_index():
    assert case_seed(0, 3) == case_seed(0, 3)
    assert len({case_seed(0, i) for i in range(50)} | {case_seed(1, i) for i in range(50)}) == 100


def test_dtypes_shapes_and_label_values(small_cases):
    for images, seg, _ in small_cases:
        assert set(images) == set(MODALITIES)
        for m in MODALITIES:
            assert images[m].dtype == np.int16 and images[m].shape == SMALL
        assert seg.dtype == np.uint8 and seg.shape == SMALL
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        assert (seg == 2).any() and ((seg == 1) | (seg == 4)).any()  # every case has a tumour


def test_background_exactly_zero_and_brain_nonzero(small_cases):
    for images, seg, maps in small_cases:
        brain = maps["tissue"] != TISSUES["background"]
        assert 0.05 < brain.mean() < 0.6  # a brain, not an empty or full box
        assert not brain[0].any() and not brain[-1].any()  # it does not touch the volume edge
        for m in MODALITIES:
            assert (images[m][~brain] == 0).all()
            assert (images[m][brain] >= 1).all()
        assert (seg[~brain] == 0).all()  # tumour labels only inside the brain


def test_nesting_edema_surrounds_core_and_rim_surrounds_necrosis(small_cases):
    for _, seg, _ in small_cases:
        wt, tc = seg > 0, (seg == 1) | (seg == 4)
        assert (dilate6(tc) <= wt).all()  # one voxel of edema all round the core
        if (seg == 4).any():
            assert (dilate6(seg == 1) <= tc).all()  # necrosis enclosed by enhancing rim
    # the tumour classes map onto the labels as documented
    images, seg, maps = small_cases[0]
    t = maps["tumour"]
    assert ((t == TUMOUR["edema"]) == (seg == 2)).all()
    assert ((t == TUMOUR["enhancing"]) == (seg == 4)).all()


def test_with_enhancing_flag_and_default_mix():
    for s in range(4):
        assert not (make_case((24, 24, 24), seed=s, with_enhancing=False)[1] == 4).any()
        assert (make_case((24, 24, 24), seed=s, with_enhancing=True)[1] == 4).any()
    has_et = [bool((make_case((24, 24, 24), seed=s)[1] == 4).any()) for s in range(20)]
    assert 0 < sum(has_et) < 20  # some cases without enhancing tumour, most with


def erode6(mask: np.ndarray) -> np.ndarray:
    """Voxels whose six face neighbours are all in ``mask`` (outside the volume counts as out)."""
    p = np.pad(mask, 1)
    out = mask.copy()
    for axis in range(3):
        for step in (0, 2):
            sl = [slice(1, -1)] * 3
            sl[axis] = slice(step, step + mask.shape[axis])
            out &= p[tuple(sl)]
    return out


def _means(images, seg, maps):
    """Per modality: tissue means over voxels whose six neighbours share their class (no
    partial volume), and means over the tumour regions."""
    healthy = maps["tumour"] == 0
    pure = {k: erode6((maps["tissue"] == TISSUES[k]) & healthy) for k in ("csf", "gm", "wm")}
    regions = {"edema": seg == 2, "core": (seg == 1) | (seg == 4), "et": seg == 4}
    return [
        {k: images[mod][m].astype(np.float64).mean() for k, m in (pure | regions).items()}
        for mod in MODALITIES
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mri_contrast_ordering(seed):
    # half the BraTS size (2 mm voxels): thin cortex is resolved, cases take ~0.2 s
    shape = (120, 120, 78)
    images, seg, maps = make_case(shape, seed=seed, with_enhancing=True, return_maps=True)
    t1, t1ce, t2, fl = _means(images, seg, maps)
    assert t1["wm"] > t1["gm"] > t1["csf"]  # T1: WM brightest, CSF dark
    assert t1["core"] < t1["wm"] and t1["edema"] < t1["wm"]  # tumour dark in T1
    assert t2["csf"] > t2["gm"] > t2["wm"]  # T2: fluid bright
    assert t2["edema"] > t2["gm"]  # edema bright in T2
    assert fl["csf"] < fl["wm"] < fl["gm"]  # FLAIR: CSF suppressed
    assert fl["edema"] > max(fl["gm"], fl["wm"], fl["csf"])  # edema brightest in FLAIR
    # T1CE: the rim enhances, also relative to T1 (contrast normalised by white matter)
    assert t1ce["et"] > t1ce["wm"]
    assert t1ce["et"] / t1ce["wm"] > 1.3 * t1["et"] / t1["wm"]


def test_scale_noise_and_bias_vary_between_cases(small_cases):
    wm_medians = [np.median(img["t1"][m["tissue"] == TISSUES["wm"]]) for img, _, m in small_cases]
    assert max(wm_medians) > 1.5 * min(wm_medians)  # different global scale per case
    images, seg, maps = small_cases[0]
    wm = (maps["tissue"] == TISSUES["wm"]) & (maps["tumour"] == 0)
    assert images["t2"][wm].std() > 0.01 * images["t2"][wm].mean()  # noise and bias present


def test_smooth_noise_unit_variance_and_smooth():
    g = Grid((0, 0, 0), (96, 96, 64), (1.0, 1.0, 1.0), (96, 96, 64))
    f = np.stack([smooth_noise(np.random.default_rng(s), g, 8.0) for s in range(4)])
    assert abs(f.std() - 1.0) < 0.1 and abs(f.mean()) < 0.1
    # neighbouring voxels 1 mm apart at an 8 mm feature size are strongly correlated
    assert np.corrcoef(f[:, 1:].ravel(), f[:, :-1].ravel())[0, 1] > 0.9


def test_default_shape_full_size_case():
    images, seg = make_case(seed=5)
    assert images["flair"].shape == (240, 240, 155) and seg.shape == (240, 240, 155)
    brain = images["t1"] > 0
    assert 1.0e6 < brain.sum() < 2.5e6  # a 1.0-2.5 litre brain at 1 mm
    assert (seg > 0).sum() > 5000
    assert all((images[m] > 0).sum() == brain.sum() for m in MODALITIES)


@pytest.mark.parametrize(
    "bad", [dict(shape=(8, 32, 32)), dict(shape=(32, 32)), dict(seed=-1), dict(seed=1.5)]
)
def test_make_case_rejects_bad_input(bad):
    kwargs = dict(shape=(32, 32, 32), seed=0) | bad
    with pytest.raises(ValueError):
        make_case(kwargs.pop("shape"), **kwargs)


@pytest.mark.parametrize(
    "bad", [dict(layout="brats2019"), dict(workers=0), dict(start_index=-1), dict(shape=(4, 4, 4))]
)
def test_write_dataset_rejects_bad_input(tmp_path, bad):
    with pytest.raises(ValueError):
        write_dataset(tmp_path, 1, **(dict(shape=(24, 24, 24)) | bad))


def _load(path: Path):
    img = nib.load(path)
    return img, np.asarray(img.dataobj)


EXPECTED_FILES = {
    "brats2021": [
        "BraTS2021_00002/BraTS2021_00002_{}.nii.gz",
        ("t1", "t1ce", "t2", "flair", "seg"),
    ],
    "brats2020": [
        "BraTS20_Training_003/BraTS20_Training_003_{}.nii.gz",
        ("t1", "t1ce", "t2", "flair", "seg"),
    ],
    "brats2023": [
        "BraTS-GLI-00002-000/BraTS-GLI-00002-000-{}.nii.gz",
        ("t1n", "t1c", "t2w", "t2f", "seg"),
    ],
    "unlabelled": ["BraTS2021_00002/BraTS2021_00002_{}.nii.gz", ("t1", "t1ce", "t2", "flair")],
    "msd": ["{}/BRATS_003.nii.gz", ("imagesTr", "labelsTr")],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_writer_names_dtypes_and_labels(tmp_path, layout):
    shape, seed = (24, 26, 20), 7
    ids = write_dataset(tmp_path, 2, shape=shape, seed=seed, layout=layout, start_index=1)
    assert ids == [case_id_for(layout, 1), case_id_for(layout, 2)]
    pattern, tags = EXPECTED_FILES[layout]
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    expected = {pattern.format(t) for t in tags}
    assert expected <= written
    n_per_case = len(tags)
    assert len(written) == 2 * n_per_case + (layout == "msd")  # nothing else (no temp files)
    images, seg = make_case(shape, seed=case_seed(seed, 2))  # the case with global index 2
    if layout == "msd":
        img, data = _load(tmp_path / "imagesTr" / "BRATS_003.nii.gz")
        assert data.shape == shape + (4,) and img.get_data_dtype() == np.int16
        for k, m in enumerate(("flair", "t1", "t1ce", "t2")):
            np.testing.assert_array_equal(data[..., k], images[m])
        lab_img, lab = _load(tmp_path / "labelsTr" / "BRATS_003.nii.gz")
        assert lab_img.get_data_dtype() == np.uint8 and lab.shape == shape
        expected_lab = np.select([seg == 2, seg == 1, seg == 4], [1, 2, 3], 0)
        np.testing.assert_array_equal(lab, expected_lab)
        meta = json.loads((tmp_path / "dataset.json").read_text())
        assert meta["numTraining"] == 2 and meta["modality"]["0"] == "FLAIR"
        assert {e["image"] for e in meta["training"]} == {
            "./imagesTr/BRATS_002.nii.gz",
            "./imagesTr/BRATS_003.nii.gz",
        }
        np.testing.assert_array_equal(img.affine, np.eye(4))
        return
    for tag, mod in zip(tags, MODALITIES):
        img, data = _load(tmp_path / pattern.format(tag))
        assert data.shape == shape and img.get_data_dtype() == np.int16
        np.testing.assert_array_equal(img.affine, np.eye(4))
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        np.testing.assert_array_equal(data, images[mod])
    if layout == "unlabelled":
        assert not list(tmp_path.rglob("*seg*"))
        return
    img, lab = _load(tmp_path / pattern.format("seg"))
    assert img.get_data_dtype() == np.uint8
    if layout == "brats2023":
        assert set(np.unique(lab).tolist()) <= {0, 1, 2, 3}
        np.testing.assert_array_equal(lab, np.where(seg == 4, 3, seg))
    else:
        np.testing.assert_array_equal(lab, seg)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.nii.gz"))
    }


def test_cases_do_not_depend_on_workers_or_batching(tmp_path):
    kw = dict(shape=(24, 24, 24), seed=3, layout="brats2021")
    write_dataset(tmp_path / "serial", 3, **kw)
    write_dataset(tmp_path / "parallel", 3, workers=2, **kw)
    write_dataset(tmp_path / "split", 1, **kw)
    write_dataset(tmp_path / "split", 2, start_index=1, **kw)
    ref = _digest(tmp_path / "serial")
    assert len(ref) == 15
    assert _digest(tmp_path / "parallel") == ref == _digest(tmp_path / "split")
    # the files are gzip with a zero mtime: the same case gives the same bytes
    raw = (tmp_path / "serial" / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\x00\x00\x00\x00"
    assert len(gzip.decompress(raw)) == 352 + 24**3  # NIfTI-1 header + uint8 voxels


def test_cli_writes_cases_and_reports_progress(tmp_path, capsys):
    tool = runpy.run_path(str(Path(__file__).parents[1] / "tools" / "make_synthetic_brats.py"))
    rc = tool["main"](
        [
            "--output",
            str(tmp_path),
            "--n-cases",
            "2",
            "--shape",
            "24",
            "24",
            "24",
            "--layout",
            "brats2023",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "2/2 cases" in err and "ETA" in err
    assert (tmp_path / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t2f.nii.gz").is_file()
    bad = ["--output", str(tmp_path), "--n-cases", "1", "--shape", "4", "4", "4"]
    assert tool["main"](bad) == 2  # a bad size is a one-line error, not a traceback


def test_montage_png_or_clear_error(tmp_path):
    write_dataset(tmp_path / "a", 1, shape=(32, 32, 24), layout="brats2021")
    write_dataset(tmp_path / "b", 1, shape=(32, 32, 24), layout="brats2023", start_index=1)
    cases = [
        tmp_path / "a" / "BraTS2021_00000",
        tmp_path / "b" / "BraTS-GLI-00001-000",
        make_case((32, 32, 24), seed=4),
    ]
    out = tmp_path / "montage.png"
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ImportError, match="viz"):
            save_montage(cases, out)
        return
    save_montage(cases, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000
    assert not list(tmp_path.glob("*.tmp"))

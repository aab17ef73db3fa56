"""dgseg/inference/predict_case.py and tools/predict.py: label maps back in the original space;
evaluate/predict
round trip."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dgseg.constants import MODALITIES
from dgseg.evaluation.scoring import score_label_files
from dgseg.inference.predict_case import load_predictor, predict_prepared, write_label_nifti
from dgseg.transforms.labels import labels_to_channels

from tool_modules import load_tool

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (30, 26, 22)  # raw (X, Y, Z), not a cube, so axis mix-ups show


predict = load_tool("predict")


def _affine():
    a = np.array(
        [[-1.1, 0.0, 0.0, 40.0], [0.0, 0.9, 0.1, -20.0], [0.0, 0.0, 1.2, 7.5], [0.0, 0.0, 0.0, 1.0]]
    )
    return a


def write_raw_case(folder: Path, case_id: str, *, seed: int, tumour=True) -> Path:
    """A BraTS-2021-layout case: ellipsoid brain off-centre, nested tumour labels 1, 2, 4."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    brain = ((x - 16) / 11) ** 2 + ((y - 12) / 9) ** 2 + ((z - 11) / 8) ** 2 <= 1
    seg = np.zeros(SHAPE, np.uint8)
    if tumour:
        c = np.array([15, 12, 10]) + rng.integers(-2, 3, size=3)
        r2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
        seg[r2 <= 16] = 2
        seg[r2 <= 6] = 1
        seg[r2 <= 2] = 4
    case = folder / case_id
    case.mkdir(parents=True)
    for k, m in enumerate(MODALITIES):
        img = brain * (100 + 20 * k + rng.normal(0, 5, SHAPE)) + 40 * (seg > 0) * (k - 1.5)
        img = np.where(brain, np.maximum(img, 1), 0).astype(np.int16)
        nib.save(nib.Nifti1Image(img, _affine()), str(case / f"{case_id}_{m}.nii.gz"))
    nib.save(nib.Nifti1Image(seg, _affine()), str(case / f"{case_id}_seg.nii.gz"))
    return case


def _prepared(case_dir: Path, size):
    from data_prep.layouts import discover_cases
    from data_prep.loading import load_raw_case
    from data_prep.preprocess import preprocess_case

    (raw,), problems = discover_cases(case_dir)
    assert problems == []
    return raw, preprocess_case(load_raw_case(raw), size=size)


def oracle_for(prepared):
    """A 'model' that returns the stored ground truth: the perfect prediction."""
    truth = torch.from_numpy(labels_to_channels(prepared.label).astype(np.float32))[None]

    def prob_fn(x):
        assert x.shape[2:] == truth.shape[2:]
        return truth

    return prob_fn


@pytest.mark.parametrize("size", [None, 24, 40])  # full box, crop, pad
def test_perfect_prediction_round_trip_scores_dice_one(tmp_path, size):
    case_dir = write_raw_case(tmp_path / "raw", "BraTS2021_00007", seed=size or 0)
    raw, prep = _prepared(case_dir, size)
    out = tmp_path / "pred"
    # The same path as the CLI: preprocess -> predict -> restore -> atomic NIfTI.
    path = predict.predict_case(raw, oracle_for(prep), ("t2",), out, size=size)
    assert path == out / "BraTS2021_00007.nii.gz"
    img = nib.load(str(path))
    src = nib.load(str(raw.label_file))
    assert img.shape == SHAPE and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asarray(img.dataobj)).tolist()) == {0, 1, 2, 4}
    row = score_label_files(path, raw.label_file)
    for r in ("WT", "TC", "ET"):
        assert row[f"dice_{r}"] == 1.0 and row[f"hd95_{r}"] == 0.0
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(src.dataobj))
    assert not list(out.glob("*.tmp"))


def test_outside_the_stored_window_is_background(tmp_path):
    # Crop 12^3 out of a brain box ~23x19x17: a predictor saying "ET everywhere" must give
    # label 4 exactly on the window [offset, offset + 12) and 0 elsewhere in the original grid.
    case_dir = write_raw_case(tmp_path / "raw", "BraTS2021_00001", seed=1)
    _, prep = _prepared(case_dir, 12)
    ones = lambda x: torch.ones(1, 3, *x.shape[2:])  # noqa: E731
    full = predict_prepared(prep, ones, ("t1", "flair"))
    assert full.shape == SHAPE
    expected = np.zeros(SHAPE, np.uint8)
    lo = np.asarray(prep.offset)
    assert (lo >= 0).all() and (lo + 12 <= np.asarray(SHAPE)).all()
    expected[lo[0] : lo[0] + 12, lo[1] : lo[1] + 12, lo[2] : lo[2] + 12] = 4
    np.testing.assert_array_equal(full, expected)


def test_channel_selection_follows_modality_order(tmp_path):
    case_dir = write_raw_case(tmp_path / "raw", "BraTS2021_00002", seed=2)
    _, prep = _prepared(case_dir, None)
    seen = {}

    def spy(x):
        seen["x"] = x
        return torch.zeros(1, 3, *x.shape[2:])

    predict_prepared(prep, spy, ("flair", "t1ce"))
    np.testing.assert_array_equal(seen["x"][0, 0].numpy(), prep.images[3])
    np.testing.assert_array_equal(seen["x"][0, 1].numpy(), prep.images[1])


def test_nifti_bytes_header(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3] = 4
    path = write_label_nifti(tmp_path / "a.nii.gz", labels, _affine())
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    np.testing.assert_allclose(img.affine, _affine(), atol=1e-6)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    # Deterministic bytes (gzip mtime fixed): re-running gives an identical file.
    first = path.read_bytes()
    write_label_nifti(path, labels, _affine())
    assert path.read_bytes() == first


def _tiny_checkpoint(path: Path, modalities, *, arch="segresnet", roi="16"):
    from dgseg.config import apply_overrides
    from dgseg.models import build_model
    from dgseg.presets import get_preset
    from dgseg.training.checkpoint import save_checkpoint

    cfg = apply_overrides(
        get_preset("tiny"),
        [
            f"data.modalities={','.join(modalities)}",
            f"model.arch={arch}",
            "model.init_filters=4",
            "model.unet_features=4,4,8,8,8",
            f"run.val_roi={roi}",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.data.in_channels, cfg.model)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict()})
    return path


def test_predict_cli_writes_cases_and_skips_bad_ones(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_raw_case(raw, "BraTS2021_00010", seed=10)
    write_raw_case(raw, "BraTS2021_00011", seed=11, tumour=False)
    bad = write_raw_case(raw, "BraTS2021_00012", seed=12)
    (bad / "BraTS2021_00012_flair.nii.gz").write_bytes(b"not a nifti file")  # corrupt, read
    (raw / "BraTS2021_00010" / "BraTS2021_00010_t1ce.nii.gz").write_bytes(b"x")  # corrupt, unread
    ck = _tiny_checkpoint(tmp_path / "m" / "best.pt", ("t2",))
    out = tmp_path / "pred"
    rc = predict.main(
        [
            "--checkpoint",
            str(ck),
            "--input",
            str(raw),
            "--output",
            str(out),
            "--modality",
            "flair",
            "--size",
            "24",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1, err  # a case failed: the others are written, the status says so
    assert sorted(p.name for p in out.iterdir()) == [
        "BraTS2021_00010.nii.gz",
        "BraTS2021_00011.nii.gz",
    ]
    skip_lines = [ln for ln in err.splitlines() if ln.startswith("skip BraTS2021_00012")]
    assert len(skip_lines) == 1 and "BraTS2021_00012_flair.nii.gz" in skip_lines[0]
    assert "predicted 2 case(s), skipped 1" in err
    for p in out.iterdir():
        img = nib.load(str(p))
        assert img.shape == SHAPE
        np.testing.assert_allclose(img.affine, _affine(), atol=1e-5)
        assert set(np.unique(np.asarray(img.dataobj)).tolist()) <= {0, 1, 2, 4}

    # Nothing predictable: non-zero exit.
    only_bad = tmp_path / "only_bad"
    (only_bad / bad.name).mkdir(parents=True)
    for f in bad.iterdir():
        (only_bad / bad.name / f.name).write_bytes(f.read_bytes())
    rc = predict.main(
        [
            "--checkpoint",
            str(ck),
            "--input",
            str(only_bad / bad.name),
            "--output",
            str(tmp_path / "p2"),
            "--device",
            "cpu",
            "--modality",
            "flair",
        ]
    )
    assert rc == 1
    assert "predicted 0 case(s), skipped 1" in capsys.readouterr().err


def test_stacked_model_refuses_single_modality(tmp_path):
    ck = _tiny_checkpoint(tmp_path / "st" / "best.pt", MODALITIES, arch="unet3d", roi="none")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="own inputs"):
        load_predictor(ck, cpu, modality="t1")
    args = predict.parse_args(
        [
            "--checkpoint",
            str(ck),
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "o"),
            "--size",
            "full",
        ]
    )
    assert args.size is None
    prob_fn, channels, _ = load_predictor(args.checkpoint, cpu)
    assert channels == MODALITIES
    # No ROI configured: one window over the whole (odd-shaped) volume, padded to 32x32x32 for
    # the 5-level UNet and cropped back.
    prob = prob_fn(torch.randn(1, 4, 23, 19, 17))
    assert prob.shape == (1, 3, 23, 19, 17)
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0


def test_predictions_scored_by_evaluate_cli(tmp_path, capsys):
    """Perfect NIfTI predictions through `tools/evaluate.py --predictions`: Dice 1, HD95 0."""
    evaluate = load_tool("evaluate")
    raw = tmp_path / "raw"
    for k in range(3):
        case = write_raw_case(raw, f"BraTS2021_0002{k}", seed=20 + k)
        r, prep = _prepared(case, 24)
        predict.predict_case(r, oracle_for(prep), ("t2",), tmp_path / "pred", size=24)
    rc = evaluate.main(
        [
            "--predictions",
            str(tmp_path / "pred"),
            "--data",
            str(raw),
            "--out",
            str(tmp_path / "ev"),
            "--bootstrap",
            "50",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "1.00 - 1.00 | 1.00 | 1.00" in out and "0.0 - 0.0 | 0.0 | 0.0" in out


# --- Cases with only the modalities the model reads, and single NIfTI files -------------------


def _run(ck: Path, inp: Path, out: Path, *extra: str) -> int:
    return predict.main(
        [
            "--checkpoint",
            str(ck),
            "--input",
            str(inp),
            "--output",
            str(out),
            "--size",
            "24",
            "--device",
            "cpu",
            *extra,
        ]
    )


def _keep_only(case: Path, *modalities: str) -> Path:
    """Delete every file of ``case`` but the given modalities (the label too)."""
    for f in case.iterdir():
        if f.name.rsplit("_", 1)[-1].split(".")[0] not in modalities:
            f.unlink()
    return case


def _labels(path: Path) -> np.ndarray:
    img = nib.load(str(path))
    assert img.shape == SHAPE and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, _affine(), atol=1e-5)
    return np.asarray(img.dataobj)


def test_discovery_requires_only_the_asked_modalities(tmp_path):
    from data_prep.layouts import discover_cases

    case = _keep_only(write_raw_case(tmp_path, "BraTS2021_00030", seed=30), "t2")
    cases, problems = discover_cases(case)  # preparation: all four
    assert cases == [] and "missing modality file(s)" in problems[0][1]
    (raw,), problems = discover_cases(case, required=("t2",), labels=False)
    assert problems == [] and set(raw.files) == {"t2"} and raw.label_file is None
    with pytest.raises(ValueError, match="required"):
        discover_cases(case, required=("t3",))


def test_folder_with_only_t2_predicted_by_t2_model(tmp_path, capsys):
    raw = tmp_path / "raw"
    _keep_only(write_raw_case(raw, "BraTS2021_00031", seed=31), "t2")
    write_raw_case(raw, "BraTS2021_00032", seed=32)  # labelled sibling: labels stay optional
    ck = _tiny_checkpoint(tmp_path / "m.pt", ("t2",))
    out = tmp_path / "pred"
    assert _run(ck, raw, out) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "BraTS2021_00031.nii.gz",
        "BraTS2021_00032.nii.gz",
    ]
    for p in out.iterdir():
        assert set(np.unique(_labels(p)).tolist()) <= {0, 1, 2, 4}
    # The same folder by itself (a case folder) works too.
    assert _run(ck, raw / "BraTS2021_00031", tmp_path / "p2") == 0


def test_folder_with_only_flair_needs_modality_flair(tmp_path, capsys):
    case = _keep_only(write_raw_case(tmp_path / "raw", "BraTS2021_00033", seed=33), "flair")
    ck = _tiny_checkpoint(tmp_path / "m.pt", ("t2",))
    assert _run(ck, case, tmp_path / "p0") == 1  # the model's own t2 is missing
    assert "missing modality file(s)" in capsys.readouterr().err
    assert _run(ck, case, tmp_path / "pred", "--modality", "flair") == 0
    _labels(tmp_path / "pred" / "BraTS2021_00033.nii.gz")


def test_box_and_zscore_come_from_the_modalities_read(tmp_path):
    from data_prep.layouts import discover_cases
    from data_prep.preprocess import brain_bbox, zscore_nonzero

    case = write_raw_case(tmp_path / "raw", "BraTS2021_00034", seed=34)
    t1 = case / "BraTS2021_00034_t1.nii.gz"  # t1 reaches beyond the brain: a larger joint box
    nib.save(nib.Nifti1Image(np.full(SHAPE, 7, np.int16), _affine()), str(t1))
    flair = np.asarray(nib.load(str(case / "BraTS2021_00034_flair.nii.gz")).dataobj)
    start, stop = brain_bbox(flair != 0)
    seen = {}

    def spy(x):
        seen["x"] = x
        return torch.zeros(1, 3, *x.shape[2:])

    (raw,), _ = discover_cases(case)
    predict.predict_case(raw, spy, ("flair",), tmp_path / "pred", size=None)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    np.testing.assert_allclose(seen["x"][0, 0].numpy(), zscore_nonzero(flair)[box], atol=1e-5)


def test_single_file_equals_the_full_folder(tmp_path, capsys):
    case = write_raw_case(tmp_path / "raw", "BraTS2021_00035", seed=35)
    ck = _tiny_checkpoint(tmp_path / "m.pt", ("t2",))
    assert _run(ck, case, tmp_path / "folder", "--modality", "flair") == 0
    scan = case / "BraTS2021_00035_flair.nii.gz"
    assert _run(ck, scan, tmp_path / "file", "--modality", "flair") == 0
    err = capsys.readouterr().err
    single = tmp_path / "file" / "BraTS2021_00035_flair_seg.nii.gz"
    assert [p.name for p in (tmp_path / "file").iterdir()] == [single.name] and str(single) in err
    expected = _labels(tmp_path / "folder" / "BraTS2021_00035.nii.gz")
    got = _labels(single)
    assert len(np.unique(got)) > 1  # the random model segments something: equality means much
    np.testing.assert_array_equal(got, expected)


def test_single_file_default_modality_and_plain_nii(tmp_path):
    case = write_raw_case(tmp_path / "raw", "BraTS2021_00036", seed=36)
    ck = _tiny_checkpoint(tmp_path / "m.pt", ("t2",))
    img = nib.load(str(case / "BraTS2021_00036_t2.nii.gz"))
    scan = tmp_path / "scan.nii"  # uncompressed NIfTI, no BraTS name
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(scan))
    assert _run(ck, scan, tmp_path / "pred") == 0  # no --modality: the model's own t2
    _labels(tmp_path / "pred" / "scan_seg.nii.gz")


def _one_error_line(capsys, *needles: str) -> None:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_single_file_bad_inputs_give_one_line_errors(tmp_path, capsys):
    ck = _tiny_checkpoint(tmp_path / "m.pt", ("t2",))
    out = tmp_path / "pred"
    aff = _affine()
    cases = {
        "missing.nii.gz": (None, "no such file"),
        "notes.txt": (b"hello", "not a NIfTI file name"),
        "garbage.nii.gz": (b"not a nifti file", "not a NIfTI file"),
        "four_d.nii.gz": (np.ones((6, 5, 4, 3), np.int16), "expected a 3D image"),
        "zero.nii.gz": (np.zeros((6, 5, 4), np.int16), "all zero"),
    }
    for name, (content, fault) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            nib.save(nib.Nifti1Image(content, aff), str(path))
        assert _run(ck, path, out, "--modality", "flair") == 1, name
        _one_error_line(capsys, str(path), fault)
    assert not out.exists() or not list(out.iterdir())


def test_single_file_and_multi_modality_models(tmp_path, capsys):
    case = write_raw_case(tmp_path / "raw", "BraTS2021_00037", seed=37)
    scan = case / "BraTS2021_00037_t1ce.nii.gz"
    two = _tiny_checkpoint(tmp_path / "two.pt", ("t1ce", "t2"))
    assert _run(two, scan, tmp_path / "p") == 1  # which channel is the file? say --modality
    _one_error_line(capsys, "t1ce+t2", "--modality")
    assert _run(two, scan, tmp_path / "p", "--modality", "t1ce") == 0  # fed to both channels
    _labels(tmp_path / "p" / "BraTS2021_00037_t1ce_seg.nii.gz")
    capsys.readouterr()
    stacked = _tiny_checkpoint(tmp_path / "st.pt", MODALITIES, arch="unet3d", roi="none")
    for extra in ((), ("--modality", "t1ce")):
        assert _run(stacked, scan, tmp_path / "p", *extra) == 1
        _one_error_line(capsys, "stacked", "single file")


def test_predict_tool_reports_expected_faults_in_one_line(tmp_path, capsys):
    ck = _tiny_checkpoint(tmp_path / "m" / "best.pt", ("t2",))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    faults = [
        ([str(bad), str(tmp_path)], "bad.pt"),
        ([str(tmp_path / "none.pt"), str(tmp_path)], "none.pt"),
        ([str(ck), str(tmp_path / "nowhere")], "nowhere"),
    ]
    for (checkpoint, source), where in faults:
        rc = predict.main(
            [
                "--checkpoint",
                checkpoint,
                "--input",
                source,
                "--output",
                str(tmp_path / "o"),
                "--device",
                "cpu",
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1, err
        assert err[0].startswith("error: ") and where in err[0], err

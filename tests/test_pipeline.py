"""Raw folder -> shards + manifest (data_prep/pipeline.py): evaluation boxes, bad inputs, resume,
verify, splits, the command line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from data_prep.layouts import patient_id
from data_prep.pipeline import assign_splits, prepare, verify_output
from data_prep.shards import ShardInvalid, check_shard
from data_prep.synthetic import write_dataset

from prepared_data import SIZE, read_nifti

REPO = Path(__file__).resolve().parents[1]


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_eval_cases_stored_as_whole_brain_box(raw_sets, prepared_sets, tmp_path):
    from dgseg.data.dataset import ShardDataset
    from dgseg.data.manifest import load_manifest, scored_extent

    out = tmp_path / "evalfull"
    res = prepare(
        raw_sets / "brats2021",
        out,
        size=SIZE,
        workers=1,
        cases_per_shard=2,
        progress=False,
        eval_size="full",
    )
    assert res.exit_code == 0
    m = load_manifest(out)
    old = load_manifest(prepared_sets[0] / "brats2021")  # eval_size "same": every case SIZE³
    assert m["params"]["eval_size"] == "full" and old["params"]["eval_size"] == SIZE
    split_of = {c["id"]: c["split"] for c in m["cases"]}
    assert split_of == {c["id"]: c["split"] for c in old["cases"]}  # same splits
    assert sorted(split_of.values()) == ["test", "train", "val"]
    for c in m["cases"]:
        box = [b - a for a, b in zip(c["bbox_start"], c["bbox_stop"])]
        if c["split"] == "train":
            assert c["shape"] == [SIZE] * 3
        else:  # the whole box (larger than SIZE on some axis: the crop would have cut it)
            assert c["shape"] == box and max(box) > SIZE and c["offset"] == c["bbox_start"]
    # The full box holds the region voxels of the raw label; the SIZE³ crop lost some.
    old_by_id = {c["id"]: c for c in old["cases"]}
    test = next(c for c in m["cases"] if c["split"] == "test")
    src = read_nifti(raw_sets / "brats2021" / test["id"] / f"{test['id']}_seg.nii.gz")
    assert test["region_voxels"]["WT"] == int(np.isin(src, (1, 2, 4)).sum())
    assert old_by_id[test["id"]]["region_voxels"]["WT"] <= test["region_voxels"]["WT"]
    assert scored_extent(m, "test")["whole_brain"] == 1
    old_extent = scored_extent(old, "test")
    assert old_extent["cropped"] == 1 and f"{SIZE}x{SIZE}x{SIZE}" in old_extent["text"]
    # Train samples are the same arrays as before.
    a = ShardDataset(out, "train", ("t2",))[0]
    b = ShardDataset(prepared_sets[0] / "brats2021", "train", ("t2",))[0]
    assert torch_equal(a["image"], b["image"]) and torch_equal(a["label"], b["label"])
    # A whole-box case that becomes a train case (its split changed later) is cropped to SIZE³
    # on the fly, exactly as the preprocessing crops it.
    (out / "manifest.json").write_text(
        (out / "manifest.json").read_text().replace('"split": "test"', '"split": "train"')
    )
    moved = ShardDataset(out, "train", ("t2", "flair"))
    ref = ShardDataset(prepared_sets[0] / "brats2021", "test", ("t2", "flair"))
    k = moved.case_ids.index(test["id"])
    got, want = moved[k], ref[ref.case_ids.index(test["id"])]
    assert got["image"].shape == (2, SIZE, SIZE, SIZE)
    assert torch_equal(got["image"], want["image"]) and torch_equal(got["label"], want["label"])
    # with a random patch smaller than SIZE, the patch lies inside that cube
    patch = ShardDataset(out, "train", ("t2",), patch_size=16, seed=3)[k]["image"][0]
    cube = want["image"][0].numpy()
    p = patch.numpy()
    hits = [
        (i, j, k)
        for i in range(SIZE - 15)
        for j in range(SIZE - 15)
        for k in range(SIZE - 15)
        if np.array_equal(cube[i : i + 16, j : j + 16, k : k + 16], p)
    ]
    assert hits


def _write_nii(path: Path, arr: np.ndarray, affine=None) -> None:
    img = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine)
    img.header.set_data_dtype(arr.dtype)
    nib.save(img, str(path))


def _copy_case(src_root: Path, cid: str, dst_root: Path, new_id: str) -> Path:
    d = dst_root / new_id
    d.mkdir(parents=True)
    for p in (src_root / cid).iterdir():
        shutil.copy(p, d / p.name.replace(cid, new_id))
    return d


def test_bad_inputs_are_skipped_with_reasons(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_dataset(src, 2, shape=(32, 32, 24), seed=1)
    a = "BraTS2021_00000"
    raw = tmp_path / "raw"
    good = [
        _copy_case(src, a, raw, "good_1").name,
        _copy_case(src, "BraTS2021_00001", raw, "good_2").name,
    ]
    t1 = read_nifti(src / a / f"{a}_t1.nii.gz")
    expect = {}

    def bad(name: str, reason: str):
        expect[name] = reason
        return _copy_case(src, a, raw, name)

    d = bad("missing_mod", "missing modality")
    (d / "missing_mod_t1ce.nii.gz").unlink()
    d = bad("shape_mismatch", "shape mismatch")
    _write_nii(d / "shape_mismatch_t2.nii.gz", t1[:, :, :-2])
    d = bad("affine_mismatch", "affine mismatch")
    aff = np.eye(4)
    aff[0, 3] = 5.0
    _write_nii(d / "affine_mismatch_t2.nii.gz", t1, aff)
    d = bad("nan_voxels", "non-finite")
    x = t1.astype(np.float32)
    x[5, 5, 5] = np.nan
    _write_nii(d / "nan_voxels_t1.nii.gz", x)
    d = bad("inf_voxels", "non-finite")
    x = t1.astype(np.float32)
    x[6, 6, 6] = np.inf
    _write_nii(d / "inf_voxels_flair.nii.gz", x)
    d = bad("all_zero", "all zero")
    _write_nii(d / "all_zero_flair.nii.gz", np.zeros_like(t1))
    d = bad("bad_labels", "unknown label values [3]")
    seg = read_nifti(d / "bad_labels_seg.nii.gz").copy()
    seg[0, 0, 0] = 3  # 3 is not a BraTS 2021 value
    _write_nii(d / "bad_labels_seg.nii.gz", seg)
    d = bad("truncated", "truncated")
    p = d / "truncated_t2.nii.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    d = bad("corrupt", "gzip")
    p = d / "corrupt_t1.nii.gz"
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2 : len(blob) // 2 + 64] = os.urandom(64)
    p.write_bytes(bytes(blob))
    d = bad("four_d", "expected a 3D image")
    _write_nii(d / "four_d_t1.nii.gz", np.stack([t1, t1], axis=-1))
    d = bad("no_label", "missing label file")
    (d / "no_label_seg.nii.gz").unlink()
    (raw / "dup").mkdir()
    _copy_case(src, a, raw, "dup_case")
    _copy_case(src, a, raw / "dup", "dup_case")
    expect["dup_case"] = "duplicate case id"
    d = bad("locked", "unreadable folder")
    real_scandir = os.scandir

    def scandir(path="."):  # root ignores chmod 000, so simulate EACCES for this one folder
        if Path(os.fsdecode(path)) == d:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)

    res = prepare(raw, tmp_path / "out", size=16, workers=1, cases_per_shard=4, progress=False)
    assert sorted(res.prepared) == sorted(good)
    assert set(res.skipped) == set(expect)
    for name, reason in expect.items():
        assert reason in res.skipped[name], (name, res.skipped[name])
        assert "\n" not in res.skipped[name]
    assert json.loads((tmp_path / "out" / "skipped.json").read_text()) == res.skipped
    assert res.exit_code == 1  # a skipped case fails the batch; the good ones are kept
    for name in expect:
        assert name in res.summary()
    # allow_skipped accepts the skips; a re-run resumes from the shards (no re-reading)
    res2 = prepare(
        raw,
        tmp_path / "out",
        size=16,
        workers=1,
        cases_per_shard=4,
        allow_skipped=True,
        progress=False,
    )
    assert res2.exit_code == 0 and res2.shards_built == [] and res2.skipped == res.skipped


def test_nothing_prepared_exits_nonzero(tmp_path):
    write_dataset(tmp_path / "raw", 1, shape=(24, 24, 20), seed=0)
    (tmp_path / "raw" / "BraTS2021_00000" / "BraTS2021_00000_t2.nii.gz").unlink()
    res = prepare(tmp_path / "raw", tmp_path / "out", size=16, progress=False)
    assert res.prepared == [] and res.exit_code == 1


def test_cli_skipped_case_fails_the_batch_and_keeps_the_rest(tmp_path):
    write_dataset(tmp_path / "raw", 3, shape=(24, 24, 20), seed=0)
    (tmp_path / "raw" / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz").unlink()
    cmd = [sys.executable, str(REPO / "tools" / "prepare_brats.py"), "--input"]
    cmd += [str(tmp_path / "raw"), "--output", str(tmp_path / "out"), "--size", "16"]
    cmd += ["--workers", "1", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "prepared 2 case(s)" in res.stdout and "BraTS2021_00001" in res.stdout
    cases = json.loads((tmp_path / "out" / "manifest.json").read_text())["cases"]
    assert sorted(c["id"] for c in cases) == ["BraTS2021_00000", "BraTS2021_00002"]
    again = subprocess.run(cmd + ["--allow-skipped"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 shard(s) built" in again.stdout, again.stdout


def test_unlabelled_set(tmp_path):
    write_dataset(tmp_path / "raw", 2, shape=(24, 24, 20), seed=0, layout="unlabelled")
    res = prepare(tmp_path / "raw", tmp_path / "out", size=16, progress=False)
    assert res.exit_code == 0 and len(res.prepared) == 2
    cases = json.loads((tmp_path / "out" / "manifest.json").read_text())["cases"]
    assert all(not c["has_label"] and c["split"] == "unlabelled" for c in cases)
    with h5py.File(tmp_path / "out" / cases[0]["shard"], "r") as f:
        assert "label" not in f[cases[0]["id"]] and not f[cases[0]["id"]].attrs["has_label"]


# --------------------------------------------------------------------------- resume / verify


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted((folder / "shards").glob("*.h5"))
    }


def test_rerun_rebuilds_only_deleted_or_stale_shard(raw_sets, tmp_path):
    out = tmp_path / "out"
    r1 = prepare(raw_sets / "brats2021", out, size=16, cases_per_shard=1, progress=False)
    assert len(r1.shards_built) == 3
    manifest1 = (out / "manifest.json").read_text()
    before = _stats(out)
    time.sleep(0.01)
    r2 = prepare(raw_sets / "brats2021", out, size=16, cases_per_shard=1, progress=False)
    assert r2.shards_built == [] and _stats(out) == before
    (out / "shards" / "shard-00001.h5").unlink()
    r3 = prepare(raw_sets / "brats2021", out, size=16, cases_per_shard=1, progress=False)
    assert r3.shards_built == ["shards/shard-00001.h5"]
    after = _stats(out)
    for name in ("shard-00000.h5", "shard-00002.h5"):
        assert after[name] == before[name]  # same inode and mtime: not rewritten
    assert (out / "manifest.json").read_text() == manifest1
    # a truncated shard (e.g. disk trouble) is unreadable and rebuilt as well
    p = out / "shards" / "shard-00002.h5"
    p.write_bytes(p.read_bytes()[:1000])
    r4 = prepare(raw_sets / "brats2021", out, size=16, cases_per_shard=1, progress=False)
    assert r4.shards_built == ["shards/shard-00002.h5"]
    assert verify_output(out) == []


def test_changed_source_rebuilds_its_shard(raw_sets, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_sets / "brats2021", raw)
    out = tmp_path / "out"
    prepare(raw, out, size=16, cases_per_shard=1, progress=False)
    cid = "BraTS2021_00002"
    p = raw / cid / f"{cid}_flair.nii.gz"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "edited" input
    r = prepare(raw, out, size=16, cases_per_shard=1, progress=False)
    assert r.shards_built == ["shards/shard-00002.h5"]


def _flip_bytes_in(path: Path, case_id: str, dataset: str) -> None:
    with h5py.File(path, "r") as f:
        ds = f[case_id][dataset]
        assert ds.compression is None  # raw floats on disk
        if ds.chunks is None:
            offset, size = ds.id.get_offset(), ds.id.get_storage_size()
        else:
            info = ds.id.get_chunk_info(0)
            offset, size = info.byte_offset, info.size
    with open(path, "r+b") as fh:
        fh.seek(offset + size // 2)
        chunk = bytearray(fh.read(16))
        fh.seek(offset + size // 2)
        fh.write(bytes(b ^ 0xFF for b in chunk))


def test_verify_detects_corrupted_shard_and_rerun_repairs(raw_sets, tmp_path):
    out = tmp_path / "out"
    prepare(raw_sets / "brats2021", out, size=16, cases_per_shard=2, progress=False)
    assert verify_output(out) == []
    rec = json.loads((out / "manifest.json").read_text())["cases"][2]
    _flip_bytes_in(out / rec["shard"], rec["id"], "t2")
    errors = verify_output(out)
    assert len(errors) == 1 and rec["id"] in errors[0] and "t2" in errors[0]
    # the cheap structural re-use check cannot see flipped data bytes; --verify can
    assert (
        prepare(
            raw_sets / "brats2021", out, size=16, cases_per_shard=2, progress=False
        ).shards_built
        == []
    )
    cli = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "prepare_brats.py"),
            "--input",
            str(raw_sets / "brats2021"),
            "--output",
            str(out),
            "--size",
            "16",
            "--cases-per-shard",
            "2",
            "--workers",
            "1",
            "--verify",
            "--quiet",
            "--eval-size",
            "same",
        ],  # as the library call above
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "1 shard(s) built, 1 reused" in cli.stdout
    assert verify_output(out) == []
    # a manifest that lists a case its shard does not hold is reported too
    m = json.loads((out / "manifest.json").read_text())
    m["cases"][0]["stored_crc32"]["t1"] = "00000000"
    (out / "manifest.json").write_text(json.dumps(m))
    assert any(m["cases"][0]["id"] in e for e in verify_output(out))
    with pytest.raises(ShardInvalid):
        check_shard(out / "shards" / "missing.h5")


def test_parallel_workers_match_serial(raw_sets, tmp_path):
    r1 = prepare(
        raw_sets / "brats2021",
        tmp_path / "a",
        size=16,
        workers=1,
        cases_per_shard=1,
        progress=False,
    )
    r2 = prepare(
        raw_sets / "brats2021",
        tmp_path / "b",
        size=16,
        workers=2,
        cases_per_shard=1,
        progress=False,
    )
    assert r1.exit_code == r2.exit_code == 0
    assert (tmp_path / "a" / "manifest.json").read_text().replace(str(tmp_path / "a"), "") == (
        tmp_path / "b" / "manifest.json"
    ).read_text().replace(str(tmp_path / "b"), "")


def test_kill_9_mid_run_then_resume(tmp_path):
    """SIGKILL while shards are being written: no partial shard is visible, a re-run finishes
    and keeps every shard published before the kill."""
    src = tmp_path / "src"
    write_dataset(src, 2, shape=(96, 96, 64), seed=2)
    raw = tmp_path / "raw"
    for k in range(24):  # many distinct ids, two source cases: cheap to create, slow to prepare
        _copy_case(src, f"BraTS2021_0000{k % 2}", raw, f"case_{k:02d}")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "tools" / "prepare_brats.py"),
        "--input",
        str(raw),
        "--output",
        str(out),
        "--size",
        "64",
        "--cases-per-shard",
        "2",
        "--workers",
        "1",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    shards = out / "shards"
    while time.monotonic() < deadline and proc.poll() is None:
        if shards.is_dir() and len(list(shards.glob("shard-*.h5"))) >= 2:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(shards.glob("shard-*.h5"))
    assert 2 <= len(done) < 12, "the run must be killed mid-way"
    assert not (out / "manifest.json").exists()
    for p in done:
        check_shard(p)  # every published shard is complete
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}
    res = subprocess.run(cmd + ["--verify"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(done)} reused" in res.stdout
    for name, st in kept.items():
        p = shards / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == st
    assert len(json.loads((out / "manifest.json").read_text())["cases"]) == 24
    assert not list(shards.glob("*.tmp"))


# --------------------------------------------------------------------------- splits


def test_splits_patient_level_deterministic():
    # 40 patients, some with two time points (BraTS 2023 style)
    cases = {}
    for p in range(40):
        cases[f"BraTS-GLI-{p:05d}-000"] = None
        if p % 3 == 0:
            cases[f"BraTS-GLI-{p:05d}-001"] = None
    patients = {c: patient_id(c, "brats2023") for c in cases}
    assert patients["BraTS-GLI-00003-001"] == "BraTS-GLI-00003"
    s1 = assign_splits(patients, (0.7, 0.1, 0.2), seed=0)
    assert s1 == assign_splits(dict(reversed(list(patients.items()))), (0.7, 0.1, 0.2), seed=0)
    s2 = assign_splits(patients, (0.7, 0.1, 0.2), seed=1)
    assert s1 != s2
    for s in (s1, s2):
        by_patient = {}
        for c, split in s.items():
            by_patient.setdefault(patients[c], set()).add(split)
        assert all(len(v) == 1 for v in by_patient.values())  # time points stay together
        counts = {
            k: sum(next(iter(v)) == k for v in by_patient.values())
            for k in ("train", "val", "test")
        }
        assert counts == {"train": 28, "val": 4, "test": 8}
        train = {patients[c] for c, v in s.items() if v == "train"}
        test = {patients[c] for c, v in s.items() if v == "test"}
        assert not train & test
    small = assign_splits({f"c{i}": f"c{i}" for i in range(3)}, (0.7, 0.1, 0.2), seed=0)
    assert sorted(small.values()) == ["test", "train", "val"]  # no requested split left empty
    with pytest.raises(ValueError, match="split"):
        assign_splits(patients, (0.7, 0.2, 0.2), seed=0)


def test_cli_default_synthetic(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "tools" / "prepare_brats.py"),
        "--output",
        str(tmp_path / "syn"),
        "--synthetic-cases",
        "3",
        "--workers",
        "1",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "prepared 3 case(s)" in res.stdout and "prepare: 3/3 cases" in res.stderr
    m = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert len(m["cases"]) == 3 and m["params"]["size"] == 64  # the synthetic default
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "0 shard(s) built" in res.stdout  # the cached synthetic source is re-used as is
    full = subprocess.run(cmd + ["--size", "full", "--quiet"], capture_output=True, text=True)
    assert full.returncode == 0 and "1 shard(s) built, 0 reused" in full.stdout  # new size
    m = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert m["params"]["size"] == "full"
    assert all(
        c["shape"] == [b - a for a, b in zip(c["bbox_start"], c["bbox_stop"])] for c in m["cases"]
    )
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "prepare_brats.py"),
            "--output",
            str(tmp_path / "x"),
            "--size",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--size" in bad.stderr

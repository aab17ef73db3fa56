"""Fault classes of the command-line tools: each bad input ends as one ``error:`` line before any
work (exit status != 0, no traceback), or as one failed item of a batch that keeps the rest.

Classes: bad option values and output paths (every tool), a damaged prepared folder, label maps
read as stored (wrapped, non-integer, NaN values), one bad prediction file among good ones, the
run-folder lock (a second job refused, a stale lock taken over by ``--resume``), predictions kept
unless ``--overwrite``. The tools run as subprocesses, so that a traceback would show.
"""

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from dgseg.evaluation.scoring import score_label_files
from dgseg.run_lock import LOCK_NAME, RunLockError, acquire, holder_of
from dgseg.training import fit

from tool_modules import load_tool

ROOT = Path(__file__).resolve().parents[1]


def run_tool(name: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = dict(os.environ if env is None else env)
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
        cwd=ROOT,
    )


def assert_one_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit != 0, exactly one ``error:`` line on stderr naming ``words``, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def read_only(tmp_path):
    """A folder without write permission (refused even for root: its mode says read-only)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    yield folder
    folder.chmod(stat.S_IRWXU)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A narrow, untrained T2 SegResNet checkpoint (scores are irrelevant here)."""
    import torch

    from dgseg.config import apply_overrides
    from dgseg.models import build_model
    from dgseg.presets import get_preset
    from dgseg.training.checkpoint import save_checkpoint

    cfg = apply_overrides(get_preset("tiny"), ["model.init_filters=4", "run.val_roi=32"])
    torch.manual_seed(0)
    model = build_model(cfg.data.in_channels, cfg.model)
    path = tmp_path_factory.mktemp("ck") / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict()})
    return path


# ----------------------------------------------------------------- option values and paths
def _argument_faults(tmp: Path, ro: Path, ck: Path, shards: Path):
    afile = tmp / "a_file"
    afile.write_text("x")
    ev = ["--checkpoint", ck, "--data", shards, "--device", "cpu"]
    pr = ["--checkpoint", ck, "--input", shards, "--device", "cpu"]
    tr = ["--preset", "tiny", "--data", shards]
    return [
        ("evaluate", [*ev, "--out", tmp / "e", "--threshold", "nan"], ["--threshold", "nan"]),
        ("evaluate", [*ev, "--out", tmp / "e", "--threshold", "2"], ["--threshold", "(0, 1)"]),
        ("evaluate", [*ev, "--out", tmp / "e", "--bootstrap", "-1"], ["--bootstrap", ">= 0"]),
        ("evaluate", [*ev, "--out", afile], ["--out", "file"]),
        ("evaluate", [*ev, "--out", ro / "e"], ["--out", "cannot be written"]),
        ("predict", [*pr, "--output", tmp / "p", "--threshold", "0"], ["--threshold"]),
        ("predict", [*pr, "--output", afile], ["--output", "file"]),
        ("benchmark", ["--threads", "0", "--sections", "bezier"], ["--threads", ">= 1"]),
        ("benchmark", ["--json", tmp, "--sections", "bezier"], ["--json", "folder"]),
        ("train", [*tr, "--out", tmp, "--set", "optim.lr=nan"], ["optim.lr", "nan"]),
        ("train", [*tr, "--out", afile], ["run folder", "file"]),
        ("train", [*tr, "--out", ro], ["run folder", "cannot be written"]),
        ("prepare_brats", ["--input", shards, "--output", afile], ["--output", "file"]),
        ("prepare_brats", ["--input", tmp / "nowhere", "--output", tmp / "o"], ["--input"]),
        ("make_synthetic_brats", ["--output", afile, "--n-cases", "1"], ["--output", "file"]),
        ("make_synthetic_brats", ["--output", tmp / "s", "--n-cases", "0"], ["--n-cases"]),
        ("run_experiments", ["--data", shards, "--out", afile], ["--out", "file"]),
        ("run_experiments", ["--data", shards, "--bootstrap", "0"], ["--bootstrap"]),
    ]


N_ARGUMENT_FAULTS = 18


@pytest.mark.parametrize("k", range(N_ARGUMENT_FAULTS))
def test_bad_option_or_path_is_one_error_line(k, tmp_path, read_only, checkpoint, tiny_shards):
    faults = _argument_faults(tmp_path, read_only, checkpoint, tiny_shards)
    assert len(faults) == N_ARGUMENT_FAULTS
    tool, argv, words = faults[k]
    proc = run_tool(tool, *argv)
    assert_one_error(proc, *words)
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()  # nothing written


def test_cuda_without_a_gpu_is_one_error_line(tmp_path, tiny_shards):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    proc = run_tool("train", "--preset", "tiny", "--data", tiny_shards, "--out", tmp_path,
                    "--set", "run.device=cuda")  # fmt: skip
    assert_one_error(proc, "run.device", "cuda")


def test_read_only_out_is_refused_before_any_case_is_scored(read_only, tiny_shards):
    raw = tiny_shards.parent / "raw"
    proc = run_tool("evaluate", "--predictions", raw, "--data", raw, "--out", read_only)
    assert_one_error(proc, "--out", str(read_only))
    assert list(read_only.iterdir()) == []


# ----------------------------------------------------------------- a damaged prepared folder
def _damage(root: Path, how: str) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["split"] == "train")
    shard = root / case["shard"]
    if how == "truncated shard":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif how == "missing shard":
        shard.unlink()
    elif how == "no case group":
        with h5py.File(shard, "a") as f:
            del f[case["id"]]
    elif how == "no modality":
        with h5py.File(shard, "a") as f:
            del f[case["id"]]["t2"]
    elif how.startswith("case without "):
        del case[how.split()[-1]]
        (root / "manifest.json").write_text(json.dumps(manifest))
    elif how == "cases a string":
        manifest["cases"] = "all"
        (root / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = [
    "truncated shard",
    "missing shard",
    "no case group",
    "no modality",
    "case without offset",
    "case without shape",
    "case without split",
    "cases a string",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_prepared_folder_is_refused_before_training(how, tiny_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    _damage(data, how)
    proc = run_tool("train", "--preset", "tiny", "--data", data, "--out", tmp_path / "runs")
    assert_one_error(proc, "prepare_brats.py --verify")
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing started, nothing left


# ----------------------------------------------------------------- label maps read as stored
@pytest.fixture(scope="module")
def label_pair(tmp_path_factory):
    """(folder, reference file): a BraTS-2021 reference with labels 1, 2 and 4."""
    folder = tmp_path_factory.mktemp("labels")
    ref = np.zeros((12, 10, 8), np.uint8)
    ref[3:8, 3:7, 2:6] = 2
    ref[4:7, 4:6, 3:5] = 1
    ref[5, 4, 3] = 4
    path = folder / "ref.nii.gz"
    nib.save(nib.Nifti1Image(ref, np.eye(4)), str(path))
    return folder, path


@pytest.mark.parametrize(
    "values, dtype, shown",
    [
        ((260, 257, -254), np.int16, ("260", "257", "-254")),  # 4, 1, 2 once cast to uint8
        ((1.5,), np.float32, ("non-integer", "1.5")),
        ((np.nan,), np.float32, ("NaN",)),
    ],
)
def test_label_values_are_checked_as_stored(label_pair, values, dtype, shown):
    folder, ref = label_pair
    truth = np.asarray(nib.load(str(ref)).dataobj)
    pred = truth.astype(dtype)
    for k, v in enumerate(values):
        pred.flat[k] = v
    bad = folder / f"bad_{np.dtype(dtype).name}_{len(values)}.nii.gz"
    nib.save(nib.Nifti1Image(pred, np.eye(4)), str(bad))
    with pytest.raises(ValueError) as err:
        score_label_files(bad, ref)
    assert str(bad) in str(err.value)
    for s in shown:
        assert s in str(err.value)
    with pytest.raises(ValueError, match="ref.nii.gz|bad_"):  # the reference is checked too
        score_label_files(ref, bad)
    # the same values in their valid uint8 form score as a perfect prediction
    good = folder / "good.nii.gz"
    nib.save(nib.Nifti1Image(truth, np.eye(4)), str(good))
    assert score_label_files(good, ref)["dice_mean"] == 1.0


# ----------------------------------------------------------------- batch jobs keep the rest
def _predictions(tiny_shards: Path, tmp: Path, n: int) -> tuple[Path, list[str]]:
    """Perfect predictions (the references themselves) of the first ``n`` raw cases."""
    raw = tiny_shards.parent / "raw"
    ids = sorted(p.name for p in raw.iterdir() if p.is_dir())[:n]
    pred = tmp / "pred"
    pred.mkdir()
    for cid in ids:
        shutil.copy(raw / cid / f"{cid}_seg.nii.gz", pred / f"{cid}.nii.gz")
    return pred, ids


def test_one_bad_prediction_leaves_every_other_case_scored(tiny_shards, tmp_path):
    pred, ids = _predictions(tiny_shards, tmp_path, 4)
    img = nib.load(str(pred / f"{ids[1]}.nii.gz"))
    wrapped = np.asarray(img.dataobj).astype(np.int16)
    wrapped[wrapped == 4] = 260  # 4 again once cast to uint8
    nib.save(nib.Nifti1Image(wrapped, img.affine), str(pred / f"{ids[1]}.nii.gz"))
    (pred / f"{ids[2]}.nii.gz").write_bytes(b"\x1f\x8b corrupt")
    out = tmp_path / "eval"
    raw = tiny_shards.parent / "raw"
    proc = run_tool(
        "evaluate", "--predictions", pred, "--data", raw, "--out", out, "--max-cases", "4",
        "--bootstrap", "0", "--metric-workers", "0", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("failed ")]
    assert len(failed) == 2, proc.stderr
    assert ids[1] in failed[0] and "260" in failed[0]
    assert ids[2] in failed[1]
    rows = (out / "per_case.csv").read_text().splitlines()[1:]
    scored = sorted(r.split(",")[4] for r in rows)
    assert scored == sorted([ids[0], ids[3]])
    assert len((out / "per_case.jsonl").read_text().splitlines()) == 2  # as produced
    assert "No bootstrap CIs" in (out / "table.md").read_text()  # --bootstrap 0: no CIs


def test_predict_keeps_existing_predictions_unless_overwrite(tmp_path, checkpoint, tiny_shards):
    raw = tiny_shards.parent / "raw"
    case = sorted(p for p in raw.iterdir() if p.is_dir())[0]
    out = tmp_path / "p"
    out.mkdir()
    target = out / f"{case.name}.nii.gz"
    target.write_bytes(b"an earlier prediction")
    common = ["--checkpoint", checkpoint, "--input", case, "--output", out, "--size", "32",
              "--device", "cpu"]  # fmt: skip
    proc = run_tool("predict", *common)
    assert proc.returncode == 0 and "kept" in proc.stderr, proc.stderr
    assert target.read_bytes() == b"an earlier prediction"
    proc = run_tool("predict", *common, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert nib.load(str(target)).shape == nib.load(str(case / f"{case.name}_t2.nii.gz")).shape
    assert not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------- one run folder, one run
def test_second_training_into_a_live_run_folder_is_refused(tiny_shards, tmp_path):
    with acquire(tmp_path / "tiny", what="run folder"):  # this process is the live holder
        proc = run_tool("train", "--preset", "tiny", "--data", tiny_shards, "--out", tmp_path)
        assert_one_error(proc, "in use by", f"PID {os.getpid()}", socket.gethostname())
        ev = run_tool("evaluate", "--predictions", tmp_path, "--data", tmp_path,
                      "--out", tmp_path / "tiny" / "eval")  # fmt: skip
        assert_one_error(ev, "--out", "in use by")
    assert not (tmp_path / "tiny").exists()  # released, and the empty folder it made removed


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_is_reported_and_taken_over_by_resume(tmp_path, monkeypatch):
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "x", "token": "t0"}
    (run_dir / LOCK_NAME).write_text(json.dumps(stale))
    seen = []
    monkeypatch.setattr(fit, "_locked_main", lambda args, cfg, d: seen.append(holder_of(d)) or 0)
    argv = ["--preset", "tiny", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=rf"stale lock of PID {stale['pid']}.*--resume"):
        fit.main(argv)
    assert seen == [] and holder_of(run_dir) == stale  # refused, untouched
    assert fit.main([*argv, "--resume"]) == 0
    assert seen[0]["pid"] == os.getpid()  # the run went on holding the folder
    assert holder_of(run_dir) is None  # and released it at the end


def test_lock_is_exclusive_and_inherited_by_children(tmp_path, monkeypatch):
    lock = acquire(tmp_path / "run", what="run folder")
    with pytest.raises(RunLockError, match="in use by"):
        acquire(tmp_path / "run", what="run folder", take_stale=True)  # live: never taken
    monkeypatch.setenv("DGSEG_RUN_LOCK", lock.token)  # a child of the holder
    child = acquire(tmp_path / "run", what="run folder")
    assert child.inherited
    child.release()  # a child never releases its parent's lock
    assert holder_of(tmp_path / "run")["token"] == lock.token
    lock.release()
    assert holder_of(tmp_path / "run") is None


def test_late_write_error_keeps_the_rows_scored(tiny_shards, tmp_path, monkeypatch, capsys):

    evaluate = load_tool("evaluate")
    pred, ids = _predictions(tiny_shards, tmp_path, 3)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate, "write_report", disk_full)
    out = tmp_path / "eval"
    raw = tiny_shards.parent / "raw"
    rc = evaluate.main(
        ["--predictions", str(pred), "--data", str(raw), "--out", str(out), "--max-cases", "3",
         "--metric-workers", "0", "--quiet"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: "), err
    assert "No space left" in err[0] and "per_case.jsonl" in err[0]
    rows = [json.loads(line) for line in (out / "per_case.jsonl").read_text().splitlines()]
    assert sorted(r["case_id"] for r in rows) == ids
    assert all(r["dice_mean"] == 1.0 for r in rows)  # perfect predictions, kept


def test_checkpoint_evaluation_keeps_the_cases_it_can_score(
    tiny_shards, checkpoint, tmp_path, monkeypatch, capsys
):
    from dgseg.data.manifest import load_manifest, split_cases
    from dgseg.evaluation import cross_modality

    evaluate = load_tool("evaluate")
    ids = [c["id"] for c in split_cases(load_manifest(tiny_shards), "test")]
    real = cross_modality.predict_volume
    calls = []

    def flaky(model, image, **kw):  # the second case cannot be predicted
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(model, image, **kw)

    monkeypatch.setattr(cross_modality, "predict_volume", flaky)
    out = tmp_path / "eval"
    rc = evaluate.main(
        ["--checkpoint", str(checkpoint), "--data", str(tiny_shards), "--out", str(out),
         "--modalities", "t2", "--bootstrap", "0", "--metric-workers", "0", "--device", "cpu",
         "--quiet"]
    )  # fmt: skip
    err = capsys.readouterr().err
    failed = [ln for ln in err.splitlines() if ln.startswith("failed ")]
    assert rc == 1 and len(failed) == 1 and ids[1] in failed[0] and "out of memory" in failed[0]
    rows = (out / "per_case.csv").read_text().splitlines()[1:]
    assert sorted({r.split(",")[4] for r in rows}) == sorted(ids[:1] + ids[2:])
    assert not (out / "run.lock").exists()


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    lock = acquire(tmp_path / "run", what="run folder")
    if lock.record["pid_start"] is None:
        lock.release()
        pytest.skip("no /proc: process start times unknown")
    rec = {**lock.record, "pid_start": lock.record["pid_start"] - 3600, "token": "old"}
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps(rec))  # our PID, an hour-older holder
    with pytest.raises(RunLockError, match="stale lock"):
        acquire(tmp_path / "run", what="run folder")
    taken = acquire(tmp_path / "run", what="run folder", take_stale=True)
    assert holder_of(tmp_path / "run")["token"] == taken.token != "old"
    taken.release()


def test_run_experiments_refuses_a_run_folder_another_job_holds(tiny_shards, tmp_path):
    out = tmp_path / "study"
    with acquire(out / "tiny" / "seed0", what="run folder"):
        proc = run_tool("run_experiments", "--data", tiny_shards, "--out", out,
                        "--presets", "tiny", "--seeds", "0", "--epochs", "1")  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("failed: tiny seed 0")]
    assert len(failed) == 1 and f"PID {os.getpid()}" in failed[0], proc.stdout
    assert not (out / "tiny" / "seed0" / "train.log").exists()  # nothing ran in it


def test_resume_from_another_networks_state_is_one_line(tiny_shards, tmp_path):
    from dgseg.config import apply_overrides
    from dgseg.models import build_model
    from dgseg.presets import get_preset
    from dgseg.training.checkpoint import capture_rng_state, save_checkpoint, training_state
    from dgseg.training.optim import build_optimizer, build_scheduler

    cfg = apply_overrides(get_preset("tiny"), [f"data.root={tiny_shards}"])
    other = apply_overrides(cfg, ["model.init_filters=4"])  # another network's weights
    net = build_model(other.data.in_channels, other.model)
    opt = build_optimizer(net.parameters(), cfg.optim)
    state = training_state(net, opt, build_scheduler(opt, cfg.optim, 4), cfg, epoch=0, step=0,
                           best_metric=-1.0, rng=[capture_rng_state()])  # fmt: skip
    save_checkpoint(tmp_path / "tiny" / "last.pt", state)
    argv = ["--preset", "tiny", "--data", str(tiny_shards), "--out", str(tmp_path), "--resume"]
    with pytest.raises(SystemExit, match=r"^error: --resume: .*last.pt does not fit this network"):
        fit.main([*argv, "--set", "run.amp=none"])
    assert holder_of(tmp_path / "tiny") is None  # the lock went with the refused run

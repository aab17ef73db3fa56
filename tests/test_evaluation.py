"""Evaluation bookkeeping (rule, records, bootstrap, aggregation, tables, writers) and a smoke
run of tools/evaluate.py on tiny checkpoints over the tiny synthetic shards."""

import csv
import dataclasses
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dgseg.constants import BRATS_EMPTY_HD95, MODALITIES
from dgseg.evaluation import (
    EVAL_RULE,
    CaseJob,
    OrderedPool,
    bootstrap_ci,
    case_record,
    format_cell,
    format_table,
    input_channels,
    pack_mask,
    score_job,
    score_label_files,
    summarize,
    unpack_mask,
    write_csv,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


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
def _case_job(case_id, seed, n_preds=3, shape=(3, 13, 11, 9)):
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, bool)
    truth[:, 3:9, 2:8, 2:7] = True
    truth[1, 3:5] = False
    truth[2, :, :, :4] = False
    preds = [({"model": "m", "case_id": case_id, "k": k}, rng.random(shape) < 0.2 * (k + 1))
             for k in range(n_preds)]
    return CaseJob.build(case_id, truth, (1.0, 1.5, 0.8), preds), truth, preds


def test_pack_roundtrip_and_score_job_is_case_record():
    m = np.random.default_rng(0).random((3, 5, 7, 3)) < 0.5  # 315 voxels: not a multiple of 8
    assert pack_mask(m).nbytes == 40
    np.testing.assert_array_equal(unpack_mask(pack_mask(m), m.shape), m)
    job, truth, preds = _case_job("c7", 1)
    rows = score_job(job)
    assert rows == [case_record(p, truth, (1.0, 1.5, 0.8), **keys) for keys, p in preds]
    assert [r["k"] for r in rows] == [0, 1, 2] and list(rows[0])[:3] == ["model", "case_id", "k"]
    with pytest.raises(ValueError, match="c8"):
        CaseJob.build("c8", truth, (1.0, 1.0, 1.0), [({}, truth[:, :-1])])


def test_ordered_pool_matches_inline_and_names_the_failing_case():
    """Worker processes give the inline results, in submission order, whatever finishes first;
    a failure in a worker is raised with the case it belongs to."""
    jobs = [_case_job(f"c{i}", i, n_preds=1 + i % 3)[0] for i in range(6)]
    with OrderedPool(0) as inline:
        want = [r for job in jobs for r in inline.submit(f"case {job.case_id}", score_job, job)]
    assert [tag for tag, _ in want] == [f"case c{i}" for i in range(6)]
    with OrderedPool(2, max_pending=3) as pool:
        got = []
        for job in jobs:
            got += pool.submit(f"case {job.case_id}", score_job, job)
            assert pool.pending <= 3
        got += pool.drain()
        assert got == want
        bad = dataclasses.replace(jobs[0], case_id="c_bad", spacing=(1.0, -1.0, 1.0))
        pool.submit("case c_bad", score_job, bad)
        with pytest.raises(RuntimeError, match="case c_bad.*spacing"):
            pool.drain()
    with pytest.raises(ValueError, match="workers"):
        OrderedPool(-1)


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_two_points_hand_computed():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0], n_boot=20000, seed=3) == (0.0, 1.0)


def test_bootstrap_contains_mean_deterministic_and_narrows():
    rng = np.random.default_rng(0)
    v = rng.beta(5, 2, size=40)
    lo, hi = bootstrap_ci(v, seed=7)
    assert lo < v.mean() < hi
    assert bootstrap_ci(v, seed=7) == (lo, hi)  # seeded: identical
    assert bootstrap_ci(v, seed=8) != (lo, hi)
    # The normal-theory half-width 1.96 * sd / sqrt(n) is a close independent check.
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    lo4, hi4 = bootstrap_ci(np.tile(v, 4), seed=7)  # 4x the cases: about half the width
    assert (hi4 - lo4) == pytest.approx((hi - lo) / 2, rel=0.2)


def test_bootstrap_edge_cases():
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert bootstrap_ci([0.4] * 5) == pytest.approx((0.4, 0.4))
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0, 2.0], alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)


# ----------------------------------------------------------------------------- aggregation
def _rows(model, ckpt, column, dice_wt, inputs=None):
    out = []
    for i, d in enumerate(dice_wt):
        r = {"model": model, "checkpoint": ckpt, "column": column,
             "inputs": inputs or column, "case_id": f"c{i}"}
        for metric, base in (("dice", d), ("hd95", 10 * d)):
            for reg, v in zip(("WT", "TC", "ET"), (base, base / 2, 0.0)):
                r[f"{metric}_{reg}"] = v
            r[f"{metric}_mean"] = (base + base / 2) / 3
        out.append(r)
    return out


def test_summarize_seeds_mean_sd_and_ci():
    recs = (_rows("noaug", "a.pt", "t2", [0.8, 0.6, 0.7])
            + _rows("noaug", "b.pt", "t2", [0.6, 0.4, 0.5])
            + _rows("noaug", "a.pt", "t1", [0.1, 0.0, 0.2])
            + _rows("noaug", "b.pt", "t1", [0.3, 0.2, 0.1]))
    s = summarize(recs, n_boot=500, seed=1)
    (m,) = s["models"]
    assert m["model"] == "noaug" and m["checkpoints"] == ["a.pt", "b.pt"]
    assert list(m["columns"]) == ["t1", "t2"]  # MODALITIES order, not first-seen order
    t2 = m["columns"]["t2"]
    assert t2["n_cases"] == 3 and t2["n_checkpoints"] == 2
    assert [e["dice_WT"]["mean"] for e in t2["per_checkpoint"]] == pytest.approx([0.7, 0.5])
    assert t2["dice_WT"]["mean"] == pytest.approx(0.6)
    assert t2["dice_WT"]["sd"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.7, 0.5
    assert t2["dice_TC"]["mean"] == pytest.approx(0.3)
    lo, hi = t2["dice_WT"]["ci"]  # bootstrap of the per-case averages 0.7, 0.5, 0.6
    assert 0.5 <= lo <= 0.6 <= hi <= 0.7
    json.dumps(s)  # serialisable


def test_table_has_named_columns_values_and_x_cells():
    recs = (_rows("segresnet_t2", "a.pt", "t1", [0.05, 0.03])
            + _rows("segresnet_t2", "a.pt", "t2", [0.75, 0.73])
            + _rows("unet_stacked", "u.pt", "own", [0.7, 0.76], inputs="t1+t1ce+t2+flair"))
    s = summarize(recs, n_boot=100)
    md = format_table(s, style="markdown", footer=[EVAL_RULE])
    header = md.splitlines()[0]
    assert header == ("| Dice | T1: Mean - WT \\| TC \\| ET | T2: Mean - WT \\| TC \\| ET "
                      "| Own inputs: Mean - WT \\| TC \\| ET |")
    rows = [ln for ln in md.splitlines() if ln.startswith("| segresnet") or ln.startswith("| unet")]
    # WT 0.04, TC 0.02, ET 0, mean (0.04 + 0.02) / 3 = 0.02
    assert "| 0.02 - 0.04 \\| 0.02 \\| 0.00 |" in rows[0]
    assert rows[0].endswith("| x |")  # the T2 model has no own-input run here
    assert rows[1].split(" | ")[1:3] == ["x", "x"]  # stacked: single-modality cells 'x'
    assert "Input rule" in md
    text = format_table(s, style="text")
    lines = text.splitlines()
    assert lines[0].split() == ["Dice", "T1", "T2", "Own", "inputs"]
    assert lines[1].count("Mean - WT | TC | ET") == 3
    hd = format_table(s, metric="hd95", style="text")
    assert "0.2 - 0.4 | 0.2 | 0.0" in hd  # HD95 with one decimal
    with pytest.raises(ValueError, match="style"):
        format_table(s, style="html")


def test_cell_with_several_checkpoints_shows_sd():
    recs = _rows("m", "a.pt", "t2", [0.8]) + _rows("m", "b.pt", "t2", [0.6])
    cell = format_cell(summarize(recs, n_boot=10)["models"][0]["columns"]["t2"])
    assert cell == "0.35±0.07 - 0.70±0.14 | 0.35±0.07 | 0.00±0.00"


# ----------------------------------------------------------------------------- writers
def test_writers_are_atomic_and_readable(tmp_path):
    rows = [{"case_id": "a", "dice_WT": 0.5}, {"case_id": "b", "dice_WT": 1.0, "extra": 2}]
    write_csv(tmp_path / "x.csv", rows)
    with open(tmp_path / "x.csv") as f:
        back = list(csv.DictReader(f))
    assert back[0] == {"case_id": "a", "dice_WT": "0.5", "extra": ""}
    assert back[1]["extra"] == "2"
    write_json(tmp_path / "sub" / "s.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "sub" / "s.json").read_text()) == {"a": [1, 2]}
    assert not list(tmp_path.rglob("*.tmp"))


# ----------------------------------------------------------------------------- overlays
def test_overlay_slice_choice_and_png(tmp_path):
    from dgseg.viz import best_slice, overlay_slices, save_overlay_grid

    truth = np.zeros((8, 9, 10), np.uint8)
    truth[2:5, 2:6, 3] = 2  # 12 voxels on z = 3
    truth[4:8, 1:8, 6] = 1  # 28 voxels on z = 6: the largest
    assert best_slice(truth) == 6
    assert best_slice(truth, axis=0) == 4  # x = 4 holds 4 + 7 voxels
    assert best_slice(np.zeros((4, 4, 5))) == 2  # no tumour: middle slice
    image = np.random.default_rng(0).normal(size=truth.shape).astype(np.float32)
    sl = overlay_slices(image, truth, np.roll(truth, 1, axis=0))
    assert sl["slice"] == 6 and sl["image"].shape == (8, 9)
    np.testing.assert_array_equal(sl["truth"], truth[:, :, 6])
    if not HAVE_MATPLOTLIB:  # optional dependency: a clear message instead of a figure
        with pytest.raises(ImportError, match="matplotlib"):
            save_overlay_grid(tmp_path / "o.png", [{"case_id": "a", **sl}] * 2, title="t")
        return
    path = save_overlay_grid(tmp_path / "o.png", [{"case_id": "a", **sl}] * 2, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


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


# ----------------------------------------------------------------------------- tools/evaluate.py
def _tiny_checkpoint(path: Path, modalities, *, arch="segresnet", seed=0, name=None, roi=16):
    from dgseg.checkpoint import save_checkpoint
    from dgseg.config import Config, apply_overrides, get_preset
    from dgseg.models import build_model

    cfg = get_preset("tiny")
    mods = ",".join(modalities)
    over = [f"data.modalities={mods}", f"model.arch={arch}", "model.init_filters=4",
            "model.unet_features=4,4,8,8,8", f"run.name={name or path.parent.name}",
            f"run.val_roi={roi}"]
    cfg = apply_overrides(cfg, over)
    cfg = Config.from_dict(cfg.to_dict())
    torch.manual_seed(seed)
    model = build_model(cfg.data.in_channels, cfg.model)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0,
                           "step": 0})
    return path


def _run_evaluate(args, *, torchrun=0, timeout=240):
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun}", str(ROOT / "tools" / "evaluate.py"), *args]
    else:
        cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), *args]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_evaluate_tool_smoke_and_distributed(tiny_shards, tmp_path):
    """Three checkpoints (two seeds of one T2 model, one stacked model) over the tiny shards,
    once in one process with 2 metric worker processes and once with 2 gloo ranks scoring
    inline: identical per-case results."""
    ck = [
        _tiny_checkpoint(tmp_path / "s0" / "best.pt", ("t2",), seed=0, name="tiny_t2"),
        _tiny_checkpoint(tmp_path / "s1" / "best.pt", ("t2",), seed=1, name="tiny_t2"),
        # A 5-level UNet needs 32^3 windows: the tool takes each checkpoint's run.val_roi.
        _tiny_checkpoint(tmp_path / "st" / "best.pt", MODALITIES, arch="unet3d", name="stacked",
                         roi=32),
    ]
    common = ["--checkpoint", *map(str, ck), "--data", str(tiny_shards), "--overlap", "0.25",
              "--bootstrap", "200", "--overlays", "2", "--device", "cpu"]
    one = _run_evaluate([*common, "--out", str(tmp_path / "e1"), "--metric-workers", "2"])
    assert one.returncode == 0, one.stderr[-3000:]
    out = one.stdout
    assert "Mean - WT | TC | ET" in out and "Input rule" in out
    assert "Scored volume ('test'): 4 of 4 case(s) whole brain box." in out  # 32³ holds each box
    row = next(ln for ln in out.splitlines() if ln.startswith("tiny_t2"))
    assert "±" in row  # two seeds -> mean±sd
    stacked = next(ln for ln in out.splitlines() if ln.startswith("stacked"))
    assert stacked.split()[1:5] == ["x", "x", "x", "x"]

    summary = json.loads((tmp_path / "e1" / "summary.json").read_text())
    models = {m["model"]: m for m in summary["models"]}
    assert list(models["tiny_t2"]["columns"]) == [*MODALITIES, "own"]
    assert list(models["stacked"]["columns"]) == ["own"]
    n = models["tiny_t2"]["columns"]["t2"]["n_cases"]
    assert n >= 1 and models["tiny_t2"]["columns"]["t2"]["n_checkpoints"] == 2
    with open(tmp_path / "e1" / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n * (2 * 5 + 1)
    for r in rows:
        assert 0.0 <= float(r["dice_mean"]) <= 1.0
        assert 0.0 <= float(r["hd95_WT"]) <= BRATS_EMPTY_HD95
    # T2 model's "own" column is its T2 column, computed once.
    own = [r for r in rows if r["column"] == "own" and r["model"] == "tiny_t2"]
    t2 = [r for r in rows if r["column"] == "t2" and r["model"] == "tiny_t2"]
    assert [r["dice_mean"] for r in own] == [r["dice_mean"] for r in t2]
    assert "Mean - WT \\| TC \\| ET" in (tmp_path / "e1" / "table.md").read_text()
    pngs = sorted(p.name for p in (tmp_path / "e1" / "overlays").glob("*.png"))
    if HAVE_MATPLOTLIB:
        assert "tiny_t2_flair.png" in pngs and "stacked_own.png" in pngs
    else:  # the tables are still written; the figures are skipped with a reason
        assert pngs == [] and "overlays skipped" in one.stderr + one.stdout

    # 2 ranks with metrics inline vs 1 process with 2 metric workers: identical rows.
    two = _run_evaluate([*common, "--out", str(tmp_path / "e2"), "--metric-workers", "0"],
                        torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    with open(tmp_path / "e2" / "per_case.csv") as f:
        rows2 = list(csv.DictReader(f))
    key = lambda r: (r["checkpoint"], r["column"], r["case_id"])  # noqa: E731
    assert sorted(rows2, key=key) == sorted(rows, key=key)
    assert re.search(r"2\s+process\(es\)", two.stdout)

"""Cross-modality evaluation runs (dgseg/evaluation/cross_modality.py): the ordered metric pool, and
tools/evaluate.py on tiny checkpoints over the tiny synthetic shards."""

import csv
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgseg.constants import BRATS_EMPTY_HD95, MODALITIES
from dgseg.evaluation.cross_modality import OrderedPool
from dgseg.evaluation.scoring import score_job

from case_jobs import case_job
from tool_modules import load_tool

ROOT = Path(__file__).resolve().parents[1]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ordered_pool_matches_inline_and_names_the_failing_case():
    """Worker processes give the inline results, in submission order, whatever finishes first;
    a failure in a worker is raised with the case it belongs to."""
    jobs = [case_job(f"c{i}", i, n_preds=1 + i % 3)[0] for i in range(6)]
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


# ----------------------------------------------------------------------------- tools/evaluate.py
def _tiny_checkpoint(path: Path, modalities, *, arch="segresnet", seed=0, name=None, roi=16):
    from dgseg.config import Config, apply_overrides
    from dgseg.models import build_model
    from dgseg.presets import get_preset
    from dgseg.training.checkpoint import save_checkpoint

    cfg = get_preset("tiny")
    mods = ",".join(modalities)
    over = [
        f"data.modalities={mods}",
        f"model.arch={arch}",
        "model.init_filters=4",
        "model.unet_features=4,4,8,8,8",
        f"run.name={name or path.parent.name}",
        f"run.val_roi={roi}",
    ]
    cfg = apply_overrides(cfg, over)
    cfg = Config.from_dict(cfg.to_dict())
    torch.manual_seed(seed)
    model = build_model(cfg.data.in_channels, cfg.model)
    save_checkpoint(
        path, {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0, "step": 0}
    )
    return path


def _run_evaluate(args, *, torchrun=0, timeout=240):
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={torchrun}",
            str(ROOT / "tools" / "evaluate.py"),
            *args,
        ]
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
        _tiny_checkpoint(
            tmp_path / "st" / "best.pt", MODALITIES, arch="unet3d", name="stacked", roi=32
        ),
    ]
    common = [
        "--checkpoint",
        *map(str, ck),
        "--data",
        str(tiny_shards),
        "--overlap",
        "0.25",
        "--bootstrap",
        "200",
        "--overlays",
        "2",
        "--device",
        "cpu",
    ]
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
    two = _run_evaluate(
        [*common, "--out", str(tmp_path / "e2"), "--metric-workers", "0"], torchrun=2
    )
    assert two.returncode == 0, two.stderr[-3000:]
    with open(tmp_path / "e2" / "per_case.csv") as f:
        rows2 = list(csv.DictReader(f))
    key = lambda r: (r["checkpoint"], r["column"], r["case_id"])  # noqa: E731
    assert sorted(rows2, key=key) == sorted(rows, key=key)
    assert re.search(r"2\s+process\(es\)", two.stdout)


def _evaluate_tool():
    return load_tool("evaluate")


def test_evaluate_tool_reports_expected_faults_in_one_line(tiny_shards, tmp_path, capsys):
    evaluate = _evaluate_tool()
    ck = _tiny_checkpoint(tmp_path / "ok" / "best.pt", ("t2",))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    faults = [
        (["--checkpoint", str(ck), "--data", str(tmp_path / "nowhere")], "nowhere"),
        (["--checkpoint", str(ck), "--data", str(tmp_path)], "manifest.json"),
        (["--checkpoint", str(bad), "--data", str(tiny_shards)], "bad.pt"),
        (["--predictions", str(tmp_path), "--data", str(tmp_path / "nowhere")], "nowhere"),
    ]
    for argv, where in faults:
        rc = evaluate.main([*argv, "--out", str(tmp_path / "e"), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1, err
        assert err[0].startswith("error: ") and where in err[0], err

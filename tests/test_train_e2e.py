"""End-to-end runs of tools/train.py on tiny synthetic shards.

The end-to-end tests (marked slow) train a narrow SegResNet on 32³ synthetic cases on the CPU:
exact resume, non-finite loss handling, and learning (in-domain T2 WT Dice above a threshold).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dgseg.config import apply_overrides
from dgseg.models import build_model
from dgseg.presets import PRESETS
from dgseg.training import fit as train_fit
from dgseg.training.checkpoint import load_checkpoint
from dgseg.training.engine import grl_lambda

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _load_train():
    return train_fit


def test_expected_faults_stop_with_one_line_naming_the_path(tmp_path):
    train = _load_train()
    with pytest.raises(SystemExit, match=r"^error: data.root: .*nowhere.*manifest.json"):
        train.main(
            ["--preset", "tiny", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
        )
    run = tmp_path / "tiny"
    run.mkdir()
    (run / "last.pt").write_bytes(b"truncated")
    with pytest.raises(SystemExit, match=r"^error: --resume: .*last.pt: not a readable checkpoint"):
        train.main(["--preset", "tiny", "--out", str(tmp_path), "--resume"])


# ------------------------------------------------------------------------- end-to-end runs
def _run(train, shards, out, *extra, stop_after=None, resume=False):
    argv = ["--preset", "tiny", "--data", str(shards), "--out", str(out), "--set", "run.plot=false"]
    for item in extra:
        argv += ["--set", item]
    if stop_after is not None:
        argv += ["--stop-after-epochs", str(stop_after)]
    if resume:
        argv += ["--resume"]
    assert train.main(argv) == 0


# Everything random in one run: Bezier domains, flips, rotations, GRL, dropout, bf16 autocast,
# and a (persistent) loader worker process.
RANDOM_EVERYTHING = (
    "optim.epochs=2",
    "data.workers=1",
    "data.intensity_augs=none,bezier_increasing,bezier_decreasing",
    "data.domain_assignment=patient",
    "data.flip=true",
    "data.rotation_degrees=10",
    "data.patch_size=24",
    "model.grl=true",
    "loss.step=adversarial",
    "model.dropout=0.2",
    "run.val_roi=32",  # one window per 32³ validation volume
    "run.log_every=3",
)


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_bit_identical_weights(tiny_shards, tmp_path):
    train = _load_train()
    _run(train, tiny_shards, tmp_path / "straight", *RANDOM_EVERYTHING)
    _run(train, tiny_shards, tmp_path / "resumed", *RANDOM_EVERYTHING, stop_after=1)
    half = load_checkpoint(tmp_path / "resumed" / "tiny" / "last.pt")
    assert half["epoch"] == 1
    with pytest.raises(SystemExit, match="--resume"):  # never silently overwrite a run
        _run(train, tiny_shards, tmp_path / "resumed", *RANDOM_EVERYTHING)
    # A resume that would bend the LR / λ schedules is refused, naming what changed.
    with pytest.raises(SystemExit, match="optim.epochs 2 -> 4"):
        _run(train, tiny_shards, tmp_path / "resumed", "optim.epochs=4", resume=True)
    with pytest.raises(SystemExit, match="steps per epoch"):  # 4 steps/epoch instead of 8
        _run(train, tiny_shards, tmp_path / "resumed", "optim.batch_size=2", resume=True)
    _run(train, tiny_shards, tmp_path / "resumed", resume=True)  # config comes from last.pt
    a = load_checkpoint(tmp_path / "straight" / "tiny" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "tiny" / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 16)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not torch.equal(a["model"][k], half["model"][k])  # the second epoch did train
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert a["scheduler"] == b["scheduler"] and a["best_metric"] == b["best_metric"]
    # The resumed log has no duplicate records and λ follows the DANN schedule per step.
    recs = [json.loads(x) for x in (tmp_path / "resumed" / "tiny" / "log.jsonl").open()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [3, 6, 8, 9, 12, 15, 16]  # every 3rd + epoch tails
    for r in train_recs:  # λ of the last step of the window, p = (step - 1) / total
        assert r["lambda"] == pytest.approx(grl_lambda(r["step"] - 1, 16, 1.0))
    assert [r["epoch"] for r in recs if r["kind"] == "val"] == [2]  # tiny: every 10 and the last


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_last_checkpoint(tiny_shards, tmp_path):
    from dgseg.data.dataset import ShardDataset
    from dgseg.data.manifest import load_manifest

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    train = _load_train()
    _run(train, shards, tmp_path, "optim.epochs=3", "run.log_every=5", stop_after=1)
    last = tmp_path / "tiny" / "last.pt"
    before = last.read_bytes()
    # Poison one training case; it is met at its position in epoch 1's sampler permutation
    # (DistributedSampler: torch.randperm(n) with a generator seeded by seed + epoch).
    ds = ShardDataset(shards, split="train")
    victim = 5
    case_id = ds.case_ids[victim]
    shard_file = next(c["shard"] for c in load_manifest(shards)["cases"] if c["id"] == case_id)
    with h5py.File(shards / shard_file, "r+") as f:
        f[case_id]["t2"][0, 0, 0] = np.nan
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0 + 1)).tolist()
    expected_step = len(ds) + perm.index(victim) + 1  # 1-based, after one epoch of len(ds)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "train.py"),
        "--preset",
        "tiny",
        "--data",
        str(shards),
        "--out",
        str(tmp_path),
        "--resume",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"non-finite training loss at step {expected_step} (epoch 2)" in proc.stderr
    assert last.read_bytes() == before  # the last good checkpoint is untouched
    assert not list((tmp_path / "tiny").glob("*.tmp"))


# Learning threshold: WT Dice on the 4 validation cases after 40 epochs (320 steps) of the tiny
# preset on T2, measured 0.74-0.75 on this data (2-core CPU, ~35 s); an untrained net scores < 0.3.
WT_DICE_THRESHOLD = 0.6


@pytest.mark.slow
def test_tiny_segresnet_learns_t2_in_domain(tiny_shards, tmp_path):
    from dgseg.config import Config
    from dgseg.data.dataset import ShardDataset
    from dgseg.training.distributed import DistState
    from dgseg.training.engine import validate

    train = _load_train()
    cfg = apply_overrides(PRESETS["tiny"], [f"data.root={tiny_shards}"])
    dist = DistState(0, 0, 1, CPU, True)
    torch.manual_seed(cfg.run.seed)
    untrained = build_model(cfg.data.in_channels, cfg.model)
    val = ShardDataset(tiny_shards, split="val")
    before = validate(untrained, val, cfg=cfg, dist=dist)["dice_WT"]
    t0 = time.perf_counter()
    _run(train, tiny_shards, tmp_path, "run.val_every=40")
    seconds = time.perf_counter() - t0
    ckpt = load_checkpoint(tmp_path / "tiny" / "best.pt")
    saved = Config.from_dict(ckpt["config"])
    net = build_model(saved.data.in_channels, saved.model)
    net.load_state_dict(ckpt["model"])
    after = validate(net, val, cfg=cfg, dist=dist)
    print(f"WT Dice untrained {before:.3f} -> trained {after['dice_WT']:.3f} in {seconds:.0f} s")
    assert before < 0.3
    assert after["dice_WT"] >= WT_DICE_THRESHOLD
    assert after["dice_mean"] == pytest.approx(ckpt["best_metric"], abs=1e-6)

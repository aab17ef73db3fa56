"""Two-process gloo tests: DDP gradients, sharded validation, and a torchrun training run.

Every multi-process call runs with a timeout so that a hang fails the test instead of CI.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dgseg.config import Config, apply_overrides
from dgseg.training.checkpoint import load_checkpoint
from dgseg.training.distributed import DistState, init_distributed

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

MODEL_KW = dict(
    in_channels=1,
    init_filters=4,
    blocks_down=(1, 1, 1),
    blocks_up=(1, 1),
    grl=True,
    num_domains=3,
    domain_hidden=8,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    g = torch.Generator().manual_seed(123)
    image = torch.randn(2, 1, 16, 16, 16, generator=g)
    label = (torch.rand(2, 3, 16, 16, 16, generator=g) > 0.6).float()
    domain = torch.tensor([0, 2])
    return image, label, domain


def _val_cases():
    g = torch.Generator().manual_seed(7)
    return [
        {
            "image": torch.randn(1, 16, 16, 16, generator=g),
            "label": (torch.rand(3, 16, 16, 16, generator=g) > 0.5).float(),
        }
        for _ in range(3)  # odd count: rank 0 gets 2 cases, rank 1 gets 1
    ]


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import torch.distributed as tdist

    from dgseg.evaluation.metrics import dice_score
    from dgseg.models import build_model
    from dgseg.training.distributed import all_reduce_sum, cleanup, wrap_ddp
    from dgseg.training.engine import validate
    from dgseg.training.losses import SegLoss
    from dgseg.training.steps import StepContext, forward_loss

    dist = init_distributed("cpu", timeout_s=120)
    try:
        assert (dist.rank, dist.world_size, dist.is_main) == (rank, world, rank == 0)
        assert tdist.get_backend() == "gloo"
        assert all_reduce_sum(torch.tensor([float(rank)])).item() == pytest.approx(1.0)

        # --- 2 ranks x batch 1 through DDP == 1 process x batch 2 --------------------------
        image, label, domain = _inputs()
        torch.manual_seed(0)
        net = build_model(**MODEL_KW)
        ddp = wrap_ddp(net, dist)
        loss_fn = SegLoss(bce_weight=0.5)
        ctx = StepContext(dist.device, lambd=0.7, domain_weight=1.0)

        def step(model, b, ctx):
            return forward_loss(model, b["image"], b["label"], loss_fn, ctx, b["domain"])

        mine = {
            "image": image[rank : rank + 1],
            "label": label[rank : rank + 1],
            "domain": domain[rank : rank + 1],
        }
        step(ddp, mine, ctx)["loss"].backward()
        ddp_grads = [p.grad.clone() for p in net.parameters()]
        if rank == 0:
            torch.manual_seed(0)
            ref = build_model(**MODEL_KW)
            both = {"image": image, "label": label, "domain": domain}
            step(ref, both, ctx)["loss"].backward()
            n_nonzero = 0
            for (name, p), g in zip(ref.named_parameters(), ddp_grads):
                torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5, msg=name)
                n_nonzero += int(g.abs().sum() > 0)
            assert n_nonzero == len(ddp_grads)  # every parameter, the domain head included
        # A second step: DDP without find_unused_parameters raises here if a parameter got no
        # gradient in the first one (the domain head must run even at lambda = 0).
        torch.optim.SGD(net.parameters(), lr=0.01).step()
        step(ddp, mine, StepContext(dist.device, domain_weight=1.0))["loss"].backward()

        # --- validation sharded as keys[rank::world], then all-reduced ----------------------
        cases = _val_cases()
        cfg = apply_overrides(Config(), ["run.amp=none"])
        got = validate(net, cases, cfg=cfg, dist=dist)
        if rank == 0:
            per_case = []
            with torch.no_grad():
                for c in cases:
                    logits = net(c["image"][None])[0][0]  # (3, D, H, W)
                    pred, truth = (logits > 0).numpy(), c["label"].numpy() > 0.5
                    per_case.append([dice_score(pred[k], truth[k]) for k in range(3)])
            expect = np.mean(per_case, axis=0)
            assert got["n_cases"] == 3
            for k, region in enumerate(("WT", "TC", "ET")):
                assert got[f"dice_{region}"] == pytest.approx(expect[k], abs=1e-6)
            assert got["dice_mean"] == pytest.approx(expect.mean(), abs=1e-6)
        tdist.barrier()
    finally:
        cleanup()


@pytest.mark.slow
def test_two_rank_gradients_and_validation_match_one_process():
    port = _free_port()
    ctx = mp.start_processes(_worker, args=(2, port), nprocs=2, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo test hung")


def test_single_process_state_without_torchrun(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    dist = init_distributed("cpu")
    assert dist == DistState(0, 0, 1, torch.device("cpu"), True)
    with pytest.raises(ValueError, match="device='gpu'"):
        init_distributed("gpu")


@pytest.mark.slow
def test_torchrun_two_processes_train_a_tiny_preset(tiny_shards, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tools" / "train.py"),
        "--preset",
        "tiny",
        "--data",
        str(tiny_shards),
        "--out",
        str(tmp_path),
        "--set",
        "optim.epochs=2",
        "--set",
        "run.val_every=1",
        "--set",
        "run.plot=false",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "tiny"
    assert {"config.json", "last.pt", "best.pt", "log.jsonl"} <= {p.name for p in run.iterdir()}
    assert not list(run.glob("*.tmp"))
    # Only rank 0 logs: one end-of-epoch line per epoch, one epoch record per epoch.
    assert proc.stdout.count("epoch 2/2 done") == 1
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    ckpt = load_checkpoint(run / "last.pt")
    from dgseg.data.dataset import ShardDataset

    n_train = len(ShardDataset(tiny_shards, split="train"))
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (n_train // 2)
    assert len(ckpt["rng"]) == 2  # every rank's RNG streams
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert json.loads((run / "config.json").read_text()) == ckpt["config"]

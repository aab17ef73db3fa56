"""One-command demo: synthetic data -> shards -> one training per preset -> cross-modality table.

    python tools/demo.py [--out demo_out] [--quick] [--fresh] [--presets A B ...] [--nproc N]

Needs no data. Four stages, each one of the tools run as a subprocess whose output you see; a
failing stage stops the demo with the command and its exit status:

1. ``data``   tools/make_synthetic_brats.py: seeded BraTS-like cases (all four modalities);
2. ``shards`` tools/prepare_brats.py: crop to the brain, z-score, store 32³ volumes;
3. ``train``  tools/train.py for each of :data:`PRESETS` on T2 only, with the small-network
   overrides of :func:`train_overrides` (the source-only baseline, the write-up's method: three
   Bezier domains, VFFC bottleneck, domain classifier behind a gradient-reversal layer, and the
   recommended single-source DG preset: the gradient-map input with location-scale, contrast
   re-synthesis or a Bezier curve drawn per sample);
4. ``eval``   tools/evaluate.py on the test split with each of T1, T1CE, T2 and FLAIR as input:
   the cross-modality table, ``table.md``, ``summary.json``, ``per_case.csv``, overlay PNGs.

A stage whose output is complete is skipped (an interrupted training continues from its
``last.pt``); ``--fresh`` deletes ``--out`` first. ``--quick`` checks the chain in under a
minute (few cases, a 4-filter network, one epoch). Training runs in one process by default: two
processes on two cores measured 0.89x the speed of one process with two threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dgseg.cli_checks import ArgumentFault, check_at_least, check_device, check_output_dir
from dgseg.config import add_set_argument
from dgseg.presets import CPU_RECIPE
from dgseg.training.distributed import launch_command

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"

# Trained in this order; the first is the baseline the others are read against: the write-up's
# method, then the recommended single-source DG preset. Others join with --presets.
PRESETS = ("segresnet_t2_noaug", "segresnet_t2_vffc_grl", "segresnet_t2_sdg")


@dataclasses.dataclass(frozen=True)
class Size:
    """How big one demo run is."""

    cases: int  # synthetic cases, split train / val / test = 70 / 10 / 20 %
    shape: tuple[int, int, int]  # raw volume (X, Y, Z); the brain box fits in a 32³ cube
    patch: int  # training crop edge (the stored volumes are 32³)
    epochs: int
    init_filters: int  # SegResNet width (the `tiny` preset: 8)
    val_every: int
    overlays: int  # cases per overlay PNG
    bootstrap: int  # bootstrap resamples of the evaluation's CIs


# FULL: 672 steps per preset at 24³ (a 32³ step costs ~2.5x more); the baseline's validation
# mean Dice reaches ~0.6, the adversarial model learns much more slowly on its augmented domains.
FULL = Size(
    cases=40,
    shape=(40, 40, 30),
    patch=24,
    epochs=24,
    init_filters=8,
    val_every=8,
    overlays=3,
    bootstrap=1000,
)
QUICK = Size(
    cases=10,
    shape=(40, 40, 30),
    patch=32,
    epochs=1,
    init_filters=4,
    val_every=1,
    overlays=1,
    bootstrap=100,
)


def train_overrides(s: Size, args: argparse.Namespace) -> list[str]:
    """``--set`` items shared by every preset: the CPU recipe at this size."""
    return [
        *CPU_RECIPE,
        f"model.init_filters={s.init_filters}",
        f"optim.epochs={s.epochs}",
        f"data.patch_size={s.patch}",
        "run.val_roi=32",  # validate (and evaluate) the whole 32³ volume in one window
        f"run.val_every={s.val_every}",
        f"run.seed={args.seed}",
        f"run.device={args.device}",
        *args.overrides,
    ]


def threads(nproc: int) -> tuple[int, str]:
    """Threads per process, and why: a core another program keeps busy makes every parallel
    region wait for it (measured 3-7x slower steps with 2 threads on 2 cores at load 4)."""
    cores = os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    n = max(1, min(cores - busy, cores) // nproc)
    return n, f"{cores} core(s), load average {busy}, {nproc} process(es)"


def run(stage: str, cmd: Sequence[object], env: dict) -> float:
    """Run one stage's command; exit the demo (status 1) when it fails. Returns seconds."""
    words = [str(c) for c in cmd]
    print(f"\n[demo] {stage}: {shlex.join(words)}", flush=True)
    t0 = time.monotonic()
    code = subprocess.run(words, env=env, check=False).returncode
    if code != 0:
        print(
            f"[demo] stage '{stage}' failed with exit status {code}; command:\n  "
            f"{shlex.join(words)}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
    return time.monotonic() - t0


def training_done(run_dir: Path, epochs: int) -> bool:
    """The run's log has its last epoch and a checkpoint exists."""
    log = run_dir / "log.jsonl"
    if not (run_dir / "last.pt").exists() or not log.exists():
        return False
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return any(r.get("kind") == "epoch" and r.get("epoch") == epochs for r in records)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny end-to-end check (< 1 minute)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument(
        "--presets",
        nargs="+",
        default=list(PRESETS),
        help=f"presets to train, baseline first (default: {' '.join(PRESETS)})",
    )
    p.add_argument("--nproc", type=int, default=1, help="processes per training (torchrun)")
    p.add_argument("--seed", type=int, default=0, help="data, split and training seed")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    add_set_argument(p, "extra tools/train.py override for every preset (repeatable)")
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    for item in args.overrides:
        if "=" not in item:
            p.error(f"--set {item!r} must look like section.field=value")
    try:
        check_at_least("--seed", args.seed, 0)
        check_device("--device", args.device)
        check_output_dir("--out", args.out)
    except ArgumentFault as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    s = QUICK if args.quick else FULL
    out = args.out
    if args.fresh and out.exists():
        shutil.rmtree(out)
    raw, shards, runs, eval_dir = out / "raw", out / "shards", out / "runs", out / "eval"
    n_threads, why = threads(args.nproc)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(n_threads),
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    print(
        f"[demo] {'quick ' if args.quick else ''}run in {out}: {s.cases} synthetic cases, "
        f"presets {', '.join(args.presets)}, {s.epochs} epoch(s) each; {args.nproc} "
        f"process(es) x {n_threads} thread(s) ({why})",
        flush=True,
    )
    t_start, times = time.monotonic(), {}

    if not (shards / "manifest.json").exists():
        times["data"] = run(
            "data",
            [
                sys.executable,
                TOOLS / "make_synthetic_brats.py",
                "--output",
                raw,
                "--n-cases",
                s.cases,
                "--shape",
                *s.shape,
                "--seed",
                args.seed,
                "--workers",
                min(2, os.cpu_count() or 1),
            ],
            env,
        )
        times["shards"] = run(
            "shards",
            [
                sys.executable,
                TOOLS / "prepare_brats.py",
                "--input",
                raw,
                "--output",
                shards,
                "--size",
                32,
                "--seed",
                args.seed,
                "--workers",
                min(2, os.cpu_count() or 1),
                "--quiet",
            ],
            env,
        )
    items = train_overrides(s, args)
    for preset in args.presets:
        if training_done(runs / preset, s.epochs):
            print(f"[demo] train {preset}: done before, skipped", flush=True)
            continue
        cmd = [
            *launch_command(args.nproc),
            TOOLS / "train.py",
            "--preset",
            preset,
            "--data",
            shards,
            "--out",
            runs,
            "--resume",
        ]
        times[f"train {preset}"] = run(
            f"train {preset}", cmd + [w for i in items for w in ("--set", i)], env
        )

    ckpts = [
        runs / p / ("best.pt" if (runs / p / "best.pt").exists() else "last.pt")
        for p in args.presets
    ]
    summary = eval_dir / "summary.json"
    if summary.exists() and all(c.stat().st_mtime < summary.stat().st_mtime for c in ckpts):
        print(f"[demo] eval: done before, skipped\n\n{(eval_dir / 'table.md').read_text()}")
    else:
        times["eval"] = run(
            "eval",
            [
                *launch_command(args.nproc),
                TOOLS / "evaluate.py",
                "--checkpoint",
                *ckpts,
                "--data",
                shards,
                "--out",
                eval_dir,
                "--overlays",
                s.overlays,
                "--bootstrap",
                s.bootstrap,
                "--device",
                args.device,
                "--quiet",
            ],
            env,
        )

    total = time.monotonic() - t_start
    print(
        "\n[demo] wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f"; total {total / 60:.1f} min"
    )
    curves = sorted(str(p) for p in runs.glob("*/curves.png"))
    print(
        f"[demo] report: {eval_dir}/table.md, summary.json, per_case.csv"
        + (", overlays/" if (eval_dir / "overlays").is_dir() else "")
        + (
            f"; training curves: {', '.join(curves)}"
            if curves
            else "; no PNGs (pip install matplotlib)"
        )
    )
    print(
        f"[demo] T2 is the training modality; T1, T1CE and FLAIR were never seen. Compare each "
        f"row with the baseline {args.presets[0]} column by column."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

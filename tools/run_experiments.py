"""Run a seeded ablation matrix (presets x seeds) through train.py and evaluate.py, then aggregate.

    python tools/run_experiments.py --data DIR [--presets P ...] [--seeds 0 1 2] [--epochs N]
        [--nproc-per-node N] [--out runs/study] [--set section.field=value ...] [--scale cpu]
        [--dry-run] [--aggregate-only]
    python tools/run_experiments.py --synthetic 40 --scale cpu --out runs/study_cpu   # no data

Every (preset, seed) is one run in its own folder ``<out>/<preset>/seed<S>/``: the run folder of
``tools/train.py`` (``run.out=<out>/<preset>``, ``run.name=seed<S>``, ``run.seed=S``; torchrun when
``--nproc-per-node`` > 1), then ``tools/evaluate.py`` of its best.pt (else last.pt) on the test
split into ``eval/``, with the logs ``train.log`` / ``eval.log`` and, once both succeeded,
``done.json``. A run with ``done.json`` is skipped, so an interrupted or re-submitted job
continues (an interrupted training resumes from its last.pt); a run folder made with other
settings (another resolved config.json) is never reused (that run fails with a message; use
another ``--out``). A failed run is reported at the end and the others continue. One line per run
started / finished, with its wall time and an ETA for the matrix (mean time of the runs finished
so far x runs left).

Aggregation (``dgseg.evaluation.study``) into ``<out>/study/``: study.md (the write-up's table,
rows =
presets, columns = T1 / T1CE / T2 / FLAIR, cells ``Mean - WT | TC | ET`` as mean ± sd over seeds;
95 % bootstrap CIs over test cases; paired comparisons of every preset with no-aug and with
spatial-only), study_table.csv, study_paired.csv, study.json and, with matplotlib, study.png.

``--scale cpu`` prepends ``CPU_SCALE`` (printed by ``--dry-run``) to the ``--set`` items: every
preset at the same small size (8 filters and one block per SegResNet level, a 8-128 channel UNet,
32³ patches, lr 2e-3, Dice + BCE, 40 epochs validated once at the end; bf16 only where it is
native). Measured on a 2-core AMD EPYC (AVX2, float32), 1 thread per run, two or three runs at
once: 4.5-6 minutes per run on the 29 training cases of docs/results/study (train 4-5.5 min,
evaluation of 14 whole-brain test cases x 4 modalities 0.4-0.7 min). On a shared machine set
OMP_NUM_THREADS=1: oversubscribed OpenMP threads are 3-5x slower. The original-network preset
keeps what distinguishes it (dropout 0.2, three reflect-padded BatchNorm VFFC blocks, domain head
without LayerNorm and 64 hidden units, Adam with amsgrad and L2 decay) but not its size:
``model.init_filters=8`` narrows it to a 64-channel bottleneck and head input.
Items given with ``--set`` come after the scale's, so they win.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import torch

from dgseg.atomic import atomic_write_json
from dgseg.cli_checks import check_at_least, check_config_values, check_output_dir
from dgseg.config import Config, add_set_argument, apply_overrides
from dgseg.data.manifest import load_manifest, scored_extent
from dgseg.data.prepared import check_prepared
from dgseg.evaluation.scoring import EVAL_RULE
from dgseg.evaluation.study import BASELINES, read_records, write_study
from dgseg.evaluation.study import aggregate as aggregate_records
from dgseg.logging_utils import format_eta
from dgseg.presets import CPU_RECIPE, PRESETS, get_preset
from dgseg.run_lock import RunLockError, acquire
from dgseg.training.distributed import launch_command

REPO = Path(__file__).resolve().parents[1]  # children run this checkout's tools and package
TOOLS = REPO / "tools"

# The matrix that answers the write-up's question: baselines, the controls, each ingredient of
# the method alone and together, the original network, and the write-up's other experiments.
DEFAULT_PRESETS = (
    "segresnet_t2_noaug",
    "segresnet_t2_spatial",
    "segresnet_t2_bezier",
    "segresnet_t2_grl",
    "segresnet_t2_vffc",
    "segresnet_t2_vffc_grl",
    "segresnet_t2_vffc_grl_original",
    "segresnet_t1ce_t2_bezier",
    "unet_t2_noaug",
)
DEFAULT_SEEDS = (0, 1, 2)

# --scale cpu: every preset small enough for a 2-core CPU, plus run.amp: bf16 where oneDNN has
# native bf16 (2.5x faster), float32 elsewhere (bf16 emulation is slower than float32). 40 epochs
# because the augmented presets were still learning at 16 (the screening in docs/results/); one
# validation, after the last epoch, so the checkpoint scored is the last one for every preset.
CPU_SCALE = (*CPU_RECIPE, "data.patch_size=32", "optim.epochs=40", "run.val_every=40")
SCALES = {"full": (), "cpu": CPU_SCALE}
SYNTHETIC_SPLIT = ("0.6", "0.1", "0.3")  # --synthetic: more test cases for the paired tests
_PER_RUN_KEYS = ("run.out", "run.name", "run.seed", "data.root")  # set by this tool
TAIL = 20  # log lines shown for a failed run


class Run(NamedTuple):
    preset: str
    seed: int
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.preset} seed {self.seed}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--data", type=Path, help="prepared shard folder (tools/prepare_brats.py)")
    p.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="no --data: prepare N built-in synthetic cases into <out>/data first",
    )
    p.add_argument(
        "--presets",
        nargs="+",
        default=list(DEFAULT_PRESETS),
        metavar="PRESET",
        help="preset names (any of dgseg.presets.PRESETS); default: the study matrix",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), metavar="S")
    p.add_argument("--epochs", type=int, help="optim.epochs of every run")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="training processes per run (torchrun when > 1)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="matrix folder")
    add_set_argument(p, "config override passed to every run (repeatable)")
    p.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default="full",
        help="'full': the presets as they are; 'cpu': CPU_SCALE first (see above)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="training (run.device) and evaluation device",
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the CIs")
    p.add_argument("--dry-run", action="store_true", help="list the runs and commands, run nothing")
    p.add_argument("--aggregate-only", action="store_true", help="only aggregate finished runs")
    args = p.parse_args(argv)
    if (args.data is None) == (args.synthetic is None):
        p.error("give exactly one of --data and --synthetic")
    if args.synthetic is not None and args.synthetic < 5:
        p.error(f"--synthetic needs >= 5 cases (train, val and test), got {args.synthetic}")
    unknown = [x for x in args.presets if x not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {unknown}; valid: {', '.join(sorted(PRESETS))}")
    if len(set(args.presets)) != len(args.presets) or len(set(args.seeds)) != len(args.seeds):
        p.error("--presets and --seeds must not repeat")
    if any(s < 0 for s in args.seeds):
        p.error(f"--seeds must be >= 0, got {args.seeds}")
    if args.nproc_per_node < 1 or (args.epochs is not None and args.epochs < 1):
        p.error("--nproc-per-node and --epochs must be >= 1")
    for item in args.overrides:
        if item.split("=", 1)[0].strip() in _PER_RUN_KEYS:
            p.error(f"--set {item!r}: {', '.join(_PER_RUN_KEYS)} are set per run by this tool")
    if args.data is None:
        args.data = args.out / "data"
    args.items = list(SCALES[args.scale])
    if args.scale == "cpu":
        args.items.append(f"run.amp={cpu_amp()}")
    if args.epochs is not None:
        args.items.append(f"optim.epochs={args.epochs}")
    if args.device != "auto":
        args.items.append(f"run.device={args.device}")
    args.items += args.overrides
    try:  # every preset must resolve with these items before anything runs
        for preset in args.presets:
            check_config_values(apply_overrides(get_preset(preset), args.items))
        check_at_least("--bootstrap", args.bootstrap, 1)
        check_output_dir("--out", args.out)
    except ValueError as e:
        p.error(str(e))
    return args


def cpu_amp() -> str:
    """bf16 where oneDNN has native bf16, float32 elsewhere (as tools/demo.py decides)."""
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"
    except (AttributeError, RuntimeError):
        return "none"


def say(text: str) -> None:
    print(text, flush=True)


def run_items(args: argparse.Namespace, run: Run) -> list[str]:
    """The --set items of one training run (the per-run keys last)."""
    return [
        *args.items,
        f"run.out={run.folder.parent}",
        f"run.name={run.folder.name}",
        f"run.seed={run.seed}",
    ]


def settings(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    """What a finished run must have been made with to be reused."""
    return {
        "preset": run.preset,
        "seed": run.seed,
        "data": str(args.data.resolve()),
        "items": run_items(args, run),
    }


def train_command(args: argparse.Namespace, run: Run) -> list[str]:
    cmd = [
        *launch_command(args.nproc_per_node),
        str(TOOLS / "train.py"),
        "--preset",
        run.preset,
        "--data",
        str(args.data),
        "--resume",
    ]
    for item in run_items(args, run):
        cmd += ["--set", item]
    return cmd


def checkpoint(run: Run) -> Path:
    """best.pt (best validation mean Dice, as in the write-up), else last.pt."""
    best = run.folder / "best.pt"
    return best if best.exists() else run.folder / "last.pt"


def eval_command(args: argparse.Namespace, run: Run) -> list[str]:
    return [
        sys.executable,
        str(TOOLS / "evaluate.py"),
        "--checkpoint",
        str(checkpoint(run)),
        "--data",
        str(args.data),
        "--split",
        "test",
        "--labels",
        run.preset,
        "--out",
        str(run.folder / "eval"),
        "--bootstrap",
        str(args.bootstrap),
        "--device",
        args.device,
        "--quiet",
    ]


def matches(args: argparse.Namespace, run: Run) -> bool:
    """Whether the run folder's resolved config is the one these settings make (so the same
    settings given in another order, or by a newer ``--scale``, still match; so does a
    config.json written before a field existed, when that field has its default)."""
    expected = apply_overrides(
        get_preset(run.preset), [f"data.root={args.data}", *run_items(args, run)]
    )
    try:
        return Config.from_dict(json.loads((run.folder / "config.json").read_text())) == expected
    except (OSError, ValueError):
        return False


def status(args: argparse.Namespace, run: Run) -> str:
    """ "done" (finished with these settings), "conflict" (made with others) or "todo"."""
    if (run.folder / "done.json").exists():
        ok = (run.folder / "eval" / "per_case.csv").exists()
        return "done" if ok and matches(args, run) else "conflict"
    if (run.folder / "config.json").exists() and not matches(args, run):
        return "conflict"  # an unfinished run is resumable only if it is this run
    return "todo"


def child_env() -> dict[str, str]:
    """The tools import this checkout's dgseg, whatever is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def execute(
    cmd: Sequence[str], log: Path, env: Optional[dict[str, str]] = None
) -> tuple[int, float]:
    """Run ``cmd`` with its output appended to ``log``; (exit status, wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.call(
            list(cmd),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env or child_env(),  # caller's cwd
        )
    return code, time.monotonic() - t0


def tail(log: Path, n: int = TAIL) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def prepare_synthetic(args: argparse.Namespace) -> None:
    cmd = [
        sys.executable,
        str(TOOLS / "prepare_brats.py"),
        "--output",
        str(args.data),
        "--synthetic-cases",
        str(args.synthetic),
        "--split",
        *SYNTHETIC_SPLIT,
        "--quiet",
        "--workers",
        str(max(1, min(4, (os.cpu_count() or 2) - 1))),
    ]
    say(f"[data] preparing {args.synthetic} synthetic cases in {args.data}")
    code, wall = execute(cmd, args.out / "prepare.log")
    if code != 0:
        for line in tail(args.out / "prepare.log"):
            say(f"    | {line}")
        raise SystemExit(f"error: preparing the synthetic data failed (exit {code})")
    say(f"[data] ready in {format_eta(wall)}")


def run_one(args: argparse.Namespace, run: Run) -> Optional[str]:
    """Train then evaluate one run, holding its folder; None on success, else a one-line
    reason. The matrix always resumes, so a stale lock of a killed matrix is taken over."""
    try:
        lock = acquire(run.folder, what="run folder", take_stale=True)
    except (RunLockError, OSError) as e:
        return " ".join(str(e).split())
    try:
        return _run_locked(args, run, lock.child_env(child_env()))
    finally:
        lock.release()


def _run_locked(args: argparse.Namespace, run: Run, env: dict[str, str]) -> Optional[str]:
    code, train_s = execute(train_command(args, run), run.folder / "train.log", env)
    if code != 0:
        return f"train exit {code} after {format_eta(train_s)}; log: {run.folder / 'train.log'}"
    if not checkpoint(run).exists():
        return f"training left no checkpoint in {run.folder}"
    code, eval_s = execute(eval_command(args, run), run.folder / "eval.log", env)
    if code != 0:
        return f"evaluate exit {code} after {format_eta(eval_s)}; log: {run.folder / 'eval.log'}"
    atomic_write_json(
        run.folder / "done.json",
        {
            "settings": settings(args, run),
            "checkpoint": checkpoint(run).name,
            "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1),
        },
    )
    return None


def aggregate(args: argparse.Namespace, runs: Sequence[Run]) -> Optional[Path]:
    """Aggregate every finished run of the matrix into <out>/study/."""
    finished = [r for r in runs if status(args, r) == "done"]
    if not finished:
        say("[study] no finished run to aggregate")
        return None
    records = []
    for r in finished:
        records += read_records(r.folder / "eval" / "per_case.csv", preset=r.preset, seed=r.seed)
    result = aggregate_records(
        records, presets=args.presets, baselines=BASELINES, n_boot=args.bootstrap
    )
    missing = [r.name for r in runs if r not in finished]
    footer = [
        "Cells: Mean - WT | TC | ET (mean = average of the three regions); Dice, HD95 in mm; "
        "BraTS empty-mask rules; mean ± sd over seeds of each seed's mean over test cases.",
        EVAL_RULE,
        scored_extent(load_manifest(args.data), "test")["text"],
        f"Runs: {len(finished)} of {len(runs)} ({len(args.presets)} presets x seeds "
        f"{' '.join(map(str, args.seeds))})"
        + (f"; missing: {', '.join(missing)}." if missing else "."),
        f"Scale '{args.scale}'; --set items of every run: "
        + (" ".join(args.items) if args.items else "none (the presets as they are)")
        + ".",
        "Paired comparisons: per test case the difference of the seed-averaged Dice of the two "
        "presets (same cases, matched by id); bootstrap over cases (the same draw for both) and, "
        f"within each preset, seeds; B={args.bootstrap}, seed 0.",
    ]
    paths = write_study(result, args.out / "study", footer=footer)
    say(f"[study] {len(finished)} run(s) aggregated: " + ", ".join(str(p) for p in paths.values()))
    return paths["md"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    runs = [Run(p, s, args.out / p / f"seed{s}") for p in args.presets for s in args.seeds]
    if args.dry_run:
        say(
            f"{len(runs)} run(s) in {args.out} (scale '{args.scale}'); --set items: "
            f"{' '.join(args.items) or 'none'}"
        )
        have_data = (args.data / "manifest.json").exists()
        for k, r in enumerate(runs, 1):
            state = status(args, r) if have_data or r.folder.exists() else "todo"
            say(f"  [{k}/{len(runs)}] {r.name:<40} {state}")
        say(
            "first run:\n  "
            + shlex.join(train_command(args, runs[0]))
            + "\n  "
            + shlex.join(eval_command(args, runs[0]))
        )
        return 0
    if not args.aggregate_only:
        if args.synthetic is not None:
            prepare_synthetic(args)
        modalities = {
            m
            for p in args.presets
            for m in apply_overrides(get_preset(p), args.items).data.modalities
        }
        try:  # a missing or damaged data folder: one line before the first run
            check_prepared(args.data, splits=("all",), modalities=sorted(modalities))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --data: {' '.join(str(e).split())}") from None
        states = {r: status(args, r) for r in runs}
        todo = [r for r in runs if states[r] == "todo"]
        failed: list[tuple[Run, str]] = [
            (
                r,
                f"{r.folder} holds a run made with other settings; use another --out or "
                "delete that folder",
            )
            for r in runs
            if states[r] == "conflict"
        ]
        say(
            f"[matrix] {len(runs)} run(s): {len(todo)} to run, "
            f"{sum(s == 'done' for s in states.values())} finished earlier, {len(failed)} "
            f"conflicting; out {args.out}"
        )
        walls: list[float] = []
        t_start = time.monotonic()
        for k, r in enumerate(runs, 1):
            head = f"[run {k}/{len(runs)}]"
            if states[r] == "done":
                say(f"{head} skip    {r.name} (finished earlier)")
                continue
            if states[r] == "conflict":
                say(f"{head} FAILED  {r.name}: {dict(failed)[r]}")
                continue
            say(f"{head} start   {r.name} -> {r.folder}")
            t0 = time.monotonic()
            reason = run_one(args, r)
            wall = time.monotonic() - t0
            walls.append(wall)
            left = len(todo) - len(walls)
            eta = sum(walls) / len(walls) * left
            if reason is None:
                done = json.loads((r.folder / "done.json").read_text())
                say(
                    f"{head} done    {r.name} in {format_eta(wall)} "
                    f"(train {format_eta(done['train_s'])}, eval {format_eta(done['eval_s'])}); "
                    f"{left} left, ETA {format_eta(eta)}"
                )
            else:
                failed.append((r, reason))
                say(f"{head} FAILED  {r.name}: {reason}; {left} left, ETA {format_eta(eta)}")
                log = r.folder / ("eval.log" if "evaluate" in reason else "train.log")
                for line in tail(log):
                    say(f"    | {line}")
        say(
            f"[matrix] {len(walls)} run(s) in {format_eta(time.monotonic() - t_start)}, "
            f"{len(failed)} failed"
        )
    else:
        failed = []
    aggregate(args, runs)
    for r, reason in failed:
        say(f"failed: {r.name}: {reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

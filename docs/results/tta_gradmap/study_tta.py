"""The gradient-map and test-time-adaptation study: train, evaluate with each --adapt, aggregate.

    python docs/results/tta_gradmap/study_tta.py --data runs/tta_study/shards \
        --out runs/tta_study/runs [--presets P ...] [--seeds 0 1 2] [--methods tent prior ...] \
        [--jobs 2] [--report docs/results/tta_gradmap]

1. Each (preset, seed) is trained and evaluated without adaptation by ``tools/run_experiments.py
   --scale cpu`` (one run per call, ``--jobs`` calls side by side, one thread each); a finished
   run is skipped, so the script can be re-run after an interruption.
2. Each finished run's scored checkpoint (best.pt, else last.pt, as run_experiments picks) is
   evaluated on the test split by ``tools/evaluate.py --adapt <method>`` into
   ``<run>/eval_<method>/`` (skipped when its per_case.csv exists).
3. Rows ``<preset>`` (no adaptation) and ``<preset> +<method>`` are aggregated with
   ``dgseg.evaluation.study``: mean ± sd over seeds, bootstrap CIs over cases, paired comparisons
   of every row with no-aug and of every adapted row with its own unadapted preset. The report
   folder gets study.md / study.json / study_table.csv / study_paired.csv / study.png, each run's
   config.json, epochs.jsonl and per_case.csv files under ``runs/``, and ``times.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from dgseg.config import add_set_argument  # noqa: E402
from dgseg.evaluation.report import summarize, write_csv  # noqa: E402
from dgseg.evaluation.study import compare, read_records, write_study  # noqa: E402

PRESETS = (
    "segresnet_t2_noaug",
    "segresnet_t2_sdg_bezier",
    "segresnet_t2_gradmap",
    "segresnet_t2_sdg_gradmap",
)
METHODS = ("tent", "prior", "match", "match+prior")
NOAUG = "segresnet_t2_noaug"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="prepared shards (the study's)")
    p.add_argument("--out", type=Path, required=True, help="run_experiments --out folder")
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="processes side by side (1 thread each)")
    add_set_argument(p, "config item passed to every training (run_experiments --set)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--report", type=Path, help="folder for the tables and the copied run files")
    p.add_argument("--aggregate-only", action="store_true")
    return p.parse_args(argv)


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [e.get("PYTHONPATH")])])
    return e


def run_folder(args, preset: str, seed: int) -> Path:
    return args.out / preset / f"seed{seed}"


def scored_checkpoint(folder: Path) -> Path:
    best = folder / "best.pt"
    return best if best.exists() else folder / "last.pt"


def timed(cmd: list[str], log: Path) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
    return rc, time.monotonic() - t0


def train(args, preset: str, seed: int) -> tuple[str, float]:
    cmd = [sys.executable, str(REPO / "tools" / "run_experiments.py"), "--data", str(args.data)]
    cmd += ["--out", str(args.out), "--scale", "cpu", "--presets", preset, "--seeds", str(seed)]
    cmd += ["--bootstrap", "200"]
    for item in args.overrides:
        cmd += ["--set", item]  # its own table only; the study aggregates below
    rc, wall = timed(cmd, args.out / "logs" / f"train_{preset}_seed{seed}.log")
    done = (run_folder(args, preset, seed) / "done.json").exists()
    print(f"[train] {preset} seed{seed}: rc {rc}, {wall / 60:.1f} min", flush=True)
    return ("ok" if rc == 0 and done else f"failed (rc {rc})"), wall


def adapt_eval(args, preset: str, seed: int, method: str) -> tuple[str, float]:
    folder = run_folder(args, preset, seed)
    out = folder / f"eval_{method.replace('+', '_')}"
    if (out / "per_case.csv").exists():
        return "skip", 0.0
    cmd = [sys.executable, str(REPO / "tools" / "evaluate.py"), "--checkpoint"]
    cmd += [str(scored_checkpoint(folder)), "--data", str(args.data), "--split", "test"]
    cmd += ["--labels", preset, "--adapt", method, "--out", str(out), "--bootstrap", "0"]
    cmd += ["--metric-workers", "0", "--quiet"]
    rc, wall = timed(cmd, out.with_suffix(".log"))
    print(f"[adapt] {preset} seed{seed} +{method}: rc {rc}, {wall:.0f} s", flush=True)
    return ("ok" if rc == 0 else f"failed (rc {rc})"), wall


def label(preset: str, method: str) -> str:
    return preset if method == "none" else f"{preset} +{method}"


def per_case(args, preset: str, seed: int, method: str) -> Path:
    sub = "eval" if method == "none" else f"eval_{method.replace('+', '_')}"
    return run_folder(args, preset, seed) / sub / "per_case.csv"


def aggregate(args) -> None:
    methods = ["none", *args.methods]
    records, rows = [], []
    for preset in args.presets:
        for method in methods:
            for seed in args.seeds:
                path = per_case(args, preset, seed, method)
                if path.exists():
                    records += read_records(path, preset=label(preset, method), seed=seed)
                    rows.append(label(preset, method))
    order = list(dict.fromkeys(rows))
    summary = summarize(records, n_boot=args.bootstrap)
    comparisons = compare(records, NOAUG, order, n_boot=args.bootstrap)
    for preset in args.presets:
        adapted = [label(preset, m) for m in args.methods if label(preset, m) in order]
        comparisons += compare(records, preset, adapted, n_boot=args.bootstrap)
    result = {
        "presets": order,
        "columns": ["t1", "t1ce", "t2", "flair"],
        "baselines": [NOAUG, *[p for p in args.presets if p != NOAUG]],
        "n_boot": args.bootstrap,
        "alpha": 0.05,
        "seed": 0,
        "seeds": {m["model"]: list(m["checkpoints"]) for m in summary["models"]},
        "summary": summary,
        "comparisons": comparisons,
    }
    report = args.report or args.out / "study"
    footer = [
        *(
            [f"--set items of every training: {' '.join(args.overrides)}."]
            if args.overrides
            else []
        ),
        "Rows: `<preset>` without adaptation, `<preset> +<method>` with tools/evaluate.py "
        "--adapt <method> at its default steps and learning rate, restarted from the trained "
        "weights for every case and modality.",
        "Cells: Mean - WT | TC | ET; Dice, HD95 in mm; BraTS empty-mask rules; mean ± sd over "
        "seeds of each seed's mean over the test cases.",
        "Paired comparisons: per test case the seed-averaged difference, bootstrap over cases "
        f"and seeds, B={args.bootstrap}.",
    ]
    paths = write_study(result, report, footer=footer)
    print("[study] " + ", ".join(str(p) for p in paths.values()))
    if args.report:
        copy_run_files(args, methods)


def copy_run_files(args, methods) -> None:
    """The files a reader needs to check a row: config, per-epoch log, per-case scores."""
    for preset in args.presets:
        for seed in args.seeds:
            src = run_folder(args, preset, seed)
            dst = args.report / "runs" / preset / f"seed{seed}"
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "log.jsonl"):
                if (src / name).exists():
                    shutil.copyfile(
                        src / name, dst / ("epochs.jsonl" if name == "log.jsonl" else name)
                    )
            for method in methods:
                path = per_case(args, preset, seed, method)
                if path.exists():
                    shutil.copyfile(path, dst / f"per_case_{method.replace('+', '_')}.csv")


def write_times(args, times: list[tuple[str, str, str, float]]) -> None:
    """Append this call's jobs to <out>/times.csv (the rows of earlier calls kept)."""
    path = args.out / "times.csv"
    rows = list(csv.DictReader(open(path, newline=""))) if path.exists() else []
    rows += [{"job": j, "run": r, "status": st, "seconds": f"{w:.1f}"} for j, r, st, w in times]
    write_csv(path, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    times: list[tuple[str, str, str, float]] = []
    if not args.aggregate_only:
        runs = [(p, s) for p in args.presets for s in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            todo = [r for r in runs if not (run_folder(args, *r) / "done.json").exists()]
            for r, (st, wall) in zip(todo, pool.map(lambda r: train(args, *r), todo)):
                times.append(("train", f"{r[0]}/seed{r[1]}", st, wall))
            jobs = [
                (p, s, m)
                for m in args.methods
                for p, s in runs
                if (run_folder(args, p, s) / "done.json").exists()
            ]
            for j, (st, wall) in zip(jobs, pool.map(lambda j: adapt_eval(args, *j), jobs)):
                if st != "skip":
                    times.append((f"adapt {j[2]}", f"{j[0]}/seed{j[1]}", st, wall))
        write_times(args, times)
        if args.report:
            args.report.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.out / "times.csv", args.report / "times.csv")
        failed = [t for t in times if t[2] not in ("ok", "skip")]
        for t in failed:
            print(f"FAILED {t[0]} {t[1]}: {t[2]}")
    aggregate(args)
    print(json.dumps({"jobs": len(times)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

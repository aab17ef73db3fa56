"""Cross-modality evaluation of trained checkpoints: the write-up's results table.

Each checkpoint is tested on the test split of prepared shards once per test modality (T1, T1CE,
T2, FLAIR) and once with its own training inputs. Whole stored volume, sliding-window inference
with overlap (Gaussian blending), sigmoid > 0.5 per region, optional flip TTA (flip the input,
predict, flip the prediction back, average). Per case and region: Dice and HD95 (mm, voxel
spacing from the case metadata) with the BraTS empty-mask rules.

Input rule (also printed under every table): a model with k input channels tested on modality m
gets m in every channel (m repeated k times), whether or not m was one of its training
modalities, because at test time only m exists: a T2 model on T1 sees (T1); a T1CE+T2 model on
FLAIR sees (FLAIR, FLAIR) and on T2 sees (T2, T2). Models trained on all four modalities stacked
are not single-modality models: they are tested with their own inputs only, and their
single-modality cells read 'x' (as in the write-up). "Own inputs" = the training modalities in
training order.

Several checkpoints with the same label (by default the run name stored in the checkpoint's
config; ``--labels`` to set them) are seeds of one model: their cells read mean±sd over
checkpoints. Bootstrap 95% CIs over cases (seeded) go to summary.json and table.md.

Usage::

    python tools/evaluate.py --checkpoint runs/segresnet_t2_noaug/best.pt --data data/prepared
    # per-case test-time adaptation (restarted from the trained weights for every case):
    python tools/evaluate.py --checkpoint runs/x/last.pt --data data/prepared --adapt prior
    torchrun --nproc_per_node=4 tools/evaluate.py --checkpoint runs/*/best.pt \\
        --data data/prepared --tta --out runs/eval
    # NIfTI predictions from tools/predict.py against the raw segmentations, in original space:
    python tools/evaluate.py --predictions preds/ --data raw/BraTS2021/ --out runs/eval_nifti

With torchrun the cases are split as ``cases[rank::world]`` and the per-case results gathered on
rank 0, which alone prints and writes. Metrics (Dice, HD95) run in ``--metric-workers`` worker
processes per rank while the network predicts the next cases: one job per case with all its
predictions (every checkpoint, every test input), scored against the case's ground truth prepared
once; results come back in submission order, so outputs do not depend on the worker count.
Outputs in ``--out``: per_case.csv, summary.json, table.md, overlays/*.png (with matplotlib,
``--overlays N`` cases per test modality), and per_case.jsonl: every case's rows appended as soon
as they are scored, so an interruption or a late write error loses no finished case.

Faults: options and paths are checked before the first case (one ``error:`` line, exit 1), and
another live job holding ``--out`` (or a run folder above it) refuses this one. A case that
cannot be read, predicted or scored (a prediction file of the wrong shape, affine or label
values, corrupt, missing) is that case's failure: one ``failed`` line, the other cases scored and
written, the failures summarised at the end and exit status 1. ``--bootstrap 0``: no CIs.

Metrics (``--metrics``): ``case`` (default) = per-case Dice and HD95 with the BraTS 2021 rules;
``lesion`` = lesion-wise Dice, HD95 and NSD (``dgseg.evaluation.lesion_metrics``) under
``--lesion-rules``
(``panoptica``: the current official BraTS_evaluation package; ``brats2023``: the BraTS 2023/2024
lesion-wise metrics); ``all`` = both. Every table's title and footer say which it shows.
``--regions`` (raw-prediction path) picks the label groups of the data: ``brats2021`` (labels
1, 2, 4), ``brats2023`` (1, 2, 3) or ``brats2024`` (post-treatment: 1 NETC, 2 SNFH, 3 ET, 4 RC;
regions WT, TC, ET, NETC, SNFH, RC); predictions then hold that set's own label values.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from data_prep.layouts import discover_cases
from dgseg.cli_checks import (
    ArgumentFault,
    check_at_least,
    check_device,
    check_input_dir,
    check_input_file,
    check_output_dir,
    check_probability,
)
from dgseg.constants import MODALITIES
from dgseg.data.manifest import load_manifest, scored_extent, split_cases
from dgseg.data.prepared import check_prepared
from dgseg.evaluation.cross_modality import (
    EvalSettings,
    OrderedPool,
    Plan,
    count_work,
    default_metric_workers,
    evaluate_cases,
    score_prediction_files,
)
from dgseg.evaluation.lesion_metrics import LESION_RULES, LesionRules, get_lesion_rules
from dgseg.evaluation.report import COLUMN_TITLES, write_report
from dgseg.evaluation.row_log import ROW_LOG_NAME, RowLog
from dgseg.evaluation.scoring import METRIC_SETS, input_specs
from dgseg.inference.adaptation import adapt_settings, add_adapt_arguments, load_case_predictor
from dgseg.logging_utils import Progress
from dgseg.run_lock import RunLockError, acquire, check_free
from dgseg.training.checkpoint import load_segmenter
from dgseg.training.distributed import (
    DEVICES,
    all_gather_objects,
    barrier,
    cleanup,
    init_distributed,
)
from dgseg.training.precision import AMP_CHOICES, describe, resolve_amp
from dgseg.transforms.labels import REGION_SETS
from dgseg.viz import save_overlays


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluate checkpoints on each test modality (cross-modality table).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", type=Path, help="checkpoint file(s) (.pt)")
    src.add_argument(
        "--predictions",
        type=Path,
        help="folder of <case_id>.nii.gz label maps to score "
        "against the raw segmentations in --data (original image space)",
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="prepared shard folder (manifest.json); raw data folder with --predictions",
    )
    p.add_argument("--split", default="test", help="manifest split to evaluate")
    p.add_argument(
        "--modalities",
        nargs="+",
        default=list(MODALITIES),
        choices=MODALITIES,
        help="test modalities (columns)",
    )
    p.add_argument(
        "--labels",
        nargs="+",
        default=None,
        help="row label per checkpoint (equal labels = seeds, aggregated); default: "
        "the run name in each checkpoint's config",
    )
    p.add_argument(
        "--roi",
        type=int,
        default=None,
        help="sliding-window size; default: config run.val_roi, else data.patch_size, "
        "else one window over the whole volume (sides rounded up to multiples of 16)",
    )
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--blend", choices=("gaussian", "constant"), default="gaussian")
    p.add_argument("--tta", action="store_true", help="8-fold flip test-time augmentation")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    p.add_argument("--max-cases", type=int, default=None, help="only the first N test cases")
    p.add_argument(
        "--overlays",
        type=int,
        default=0,
        help="overlay PNG per test modality with this many cases (needs matplotlib)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="bf16 autocast for the network (blending stays float32); auto: bf16 "
        "where the device has native bf16, else fp32",
    )
    p.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples for CIs (0: no CIs)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--metric-workers",
        type=int,
        default=None,
        help="worker processes per rank computing Dice/HD95 while the network "
        "predicts; 0 = inline; default: CPUs per rank - 1, at most 8",
    )
    p.add_argument(
        "--metrics",
        choices=(*METRIC_SETS, "legacy"),
        default="case",
        help="case: per-case Dice/HD95 (BraTS 2021 rules; 'legacy' is another name for it), "
        "lesion: lesion-wise Dice/HD95/NSD, or all",
    )
    p.add_argument(
        "--lesion-rules",
        choices=sorted(LESION_RULES),
        default="panoptica",
        help="lesion-wise rule set: panoptica (official BraTS_evaluation package) or "
        "brats2023 (BraTS 2023/2024 lesion-wise metrics)",
    )
    p.add_argument(
        "--nsd-tolerance",
        type=float,
        default=None,
        help="NSD tolerance in mm (default: the smallest voxel spacing)",
    )
    p.add_argument(
        "--regions",
        choices=sorted(REGION_SETS),
        default="brats2021",
        help="label groups of --predictions files (checkpoints: WT, TC, ET channels)",
    )
    add_adapt_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.metrics == "legacy":
        args.metrics = "case"
    if args.nsd_tolerance is not None and not 0 <= args.nsd_tolerance < float("inf"):
        p.error(f"--nsd-tolerance must be a finite number >= 0 (mm), got {args.nsd_tolerance}")
    if args.checkpoint and tuple(REGION_SETS[args.regions]) != tuple(REGION_SETS["brats2021"]):
        p.error(f"--regions {args.regions} needs --predictions: checkpoints predict WT, TC, ET")
    if args.metric_workers is None:
        args.metric_workers = default_metric_workers()
    if args.metric_workers < 0:
        p.error(f"--metric-workers must be >= 0, got {args.metric_workers}")
    if not 0.0 <= args.overlap < 1.0:
        p.error(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.max_cases is not None and args.max_cases < 1:
        p.error(f"--max-cases must be >= 1, got {args.max_cases}")
    if args.labels is not None and args.checkpoint and len(args.labels) != len(args.checkpoint):
        p.error(f"--labels has {len(args.labels)} names for {len(args.checkpoint)} checkpoints")
    if args.roi is not None and args.roi < 1:
        p.error(f"--roi must be >= 1, got {args.roi}")
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every value and path checked before the first case (ArgumentFault: one line)."""
    check_probability("--threshold", args.threshold)
    check_at_least("--bootstrap", args.bootstrap, 0, "0 = no CIs")
    check_at_least("--seed", args.seed, 0)
    check_at_least("--sw-batch-size", args.sw_batch_size, 1)
    check_at_least("--overlays", args.overlays, 0)
    check_device("--device", args.device)
    for path in args.checkpoint or ():
        check_input_file("--checkpoint", path)
    if args.predictions is not None:
        check_input_dir("--predictions", args.predictions)
    check_input_dir("--data", args.data)
    check_output_dir("--out", args.out)


def error(e: Exception) -> int:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 1


def report_failures(failed: Sequence[tuple[str, str]], n_scored: int, what: str) -> None:
    """One line per failed item as it is known, then a summary naming them all."""
    if not failed:
        return
    print(
        f"{len(failed)} {what}(s) failed, {n_scored} scored: "
        + "; ".join(f"{tag}: {why}" for tag, why in failed),
        file=sys.stderr,
    )


def lesion_rules(args: argparse.Namespace) -> LesionRules:
    """The lesion-wise rules of ``--lesion-rules``, with ``--nsd-tolerance`` when given."""
    extra = {} if args.nsd_tolerance is None else {"nsd_tolerance": args.nsd_tolerance}
    return get_lesion_rules(args.lesion_rules, **extra)


def write_outputs(
    records: list[dict[str, Any]], args: argparse.Namespace, footer: Sequence[str]
) -> str:
    """per_case.csv, summary.json and table.md in ``--out``; returns the printed tables."""
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("quiet",)
    }
    settings["checkpoint"] = [str(c) for c in (args.checkpoint or [])]
    raw = args.predictions is not None
    return write_report(
        records,
        args.out,
        metric_set=args.metrics,
        lesion_rules=lesion_rules(args),
        regions=tuple(REGION_SETS[args.regions]) if raw else None,
        n_boot=args.bootstrap,
        seed=args.seed,
        split=args.split,
        scored="raw files" if raw else None,
        settings=settings,
        footer=footer,
    )


def evaluate_predictions(args: argparse.Namespace) -> int:
    """``--predictions``: NIfTI label maps (tools/predict.py output) vs the raw segmentations.

    A case without a prediction, or whose prediction cannot be read or scored, is that case's
    failure (one line); every other case is scored and written, and the exit status is 1."""
    cases, problems = discover_cases(args.data)  # ValueError: not a folder
    for cid, why in problems:
        print(f"skipped {cid}: {why}", file=sys.stderr)
    labelled = [(c.case_id, c.label_file, c.label_convention) for c in cases if c.has_label]
    if not labelled:
        raise ValueError(f"--data {args.data}: no labelled case to score against")
    rows = RowLog(args.out, fresh=True)
    with OrderedPool(args.metric_workers) as pool:
        records, failed = score_prediction_files(
            labelled[: args.max_cases],
            args.predictions,
            pool,
            region_set=args.regions,
            metrics=args.metrics,
            lesion_rules=lesion_rules(args),
            on_rows=rows.append,
        )
    for cid, why in failed:
        print(f"failed {cid}: {why}", file=sys.stderr)
    if not records:
        print("error: no prediction could be scored", file=sys.stderr)
        return 1
    try:
        text = write_outputs(
            records,
            args,
            ["Column 'nifti': label maps in original image space vs the raw segmentation files."],
        )
    except OSError as e:
        return error(write_fault(args, e, len(records)))
    print(text, end="")
    report_failures(failed, len(records), "case")
    return 1 if failed else 0


def write_fault(args: argparse.Namespace, e: OSError, n_rows: int) -> str:
    return (
        f"--out {args.out}: writing the tables failed ({e.strerror or e}); the {n_rows} "
        f"row(s) scored are in {args.out / ROW_LOG_NAME}"
    )


def load_plans(args: argparse.Namespace, device: torch.device) -> tuple[list[Plan], str]:
    """One :class:`Plan` per ``--checkpoint`` and the footer text naming each model's window.

    With ``--adapt`` other than none, every row label ends in `` +<method>``."""
    plans: list[Plan] = []
    rois: dict[str, Any] = {}
    adapt = adapt_settings(args)
    for k, path in enumerate(args.checkpoint):
        model, cfg = load_segmenter(path, device)
        label = args.labels[k] if args.labels else cfg.run.name
        if adapt.method != "none":
            label = f"{label} +{adapt.method}"
        roi = args.roi or cfg.eval_roi
        rois.setdefault(label, roi or "whole volume")
        specs = input_specs(tuple(cfg.data.modalities), args.modalities)
        case_fn = load_case_predictor(path, model, cfg.data, adapt)
        plans.append(Plan(path, label, model, roi, specs, case_fn))
    return plans, ", ".join(f"{k} {v}" for k, v in rois.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
    except ArgumentFault as e:
        return error(e)
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # one holder: rank 0, for every rank
        try:
            check_free(args.out, what="--out")
            lock = acquire(args.out, what="--out", take_stale=True)
        except (RunLockError, OSError) as e:
            return error(e)
    try:
        return run(args)
    finally:
        if lock is not None:
            lock.release()


def run(args: argparse.Namespace) -> int:
    """:func:`main` once this process holds ``--out``."""
    try:  # expected faults (missing folder or manifest, bad checkpoint): one line, exit 1
        if args.predictions is not None:
            return evaluate_predictions(args)
        n_cases = len(split_cases(load_manifest(args.data), args.split))
        if n_cases == 0:
            raise ValueError(f"split {args.split!r} of {args.data} has no cases")
        if int(os.environ.get("RANK", "0")) == 0:
            RowLog(args.out, fresh=True)  # before any rank appends: they start after the group
        dist = init_distributed(args.device)
    except (OSError, ValueError) as e:
        return error(e)
    try:
        try:
            plans, roi_text = load_plans(args, dist.device)
            needed = {m for plan in plans for inputs in plan.specs for m in inputs}
            check_prepared(args.data, splits=(args.split,), modalities=sorted(needed))
        except (OSError, ValueError) as e:
            return error(e)
        args.amp, why = resolve_amp(args.amp, dist.device)  # summary.json records what ran
        if dist.is_main:
            print(f"[eval] {describe(args.amp, why)}", file=sys.stderr, flush=True)
        settings = EvalSettings(
            split=args.split,
            max_cases=args.max_cases,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            blend=args.blend,
            tta=args.tta,
            threshold=args.threshold,
            overlays=args.overlays,
            metrics=args.metrics,
            lesion_rules=lesion_rules(args),
            autocast_dtype=torch.bfloat16 if args.amp == "bf16" else None,
        )
        total = count_work(plans, n_cases, args.max_cases, dist.rank, dist.world_size)
        scope = f" rank 0 of {dist.world_size}" if dist.world_size > 1 else ""
        progress = Progress(
            total,
            label=f"[eval{scope}]",
            unit="predictions scored",
            every=2.0,
            enabled=dist.is_main and not args.quiet,
        )
        if dist.is_main and not args.quiet:
            print(
                f"[eval] metrics in {args.metric_workers or 'no'} worker process(es) per rank",
                file=sys.stderr,
                flush=True,
            )
        failed: list[tuple[str, str]] = []
        rows = RowLog(args.out)
        with OrderedPool(args.metric_workers) as pool:
            records, overlays = evaluate_cases(
                plans,
                args.data,
                settings,
                rank=dist.rank,
                world=dist.world_size,
                device=dist.device,
                progress=progress,
                pool=pool,
                failures=failed,
                on_rows=rows.append,
            )
        progress.close()
        for tag, why in failed:
            print(f"failed {tag}: {why}", file=sys.stderr, flush=True)
        gathered = all_gather_objects((records, overlays, failed))
        code = 0
        if dist.is_main:
            records = [r for rec, _, _ in gathered for r in rec]
            overlays = [o for _, ov, _ in gathered for o in ov]
            failed = [f for _, _, fl in gathered for f in fl]
            code = write_checkpoint_outputs(args, records, overlays, failed, roi_text, dist)
        # Nobody tears the process group down while rank 0 still writes: a gloo peer that
        # disappears mid-way can abort the writing process.
        barrier()
    finally:
        cleanup()
    return code


def write_checkpoint_outputs(
    args: argparse.Namespace,
    records: list[dict[str, Any]],
    overlays: list[dict[str, Any]],
    failed: list[tuple[str, str]],
    roi_text: str,
    dist: Any,
) -> int:
    """Rank 0: the tables of every case scored, the overlays, the failures; the exit status."""
    if not records:
        report_failures(failed, 0, "case")
        print("error: no case could be scored", file=sys.stderr)
        return 1
    # Gathered by rank: put the rows back into a deterministic order.
    order = {str(p): k for k, p in enumerate(args.checkpoint)}
    records.sort(key=lambda r: (order[r["checkpoint"]], r["column"], r["case_id"]))
    extra = [
        f"Sliding window: roi ({roi_text}), overlap {args.overlap}, "
        f"{args.blend} blending, threshold {args.threshold}, TTA "
        f"{'8 flips' if args.tta else 'off'}; {dist.world_size} process(es).",
        scored_extent(load_manifest(args.data), args.split)["text"],
        f"Test-time adaptation: {adapt_settings(args).describe()}.",
    ]
    try:
        text = write_outputs(records, args, extra)
    except OSError as e:
        return error(write_fault(args, e, len(records)))
    print(text, end="")
    if overlays:
        print(save_overlays(overlays, args.out / "overlays", titles=COLUMN_TITLES), file=sys.stderr)
    print(f"wrote {args.out}/per_case.csv, summary.json, table.md", file=sys.stderr)
    report_failures(failed, len({r["case_id"] for r in records}), "case")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

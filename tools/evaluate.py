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
``--overlays N`` cases per test modality).

Metrics (``--metrics``): ``legacy`` (default) = per-case Dice and HD95 with the BraTS 2021 rules;
``lesion`` = lesion-wise Dice, HD95 and NSD (``dgseg.lesion_metrics``) under ``--lesion-rules``
(``panoptica``: the current official BraTS_evaluation package; ``brats2023``: the BraTS 2023/2024
lesion-wise metrics); ``all`` = both. Every table's title and footer say which it shows.
``--regions`` (raw-prediction path) picks the label groups of the data: ``brats2021`` (labels
1, 2, 4), ``brats2023`` (1, 2, 3) or ``brats2024`` (post-treatment: 1 NETC, 2 SNFH, 3 ET, 4 RC;
regions WT, TC, ET, NETC, SNFH, RC); predictions then hold that set's own label values.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from data_prep.layouts import discover_cases
from dgseg.atomic import atomic_write_text
from dgseg.checkpoint import load_segmenter
from dgseg.constants import MODALITIES
from dgseg.data import ShardDataset
from dgseg.data.manifest import load_manifest, scored_extent
from dgseg.distributed import all_gather_objects, barrier, cleanup, init_distributed
from dgseg.evaluation import (
    COLUMN_TITLES,
    METRIC_SETS,
    METRIC_TITLES,
    CaseJob,
    OrderedPool,
    default_metric_workers,
    format_table,
    input_channels,
    score_job,
    score_label_files,
    summarize,
    summary_columns,
    table_footer,
    write_csv,
    write_json,
)
from dgseg.inference import covering_roi, predict_volume
from dgseg.lesion_metrics import LESION_RULES, LesionRules, get_lesion_rules
from dgseg.precision import AMP_CHOICES, describe, resolve_amp
from dgseg.transforms.labels import REGION_SETS, channels_to_labels
from dgseg.viz import overlay_slices, save_overlay_grid


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluate checkpoints on each test modality (cross-modality table).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", type=Path, help="checkpoint file(s) (.pt)")
    src.add_argument(
        "--predictions", type=Path, help="folder of <case_id>.nii.gz label maps to score "
        "against the raw segmentations in --data (original image space)"
    )
    p.add_argument("--data", type=Path, required=True,
                   help="prepared shard folder (manifest.json); raw data folder with --predictions")
    p.add_argument("--split", default="test", help="manifest split to evaluate")
    p.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES,
                   help="test modalities (columns)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="row label per checkpoint (equal labels = seeds, aggregated); default: "
                   "the run name in each checkpoint's config")
    p.add_argument("--roi", type=int, default=None,
                   help="sliding-window size; default: config run.val_roi, else data.patch_size, "
                   "else one window over the whole volume (sides rounded up to multiples of 16)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--blend", choices=("gaussian", "constant"), default="gaussian")
    p.add_argument("--tta", action="store_true", help="8-fold flip test-time augmentation")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    p.add_argument("--max-cases", type=int, default=None, help="only the first N test cases")
    p.add_argument("--overlays", type=int, default=0,
                   help="overlay PNG per test modality with this many cases (needs matplotlib)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="bf16 autocast for the network (blending stays float32); auto: bf16 "
                   "where the device has native bf16, else fp32")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for CIs")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--metric-workers", type=int, default=None,
                   help="worker processes per rank computing Dice/HD95 while the network "
                   "predicts; 0 = inline; default: CPUs per rank - 1, at most 8")
    p.add_argument("--metrics", choices=tuple(METRIC_SETS), default="legacy",
                   help="legacy per-case Dice/HD95 (BraTS 2021 rules), lesion-wise Dice/HD95/NSD, "
                   "or all")
    p.add_argument("--lesion-rules", choices=sorted(LESION_RULES), default="panoptica",
                   help="lesion-wise rule set: panoptica (official BraTS_evaluation package) or "
                   "brats2023 (BraTS 2023/2024 lesion-wise metrics)")
    p.add_argument("--nsd-tolerance", type=float, default=None,
                   help="NSD tolerance in mm (default: the smallest voxel spacing)")
    p.add_argument("--regions", choices=sorted(REGION_SETS), default="brats2021",
                   help="label groups of --predictions files (checkpoints: WT, TC, ET channels)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.nsd_tolerance is not None and not args.nsd_tolerance >= 0:
        p.error(f"--nsd-tolerance must be >= 0, got {args.nsd_tolerance}")
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


class Progress:
    """Rank-0 progress line with throughput and ETA, at most one line every ``every`` seconds.

    Counts predictions whose metrics are back: with metric workers the network runs ahead, and
    the scored count is what the remaining time depends on. ``queued`` = metric jobs in flight.
    With several ranks the counts are rank 0's share (the others run in step).
    """

    def __init__(self, total: int, *, enabled: bool, every: float = 2.0, scope: str = "") -> None:
        self.total, self.enabled, self.every, self.scope = max(total, 1), enabled, every, scope
        self.done, self.start, self.last = 0, time.monotonic(), 0.0

    def step(self, what: str, n: int = 1, *, queued: int = 0) -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = (now - self.start) / max(self.done, 1)
        eta = rate * max(self.total - self.done, 0)
        print(f"[eval{self.scope}] {self.done}/{self.total} predictions scored, {what}  "
              f"{rate:.2f} s each  {queued} metric job(s) queued  "
              f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", file=sys.stderr, flush=True)


def lesion_rules(args: argparse.Namespace) -> LesionRules:
    """The lesion-wise rules of ``--lesion-rules``, with ``--nsd-tolerance`` when given."""
    extra = {} if args.nsd_tolerance is None else {"nsd_tolerance": args.nsd_tolerance}
    return get_lesion_rules(args.lesion_rules, **extra)


def table_title(metric: str, args: argparse.Namespace) -> str:
    """What a table shows: legacy per-case or lesion-wise (with the rule set), and the metric."""
    if metric in METRIC_SETS["legacy"]:
        return f"Legacy per-case {METRIC_TITLES[metric]} (BraTS 2021 rules)"
    return f"{METRIC_TITLES[metric]} (rules '{lesion_rules(args).name}')"


def configured_roi(cfg: Any) -> Optional[int]:
    """Window size the model was validated with: run.val_roi, else data.patch_size, else None
    (one window covering the whole volume, as validation during training does)."""
    return cfg.run.val_roi or cfg.data.patch_size


class Plan(NamedTuple):
    """One checkpoint to evaluate: its model, row label, window, and the input tuples it is
    tested on mapped to the table columns each fills (a T2 model's "own" is its T2 column)."""

    path: Path
    label: str
    model: torch.nn.Module
    roi: Optional[int]
    specs: dict[tuple[str, ...], list[str]]


def input_specs(train_modalities: tuple[str, ...],
                modalities: Sequence[str]) -> dict[tuple[str, ...], list[str]]:
    """Distinct input tuples -> the table columns they fill, under the input rule."""
    specs: dict[tuple[str, ...], list[str]] = {}
    for column in [*modalities, "own"]:
        inputs = input_channels(train_modalities, column)
        if inputs is not None:
            specs.setdefault(inputs, []).append(column)
    return specs


def evaluate_cases(
    plans: list[Plan],
    *,
    args: argparse.Namespace,
    rank: int,
    world: int,
    device: torch.device,
    progress: Progress,
    pool: OrderedPool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-case records (and overlay slices) for this rank's share of the test cases.

    Case by case, every checkpoint predicts every input tuple it is tested on; the case's
    predictions go to ``pool`` as one :class:`CaseJob`, so the ground truth's side of HD95 is
    prepared once per case, and the next case is predicted while workers score this one.
    """
    autocast = torch.bfloat16 if resolve_amp(args.amp, device)[0] == "bf16" else None
    all_inputs = list(dict.fromkeys(inputs for plan in plans for inputs in plan.specs))
    datasets = {inputs: ShardDataset(args.data, split=args.split, modalities=inputs)
                for inputs in all_inputs}
    first = datasets[all_inputs[0]]
    n = len(first) if args.max_cases is None else min(len(first), args.max_cases)
    per_case = sum(len(plan.specs) for plan in plans)

    records: list[dict[str, Any]] = []
    overlays: list[dict[str, Any]] = []
    columns_of: dict[str, list[list[str]]] = {}  # job tag -> table columns of each prediction

    def collect(done: list[tuple[str, list[dict[str, Any]]]]) -> None:
        for tag, rows in done:  # in submission order: deterministic record order
            for row, columns in zip(rows, columns_of.pop(tag)):
                records.extend({**row, "column": column} for column in columns)
            progress.step(tag, len(rows), queued=pool.pending)

    for i in range(rank, n, world):  # nnU-Net-style sharding: keys[rank::world]
        meta = first.case_meta(i)
        if not bool(meta.get("has_label", True)):  # nothing to score against
            progress.step(f"skipped unlabelled case {i}", per_case, queued=pool.pending)
            continue
        preds: list[tuple[dict[str, Any], np.ndarray]] = []
        columns: list[list[str]] = []
        truth3: Optional[np.ndarray] = None
        case_id = ""
        for inputs in all_inputs:
            sample = datasets[inputs][i]  # read once, predicted by every checkpoint using it
            image = sample["image"].unsqueeze(0).to(device)  # (1, C, D, H, W)
            if truth3 is None:
                truth3 = (sample["label"] > 0.5).numpy()  # (3, D, H, W) bool
                case_id = sample["case_id"]
            for plan in plans:
                if inputs not in plan.specs:
                    continue
                window = plan.roi or covering_roi(image.shape[2:])
                prob = predict_volume(plan.model, image, roi_size=window, overlap=args.overlap,
                                      tta=args.tta, sw_batch_size=args.sw_batch_size,
                                      blend=args.blend, autocast_dtype=autocast)
                pred3 = (prob[0] > args.threshold).cpu().numpy()  # (3, D, H, W) bool
                keys = {"model": plan.label, "checkpoint": str(plan.path), "column": "",
                        "inputs": "+".join(inputs), "case_id": case_id}
                preds.append((keys, pred3))
                columns.append(plan.specs[inputs])
                if i < args.overlays:
                    sl = overlay_slices(sample["image"][0].numpy(), channels_to_labels(truth3),
                                        channels_to_labels(pred3))  # test modality, best slice
                    for column in plan.specs[inputs]:
                        overlays.append({"model": plan.label, "checkpoint": str(plan.path),
                                         "column": column, "case_id": case_id, **sl})
        spacing = tuple(float(s) for s in np.asarray(meta["spacing"]).ravel())
        tag = f"case {case_id}"
        columns_of[tag] = columns
        job = CaseJob.build(case_id, truth3, spacing, preds, metrics=args.metrics,
                            lesion_rules=lesion_rules(args))
        collect(pool.submit(tag, score_job, job))
    collect(pool.drain())
    return records, overlays


def count_work(args: argparse.Namespace, plans: list[Plan], rank: int, world: int,
               n_cases: int) -> int:
    """Predictions this rank makes (the progress total)."""
    n = n_cases if args.max_cases is None else min(n_cases, args.max_cases)
    return sum(len(plan.specs) for plan in plans) * len(range(rank, n, world))


def write_outputs(records: list[dict[str, Any]], overlays: list[dict[str, Any]],
                  args: argparse.Namespace, extra_footer: Sequence[str]) -> str:
    """Summary, tables and files on rank 0; returns the printed text."""
    metrics = METRIC_SETS[args.metrics]
    regions = tuple(REGION_SETS[args.regions]) if args.predictions is not None else None
    summary = summarize(records, n_boot=args.bootstrap, seed=args.seed, metrics=metrics,
                        lesion_rules=lesion_rules(args), **({"regions": regions} if regions else {}))
    summary["split"] = args.split
    summary["metric_set"] = args.metrics  # legacy | lesion | all: what the tables show
    summary["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k not in ("quiet",)}
    summary["settings"]["checkpoint"] = [str(c) for c in (args.checkpoint or [])]
    split = args.split if args.checkpoint else "raw files"
    footer = table_footer(summary, split=split, extra=extra_footer)
    text = "\n".join(
        format_table(summary, metric=m, style="text", title=table_title(m, args),
                     footer=footer if k == len(metrics) - 1 else ())
        for k, m in enumerate(metrics))
    md = ["# Cross-modality evaluation", ""]
    md += [format_table(summary, metric=m, style="markdown", title=table_title(m, args))
           for m in metrics]
    md.append(format_ci_table(summary, metric=metrics[0], title=table_title(metrics[0], args)))
    md += [f"{f}  " for f in footer]
    out = args.out
    write_csv(out / "per_case.csv", records)
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    if overlays:
        print(write_overlays(overlays, out / "overlays"), file=sys.stderr)
    return text


def format_ci_table(summary: dict[str, Any], metric: str = "dice", title: str = "Dice") -> str:
    """Markdown: mean Dice of the regions with its bootstrap CI, per model and column."""
    cols = summary_columns(summary)
    pct = f"{100 * (1 - summary['alpha']):.0f}%"
    lines = [f"**Mean of {title} with {pct} bootstrap CI over cases**", "",
             "| Model | " + " | ".join(COLUMN_TITLES.get(c, c) for c in cols) + " |",
             "|" + "|".join("---" for _ in range(len(cols) + 1)) + "|"]
    for m in summary["models"]:
        cells = []
        for c in cols:
            col = m["columns"].get(c)
            if col is None:
                cells.append("x")
            else:
                d = col[f"{metric}_mean"]
                cells.append(f"{d['mean']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]")
        lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_overlays(overlays: list[dict[str, Any]], folder: Path) -> str:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    first_ckpt: dict[str, str] = {}
    for o in overlays:
        first_ckpt.setdefault(o["model"], o["checkpoint"])
        if o["checkpoint"] == first_ckpt[o["model"]]:  # one seed per model is enough to look at
            groups.setdefault((o["model"], o["column"]), []).append(o)
    try:
        for (model, column), rows in groups.items():
            rows = sorted(rows, key=lambda r: r["case_id"])
            save_overlay_grid(folder / f"{model}_{column}.png", rows,
                              title=f"{model} tested on {COLUMN_TITLES.get(column, column)}")
    except ImportError as e:
        return f"overlays skipped: {e}"
    return f"overlays: {len(groups)} PNG(s) in {folder}"


def evaluate_predictions(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Records for NIfTI predictions (tools/predict.py output) vs the raw segmentations."""
    cases, problems = discover_cases(args.data)
    for cid, why in problems:
        print(f"skipped {cid}: {why}", file=sys.stderr)
    labelled = [c for c in cases if c.has_label]
    if args.max_cases is not None:
        labelled = labelled[: args.max_cases]
    records: list[dict[str, Any]] = []
    name = args.predictions.name or str(args.predictions)
    with OrderedPool(args.metric_workers) as pool:
        for c in labelled:
            pred = args.predictions / f"{c.case_id}.nii.gz"
            if not pred.is_file():
                print(f"skipped {c.case_id}: no prediction {pred}", file=sys.stderr)
                continue
            score = functools.partial(
                score_label_files, convention=c.label_convention, region_set=args.regions,
                metrics=args.metrics, lesion_rules=lesion_rules(args), model=name,
                checkpoint=str(args.predictions), column="nifti", inputs="nifti",
                case_id=c.case_id,
            )
            done = pool.submit(f"case {c.case_id}", score, pred, c.label_file)
            records += [row for _, row in done]
        records += [row for _, row in pool.drain()]
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.predictions is not None:
        records = evaluate_predictions(args)
        if not records:
            print("no prediction could be scored", file=sys.stderr)
            return 1
        print(write_outputs(records, [], args, ["Column 'nifti': label maps in original image "
                                                 "space vs the raw segmentation files."]), end="")
        return 0

    dist = init_distributed(args.device)
    args.amp, why = resolve_amp(args.amp, dist.device)  # summary.json records what ran
    if dist.is_main:
        print(f"[eval] {describe(args.amp, why)}", file=sys.stderr, flush=True)
    try:
        n_cases = len(ShardDataset(args.data, split=args.split, modalities=("t2",)))
        if n_cases == 0:
            raise ValueError(f"split {args.split!r} of {args.data} has no cases")
        plans: list[Plan] = []
        rois: dict[str, Any] = {}
        for k, path in enumerate(args.checkpoint):
            model, cfg = load_segmenter(path, dist.device)
            label = args.labels[k] if args.labels else cfg.run.name
            roi = args.roi or configured_roi(cfg)
            rois.setdefault(label, roi or "whole volume")
            plans.append(Plan(path, label, model, roi,
                              input_specs(tuple(cfg.data.modalities), args.modalities)))
        total = count_work(args, plans, dist.rank, dist.world_size, n_cases)
        scope = f" rank 0 of {dist.world_size}" if dist.world_size > 1 else ""
        progress = Progress(total, enabled=dist.is_main and not args.quiet, scope=scope)
        if dist.is_main and not args.quiet:
            print(f"[eval] metrics in {args.metric_workers or 'no'} worker process(es) per rank",
                  file=sys.stderr, flush=True)
        with OrderedPool(args.metric_workers) as pool:
            records, overlays = evaluate_cases(
                plans, args=args, rank=dist.rank, world=dist.world_size, device=dist.device,
                progress=progress, pool=pool)
        gathered = all_gather_objects((records, overlays))
        if dist.is_main:
            records = [r for rec, _ in gathered for r in rec]
            overlays = [o for _, ov in gathered for o in ov]
            # Gathered by rank: put the rows back into a deterministic order.
            order = {str(p): k for k, p in enumerate(args.checkpoint)}
            records.sort(key=lambda r: (order[r["checkpoint"]], r["column"], r["case_id"]))
            roi_text = ", ".join(f"{k} {v}" for k, v in rois.items())
            extra = [f"Sliding window: roi ({roi_text}), overlap {args.overlap}, "
                     f"{args.blend} blending, threshold {args.threshold}, TTA "
                     f"{'8 flips' if args.tta else 'off'}; {dist.world_size} process(es).",
                     scored_extent(load_manifest(args.data), args.split)["text"]]
            print(write_outputs(records, overlays, args, extra), end="")
            print(f"wrote {args.out}/per_case.csv, summary.json, table.md", file=sys.stderr)
        # Nobody tears the process group down while rank 0 still writes: a gloo peer that
        # disappears mid-way can abort the writing process.
        barrier()
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

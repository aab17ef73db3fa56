"""Cross-modality evaluation bookkeeping: per-case metrics, bootstrap CIs, seeds, tables.

The write-up (docs/SPEC.md "Experiments") trains on one source modality and tests on each of the
four BraTS modalities, reporting per modality ``Mean - WT | TC | ET`` Dice. This module holds
the parts of that evaluation that do not run a network:

* the rule that turns a test modality into the input channels of a model (:func:`input_channels`,
  documented in :data:`EVAL_RULE`);
* one flat record per (checkpoint, test column, case) with Dice and HD95 per region under the
  BraTS empty-mask rules (:func:`case_record`, metrics from :mod:`dgseg.metrics`);
* aggregation (:func:`summarize`): per checkpoint the mean over cases with a percentile-bootstrap
  95% CI over cases (Efron & Tibshirani 1993, ch. 13; seeded, so reproducible); several
  checkpoints with the same model label (seeds) become mean ± sample sd over checkpoints, and the
  row's CI is the bootstrap over cases of the per-case scores averaged over those checkpoints;
* tables whose columns are always named (``Mean - WT | TC | ET``; the original printout's column
  order did not match its values), and atomic CSV / JSON / text writers;
* scoring off the main process (:class:`CaseJob`, :func:`score_job`, :class:`OrderedPool`): the
  HD95 of a poor prediction costs far more CPU time than the network's GPU inference, so the
  predictions of one case go, bit-packed, to worker processes that score them against a
  :class:`dgseg.metrics.RegionReference` built once per case, while the main process predicts.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import csv
import dataclasses
import io
import json
import math
import multiprocessing as mp
import os
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import nibabel as nib
import numpy as np

from dgseg.atomic import atomic_write_text
from dgseg.constants import MODALITIES, REGIONS
from dgseg.metrics import RegionReference, region_metrics
from dgseg.transforms.labels import convert_labels, labels_to_channels

__all__ = [
    "COLUMNS",
    "COLUMN_TITLES",
    "EVAL_RULE",
    "METRICS",
    "input_channels",
    "case_record",
    "pack_mask",
    "unpack_mask",
    "CaseJob",
    "score_job",
    "OrderedPool",
    "default_metric_workers",
    "bootstrap_ci",
    "summarize",
    "format_cell",
    "format_table",
    "summary_columns",
    "table_footer",
    "score_label_files",
    "write_json",
    "write_csv",
]

# Test columns: each single modality, then the model's own training inputs.
COLUMNS = (*MODALITIES, "own")
COLUMN_TITLES = {"t1": "T1", "t1ce": "T1CE", "t2": "T2", "flair": "FLAIR", "own": "Own inputs",
                 "nifti": "NIfTI"}
METRICS = ("dice", "hd95")

EVAL_RULE = (
    "Input rule: a model with k input channels tested on modality m gets m in every channel "
    "(m repeated k times), whether or not m was one of its training modalities: at test time "
    "only m exists. Models trained on all four modalities stacked are not single-modality "
    "models and are tested with their own inputs only ('x' in the single-modality columns). "
    "'Own inputs' = the model's training modalities in training order."
)

PathLike = Union[str, "os.PathLike[str]"]


def input_channels(train_modalities: Sequence[str], column: str) -> Optional[tuple[str, ...]]:
    """Modalities fed to the model's input channels for a test column (see :data:`EVAL_RULE`).

    Args:
        train_modalities: the model's training modalities, one per input channel
            (``cfg.data.modalities``), e.g. ``("t2",)`` or ``("t1ce", "t2")``.
        column: a modality name or ``"own"``.

    Returns:
        One modality per input channel, or ``None`` when the rule does not evaluate this
        combination (four-modality stacked models on a single modality).
    """
    train = tuple(train_modalities)
    if not train or any(m not in MODALITIES for m in train):
        raise ValueError(f"train_modalities must be names from {MODALITIES}, got {train}")
    if column == "own":
        return train
    if column not in MODALITIES:
        raise ValueError(f"column must be one of {COLUMNS}, got {column!r}")
    if set(train) >= set(MODALITIES):
        return None  # stacked: the 'x' cells of the write-up's table
    return (column,) * len(train)


def case_record(
    pred3: Any,
    truth3: Any,
    spacing: Sequence[float],
    **keys: Any,
) -> dict[str, Any]:
    """One flat row: the given identifying ``keys`` then ``dice_WT .. dice_mean, hd95_WT ..``.

    ``pred3`` / ``truth3`` are (3, D, H, W) binary WT/TC/ET masks; ``spacing`` in mm. ``truth3``
    may be a :class:`dgseg.metrics.RegionReference` (with that spacing) shared by the
    predictions of one case, so that the truth side of HD95 is computed once.
    """
    spacing = tuple(float(s) for s in spacing)
    per_region = region_metrics(pred3, truth3, spacing)
    row: dict[str, Any] = dict(keys)
    for metric in METRICS:
        values = [float(per_region[r][metric]) for r in REGIONS]
        for r, v in zip(REGIONS, values):
            row[f"{metric}_{r}"] = v
        row[f"{metric}_mean"] = float(np.mean(values))
    return row


# ----------------------------------------------------------------------------- off-process scoring
def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Bit-pack a boolean array (8 voxels per byte) for sending to a worker process."""
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1))  # (ceil(N / 8),) uint8


def unpack_mask(packed: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_mask`: a boolean array of ``shape``."""
    shape = tuple(int(s) for s in shape)
    return np.unpackbits(packed, count=math.prod(shape)).view(bool).reshape(shape)


@dataclasses.dataclass(frozen=True)
class CaseJob:
    """The predictions of one case to score against its ground truth (picklable, compact).

    Attributes:
        case_id: the case, named in error messages.
        shape: (3, D, H, W) of the WT/TC/ET masks.
        spacing: voxel size (D, H, W) in mm.
        truth: :func:`pack_mask` of the ground-truth regions.
        preds: one ``(keys, packed prediction)`` per prediction; ``keys`` head its record.
    """

    case_id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    truth: np.ndarray
    preds: tuple[tuple[dict[str, Any], np.ndarray], ...]

    @classmethod
    def build(
        cls,
        case_id: str,
        truth3: np.ndarray,
        spacing: Sequence[float],
        preds: Sequence[tuple[Mapping[str, Any], np.ndarray]],
    ) -> "CaseJob":
        """Pack ``truth3`` and every (3, D, H, W) prediction of ``preds``."""
        truth3 = np.asarray(truth3, dtype=bool)
        packed = []
        for keys, pred in preds:
            if np.shape(pred) != truth3.shape:
                raise ValueError(
                    f"case {case_id}: prediction shape {np.shape(pred)} != truth {truth3.shape}"
                )
            packed.append((dict(keys), pack_mask(pred)))
        return cls(case_id, tuple(truth3.shape), tuple(float(s) for s in spacing),
                   pack_mask(truth3), tuple(packed))


def score_job(job: CaseJob) -> list[dict[str, Any]]:
    """:func:`case_record` of every prediction of ``job``, in order, with one shared
    :class:`dgseg.metrics.RegionReference` (truth surfaces and distance maps computed once)."""
    ref = RegionReference(unpack_mask(job.truth, job.shape), job.spacing)
    return [case_record(unpack_mask(p, job.shape), ref, job.spacing, **keys)
            for keys, p in job.preds]


def default_metric_workers() -> int:
    """Worker processes for metrics when not set: the CPUs this process may use, shared by the
    processes torchrun started on this node, minus one for the process that predicts; at most 8
    (measured: 8 workers keep up with one H100/H200 on poor, noisy predictions of 128³ cases)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cpus // local_world - 1))


def _init_worker() -> None:
    import torch  # already imported through dgseg.metrics; metrics need one thread per worker

    torch.set_num_threads(1)


class OrderedPool:
    """Runs ``fn(*args)`` inline (``workers=0``) or in worker processes, and hands the results
    back in submission order, so that the caller keeps predicting while CPUs compute metrics.

    Worker processes start with the "forkserver" method where available (else "spawn"): never a
    plain fork of a process that may hold CUDA or thread-pool state. ``fn`` must be importable
    (a module-level function) and ``args`` picklable. At most ``max_pending`` calls are in flight;
    :meth:`submit` waits for the oldest beyond that. A failure is raised as ``RuntimeError``
    naming the call's tag (e.g. the case id), with the worker's exception as its cause.

    Args:
        workers: worker processes; 0 runs every call at once in the calling process.
        max_pending: calls in flight before :meth:`submit` blocks (default 4 per worker).
    """

    def __init__(self, workers: int, *, max_pending: Optional[int] = None) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = int(workers)
        self.max_pending = max(1, max_pending if max_pending is not None else 4 * self.workers)
        self._pending: collections.deque[tuple[str, cf.Future]] = collections.deque()
        self._executor: Optional[cf.ProcessPoolExecutor] = None
        if self.workers > 0:
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            self._executor = cf.ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context(method), initializer=_init_worker
            )

    @property
    def pending(self) -> int:
        """Calls submitted whose results have not been handed back yet."""
        return len(self._pending)

    def submit(self, tag: str, fn: Callable[..., Any], *args: Any) -> list[tuple[str, Any]]:
        """Queue ``fn(*args)``; returns the ``(tag, result)`` pairs finished meanwhile, in order."""
        if self._executor is None:
            return [(tag, self._result(tag, lambda: fn(*args)))]
        self._pending.append((tag, self._executor.submit(fn, *args)))
        out = []
        while self._pending and (
            len(self._pending) > self.max_pending or self._pending[0][1].done()
        ):
            out.append(self._pop())
        return out

    def drain(self) -> list[tuple[str, Any]]:
        """Wait for every call in flight; their ``(tag, result)`` pairs in submission order."""
        return [self._pop() for _ in range(len(self._pending))]

    def _pop(self) -> tuple[str, Any]:
        tag, future = self._pending.popleft()
        return tag, self._result(tag, future.result)

    def _result(self, tag: str, get: Callable[[], Any]) -> Any:
        try:
            return get()
        except Exception as e:
            self.close()
            raise RuntimeError(f"{tag}: metrics failed: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        """Stop the workers; calls still queued are cancelled."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._pending.clear()

    def __enter__(self) -> "OrderedPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` CI of the mean of ``values`` (resampling cases).

    One case gives a zero-width interval at its value; no case gives ``(nan, nan)``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return (math.nan, math.nan)
    if v.size == 1:
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))  # (n_boot, n) resampled case indices
    means = v[idx].mean(axis=1)  # (n_boot,)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def _metric_keys(metric: str) -> list[str]:
    return [f"{metric}_{r}" for r in REGIONS] + [f"{metric}_mean"]


def summarize(
    records: Iterable[Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Aggregate per-case records into the summary behind the tables (JSON-serialisable).

    Records need the keys ``model`` (row label; checkpoints sharing it are seeds of one model),
    ``checkpoint``, ``column``, ``inputs``, ``case_id`` and the metric keys of
    :func:`case_record`. Returns::

        {"n_boot", "alpha", "seed", "rule",
         "models": [{"model", "checkpoints": [..], "columns": {column: {
             "inputs", "n_cases", "n_checkpoints",
             "per_checkpoint": [{"checkpoint", "n_cases",
                                 "<metric>_<region>": {"mean", "ci"}}],
             "<metric>_<region>": {"mean", "sd", "ci"}}}}]}

    where ``<region>`` runs over WT, TC, ET and ``mean`` (the mean of the three), ``sd`` is the
    sample sd over checkpoints (0 for one), and the row ``ci`` bootstraps over cases the per-case
    values averaged over the checkpoints.
    """
    rows = list(records)
    models: dict[str, dict[str, Any]] = {}
    for r in rows:  # first-seen order of models, checkpoints and cases
        m = models.setdefault(r["model"], {"checkpoints": [], "columns": {}})
        if r["checkpoint"] not in m["checkpoints"]:
            m["checkpoints"].append(r["checkpoint"])
        m["columns"].setdefault(r["column"], []).append(r)
    keys = _metric_keys("dice") + _metric_keys("hd95")

    out_models = []
    for name, m in models.items():
        columns: dict[str, Any] = {}
        for column in [c for c in COLUMNS if c in m["columns"]] + [
            c for c in m["columns"] if c not in COLUMNS
        ]:
            col_rows = m["columns"][column]
            by_ckpt: dict[str, dict[str, Mapping[str, Any]]] = {}
            for r in col_rows:
                by_ckpt.setdefault(r["checkpoint"], {})[r["case_id"]] = r
            per_ckpt = []
            for ckpt, cases in by_ckpt.items():
                entry: dict[str, Any] = {"checkpoint": ckpt, "n_cases": len(cases)}
                for k in keys:
                    v = [float(c[k]) for c in cases.values()]
                    entry[k] = {
                        "mean": float(np.mean(v)),
                        "ci": list(bootstrap_ci(v, n_boot=n_boot, alpha=alpha, seed=seed)),
                    }
                per_ckpt.append(entry)
            # Cases present for every checkpoint (all of them unless --max-cases differed).
            first = next(iter(by_ckpt.values()))
            common = [c for c in first if all(c in d for d in by_ckpt.values())]
            summary: dict[str, Any] = {
                "inputs": col_rows[0]["inputs"],
                "n_cases": len(common),
                "n_checkpoints": len(per_ckpt),
                "per_checkpoint": per_ckpt,
            }
            for k in keys:
                means = np.array([e[k]["mean"] for e in per_ckpt])
                pooled = [np.mean([by_ckpt[ck][c][k] for ck in by_ckpt]) for c in common]
                summary[k] = {
                    "mean": float(means.mean()),
                    "sd": float(means.std(ddof=1)) if means.size > 1 else 0.0,
                    "ci": list(bootstrap_ci(pooled, n_boot=n_boot, alpha=alpha, seed=seed)),
                }
            columns[column] = summary
        out_models.append({"model": name, "checkpoints": m["checkpoints"], "columns": columns})
    return {"n_boot": n_boot, "alpha": alpha, "seed": seed, "rule": EVAL_RULE, "models": out_models}


def _fmt(value: float, sd: float, n: int, digits: int) -> str:
    s = f"{value:.{digits}f}"
    return f"{s}±{sd:.{digits}f}" if n > 1 else s


def format_cell(col: Optional[Mapping[str, Any]], *, metric: str = "dice") -> str:
    """``Mean - WT | TC | ET`` for one summary column (``mean±sd`` over several checkpoints).

    ``None`` (combination not evaluated) gives ``x``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if col is None:
        return "x"
    digits = 2 if metric == "dice" else 1
    n = int(col["n_checkpoints"])
    parts = [
        _fmt(col[f"{metric}_{k}"]["mean"], col[f"{metric}_{k}"]["sd"], n, digits)
        for k in ("mean", *REGIONS)
    ]
    return f"{parts[0]} - {parts[1]} | {parts[2]} | {parts[3]}"


def table_footer(
    summary: Mapping[str, Any], *, split: str = "test", extra: Sequence[str] = ()
) -> list[str]:
    """Lines printed under every table: columns, input rule, case counts, CI method."""
    n_cases = sorted({c["n_cases"] for m in summary["models"] for c in m["columns"].values()})
    n_ckpt = sorted({c["n_checkpoints"] for m in summary["models"] for c in m["columns"].values()})
    lines = [
        "Cells: Mean - WT | TC | ET (mean = average of the three regions); Dice, HD95 in mm; "
        "BraTS empty-mask rules.",
        EVAL_RULE,
        f"Split '{split}', cases per cell: {', '.join(map(str, n_cases)) or '0'}; checkpoints per "
        f"row: {', '.join(map(str, n_ckpt)) or '0'} (several: mean±sd over checkpoints). "
        f"Bootstrap {100 * (1 - summary['alpha']):.0f}% CIs over cases (B={summary['n_boot']}, "
        f"seed {summary['seed']}) in summary.json.",
    ]
    return lines + list(extra)


def summary_columns(summary: Mapping[str, Any]) -> list[str]:
    """Columns present in a summary: :data:`COLUMNS` order first, then any others."""
    present: list[str] = []
    for m in summary["models"]:
        present += [c for c in m["columns"] if c not in present]
    return [c for c in COLUMNS if c in present] + [c for c in present if c not in COLUMNS]


def format_table(
    summary: Mapping[str, Any],
    *,
    metric: str = "dice",
    style: str = "text",
    columns: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    footer: Sequence[str] = (),
) -> str:
    """The write-up's table: rows = models, columns = test modalities, named columns.

    Args:
        summary: output of :func:`summarize`.
        metric: "dice" or "hd95".
        style: "markdown" (pipes inside cells escaped as ``\\|``) or "text" (aligned columns
            separated by two spaces, for the terminal).
        columns: which test columns, default every column any model has, in :data:`COLUMNS` order.
        title, footer: optional lines above / below the table.
    """
    if style not in ("text", "markdown"):
        raise ValueError(f"style must be 'text' or 'markdown', got {style!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if columns is None:
        columns = summary_columns(summary)
    label = "Dice" if metric == "dice" else "HD95 (mm)"
    names = [COLUMN_TITLES.get(c, c) for c in columns]
    body = [
        [m["model"]] + [format_cell(m["columns"].get(c), metric=metric) for c in columns]
        for m in summary["models"]
    ]
    lines: list[str] = []
    if style == "markdown":
        if title:
            lines += [f"**{title}**", ""]
        header = [label] + [f"{n}: Mean - WT \\| TC \\| ET" for n in names]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for row in body:
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        if footer:
            lines.append("")
            lines += [f"{f}  " for f in footer]  # two spaces: markdown line break
    else:
        head1 = [label] + names
        head2 = [""] + ["Mean - WT | TC | ET"] * len(names)
        widths = [max(len(r[i]) for r in [head1, head2, *body]) for i in range(len(head1))]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        if title:
            lines.append(title)
        lines += [line(head1), line(head2), "  ".join("-" * w for w in widths)]
        lines += [line(r) for r in body]
        for f in footer:  # terminal: wrap the long rule text at 100 columns
            lines += textwrap.wrap(f, width=100) or [""]
    return "\n".join(lines) + "\n"


def score_label_files(
    pred_file: PathLike, truth_file: PathLike, *, convention: str = "brats2021", **keys: Any
) -> dict[str, Any]:
    """Score a BraTS label NIfTI (e.g. from tools/predict.py) against a reference segmentation.

    Both files are read with nibabel in their stored voxel order and must share shape and affine
    (the prediction has to be in the original image space). The prediction holds BraTS-2021
    values {0, 1, 2, 4}; the reference is converted from ``convention`` ("brats2021",
    "brats2023" or "msd"). The spacing is the reference header's voxel size in mm.

    Returns:
        A :func:`case_record` row with ``keys`` first.
    """
    pred_img, truth_img = nib.load(str(pred_file)), nib.load(str(truth_file))
    if pred_img.shape != truth_img.shape:
        raise ValueError(
            f"shape {pred_img.shape} of {pred_file} != shape {truth_img.shape} of {truth_file}"
        )
    if not np.allclose(pred_img.affine, truth_img.affine, atol=1e-4):
        raise ValueError(f"affine of {pred_file} differs from that of {truth_file}")
    pred = np.asarray(pred_img.dataobj).astype(np.uint8)
    truth = convert_labels(np.asanyarray(truth_img.dataobj), convention)
    spacing = tuple(float(z) for z in truth_img.header.get_zooms()[:3])
    return case_record(labels_to_channels(pred), labels_to_channels(truth), spacing, **keys)


def write_json(path: PathLike, obj: Any) -> Path:
    """Indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """CSV with the union of the rows' keys as header (first-seen order), atomic."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in fields})
    return atomic_write_text(path, buf.getvalue())

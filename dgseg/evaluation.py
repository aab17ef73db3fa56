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
* lesion-wise metrics beside the legacy ones (``metrics="lesion"`` or ``"all"``; rules and
  references in :mod:`dgseg.lesion_metrics`): record keys ``lesion_dice_<region>``,
  ``lesion_hd95_<region>``, ``lesion_nsd_<region>`` and the counts ``lesion_tp/fp/fn_<region>``;
  a NaN value (no lesion on either side under the panoptica rules) is left out of every mean;
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
from dgseg.lesion_metrics import LesionRules, get_lesion_rules, lesion_region_metrics
from dgseg.metrics import RegionReference, dice_score, hd95, region_metrics
from dgseg.transforms.labels import (
    REGION_SETS,
    convert_labels,
    labels_for_region_set,
    labels_to_channels,
    region_masks,
)

__all__ = [
    "COLUMNS",
    "COLUMN_TITLES",
    "EVAL_RULE",
    "METRICS",
    "LESION_METRICS",
    "METRIC_SETS",
    "METRIC_TITLES",
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
# Lesion-wise metrics (dgseg.lesion_metrics), and what --metrics legacy|lesion|all selects.
LESION_METRICS = ("lesion_dice", "lesion_hd95", "lesion_nsd")
METRIC_SETS = {"legacy": METRICS, "lesion": LESION_METRICS, "all": METRICS + LESION_METRICS}
METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 (mm)", "lesion_dice": "Lesion-wise Dice",
                 "lesion_hd95": "Lesion-wise HD95 (mm)", "lesion_nsd": "Lesion-wise NSD"}

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


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (NaN when there are none), without NumPy's warning."""
    v = [float(x) for x in values if not math.isnan(float(x))]
    return float(np.mean(v)) if v else math.nan


def case_record(
    pred3: Any,
    truth3: Any,
    spacing: Sequence[float],
    *,
    metrics: str = "legacy",
    lesion_rules: Union[str, LesionRules, None] = None,
    regions: Sequence[str] = REGIONS,
    **keys: Any,
) -> dict[str, Any]:
    """One flat row: the given identifying ``keys`` then ``dice_WT .. dice_mean, hd95_WT ..``.

    ``pred3`` / ``truth3`` are (3, D, H, W) binary WT/TC/ET masks; ``spacing`` in mm. ``truth3``
    may be a :class:`dgseg.metrics.RegionReference` (with that spacing) shared by the
    predictions of one case, so that the truth side of HD95 is computed once.

    ``metrics`` ("legacy", "lesion" or "all", :data:`METRIC_SETS`) adds the lesion-wise keys
    ``lesion_<dice|hd95|nsd>_<region>`` and ``_mean`` (mean over the regions that are not NaN),
    and ``lesion_<tp|fp|fn>_<region>``, scored under ``lesion_rules`` (default "panoptica").
    ``regions`` names the channels (R, D, H, W) when they are not WT, TC, ET (region sets of
    :data:`dgseg.transforms.labels.REGION_SETS`).
    """
    if metrics not in METRIC_SETS:
        raise ValueError(f"metrics must be one of {tuple(METRIC_SETS)}, got {metrics!r}")
    spacing = tuple(float(s) for s in spacing)
    regions = tuple(regions)
    row: dict[str, Any] = dict(keys)
    if metrics != "lesion":
        _legacy_into(row, pred3, truth3, spacing, regions)
    if metrics != "legacy":
        truth = truth3.truth if isinstance(truth3, RegionReference) else truth3
        per = lesion_region_metrics(pred3, truth, spacing, regions=regions, rules=lesion_rules)
        for metric in ("dice", "hd95", "nsd"):
            for r in regions:
                row[f"lesion_{metric}_{r}"] = float(per[r][metric])
            row[f"lesion_{metric}_mean"] = _nanmean([per[r][metric] for r in regions])
        for count in ("tp", "fp", "fn"):
            for r in regions:
                row[f"lesion_{count}_{r}"] = int(per[r][count])
    return row


def _legacy_into(row: dict[str, Any], pred3: Any, truth3: Any, spacing: tuple[float, ...],
                 regions: tuple[str, ...]) -> None:
    """The legacy per-case keys ``dice_<region>``, ``hd95_<region>`` and means, into ``row``."""
    if regions != REGIONS:  # other region sets: channel by channel, same BraTS 2021 rules
        p = np.asarray(pred3, dtype=bool)
        t = np.asarray(truth3, dtype=bool)
        if p.shape != t.shape or p.ndim != 4 or p.shape[0] != len(regions):
            raise ValueError(f"expected pred3 and truth3 of shape ({len(regions)}, D, H, W), got "
                             f"{p.shape} and {t.shape}")
        per = {r: {"dice": dice_score(p[i], t[i]), "hd95": hd95(p[i], t[i], spacing)}
               for i, r in enumerate(regions)}
        for metric in METRICS:
            for r in regions:
                row[f"{metric}_{r}"] = float(per[r][metric])
            row[f"{metric}_mean"] = float(np.mean([per[r][metric] for r in regions]))
        return
    per_region = region_metrics(pred3, truth3, spacing)
    for metric in METRICS:
        values = [float(per_region[r][metric]) for r in REGIONS]
        for r, v in zip(REGIONS, values):
            row[f"{metric}_{r}"] = v
        row[f"{metric}_mean"] = float(np.mean(values))


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
        metrics, lesion_rules, regions: as for :func:`case_record`.
    """

    case_id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    truth: np.ndarray
    preds: tuple[tuple[dict[str, Any], np.ndarray], ...]
    metrics: str = "legacy"
    lesion_rules: Optional[LesionRules] = None
    regions: tuple[str, ...] = REGIONS

    @classmethod
    def build(
        cls,
        case_id: str,
        truth3: np.ndarray,
        spacing: Sequence[float],
        preds: Sequence[tuple[Mapping[str, Any], np.ndarray]],
        *,
        metrics: str = "legacy",
        lesion_rules: Union[str, LesionRules, None] = None,
        regions: Sequence[str] = REGIONS,
    ) -> "CaseJob":
        """Pack ``truth3`` and every (3, D, H, W) prediction of ``preds``."""
        if metrics not in METRIC_SETS:
            raise ValueError(f"metrics must be one of {tuple(METRIC_SETS)}, got {metrics!r}")
        rules = None if metrics == "legacy" else get_lesion_rules(lesion_rules)
        truth3 = np.asarray(truth3, dtype=bool)
        packed = []
        for keys, pred in preds:
            if np.shape(pred) != truth3.shape:
                raise ValueError(
                    f"case {case_id}: prediction shape {np.shape(pred)} != truth {truth3.shape}"
                )
            packed.append((dict(keys), pack_mask(pred)))
        return cls(case_id, tuple(truth3.shape), tuple(float(s) for s in spacing),
                   pack_mask(truth3), tuple(packed), metrics, rules, tuple(regions))


def score_job(job: CaseJob) -> list[dict[str, Any]]:
    """:func:`case_record` of every prediction of ``job``, in order, with one shared
    :class:`dgseg.metrics.RegionReference` (truth surfaces and distance maps computed once)."""
    truth = unpack_mask(job.truth, job.shape)
    ref = truth
    if job.metrics != "lesion" and job.regions == REGIONS:
        ref = RegionReference(truth, job.spacing)
    return [case_record(unpack_mask(p, job.shape), ref, job.spacing, metrics=job.metrics,
                        lesion_rules=job.lesion_rules, regions=job.regions, **keys)
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


def _metric_keys(metric: str, regions: Sequence[str] = REGIONS) -> list[str]:
    return [f"{metric}_{r}" for r in regions] + [f"{metric}_mean"]


def _finite(values: Iterable[Any]) -> list[float]:
    """The values as floats, NaN left out (lesion-wise 'no lesion anywhere' results)."""
    return [v for v in (float(x) for x in values) if not math.isnan(v)]


def summarize(
    records: Iterable[Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    metrics: Sequence[str] = METRICS,
    regions: Sequence[str] = REGIONS,
    lesion_rules: Union[str, LesionRules, None] = None,
) -> dict[str, Any]:
    """Aggregate per-case records into the summary behind the tables (JSON-serialisable).

    ``metrics`` lists the metrics to aggregate (default the legacy Dice and HD95; see
    :data:`METRIC_SETS`), ``regions`` the region names of the records. NaN per-case values are
    left out of means and CIs (``n_cases`` still counts every case). With lesion-wise metrics,
    the summary records the :class:`dgseg.lesion_metrics.LesionRules` used (``lesion_rules``).

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
    unknown = [m for m in metrics if m not in METRIC_TITLES]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected names from {tuple(METRIC_TITLES)}")
    keys = [k for metric in metrics for k in _metric_keys(metric, regions)]

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
                    v = _finite(c[k] for c in cases.values())
                    entry[k] = {
                        "mean": float(np.mean(v)) if v else math.nan,
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
                means = np.array(_finite(e[k]["mean"] for e in per_ckpt))
                pooled = [np.mean(v) for v in (_finite(by_ckpt[ck][c][k] for ck in by_ckpt)
                                                for c in common) if v]
                summary[k] = {
                    "mean": float(means.mean()) if means.size else math.nan,
                    "sd": float(means.std(ddof=1)) if means.size > 1 else 0.0,
                    "ci": list(bootstrap_ci(pooled, n_boot=n_boot, alpha=alpha, seed=seed)),
                }
            columns[column] = summary
        out_models.append({"model": name, "checkpoints": m["checkpoints"], "columns": columns})
    out = {"n_boot": n_boot, "alpha": alpha, "seed": seed, "rule": EVAL_RULE, "models": out_models}
    if tuple(metrics) != METRICS or tuple(regions) != REGIONS:  # legacy summaries stay as they were
        out["metrics"] = list(metrics)
        out["regions"] = list(regions)
    if any(m in LESION_METRICS for m in metrics):
        rules = get_lesion_rules(lesion_rules)
        out["lesion_rules"] = {**dataclasses.asdict(rules), "text": rules.describe()}
    return out


def _fmt(value: float, sd: float, n: int, digits: int) -> str:
    s = f"{value:.{digits}f}"
    return f"{s}±{sd:.{digits}f}" if n > 1 else s


def format_cell(
    col: Optional[Mapping[str, Any]], *, metric: str = "dice", regions: Sequence[str] = REGIONS
) -> str:
    """``Mean - WT | TC | ET`` for one summary column (``mean±sd`` over several checkpoints).

    ``None`` (combination not evaluated) gives ``x``. ``metric`` is any of :data:`METRIC_SETS`
    ``["all"]``; ``regions`` the summary's regions (more than three for the 2024 region set).
    """
    if metric not in METRIC_TITLES:
        raise ValueError(f"metric must be one of {tuple(METRIC_TITLES)}, got {metric!r}")
    if col is None:
        return "x"
    digits = 1 if metric.endswith("hd95") else 2
    n = int(col["n_checkpoints"])
    parts = [
        _fmt(col[f"{metric}_{k}"]["mean"], col[f"{metric}_{k}"]["sd"], n, digits)
        for k in ("mean", *regions)
    ]
    return f"{parts[0]} - " + " | ".join(parts[1:])


def table_footer(
    summary: Mapping[str, Any], *, split: str = "test", extra: Sequence[str] = ()
) -> list[str]:
    """Lines printed under every table: columns, input rule, case counts, CI method."""
    n_cases = sorted({c["n_cases"] for m in summary["models"] for c in m["columns"].values()})
    n_ckpt = sorted({c["n_checkpoints"] for m in summary["models"] for c in m["columns"].values()})
    regions = list(summary.get("regions", REGIONS))
    metrics = list(summary.get("metrics", METRICS))
    legacy_only = regions == list(REGIONS) and metrics == list(METRICS)
    if legacy_only:  # the legacy tables' line, as before lesion-wise metrics existed
        lines = ["Cells: Mean - WT | TC | ET (mean = average of the three regions); Dice, HD95 in "
                 "mm; BraTS empty-mask rules."]
    else:
        lines = [f"Cells: Mean - {' | '.join(regions)} (mean = average of the {len(regions)} "
                 f"regions, NaN left out); HD95 in mm."]
        if any(m in METRICS for m in metrics):
            lines.append("Legacy metrics: per-case Dice and HD95 with the BraTS 2021 empty-mask "
                         "rules (both empty: Dice 1, HD95 0; one empty: Dice 0, HD95 373.13 mm).")
    if "lesion_rules" in summary:
        lines.append(summary["lesion_rules"]["text"])
    lines += [
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
    if metric not in METRIC_TITLES:
        raise ValueError(f"metric must be one of {tuple(METRIC_TITLES)}, got {metric!r}")
    if columns is None:
        columns = summary_columns(summary)
    label = METRIC_TITLES[metric]
    regions = tuple(summary.get("regions", REGIONS))
    spec = "Mean - " + " | ".join(regions)
    names = [COLUMN_TITLES.get(c, c) for c in columns]
    body = [
        [m["model"]]
        + [format_cell(m["columns"].get(c), metric=metric, regions=regions) for c in columns]
        for m in summary["models"]
    ]
    lines: list[str] = []
    if style == "markdown":
        if title:
            lines += [f"**{title}**", ""]
        header = [label] + [f"{n}: " + spec.replace("|", "\\|") for n in names]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for row in body:
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        if footer:
            lines.append("")
            lines += [f"{f}  " for f in footer]  # two spaces: markdown line break
    else:
        head1 = [label] + names
        head2 = [""] + [spec] * len(names)
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
    pred_file: PathLike,
    truth_file: PathLike,
    *,
    convention: str = "brats2021",
    region_set: str = "brats2021",
    metrics: str = "legacy",
    lesion_rules: Union[str, LesionRules, None] = None,
    **keys: Any,
) -> dict[str, Any]:
    """Score a BraTS label NIfTI (e.g. from tools/predict.py) against a reference segmentation.

    Both files are read with nibabel in their stored voxel order and must share shape and affine
    (the prediction has to be in the original image space). The prediction holds BraTS-2021
    values {0, 1, 2, 4}; the reference is converted from ``convention`` ("brats2021",
    "brats2023" or "msd"). The spacing is the reference header's voxel size in mm.

    With another ``region_set`` ("brats2023", "brats2024"; :data:`REGION_SETS`) the prediction
    holds that set's own label values and is scored on its regions; the reference is converted
    with :func:`dgseg.transforms.labels.labels_for_region_set`. ``metrics`` and
    ``lesion_rules`` as for :func:`case_record`.

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
    spacing = tuple(float(z) for z in truth_img.header.get_zooms()[:3])
    extra: dict[str, Any] = {"metrics": metrics, "lesion_rules": lesion_rules}
    if region_set != "brats2021":
        truth = labels_for_region_set(np.asanyarray(truth_img.dataobj), convention, region_set)
        return case_record(region_masks(pred, region_set), region_masks(truth, region_set),
                           spacing, regions=tuple(REGION_SETS[region_set]), **extra, **keys)
    truth = convert_labels(np.asanyarray(truth_img.dataobj), convention)
    return case_record(labels_to_channels(pred), labels_to_channels(truth), spacing, **extra,
                       **keys)


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

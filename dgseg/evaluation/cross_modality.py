"""Cross-modality evaluation runs: the loop behind ``tools/evaluate.py``.

Case by case over a split of prepared shards, every checkpoint predicts every input tuple the
input rule tests it on (:func:`dgseg.evaluation.scoring.input_specs`; whole stored volume, sliding
windows with Gaussian blending, optional flip TTA, sigmoid > threshold per region). The
predictions of one case go as one :class:`dgseg.evaluation.scoring.CaseJob` to an
:class:`OrderedPool`
of worker processes, which score them against the case's ground truth prepared once while the
network predicts the next case; results come back in submission order, so the records do not
depend on the worker count. With several ranks each takes ``cases[rank::world]`` (nnU-Net's
sharding) and the caller gathers the records.

:func:`score_prediction_files` scores label NIfTI files (``tools/predict.py`` output) against
reference segmentations in the same pool.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from dgseg.data.dataset import ShardDataset
from dgseg.evaluation.lesion_metrics import LesionRules
from dgseg.evaluation.scoring import CaseJob, score_job, score_label_files
from dgseg.inference.sliding_window import predict_volume
from dgseg.logging_utils import Progress
from dgseg.transforms.labels import channels_to_labels
from dgseg.viz import overlay_slices

__all__ = [
    "EvalSettings",
    "Plan",
    "OrderedPool",
    "default_metric_workers",
    "count_work",
    "evaluate_cases",
    "score_prediction_files",
    "CaseFault",
    "guarded",
]


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`evaluate_cases` predicts and scores (``tools/evaluate.py``'s options)."""

    split: str = "test"  # manifest split to evaluate
    max_cases: Optional[int] = None  # only the first N cases of the split
    overlap: float = 0.5  # sliding-window overlap
    sw_batch_size: int = 1  # windows per forward pass
    blend: str = "gaussian"  # "gaussian" | "constant" window blending
    tta: bool = False  # 8-fold flip test-time augmentation
    threshold: float = 0.5  # probability threshold per region
    overlays: int = 0  # overlay slices of the first N cases
    metrics: str = "case"  # "case" | "lesion" | "all" (dgseg.evaluation.scoring.METRIC_SETS)
    lesion_rules: Optional[LesionRules] = None  # lesion-wise rules (None: "panoptica")
    autocast_dtype: Optional[torch.dtype] = None  # e.g. torch.bfloat16 for the network


class Plan(NamedTuple):
    """One checkpoint to evaluate: its model, row label, window, and the input tuples it is
    tested on mapped to the table columns each fills (a T2 model's "own" is its T2 column)."""

    path: Path
    label: str
    model: torch.nn.Module
    roi: Optional[int]
    specs: dict[tuple[str, ...], list[str]]
    # stored volume -> probabilities: input representation and test-time adaptation
    # (dgseg.inference.adaptation.CasePredictor); None: the volume is the network input
    case_fn: Optional[Callable[..., torch.Tensor]] = None


class CaseFault(NamedTuple):
    """What :func:`guarded` returns instead of a result: the fault of one case, in one line."""

    message: str


def guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or a :class:`CaseFault` with its error in one line: a bad item
    of a batch becomes that item's failure, in a worker process as inline."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any fault of one case stays that case's
        text = " ".join(str(e).split())
        known = isinstance(e, (ValueError, OSError))
        return CaseFault(text if known and text else f"{type(e).__name__}: {text}")


def default_metric_workers() -> int:
    """Worker processes for metrics when not set: the CPUs this process may use, shared by the
    processes torchrun started on this node, minus one for the process that predicts; at most 8
    (enough to keep up with one GPU predicting 128³ cases)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cpus // local_world - 1))


def _init_worker() -> None:
    torch.set_num_threads(1)  # metrics in one thread per worker process


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


def count_work(
    plans: Sequence[Plan], n_cases: int, max_cases: Optional[int], rank: int, world: int
) -> int:
    """Predictions this rank makes (the progress total)."""
    n = n_cases if max_cases is None else min(n_cases, max_cases)
    return sum(len(plan.specs) for plan in plans) * len(range(rank, n, world))


def evaluate_cases(
    plans: Sequence[Plan],
    data: Path,
    settings: EvalSettings,
    *,
    rank: int,
    world: int,
    device: torch.device,
    progress: Progress,
    pool: OrderedPool,
    failures: Optional[list[tuple[str, str]]] = None,
    on_rows: Optional[Callable[[list[dict[str, Any]]], None]] = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-case records (and overlay slices) for this rank's share of the cases of ``data``.

    Case by case, every checkpoint predicts every input tuple it is tested on; the case's
    predictions go to ``pool`` as one :class:`CaseJob`, so the ground truth's side of HD95 is
    prepared once per case, and the next case is predicted while workers score this one.

    With ``failures`` (a list), a case that cannot be read, predicted or scored is appended to it
    as ``(case, reason)`` and the others go on; without it the first fault is raised.
    ``on_rows`` receives each case's records as soon as they are scored.
    """
    s = settings
    all_inputs = list(dict.fromkeys(inputs for plan in plans for inputs in plan.specs))
    datasets = {
        inputs: ShardDataset(data, split=s.split, modalities=inputs) for inputs in all_inputs
    }
    first = datasets[all_inputs[0]]
    n = len(first) if s.max_cases is None else min(len(first), s.max_cases)
    per_case = sum(len(plan.specs) for plan in plans)

    records: list[dict[str, Any]] = []
    overlays: list[dict[str, Any]] = []
    columns_of: dict[str, list[list[str]]] = {}  # job tag -> table columns of each prediction

    def collect(done: list[tuple[str, Any]]) -> None:
        for tag, rows in done:  # in submission order: deterministic record order
            columns = columns_of.pop(tag)
            if isinstance(rows, CaseFault):
                fail(tag, rows.message, len(columns))
                continue
            case_rows = [
                {**row, "column": column} for row, cols in zip(rows, columns) for column in cols
            ]
            records.extend(case_rows)
            if on_rows is not None:
                on_rows(case_rows)
            progress.step(len(rows), note=f"{tag}, {pool.pending} metric job(s) queued")

    def fail(tag: str, message: str, n_preds: int) -> None:
        if failures is None:
            raise RuntimeError(f"{tag}: {message}")
        failures.append((tag, message))
        progress.step(n_preds, note=f"{tag} failed")

    def case_job(i: int) -> Optional[tuple[str, list[list[str]], CaseJob]]:
        """Predict case ``i`` with every plan: (tag, columns, job), None when unlabelled."""
        meta = first.case_meta(i)
        if not bool(meta.get("has_label", True)):  # nothing to score against
            progress.step(per_case, note=f"skipped unlabelled case {i}")
            return None
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
                predict = functools.partial(
                    predict_volume,
                    roi_size=plan.roi,
                    overlap=s.overlap,
                    tta=s.tta,
                    sw_batch_size=s.sw_batch_size,
                    blend=s.blend,
                    autocast_dtype=s.autocast_dtype,
                )
                if plan.case_fn is None:
                    prob = predict(plan.model, image)
                else:
                    prob = plan.case_fn(image, predict)
                pred3 = (prob[0] > s.threshold).cpu().numpy()  # (3, D, H, W) bool
                keys = {
                    "model": plan.label,
                    "checkpoint": str(plan.path),
                    "column": "",
                    "inputs": "+".join(inputs),
                    "case_id": case_id,
                }
                preds.append((keys, pred3))
                columns.append(plan.specs[inputs])
                if i < s.overlays:
                    sl = overlay_slices(
                        sample["image"][0].numpy(),
                        channels_to_labels(truth3),
                        channels_to_labels(pred3),
                    )  # test modality, best slice
                    for column in plan.specs[inputs]:
                        overlays.append(
                            {
                                "model": plan.label,
                                "checkpoint": str(plan.path),
                                "column": column,
                                "case_id": case_id,
                                **sl,
                            }
                        )
        spacing = tuple(float(s) for s in np.asarray(meta["spacing"]).ravel())
        job = CaseJob.build(
            case_id, truth3, spacing, preds, metrics=s.metrics, lesion_rules=s.lesion_rules
        )
        return f"case {case_id}", columns, job

    for i in range(rank, n, world):  # nnU-Net-style sharding: keys[rank::world]
        if failures is None:
            made = case_job(i)
        else:
            made = guarded(case_job, i)
            if isinstance(made, CaseFault):
                fail(f"case {first.cases[i].get('id', i)}", made.message, per_case)
                continue
        if made is None:
            continue
        tag, columns, job = made
        columns_of[tag] = columns
        if failures is None:
            collect(pool.submit(tag, score_job, job))
        else:
            collect(pool.submit(tag, guarded, score_job, job))
    collect(pool.drain())
    return records, overlays


def score_prediction_files(
    cases: Sequence[tuple[str, Path, str]],
    predictions: Path,
    pool: OrderedPool,
    *,
    region_set: str = "brats2021",
    metrics: str = "case",
    lesion_rules: Optional[LesionRules] = None,
    on_rows: Optional[Callable[[list[dict[str, Any]]], None]] = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Records of ``predictions/<case_id>.nii.gz`` against each case's reference segmentation.

    Args:
        cases: (case id, reference label file, its label convention) per labelled case.
        predictions: folder of label maps in original image space (``tools/predict.py``).
        region_set, metrics, lesion_rules: as for
        :func:`dgseg.evaluation.scoring.score_label_files`.
        on_rows: receives each case's record as soon as it is scored.

    Returns:
        (records in case order, (case id, reason) of every case that was not scored: no
        prediction file, or a file that cannot be read or scored, e.g. wrong shape, affine or
        label values; the other cases are scored all the same).
    """
    records: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    name = predictions.name or str(predictions)

    def collect(done: list[tuple[str, Any]]) -> None:
        for tag, row in done:
            if isinstance(row, CaseFault):
                failed.append((tag, row.message))
                continue
            records.append(row)
            if on_rows is not None:
                on_rows([row])

    for case_id, label_file, convention in cases:
        pred = predictions / f"{case_id}.nii.gz"
        if not pred.is_file():
            failed.append((case_id, f"no prediction {pred}"))
            continue
        score = functools.partial(
            score_label_files,
            convention=convention,
            region_set=region_set,
            metrics=metrics,
            lesion_rules=lesion_rules,
            model=name,
            checkpoint=str(predictions),
            column="nifti",
            inputs="nifti",
            case_id=case_id,
        )
        collect(pool.submit(case_id, guarded, score, pred, label_file))
    collect(pool.drain())
    order = {cid: k for k, (cid, _, _) in enumerate(cases)}
    failed.sort(key=lambda f: order.get(f[0], -1))
    return records, failed

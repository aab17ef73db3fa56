"""Cross-modality evaluation rules and per-case records.

The write-up (docs/SPEC.md "Experiments") trains on one source modality and tests on each of the
four BraTS modalities, reporting per modality ``Mean - WT | TC | ET`` Dice. This module holds
the scoring side of that evaluation (aggregation, tables and writers:
:mod:`dgseg.evaluation.report`; the
loop that runs the networks: :mod:`dgseg.evaluation.cross_modality`):

* the rule that turns a test modality into the input channels of a model (:func:`input_channels`,
  documented in :data:`EVAL_RULE`);
* one flat record per (checkpoint, test column, case) with Dice and HD95 per region under the
  BraTS empty-mask rules (:func:`case_record`, metrics from :mod:`dgseg.evaluation.metrics`);
* lesion-wise metrics beside the per-case ones (``metrics="lesion"`` or ``"all"``; rules and
  references in :mod:`dgseg.evaluation.lesion_metrics`): record keys ``lesion_dice_<region>``,
  ``lesion_hd95_<region>``, ``lesion_nsd_<region>`` and the counts ``lesion_tp/fp/fn_<region>``;
  a NaN value (no lesion on either side under the panoptica rules) is left out of every mean;
* scoring off the main process (:class:`CaseJob`, :func:`score_job`): the HD95 of a poor
  prediction costs far more CPU time than the network's GPU inference, so the predictions of one
  case go, bit-packed, to worker processes that score them against a
  :class:`dgseg.evaluation.metrics.RegionReference` built once per case, while the main process
  predicts;
* scoring a label NIfTI against a reference segmentation (:func:`score_label_files`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import nibabel as nib
import numpy as np

from dgseg.constants import MODALITIES, REGIONS
from dgseg.evaluation.lesion_metrics import LesionRules, get_lesion_rules, lesion_region_metrics
from dgseg.evaluation.metrics import RegionReference, dice_score, hd95, region_metrics
from dgseg.transforms.labels import (
    CONVENTIONS,
    REGION_SETS,
    check_label_values,
    convert_labels,
    labels_for_region_set,
    labels_to_channels,
    region_masks,
)

__all__ = [
    "COLUMNS",
    "EVAL_RULE",
    "METRICS",
    "LESION_METRICS",
    "METRIC_SETS",
    "input_channels",
    "input_specs",
    "case_record",
    "pack_mask",
    "unpack_mask",
    "CaseJob",
    "score_job",
    "score_label_files",
]

# Test columns: each single modality, then the model's own training inputs.
COLUMNS = (*MODALITIES, "own")
METRICS = ("dice", "hd95")
# Lesion-wise metrics (dgseg.evaluation.lesion_metrics), and what --metrics case|lesion|all
# selects.
LESION_METRICS = ("lesion_dice", "lesion_hd95", "lesion_nsd")
METRIC_SETS = {"case": METRICS, "lesion": LESION_METRICS, "all": METRICS + LESION_METRICS}
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


def input_specs(
    train_modalities: Sequence[str], modalities: Sequence[str]
) -> dict[tuple[str, ...], list[str]]:
    """Distinct input tuples -> the table columns they fill, under the input rule (a T2 model's
    "own" column is its T2 column, predicted once)."""
    specs: dict[tuple[str, ...], list[str]] = {}
    for column in [*modalities, "own"]:
        inputs = input_channels(train_modalities, column)
        if inputs is not None:
            specs.setdefault(inputs, []).append(column)
    return specs


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (NaN when there are none), without NumPy's warning."""
    v = [float(x) for x in values if not math.isnan(float(x))]
    return float(np.mean(v)) if v else math.nan


def case_record(
    pred3: Any,
    truth3: Any,
    spacing: Sequence[float],
    *,
    metrics: str = "case",
    lesion_rules: Union[str, LesionRules, None] = None,
    regions: Sequence[str] = REGIONS,
    **keys: Any,
) -> dict[str, Any]:
    """One flat row: the given identifying ``keys`` then ``dice_WT .. dice_mean, hd95_WT ..``.

    ``pred3`` / ``truth3`` are (3, D, H, W) binary WT/TC/ET masks; ``spacing`` in mm. ``truth3``
    may be a :class:`dgseg.evaluation.metrics.RegionReference` (with that spacing) shared by the
    predictions of one case, so that the truth side of HD95 is computed once.

    ``metrics`` ("case", "lesion" or "all", :data:`METRIC_SETS`) adds the lesion-wise keys
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
        _case_metrics_into(row, pred3, truth3, spacing, regions)
    if metrics != "case":
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


def _case_metrics_into(
    row: dict[str, Any],
    pred3: Any,
    truth3: Any,
    spacing: tuple[float, ...],
    regions: tuple[str, ...],
) -> None:
    """The per-case keys ``dice_<region>``, ``hd95_<region>`` and means, into ``row``."""
    if regions != REGIONS:  # other region sets: channel by channel, same BraTS 2021 rules
        p = np.asarray(pred3, dtype=bool)
        t = np.asarray(truth3, dtype=bool)
        if p.shape != t.shape or p.ndim != 4 or p.shape[0] != len(regions):
            raise ValueError(
                f"expected pred3 and truth3 of shape ({len(regions)}, D, H, W), got "
                f"{p.shape} and {t.shape}"
            )
        per = {
            r: {"dice": dice_score(p[i], t[i]), "hd95": hd95(p[i], t[i], spacing)}
            for i, r in enumerate(regions)
        }
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
    metrics: str = "case"
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
        metrics: str = "case",
        lesion_rules: Union[str, LesionRules, None] = None,
        regions: Sequence[str] = REGIONS,
    ) -> "CaseJob":
        """Pack ``truth3`` and every (3, D, H, W) prediction of ``preds``."""
        if metrics not in METRIC_SETS:
            raise ValueError(f"metrics must be one of {tuple(METRIC_SETS)}, got {metrics!r}")
        rules = None if metrics == "case" else get_lesion_rules(lesion_rules)
        truth3 = np.asarray(truth3, dtype=bool)
        packed = []
        for keys, pred in preds:
            if np.shape(pred) != truth3.shape:
                raise ValueError(
                    f"case {case_id}: prediction shape {np.shape(pred)} != truth {truth3.shape}"
                )
            packed.append((dict(keys), pack_mask(pred)))
        return cls(
            case_id,
            tuple(truth3.shape),
            tuple(float(s) for s in spacing),
            pack_mask(truth3),
            tuple(packed),
            metrics,
            rules,
            tuple(regions),
        )


def score_job(job: CaseJob) -> list[dict[str, Any]]:
    """:func:`case_record` of every prediction of ``job``, in order, with one shared
    :class:`dgseg.evaluation.metrics.RegionReference` (truth surfaces and distance maps computed
    once)."""
    truth = unpack_mask(job.truth, job.shape)
    ref = truth
    if job.metrics != "lesion" and job.regions == REGIONS:
        ref = RegionReference(truth, job.spacing)
    return [
        case_record(
            unpack_mask(p, job.shape),
            ref,
            job.spacing,
            metrics=job.metrics,
            lesion_rules=job.lesion_rules,
            regions=job.regions,
            **keys,
        )
        for keys, p in job.preds
    ]


def score_label_files(
    pred_file: PathLike,
    truth_file: PathLike,
    *,
    convention: str = "brats2021",
    region_set: str = "brats2021",
    metrics: str = "case",
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
    if region_set not in REGION_SETS:
        raise ValueError(
            f"unknown region set {region_set!r}; expected one of {sorted(REGION_SETS)}"
        )
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}")
    pred_img, pred_stored = _read_label_file(pred_file)
    truth_img, truth_stored = _read_label_file(truth_file)
    if pred_img.shape != truth_img.shape:
        raise ValueError(
            f"shape {pred_img.shape} of {pred_file} != shape {truth_img.shape} of {truth_file}"
        )
    if not np.allclose(pred_img.affine, truth_img.affine, atol=1e-4):
        raise ValueError(f"affine of {pred_file} differs from that of {truth_file}")
    # Values checked as stored: a cast first would read an int16 260 as the uint8 4.
    own = sorted({0, *(v for vals in REGION_SETS[region_set].values() for v in vals)})
    pred = check_label_values(pred_stored, own, str(pred_file))
    source = own if region_set == "brats2024" else sorted(CONVENTIONS[convention])
    truth_stored = check_label_values(truth_stored, source, str(truth_file))
    spacing = tuple(float(z) for z in truth_img.header.get_zooms()[:3])
    extra: dict[str, Any] = {"metrics": metrics, "lesion_rules": lesion_rules}
    if region_set != "brats2021":
        truth = labels_for_region_set(truth_stored, convention, region_set)
        return case_record(
            region_masks(pred, region_set),
            region_masks(truth, region_set),
            spacing,
            regions=tuple(REGION_SETS[region_set]),
            **extra,
            **keys,
        )
    truth = convert_labels(truth_stored, convention)
    return case_record(
        labels_to_channels(pred), labels_to_channels(truth), spacing, **extra, **keys
    )


def _read_label_file(path: PathLike) -> tuple[Any, np.ndarray]:
    """(image, voxels as stored) of a label NIfTI; ValueError naming the file when it cannot be
    read (missing, truncated, not NIfTI)."""
    try:
        img = nib.load(str(path))
        return img, np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for a corrupt or truncated file
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"{path}: cannot read label map ({type(e).__name__}: {why})") from None

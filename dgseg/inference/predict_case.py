"""Label maps from a checkpoint, back in the original voxel grid: the core of ``tools/predict.py``.

A prepared case (``data_prep.preprocess.PreparedCase``: the z-scored stored window of the
modalities read, with its ``offset`` and ``original_shape``) is segmented with sliding windows
(optional flip TTA), thresholded per region (WT, TC, ET), turned into BraTS 2021 labels
(ET -> 4, TC without ET -> 1, WT without TC -> 2, ``channels_to_labels``) and put back into the
original grid (``dgseg.data.window.restore_to_original``; outside the stored window:
background), then written as a uint8 NIfTI with the original affine.

Input channels follow the evaluation's input rule (``dgseg.evaluation.scoring.input_channels``): by
default the model's own training modalities; a modality ``m`` feeds m to every input channel
(not for 4-modality stacked models). A single file can only feed a model that reads one modality.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from dgseg.constants import MODALITIES
from dgseg.data.window import restore_to_original
from dgseg.evaluation.scoring import input_channels
from dgseg.inference.adaptation import NO_ADAPT, AdaptSettings, load_case_predictor
from dgseg.inference.nifti import write_nifti
from dgseg.inference.sliding_window import predict_volume
from dgseg.training.checkpoint import load_segmenter
from dgseg.transforms.labels import channels_to_labels

__all__ = [
    "ProbFn",
    "choose_channels",
    "load_predictor",
    "stored_labels",
    "predict_prepared",
    "write_label_nifti",
    "predict_to_file",
]

# (1, C, D, H, W) float32 image -> (1, 3, D, H, W) WT/TC/ET probabilities
ProbFn = Callable[[torch.Tensor], torch.Tensor]
PathLike = Union[str, "os.PathLike[str]"]


def choose_channels(
    train: Sequence[str], modality: str | None, *, single_file: bool = False
) -> tuple[str, ...]:
    """Input channel modalities for a model trained on ``train`` and ``--modality``.

    Raises:
        ValueError: one line, when the combination cannot be fed (see the module docstring).
    """
    train = tuple(train)
    stacked = set(train) >= set(MODALITIES)
    if single_file and stacked:
        raise ValueError(
            f"the model was trained on all four modalities stacked ({'+'.join(train)}): "
            "it cannot segment a single file; give a case folder"
        )
    channels = input_channels(train, modality or "own")
    if channels is None:
        raise ValueError(
            f"the model was trained on all four modalities {train}; it needs its "
            f"own inputs: omit --modality"
        )
    if single_file and len(set(channels)) != 1:
        raise ValueError(
            f"the model reads {'+'.join(train)}: pass --modality m to feed the single file "
            "to every input channel"
        )
    return channels


def load_predictor(
    checkpoint: PathLike,
    device: torch.device,
    *,
    modality: Optional[str] = None,
    single_file: bool = False,
    roi: Optional[int] = None,
    overlap: float = 0.5,
    tta: bool = False,
    autocast_dtype: Optional[torch.dtype] = None,
    adapt: AdaptSettings = NO_ADAPT,
) -> tuple[ProbFn, tuple[str, ...], str]:
    """Probability function, input channel modalities and a description of the model.

    ``roi`` None: the checkpoint's ``Config.eval_roi`` (None there too: one covering window).
    The probability function applies the checkpoint's input representation and ``adapt``
    (``dgseg.inference.adaptation.CasePredictor``) to the stored-space image.

    Raises:
        FileNotFoundError, ValueError: one line naming the checkpoint or the channel problem.
    """
    model, cfg = load_segmenter(checkpoint)
    train = tuple(cfg.data.modalities)
    channels = choose_channels(train, modality, single_file=single_file)
    model = model.to(device)
    roi = roi or cfg.eval_roi  # None: one covering window
    case_fn = load_case_predictor(checkpoint, model, cfg.data, adapt)
    predict = functools.partial(
        predict_volume, roi_size=roi, overlap=overlap, tta=tta, autocast_dtype=autocast_dtype
    )

    def prob_fn(x: torch.Tensor) -> torch.Tensor:
        return case_fn(x.to(device), predict)

    what = f"{cfg.run.name} ({'+'.join(train)}), inputs {'+'.join(channels)}"
    return prob_fn, channels, f"{what}, test-time adaptation: {adapt.describe()}"


def stored_labels(image: np.ndarray, prob_fn: ProbFn, *, threshold: float = 0.5) -> np.ndarray:
    """BraTS-2021 label map (D, H, W) uint8 of a stored-space image (C, D, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]  # (1, C, D, H, W)
    prob = prob_fn(x)
    if prob.shape[:2] != (1, 3) or prob.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"expected probabilities (1, 3, {tuple(x.shape[2:])}), got {tuple(prob.shape)}"
        )
    pred3 = (prob[0] > threshold).cpu().numpy()  # (3, D, H, W) bool
    return channels_to_labels(pred3)


def predict_prepared(
    prepared: Any, prob_fn: ProbFn, channels: Sequence[str], *, threshold: float = 0.5
) -> np.ndarray:
    """Label map in the original voxel grid for a ``data_prep.preprocess.PreparedCase``.

    ``channels`` names the modality of each input channel (from :func:`choose_channels`); each
    must be among ``prepared.modalities``.
    """
    idx = [tuple(prepared.modalities).index(m) for m in channels]
    image = prepared.images[idx]  # (C, D, H, W), modalities in the model's channel order
    labels = stored_labels(image, prob_fn, threshold=threshold)
    # Outside the stored window there was no prediction: background.
    return restore_to_original(labels, prepared.offset, prepared.original_shape, fill=0)


def write_label_nifti(path: PathLike, labels: np.ndarray, affine: np.ndarray) -> Path:
    """Write uint8 ``labels`` with ``affine`` to ``path`` (.nii.gz) atomically."""
    return write_nifti(path, np.asarray(labels, np.uint8), affine)


def predict_to_file(
    prepared: Any,
    prob_fn: ProbFn,
    channels: Sequence[str],
    path: PathLike,
    *,
    threshold: float = 0.5,
) -> Path:
    """Segment a prepared case and write its label map, in the original grid and affine."""
    labels = predict_prepared(prepared, prob_fn, channels, threshold=threshold)
    return write_label_nifti(path, labels, prepared.affine)

"""Segment raw BraTS-style cases with a checkpoint and write BraTS label maps as NIfTI.

Input: one case folder or a dataset folder in any layout ``data_prep.layouts`` recognises
(BraTS 2020/2021, BraTS 2023, MSD Task01), or a single 3D NIfTI file. A case needs only the
modality files the model reads (its training modalities, or ``--modality m``): other modalities
and the label may be missing and are not read. Each case is loaded and checked, preprocessed like
the shards but over the modalities read only (their joint brain box, per-modality z-score over
its own nonzero voxels, crop/pad to ``--size`` centred on the brain, or ``full`` to keep the
box), segmented with sliding windows (optional flip TTA), thresholded at 0.5 per region (WT, TC,
ET), turned into BraTS-2021 labels (ET -> 4, TC without ET -> 1, WT without TC -> 2) and put
back into the **original** voxel grid with the original affine, ready for the official evaluation
tools:
``<output>/<case_id>.nii.gz`` (uint8, written atomically). Voxels outside the stored window (the
``--size`` crop) are background: with the default 128^3 crop a brain wider than 128 voxels along
an axis loses its edges, so use ``--size full`` when that matters.

Input channels follow tools/evaluate.py's rule: by default the model's own training modalities;
``--modality m`` feeds m to every input channel (not allowed for 4-modality stacked models).

Single file (``--input scan.nii.gz`` or ``.nii``): the file is the ``--modality`` scan, by
default the model's training modality when it has exactly one; the label map is written in the
file's grid and affine to ``<output>/<stem>_seg.nii.gz`` (``scan.nii.gz`` -> ``scan_seg.nii.gz``).
A model that reads several different modalities (e.g. the stacked 4-modality one) cannot
segment one file. Any fault is one ``error:`` line naming the file, with exit status 1.

A case of a folder that cannot be read or segmented is skipped with a one-line reason and listed
at the end; the exit status is non-zero only when no case was predicted.

Usage::

    python tools/predict.py --checkpoint runs/segresnet_t2_noaug/best.pt \\
        --input raw/BraTS2021_00000 --output preds/ --modality flair --tta
    python tools/predict.py --checkpoint runs/segresnet_t2_noaug/best.pt \\
        --input scan_flair.nii.gz --output preds/ --modality flair   # preds/scan_flair_seg.nii.gz
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import nibabel as nib
import numpy as np
import torch

from data_prep.layouts import discover_cases, single_file_case
from data_prep.loading import CaseError, load_raw_case
from data_prep.preprocess import preprocess_case, restore_to_original
from dgseg.atomic import atomic_write_bytes
from dgseg.checkpoint import load_segmenter
from dgseg.constants import MODALITIES
from dgseg.evaluation import input_channels
from dgseg.inference import covering_roi, predict_volume
from dgseg.precision import AMP_CHOICES, describe, resolve_amp
from dgseg.transforms.labels import channels_to_labels

# (1, C, D, H, W) float32 image -> (1, 3, D, H, W) WT/TC/ET probabilities
ProbFn = Callable[[torch.Tensor], torch.Tensor]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Predict BraTS label maps (NIfTI, original space) for raw cases.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file (.pt)")
    p.add_argument("--input", type=Path, required=True,
                   help="a case folder, a dataset folder, or one NIfTI file (.nii / .nii.gz)")
    p.add_argument("--output", type=Path, required=True,
                   help="folder for <case_id>.nii.gz (single file: <stem>_seg.nii.gz)")
    p.add_argument("--modality", choices=MODALITIES, default=None,
                   help="feed this modality to every input channel (default: own inputs)")
    p.add_argument("--size", default="128",
                   help="stored crop size as in tools/prepare_brats.py: an int or 'full'")
    p.add_argument("--roi", type=int, default=None,
                   help="sliding-window size; default: config run.val_roi, else data.patch_size, "
                   "else one window over the whole volume (sides rounded up to multiples of 16)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--tta", action="store_true", help="8-fold flip test-time augmentation")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="bf16 autocast for the network (blending stays float32); auto: bf16 "
                   "where the device has native bf16, else fp32")
    args = p.parse_args(argv)
    if args.size != "full":
        try:
            args.size = int(args.size)
        except ValueError:
            p.error(f"--size must be an int or 'full', got {args.size!r}")
        if args.size < 1:
            p.error(f"--size must be >= 1, got {args.size}")
    else:
        args.size = None
    if not 0.0 <= args.overlap < 1.0:
        p.error(f"--overlap must be in [0, 1), got {args.overlap}")
    return args


def stored_labels(image: np.ndarray, prob_fn: ProbFn, *, threshold: float = 0.5) -> np.ndarray:
    """BraTS-2021 label map (D, H, W) uint8 of a stored-space image (C, D, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]  # (1, C, D, H, W)
    prob = prob_fn(x)
    if prob.shape[:2] != (1, 3) or prob.shape[2:] != x.shape[2:]:
        raise ValueError(f"expected probabilities (1, 3, {tuple(x.shape[2:])}), got "
                         f"{tuple(prob.shape)}")
    pred3 = (prob[0] > threshold).cpu().numpy()  # (3, D, H, W) bool
    return channels_to_labels(pred3)


def label_nifti_bytes(labels: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzip-compressed NIfTI-1 file (uint8 labels, given affine as qform and sform, mm)."""
    affine = np.asarray(affine, np.float64)
    img = nib.Nifti1Image(np.asarray(labels, np.uint8), affine)
    img.header.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # scanner coordinates, as BraTS images carry
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def write_label_nifti(path: Path, labels: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``labels`` with ``affine`` to ``path`` (.nii.gz) atomically."""
    return atomic_write_bytes(path, label_nifti_bytes(labels, affine))


def predict_prepared(
    prepared: Any, prob_fn: ProbFn, channels: Sequence[str], *, threshold: float = 0.5
) -> np.ndarray:
    """Label map in the original voxel grid for a ``data_prep.preprocess.PreparedCase``.

    ``channels`` names the modality of each input channel (from :func:`input_channels`); each
    must be among ``prepared.modalities``.
    """
    idx = [tuple(prepared.modalities).index(m) for m in channels]
    image = prepared.images[idx]  # (C, D, H, W), modalities in the model's channel order
    labels = stored_labels(image, prob_fn, threshold=threshold)
    # Outside the stored window there was no prediction: background.
    return restore_to_original(labels, prepared.offset, prepared.original_shape, fill=0)


def predict_case(raw: Any, prob_fn: ProbFn, channels: Sequence[str], out_dir: Path, *,
                 size: Optional[int] = 128, threshold: float = 0.5,
                 filename: str | None = None) -> Path:
    """Load, preprocess, segment and write one raw case; returns the written file.

    Only the modalities in ``channels`` are read: the brain box and the z-scores are theirs.
    The file is ``out_dir / filename``, by default ``<case_id>.nii.gz``.
    """
    loaded = load_raw_case(raw, modalities=channels)
    prepared = preprocess_case(loaded, size=size)
    labels = predict_prepared(prepared, prob_fn, channels, threshold=threshold)
    name = filename or f"{raw.case_id}.nii.gz"
    return write_label_nifti(out_dir / name, labels, prepared.affine)


def is_single_file(path: Path) -> bool:
    """Whether ``--input`` names one file (a NIfTI name, or any existing file) and not a folder."""
    name = path.name.lower()
    return not path.is_dir() and (path.is_file() or name.endswith((".nii", ".nii.gz")))


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


def load_predictor(args: argparse.Namespace) -> tuple[ProbFn, tuple[str, ...], str]:
    """Probability function, input channel modalities and a description of the model."""
    model, cfg = load_segmenter(args.checkpoint)
    train = tuple(cfg.data.modalities)
    channels = choose_channels(train, args.modality, single_file=is_single_file(args.input))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    model = model.to(device)
    roi = args.roi or cfg.run.val_roi or cfg.data.patch_size  # None: one covering window
    amp, why = resolve_amp(args.amp, device)
    print(describe(amp, why), file=sys.stderr, flush=True)
    autocast = torch.bfloat16 if amp == "bf16" else None

    def prob_fn(x: torch.Tensor) -> torch.Tensor:
        window = roi or covering_roi(x.shape[2:])
        return predict_volume(model, x.to(device), roi_size=window, overlap=args.overlap,
                              tta=args.tta, autocast_dtype=autocast)

    return prob_fn, channels, f"{cfg.run.name} ({'+'.join(train)}), inputs {'+'.join(channels)}"


def file_error(path: Path, err: Exception) -> str:
    """One line naming ``path`` and the fault (the type only for an unexpected exception)."""
    known = isinstance(err, (CaseError, ValueError, OSError))
    msg = " ".join((str(err) if known else f"{type(err).__name__}: {err}").split())
    return msg if str(path) in msg else f"{path}: {msg}"


def predict_file(
    args: argparse.Namespace, prob_fn: ProbFn, channels: Sequence[str], what: str
) -> int:
    """``--input`` is one NIfTI file: write ``<output>/<stem>_seg.nii.gz`` or one error line."""
    try:
        raw = single_file_case(args.input, channels[0])  # choose_channels: one modality
        path = predict_case(
            raw,
            prob_fn,
            channels,
            args.output,
            size=args.size,
            threshold=args.threshold,
            filename=f"{raw.case_id}_seg.nii.gz",
        )
    except Exception as e:  # noqa: BLE001 - any fault of the file becomes one error line
        print(f"error: {file_error(args.input, e)}", file=sys.stderr)
        return 1
    print(f"model {what}; {args.input} -> {path}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:  # first the model: its inputs say which modality files a case needs
        prob_fn, channels, what = load_predictor(args)
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if is_single_file(args.input):
        return predict_file(args, prob_fn, channels, what)
    try:
        cases, problems = discover_cases(args.input, required=channels, labels=False)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    skipped: list[tuple[str, str]] = list(problems)
    for cid, why in problems:
        print(f"skip {cid}: {why}", file=sys.stderr)
    if not cases:
        print(f"no usable case under {args.input}", file=sys.stderr)
        return 1
    print(f"model {what}; {len(cases)} case(s) -> {args.output}", file=sys.stderr)
    done = 0
    start = time.monotonic()
    for k, raw in enumerate(cases, 1):
        try:
            path = predict_case(raw, prob_fn, channels, args.output, size=args.size,
                                threshold=args.threshold)
        except Exception as e:  # noqa: BLE001 - one bad case must not stop the batch
            reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line
            skipped.append((raw.case_id, reason))
            print(f"skip {raw.case_id}: {reason}", file=sys.stderr)
            continue
        done += 1
        eta = (time.monotonic() - start) / k * (len(cases) - k)
        print(f"[{k}/{len(cases)}] {path}  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
              file=sys.stderr)
    print(f"predicted {done} case(s), skipped {len(skipped)}", file=sys.stderr)
    for cid, why in skipped:
        print(f"  skipped {cid}: {why}", file=sys.stderr)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())

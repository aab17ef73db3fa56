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
at the end, the other cases are predicted and written, and the exit status is 1. An existing
prediction is kept (and said so) unless ``--overwrite``. Another live job writing into
``--output`` refuses this one.

Usage::

    python tools/predict.py --checkpoint runs/segresnet_t2_noaug/best.pt \\
        --input raw/BraTS2021_00000 --output preds/ --modality flair --tta
    python tools/predict.py --checkpoint runs/segresnet_t2_noaug/best.pt \\
        --input scan_flair.nii.gz --output preds/ --modality flair   # preds/scan_flair_seg.nii.gz
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from data_prep.layouts import RawCase, discover_cases, single_file_case
from data_prep.loading import CaseError, load_raw_case
from data_prep.preprocess import preprocess_case
from dgseg.cli_checks import ArgumentFault, check_device, check_output_dir, check_probability
from dgseg.constants import MODALITIES
from dgseg.inference.adaptation import adapt_settings, add_adapt_arguments
from dgseg.inference.predict_case import ProbFn, load_predictor, predict_to_file
from dgseg.logging_utils import Progress
from dgseg.run_lock import RunLockError, acquire, check_free
from dgseg.training.distributed import DEVICES
from dgseg.training.precision import AMP_CHOICES, describe, resolve_amp


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Predict BraTS label maps (NIfTI, original space) for raw cases.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file (.pt)")
    p.add_argument(
        "--input",
        type=Path,
        required=True,
        help="a case folder, a dataset folder, or one NIfTI file (.nii / .nii.gz)",
    )
    p.add_argument(
        "--output",
        type=Path,
        required=True,
        help="folder for <case_id>.nii.gz (single file: <stem>_seg.nii.gz)",
    )
    p.add_argument(
        "--modality",
        choices=MODALITIES,
        default=None,
        help="feed this modality to every input channel (default: own inputs)",
    )
    p.add_argument(
        "--size",
        default="128",
        help="stored crop size as in tools/prepare_brats.py: an int or 'full'",
    )
    p.add_argument(
        "--roi",
        type=int,
        default=None,
        help="sliding-window size; default: config run.val_roi, else data.patch_size, "
        "else one window over the whole volume (sides rounded up to multiples of 16)",
    )
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--tta", action="store_true", help="8-fold flip test-time augmentation")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing predictions (default: keep)"
    )
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="bf16 autocast for the network (blending stays float32); auto: bf16 "
        "where the device has native bf16, else fp32",
    )
    add_adapt_arguments(p)
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
    if args.roi is not None and args.roi < 1:
        p.error(f"--roi must be >= 1, got {args.roi}")
    return args


def check_args(args: argparse.Namespace) -> None:
    """Values and the output folder, before the model is loaded (ArgumentFault: one line)."""
    check_probability("--threshold", args.threshold)
    check_device("--device", args.device)
    check_output_dir("--output", args.output)


def predict_case(
    raw: RawCase,
    prob_fn: ProbFn,
    channels: Sequence[str],
    out_dir: Path,
    *,
    size: Optional[int] = 128,
    threshold: float = 0.5,
    filename: str | None = None,
) -> Path:
    """Load, preprocess, segment and write one raw case; returns the written file.

    Only the modalities in ``channels`` are read: the brain box and the z-scores are theirs.
    The file is ``out_dir / filename``, by default ``<case_id>.nii.gz``.
    """
    prepared = preprocess_case(load_raw_case(raw, modalities=channels), size=size)
    return predict_to_file(
        prepared,
        prob_fn,
        channels,
        out_dir / (filename or f"{raw.case_id}.nii.gz"),
        threshold=threshold,
    )


def is_single_file(path: Path) -> bool:
    """Whether ``--input`` names one file (a NIfTI name, or any existing file) and not a folder."""
    name = path.name.lower()
    return not path.is_dir() and (path.is_file() or name.endswith((".nii", ".nii.gz")))


def device_of(choice: str) -> torch.device:
    """The ``--device`` to run on ("auto": CUDA when available)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


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
        target = args.output / f"{raw.case_id}_seg.nii.gz"
        if target.exists() and not args.overwrite:
            print(f"kept {target}: it exists (--overwrite to replace it)", file=sys.stderr)
            return 0
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
    try:
        check_args(args)
    except ArgumentFault as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            check_free(args.output, what="--output")
            lock = acquire(args.output, what="--output", take_stale=True)
        except (RunLockError, OSError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
    try:
        return run(args)
    finally:
        if lock is not None:
            lock.release()


def run(args: argparse.Namespace) -> int:
    """:func:`main` once this process holds ``--output``."""
    try:  # first the model: its inputs say which modality files a case needs
        device = device_of(args.device)
        amp, why = resolve_amp(args.amp, device)
        autocast = torch.bfloat16 if amp == "bf16" else None
        prob_fn, channels, what = load_predictor(
            args.checkpoint,
            device,
            modality=args.modality,
            single_file=is_single_file(args.input),
            roi=args.roi,
            overlap=args.overlap,
            tta=args.tta,
            autocast_dtype=autocast,
            adapt=adapt_settings(args),
        )
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    what = f"{what}; {describe(amp, why)}"  # printed with the model line, after input checks
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
    done, kept = 0, 0
    progress = Progress(len(cases), label="[predict]", unit="cases", every=0.0)
    for raw in cases:
        target = args.output / f"{raw.case_id}.nii.gz"
        if target.exists() and not args.overwrite:
            kept += 1
            progress.step(note=f"kept {target}: it exists (--overwrite to replace it)")
            continue
        try:
            path = predict_case(
                raw, prob_fn, channels, args.output, size=args.size, threshold=args.threshold
            )
        except Exception as e:  # noqa: BLE001 - one bad case must not stop the batch
            reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line
            skipped.append((raw.case_id, reason))
            print(f"skip {raw.case_id}: {reason}", file=sys.stderr)
            progress.step(note=f"skipped {raw.case_id}")
            continue
        done += 1
        progress.step(note=str(path))
    progress.close()
    print(
        f"predicted {done} case(s), skipped {len(skipped)}"
        + (f", kept {kept} existing (--overwrite to replace them)" if kept else ""),
        file=sys.stderr,
    )
    for cid, why in skipped:
        print(f"  skipped {cid}: {why}", file=sys.stderr)
    return 1 if skipped or not (done or kept) else 0


if __name__ == "__main__":
    sys.exit(main())

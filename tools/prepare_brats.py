"""Prepare BraTS-style NIfTI cases as verified HDF5 shards for dgseg.

    python tools/prepare_brats.py --input DIR --output DIR [--size 128|full] [--workers N]
        [--seed S] [--split 0.7 0.1 0.2] [--split-file FILE] [--folds K]
        [--cases-per-shard 8] [--eval-size full|same] [--verify] [--allow-skipped]

The layout is detected (BraTS 2020/2021, BraTS 2023 GLI, MSD Task01 4D, unlabelled sets) and
labels are mapped to the BraTS 2021 values. Train cases are stored at ``--size``; val and test
cases as their whole brain box (``--eval-size full``), so evaluation scores the whole brain
(``--eval-size same``: every case at ``--size``, as before). Bad cases are skipped with a one-line
reason in ``OUTPUT/skipped.json`` and in the summary; every good case is still prepared. The
exit code is 1 when a case was skipped (``--allow-skipped``: 0, for a dataset with known bad
cases), nothing was prepared, a shard could not be written, or ``--verify`` found a problem.
Re-running the same command resumes: finished shards are checked and kept.

``--split-file FILE`` (JSON ``{case_id: "train"|"val"|"test"|fold}`` or CSV ``case_id,split``)
replaces the seeded split; unknown or missing ids are refused by name before any work.
``--folds K`` writes seeded per-patient cross-validation folds of the non-test cases into the
manifest; train on fold i with ``tools/train.py --set data.fold=i``.

Without ``--input`` it generates the built-in synthetic set (12 cases of 80x80x52 voxels in the
BraTS 2021 layout, under ``OUTPUT/synthetic_source``) and prepares it at ``--size 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from data_prep.pipeline import EVAL_SIZES, prepare
from data_prep.shards import COMPRESSIONS, STORAGE_DEFAULTS
from data_prep.synthetic import write_dataset
from dgseg.atomic import atomic_write_json
from dgseg.cli_checks import ArgumentFault, check_input_dir, check_input_file, check_output_dir
from dgseg.constants import DEFAULT_DATA_ROOT
from dgseg.run_lock import RunLockError, acquire, check_free

SYNTHETIC_CASES = 12
SYNTHETIC_SHAPE = (80, 80, 52)  # a third of 240x240x155: the whole brain fits in 64^3
SYNTHETIC_SIZE = 64
SYNTHETIC_SEED = 0


def _size(text: str) -> int | str:
    if text.lower() == "full":
        return "full"
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(
            f"--size must be a positive integer or 'full', got {text!r}"
        )
    return v


def _chunks(text: str) -> str | int:
    if text in ("volume", "contiguous"):
        return text
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(
            f"--chunks must be volume, contiguous or a positive int, got {text!r}"
        )
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument(
        "--input",
        type=Path,
        default=None,
        help="raw data folder (default: generate the built-in synthetic set)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"output folder (default: {DEFAULT_DATA_ROOT}, the training default "
        "data.root; data/synthetic without --input)",
    )
    p.add_argument(
        "--size",
        type=_size,
        default=None,
        help="stored cube edge in voxels, or 'full' to keep the brain box (default 128; "
        f"{SYNTHETIC_SIZE} for the synthetic set)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=max(1, min(8, (os.cpu_count() or 2) - 1)),
        help="worker processes (default: CPUs - 1, at most 8)",
    )
    p.add_argument(
        "--eval-size",
        choices=EVAL_SIZES,
        default="full",
        help="val/test cases: 'full' = the whole brain box, so evaluation covers the "
        "whole brain (default); 'same' = cropped/padded to --size like train",
    )
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=(0.7, 0.1, 0.2),
        metavar=("TRAIN", "VAL", "TEST"),
        help="patient fractions (default 0.7 0.1 0.2)",
    )
    p.add_argument(
        "--split-file",
        type=Path,
        default=None,
        help="JSON {case_id: train|val|test|fold} or CSV 'case_id,split' replacing "
        "the seeded split",
    )
    p.add_argument(
        "--folds",
        type=_positive,
        default=None,
        help="K >= 2 cross-validation folds of the non-test patients (seeded)",
    )
    p.add_argument("--cases-per-shard", type=_positive, default=8, help="default 8")
    p.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default=STORAGE_DEFAULTS["compression"],
        help=f"image filter (default {STORAGE_DEFAULTS['compression']}; gzip = level 1 + shuffle)",
    )
    p.add_argument(
        "--chunks",
        type=_chunks,
        default=None,
        help="'contiguous' (no chunks; uncompressed only), 'volume' (one chunk per "
        f"image) or a cube edge (default {STORAGE_DEFAULTS['chunks']}; volume "
        "with a filter)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="checksum re-used shards and re-read every shard against the manifest",
    )
    p.add_argument(
        "--allow-skipped",
        action="store_true",
        help="exit 0 when cases were skipped (default: 1; the good cases are prepared either way)",
    )
    # the default since skips fail the batch; kept so that existing scripts still run
    p.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--synthetic-cases",
        type=_positive,
        default=SYNTHETIC_CASES,
        help=f"cases of the built-in set (default {SYNTHETIC_CASES})",
    )
    return p.parse_args(argv)


def synthetic_source(folder: Path, n_cases: int, *, quiet: bool = False) -> Path:
    """Generate (once) the built-in synthetic cases under ``folder``; return it."""
    marker = folder / ".complete.json"
    want = {
        "n_cases": n_cases,
        "shape": list(SYNTHETIC_SHAPE),
        "seed": SYNTHETIC_SEED,
        "layout": "brats2021",
    }
    try:
        if json.loads(marker.read_text()) == want:
            return folder  # already there: same files, same mtimes, so shards are re-used
    except (OSError, ValueError):
        pass
    if not quiet:
        print(
            f"generating {n_cases} synthetic cases {SYNTHETIC_SHAPE} in {folder}", file=sys.stderr
        )
    write_dataset(
        folder,
        n_cases,
        shape=SYNTHETIC_SHAPE,
        seed=SYNTHETIC_SEED,
        layout="brats2021",
        workers=max(1, min(4, os.cpu_count() or 1)),
    )
    atomic_write_json(marker, want)
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    size = None if args.size == "full" else args.size
    try:  # paths and values before any case is read
        output = args.output or Path("data/synthetic" if args.input is None else DEFAULT_DATA_ROOT)
        check_output_dir("--output", output)
        if args.input is not None:
            check_input_dir("--input", args.input)
        if args.split_file is not None:
            check_input_file("--split-file", args.split_file)
    except ArgumentFault as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # one preparation per output folder (a stale lock of a killed one is taken over)
        check_free(output, what="--output")
        lock = acquire(output, what="--output", take_stale=True)
    except (RunLockError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        return _prepare(args, output, size)
    finally:
        lock.release()


def _prepare(args: argparse.Namespace, output: Path, size: int | None) -> int:
    """:func:`main` once this process holds ``output``."""
    if args.input is None:
        source = synthetic_source(
            output / "synthetic_source", args.synthetic_cases, quiet=args.quiet
        )
        size = SYNTHETIC_SIZE if args.size is None else size
    else:
        source = args.input
        size = 128 if args.size is None else size
        if not source.is_dir():
            print(f"error: --input {source} is not a folder", file=sys.stderr)
            return 2
    try:
        res = prepare(
            source,
            output,
            size=size,
            workers=args.workers,
            seed=args.seed,
            split=args.split,
            cases_per_shard=args.cases_per_shard,
            compression=args.compression,
            chunks=args.chunks,
            verify=args.verify,
            allow_skipped=args.allow_skipped,
            progress=not args.quiet,
            split_file=args.split_file,
            folds=args.folds,
            eval_size=args.eval_size,
        )
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(res.summary())
    return res.exit_code


if __name__ == "__main__":
    sys.exit(main())

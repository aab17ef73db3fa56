"""Write synthetic BraTS-like cases (``data_prep.synthetic``) in a BraTS or MSD folder layout.

Examples::

    python tools/make_synthetic_brats.py --output data/synthetic --n-cases 20 --workers 2
    python tools/make_synthetic_brats.py --output data/tiny --n-cases 3 --shape 40 40 40 \\
        --layout brats2023
    python tools/make_synthetic_brats.py --output data/syn --n-cases 4 \\
        --montage docs/synthetic_montage.png

Case ``i`` depends only on ``(--seed, i)``: ``--workers`` and ``--start-index`` (to add cases to
an existing folder) never change a case.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_prep.synthetic import LAYOUTS, case_seed, make_case, save_montage, write_dataset
from dgseg.cli_checks import ArgumentFault, check_at_least, check_output_dir, check_output_file
from dgseg.logging_utils import Progress, format_eta


class _Report:
    """``write_dataset``'s progress callback as a :class:`dgseg.logging_utils.Progress` line."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.start = time.monotonic()

    def __call__(self, done: int, total: int, case_id: str) -> None:
        if self.bar is None:
            self.bar = Progress(total, label="synthetic", unit="cases")
        self.bar.step(done - self.bar.done, note=f"last {case_id}")
        if done == total:
            self.bar.close()
            print(f"done in {format_eta(time.monotonic() - self.start)}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, type=Path, help="folder to write the cases into")
    p.add_argument("--n-cases", type=int, default=8, help="number of cases (default 8)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(240, 240, 155),
        metavar=("X", "Y", "Z"),
        help="volume size (default 240 240 155, the BraTS size)",
    )
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="brats2021",
        help="folder layout and label convention (default brats2021)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--start-index", type=int, default=0, help="global index of the first case")
    p.add_argument(
        "--montage",
        type=Path,
        default=None,
        help="also write a PNG montage of the first (up to 4) cases (needs matplotlib)",
    )
    args = p.parse_args(argv)
    try:
        check_at_least("--n-cases", args.n_cases, 1)
        check_at_least("--workers", args.workers, 1)
        check_at_least("--seed", args.seed, 0)
        check_at_least("--start-index", args.start_index, 0)
        check_output_dir("--output", args.output)
        if args.montage is not None:
            check_output_file("--montage", args.montage)
    except ArgumentFault as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ids = write_dataset(
            args.output,
            args.n_cases,
            shape=args.shape,
            seed=args.seed,
            layout=args.layout,
            workers=args.workers,
            start_index=args.start_index,
            progress=_Report(),
        )
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"wrote {len(ids)} cases ({args.layout}) to {args.output}")
    if args.montage is not None and ids:
        # Re-draw rather than re-read: the montage works for every layout, MSD included.
        first = range(args.start_index, args.start_index + min(4, len(ids)))
        cases = [make_case(args.shape, seed=case_seed(args.seed, i)) for i in first]
        try:
            save_montage(cases, args.montage)
        except ImportError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"montage: {args.montage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

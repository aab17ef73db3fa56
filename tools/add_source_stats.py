"""Store the source statistics of test-time adaptation in checkpoints trained before they were.

    python tools/add_source_stats.py --checkpoint runs/x/last.pt [runs/x/best.pt ...] \\
        [--data DIR]

From each checkpoint's own config (training modalities, fold) and the training split of
``--data`` (default: the checkpoint's ``data.root``), computes the region prior and the brain
intensity quantiles (``dgseg.inference.source_stats``) that ``--adapt prior`` and ``--adapt
match`` of tools/evaluate.py and tools/predict.py read, and writes them into the checkpoint
(atomically; the weights are untouched). Training stores them itself (``dgseg.training.fit``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from dgseg.config import Config
from dgseg.inference.source_stats import attach_source_stats, compute_source_stats
from dgseg.training.checkpoint import load_checkpoint


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", type=Path, required=True, help="checkpoint(s)")
    p.add_argument("--data", type=Path, default=None, help="prepared shards (default: data.root)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    for path in args.checkpoint:
        try:
            state = load_checkpoint(path)
            if not isinstance(state.get("config"), dict):
                raise ValueError(f"{path}: no 'config' dict: not a dgseg checkpoint")
            d = Config.from_dict(state["config"]).data
            stats = compute_source_stats(args.data or d.root, d.modalities, fold=d.fold)
            attach_source_stats(path, stats)
        except (OSError, ValueError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
        prior = ", ".join(f"{r} {v:.4f}" for r, v in zip(("WT", "TC", "ET"), stats["region_prior"]))
        print(f"{path}: {stats['n_cases']} training case(s); region prior {prior}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

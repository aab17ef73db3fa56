"""Train a segmentation network on one source modality (one preset per experiment of the write-up).

    torchrun --nproc_per_node=N tools/train.py --preset NAME [--data DIR] [--out DIR]
                                               [--set section.field=value ...] [--resume]
    python tools/train.py --preset NAME ...          # one process, no process group
    python tools/train.py --list-presets             # every preset, one line each

The fit loop lives in :mod:`dgseg.training.fit`.
"""

import sys

from dgseg.training.fit import run_cli

if __name__ == "__main__":
    sys.exit(run_cli())

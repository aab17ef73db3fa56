"""Shared constants of the raw and prepared test sets (fixtures ``raw_sets`` and ``prepared_sets``
in conftest.py): used by the data_prep tests."""

from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (40, 44, 36)  # non-cubic: an axis mix-up changes results
SIZE = 24  # smaller than the brain box: exercises the crop
# Regions written in each source convention (docs/SPEC.md "Labels"), independent of the code.
REGIONS_IN_SOURCE = {
    "brats2021": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "brats2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "msd": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
}
SEG_NAME = {
    "brats2021": "{id}/{id}_seg.nii.gz",
    "brats2023": "{id}/{id}-seg.nii.gz",
    "msd": "labelsTr/{id}.nii.gz",
}


def read_nifti(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)

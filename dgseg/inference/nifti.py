"""Writing NIfTI-1 files: predicted label maps (``dgseg.inference.predict_case``) and synthetic
cases
(``data_prep.synthetic``). Reading raw cases, with their checks, is ``data_prep.loading``'s.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Union

import nibabel as nib
import numpy as np

from dgseg.atomic import atomic_write_bytes

__all__ = ["nifti_bytes", "write_nifti"]

PathLike = Union[str, "os.PathLike[str]"]


def nifti_bytes(
    array: np.ndarray, affine: Optional[np.ndarray] = None, *, compresslevel: int = 6
) -> bytes:
    """A gzip-compressed NIfTI-1 file of ``array`` in its own dtype, byte-reproducible.

    ``affine`` (default identity, 1 mm voxels) is stored as qform and sform with code 1 (scanner
    coordinates, as BraTS images carry), units mm; the gzip header has mtime 0, so the same array
    always gives the same bytes.
    """
    array = np.asarray(array)
    affine = np.eye(4) if affine is None else np.asarray(affine, np.float64)
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0)


def write_nifti(
    path: PathLike,
    array: np.ndarray,
    affine: Optional[np.ndarray] = None,
    *,
    compresslevel: int = 6,
) -> Path:
    """Write :func:`nifti_bytes` of ``array`` to ``path`` (``.nii.gz``) atomically."""
    return atomic_write_bytes(path, nifti_bytes(array, affine, compresslevel=compresslevel))

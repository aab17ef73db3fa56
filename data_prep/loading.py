"""Load and check one raw case (NIfTI, via nibabel) and map its labels to the BraTS 2021 values.

Checks, each failing with a one-line :class:`CaseError` that names the file and the fault:
readable and complete (``.nii.gz`` decompressed in one go, so truncation is caught here), 3D where
3D is expected (MSD: 4D with 4 channels), equal shapes and affines (``AFFINE_ATOL`` mm) over the
modalities and the label, finite voxels, no all-zero modality, integer labels with values the
layout's convention defines (``dgseg.constants.LABEL_CONVENTIONS``; BraTS 2023 3->4, MSD 1->2,
2->1, 3->4).

Each file is read once: its bytes feed both the SHA-256 recorded in the manifest and the
decompression, so checksumming costs no extra I/O.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from dgseg.constants import LABEL_CONVENTIONS, MODALITIES

from .layouts import MSD_DEFAULT_ORDER, RawCase

__all__ = [
    "CaseError",
    "LoadedCase",
    "load_raw_case",
    "read_nifti",
    "gunzip",
    "AFFINE_ATOL",
]

# Largest allowed difference (mm, any affine entry) between the files of one case.
AFFINE_ATOL = 1e-3


class CaseError(Exception):
    """A case that cannot be prepared; ``str(err)`` is a one-line reason."""


@dataclass
class LoadedCase:
    """A checked raw case in memory.

    Attributes:
        case_id: the case id.
        images: (M, X, Y, Z), one image per entry of ``modalities``, float32 unless
            ``load_raw_case(dtype=None)`` kept the files' own type (int16 for BraTS); with
            ``stack=False`` a tuple of M (X, Y, Z) arrays.
        label: (X, Y, Z) uint8 in BraTS 2021 values, or None for an unlabelled case.
        affine: (4, 4) voxel-to-world matrix of the first modality.
        spacing: voxel size in mm (3,).
        source_sha256: file role ("t1", ..., "4d", "seg") -> SHA-256 hex of the file's bytes.
        modalities: the modality of each image, in ``MODALITIES`` order (all four by default).
    """

    case_id: str
    images: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source_sha256: dict[str, str]
    modalities: tuple[str, ...] = MODALITIES


def gunzip(raw: bytes) -> bytes:
    """Decompress a whole ``.gz`` buffer in one call; truncation or a bad CRC raises."""
    d = zlib.decompressobj(47)  # 32 + 15: gzip header, checks CRC32 and length
    out = d.decompress(raw)
    if not d.eof:
        raise EOFError("compressed data ended before the end-of-stream marker")
    if d.unused_data:  # several gzip members (legal, rare): let gzip walk them
        out = gzip.decompress(raw)
    return out


def read_nifti(path: Path, *, name: str | None = None) -> tuple[np.ndarray, nib.Nifti1Image, str]:
    """Read a ``.nii`` / ``.nii.gz`` file: (array, image header holder, SHA-256 of the bytes).

    The array is a read-only view of the decompressed buffer in the file's (Fortran) order and
    dtype, scaled by the header's slope / intercept when they are not identity (as nibabel's
    ``np.asanyarray(img.dataobj)``, minus one full-volume copy).

    Raises:
        CaseError: unreadable, truncated or corrupt file.
    """
    label = name or path.name
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CaseError(f"{label}: cannot read file ({e.strerror or e})") from None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        if raw[:2] == b"\x1f\x8b":  # gzip magic
            raw = gunzip(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise CaseError(f"{label}: truncated or corrupt gzip ({type(e).__name__}: {e})") from None
    img = None
    errors = []
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            img = cls.from_bytes(raw)
            break
        except Exception as e:  # nibabel raises several types for a bad header
            errors.append(f"{type(e).__name__}: {e}")
    if img is None:
        raise CaseError(f"{label}: not a NIfTI file ({errors[0]})")
    proxy = img.dataobj
    try:
        shape = tuple(int(s) for s in proxy.shape)
        count = int(np.prod(shape))
        arr = np.frombuffer(raw, dtype=proxy.dtype, count=count, offset=int(proxy.offset))
        arr = arr.reshape(shape, order=proxy.order)  # (X, Y, Z[, C]) view, no copy
        slope, inter = proxy.slope, proxy.inter
        if slope != 1 or inter != 0:
            arr = nib.volumeutils.apply_read_scaling(arr, slope, inter)
    except ValueError as e:  # buffer shorter than the header promises
        raise CaseError(f"{label}: truncated voxel data ({e})") from None
    except Exception as e:  # an unusual proxy: take nibabel's general path
        try:
            arr = np.asanyarray(proxy)
        except Exception:
            raise CaseError(f"{label}: cannot read voxel data ({type(e).__name__}: {e})") from None
    return arr, img, digest


def _squeeze3(arr: np.ndarray, what: str) -> np.ndarray:
    """Drop trailing singleton axes beyond the third; fail when the image is not 3D."""
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise CaseError(f"{what}: expected a 3D image, got shape {tuple(arr.shape)}")
    return arr


def _check_geometry(ref_name: str, ref_shape, ref_aff, name: str, shape, aff) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise CaseError(f"shape mismatch: {ref_name} {tuple(ref_shape)} vs {name} {tuple(shape)}")
    diff = float(np.max(np.abs(np.asarray(aff) - np.asarray(ref_aff))))
    if not np.isfinite(diff) or diff > AFFINE_ATOL:
        raise CaseError(
            f"affine mismatch: {ref_name} vs {name} differ by {diff:.4g} "
            f"(tolerance {AFFINE_ATOL} mm)"
        )


def _check_finite(arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind in "fc":  # integer data is finite by construction
        finite = np.isfinite(arr)
        if not finite.all():
            raise CaseError(f"{what}: {int(arr.size - finite.sum())} non-finite (NaN/inf) voxels")


def _convert_label(lab: np.ndarray, convention: str, what: str) -> np.ndarray:
    """Map ``lab`` to BraTS 2021 uint8 values; CaseError naming unknown values."""
    table = LABEL_CONVENTIONS[convention]
    if lab.dtype.kind == "b" or lab.dtype.kind not in "iuf":
        raise CaseError(f"{what}: label dtype {lab.dtype} is not numeric")
    if lab.dtype.kind == "f":
        _check_finite(lab, what)
        if not np.array_equal(lab, np.round(lab)):
            raise CaseError(f"{what}: label map holds non-integer values")
    lo, hi = (lab.min(), lab.max()) if lab.size else (0, 0)
    if lo < 0 or hi > 255:
        bad = sorted({int(v) for v in (lo, hi) if v < 0 or v > 255})
        raise CaseError(
            f"{what}: unknown label values {bad} for the {convention} convention "
            f"(allowed {sorted(table)})"
        )
    lab8 = lab if lab.dtype == np.uint8 else lab.astype(np.uint8)  # order kept (Fortran)
    counts = np.bincount(lab8.reshape(-1, order="A"), minlength=256)  # no copy; np.unique sorts
    bad = [v for v in np.flatnonzero(counts).tolist() if v not in table]
    if bad:
        raise CaseError(
            f"{what}: unknown label values {bad} for the {convention} convention "
            f"(allowed {sorted(table)})"
        )
    if all(k == v for k, v in table.items()):
        return lab8
    lut = np.zeros(256, np.uint8)
    for src, dst in table.items():
        lut[src] = dst
    return lut[lab8.T].T  # (X, Y, Z) uint8; through .T so a Fortran array is read in order


def load_raw_case(
    raw: RawCase,
    *,
    dtype: np.dtype | None = np.float32,
    stack: bool = True,
    modalities: Sequence[str] = MODALITIES,
) -> LoadedCase:
    """Load, check and label-normalise one case.

    Args:
        raw: a case from :func:`data_prep.layouts.discover_cases`.
        dtype: image dtype of the result; None keeps the files' type.
        stack: True gives ``images`` as one (M, X, Y, Z) array; False leaves a tuple of M
            read-only (X, Y, Z) views of the decompressed files (``dtype`` then ignored), which
            saves two full-volume copies when the caller crops first, as the preprocessing does.
        modalities: the modalities to read (``MODALITIES`` names, loaded in ``MODALITIES``
            order); the files of the others are not opened. Prediction reads only its inputs.

    Raises:
        CaseError: any fault of the input, one line naming the file.
        ValueError: a bad ``modalities``.
    """
    if not modalities or any(m not in MODALITIES for m in modalities):
        raise ValueError(f"modalities must be names from {MODALITIES}, got {tuple(modalities)}")
    modalities = tuple(m for m in MODALITIES if m in modalities)  # canonical order, no repeats
    sha: dict[str, str] = {}
    arrays: list[np.ndarray] = []
    if "4d" in raw.files:  # MSD: one (X, Y, Z, 4) file
        path = raw.files["4d"]
        name = raw.rel(path)
        arr, img, sha["4d"] = read_nifti(path, name=name)
        if arr.ndim != 4 or arr.shape[3] != len(MODALITIES):
            raise CaseError(
                f"{name}: expected a 4D image with {len(MODALITIES)} channels, got "
                f"shape {tuple(arr.shape)}"
            )
        order = raw.channel_order or MSD_DEFAULT_ORDER
        arrays = [arr[..., order.index(m)] for m in modalities]  # (X, Y, Z) views
        ref_name, ref_aff = name, img.affine
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    else:
        ref_name = ref_aff = spacing = None
        for m in modalities:
            if m not in raw.files:
                raise CaseError(f"{raw.case_id}: no {m} file")
            path = raw.files[m]
            name = raw.rel(path)
            arr, img, sha[m] = read_nifti(path, name=name)
            arr = _squeeze3(arr, name)
            if ref_name is None:
                ref_name, ref_aff, ref_shape = name, img.affine, arr.shape
                spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
            else:
                _check_geometry(ref_name, ref_shape, ref_aff, name, arr.shape, img.affine)
            arrays.append(arr)
    shape = arrays[0].shape

    for m, arr in zip(modalities, arrays):
        what = f"{raw.case_id} {m}" if "4d" in raw.files else raw.rel(raw.files[m])  # the file
        _check_finite(arr, what)
        if not arr.any():
            raise CaseError(f"{what}: image is all zero (no brain)")

    label = None
    if raw.label_file is not None:
        name = raw.rel(raw.label_file)
        lab, img, sha["seg"] = read_nifti(raw.label_file, name=name)
        lab = _squeeze3(lab, name)
        _check_geometry(ref_name, shape, ref_aff, name, lab.shape, img.affine)
        label = _convert_label(lab, raw.label_convention or "brats2021", name)

    if stack:
        out_dtype = np.result_type(*arrays) if dtype is None else np.dtype(dtype)
        images = np.empty((len(arrays), *shape), dtype=out_dtype)  # (M, X, Y, Z)
        for i, arr in enumerate(arrays):
            images[i] = arr
    else:
        images = tuple(arrays)
    return LoadedCase(
        case_id=raw.case_id,
        images=images,
        label=label,
        affine=np.asarray(ref_aff, dtype=np.float64),
        spacing=spacing,
        source_sha256=sha,
        modalities=modalities,
    )

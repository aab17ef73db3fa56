"""Synthetic BraTS-like cases: seeded numpy generator and writers for the BraTS/MSD layouts.

Real BraTS (Menze et al., IEEE TMI 2015; Baid et al., arXiv:2107.02314) cannot be downloaded
everywhere, so this module draws look-alike cases that exercise the whole pipeline: a skull-
stripped brain (cortex with sulci, white matter, deep grey matter, ventricles, outer CSF) holding
a glioma-like lesion (necrosis in an enhancing rim in irregular edema, mass effect), rendered in
T1, T1CE, T2 and FLAIR with MRI-like tissue contrast, a smooth multiplicative bias field, Rician
noise |I + sigma (n1 + i n2)| and a different intensity scale per case. The geometry lives in
``synthetic_anatomy``; this module holds the contrast model, the file writers and a montage.

Label conventions written (docs/SPEC.md "Labels"): BraTS 2020/2021 {1 necrotic/non-enhancing core,
2 edema, 4 enhancing}; BraTS 2023 GLI 4 -> 3; MSD Task01 {1 edema, 2 non-enhancing, 3 enhancing}.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np

from data_prep.layouts import MSD_DEFAULT_ORDER
from data_prep.synthetic_anatomy import TISSUES, TUMOUR, build_anatomy, build_tumour, smooth_noise
from dgseg.atomic import atomic_write_bytes, atomic_write_text
from dgseg.constants import LABEL_CONVENTIONS, MODALITIES
from dgseg.inference.nifti import nifti_bytes
from dgseg.viz import save_montage as viz_montage

__all__ = [
    "LAYOUTS",
    "CONTRAST",
    "make_case",
    "case_seed",
    "case_id_for",
    "write_case",
    "write_dataset",
    "save_montage",
]

LAYOUTS = ("brats2021", "brats2020", "brats2023", "msd", "unlabelled")

# Mean intensity per tissue and modality, relative to T1 white matter (~1). Orderings follow
# clinical MRI: T1 WM > GM > CSF, tumour dark; T1CE adds a bright enhancing rim; T2 CSF > GM > WM
# with bright edema and fluid-filled necrosis; FLAIR is T2 with CSF suppressed, edema brightest.
CONTRAST = {
    #          csf   gm    wm    deep   edema  enh   necr  non-enh
    "t1": (0.28, 0.60, 0.92, 0.78, 0.55, 0.62, 0.34, 0.48),
    "t1ce": (0.30, 0.62, 0.90, 0.77, 0.57, 1.45, 0.35, 0.50),
    "t2": (1.00, 0.58, 0.40, 0.47, 0.90, 0.66, 0.95, 0.76),
    "flair": (0.14, 0.62, 0.47, 0.53, 1.00, 0.78, 0.42, 0.86),
}
_TISSUE_ORDER = ("csf", "gm", "wm", "deep_gm")
_SEG_OF_TUMOUR = {"edema": 2, "enhancing": 4, "necrosis": 1, "non_enhancing": 1}
# File names per layout: modality -> file tag, and the separator before the tag.
_TAGS = {
    "brats2021": ({"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, "_"),
    "brats2020": ({"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, "_"),
    "unlabelled": ({"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, "_"),
    "brats2023": ({"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}, "-"),
}
_MIN_SIZE = 16


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < _MIN_SIZE:
        raise ValueError(f"shape must be 3 sizes >= {_MIN_SIZE}, got {shape}")
    return shape


def _binomial_blur(img: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 along each axis (edge replicated): the partial-volume point spread."""
    for ax in range(3):
        if img.shape[ax] < 3:
            continue
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        out = img * np.float32(0.5)
        out[tuple(hi)] += np.float32(0.25) * img[tuple(lo)]  # left neighbour
        out[tuple(lo)] += np.float32(0.25) * img[tuple(hi)]  # right neighbour
        first, last = [slice(None)] * 3, [slice(None)] * 3
        first[ax], last[ax] = slice(0, 1), slice(-1, None)
        out[tuple(first)] += np.float32(0.25) * img[tuple(first)]
        out[tuple(last)] += np.float32(0.25) * img[tuple(last)]
        img = out
    return img


def _render(rng, grid, tissue, classes, strength) -> dict[str, np.ndarray]:
    """Intensity images (int16, on ``grid``) from tissue and tumour class maps."""
    fg = tissue != TISSUES["background"]
    n_fg = int(fg.sum())
    texture = 1.0 + 0.035 * smooth_noise(rng, grid, 5.0)  # shared tissue microstructure
    hetero = smooth_noise(rng, grid, 4.0)  # tumour heterogeneity
    edema = classes == TUMOUR["edema"]
    a = strength[edema]
    out = {}
    for mod in MODALITIES:
        values = np.asarray(CONTRAST[mod], np.float32) * rng.uniform(0.95, 1.05, 8).astype(
            np.float32
        )  # per-case contrast jitter
        lut = np.zeros(256, np.float32)
        for name, v in zip(_TISSUE_ORDER, values[:4]):
            lut[TISSUES[name]] = v
        img = lut[tissue]
        img[edema] = (1.0 - a) * img[edema] + a * values[4]  # edema blends into its tissue
        for k, name in ((5, "enhancing"), (6, "necrosis"), (7, "non_enhancing")):
            m = classes == TUMOUR[name]
            amp = 0.2 if (mod == "t1ce" and name == "enhancing") else 0.1
            img[m] = values[k] * (1.0 + amp * hetero[m])
        img *= texture
        img = _binomial_blur(img)
        img *= np.exp(rng.uniform(0.03, 0.1) * smooth_noise(rng, grid, 100.0))  # bias field
        scale = np.exp(rng.uniform(np.log(250.0), np.log(2500.0)))  # scanner scale per case
        img *= np.float32(scale)
        sigma = np.float32(rng.uniform(0.02, 0.05) * scale)  # 2-5% of T1 white matter
        noise = rng.standard_normal((2, n_fg), dtype=np.float32) * sigma
        mag = np.sqrt((img[fg] + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude
        vol = np.zeros(grid.shape, np.int16)
        vol[fg] = np.clip(np.rint(mag), 1, 32767)  # brain stays nonzero, background exactly 0
        out[mod] = vol
    return out


def make_case(
    shape: Sequence[int] = (240, 240, 155),
    *,
    seed: int,
    with_enhancing: bool | None = None,
    return_maps: bool = False,
):
    """Draw one synthetic case.

    Args:
        shape: volume size (x, y, z); the brain always fills a 240x240x155 mm box.
        seed: non-negative integer; the case is a pure function of (shape, seed, with_enhancing).
        with_enhancing: True/False forces an enhancing rim or a purely non-enhancing core; None
            draws it (80% enhancing).
        return_maps: also return ``{"tissue": uint8, "tumour": uint8}`` full-size class maps
            (``synthetic_anatomy.TISSUES`` / ``TUMOUR``), for tests and figures.

    Returns:
        ``(images, seg)``: ``images`` maps each of ``MODALITIES`` to an int16 array of ``shape``
        (background exactly 0, brain >= 1); ``seg`` is uint8 in BraTS 2021 values {0, 1, 2, 4}.
        With ``return_maps`` a third element holds the class maps.
    """
    shape = _check_shape(shape)
    if with_enhancing is not None and not isinstance(with_enhancing, (bool, np.bool_)):
        raise ValueError(f"with_enhancing must be None, True or False, got {with_enhancing!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    anat = build_anatomy(rng, shape)
    tumour = build_tumour(rng, anat, with_enhancing)
    grid = anat.grid
    small = _render(rng, grid, tumour.tissue, tumour.classes, tumour.strength)
    box = tuple(slice(grid.lo[k], grid.lo[k] + grid.shape[k]) for k in range(3))
    images = {}
    for mod in MODALITIES:
        images[mod] = np.zeros(shape, np.int16)
        images[mod][box] = small[mod]
    seg = np.zeros(shape, np.uint8)
    seg_lut = np.zeros(256, np.uint8)
    for name, value in _SEG_OF_TUMOUR.items():
        seg_lut[TUMOUR[name]] = value
    seg[box] = seg_lut[tumour.classes]
    if not return_maps:
        return images, seg
    maps = {"tissue": np.zeros(shape, np.uint8), "tumour": np.zeros(shape, np.uint8)}
    maps["tissue"][box] = tumour.tissue
    maps["tumour"][box] = tumour.classes
    return images, seg, maps


def case_seed(seed: int, index: int) -> int:
    """Seed of the case with global ``index`` in a dataset drawn with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def case_id_for(layout: str, index: int) -> str:
    """Case id (folder / file stem) of global case ``index`` (0-based) in ``layout``."""
    if layout in ("brats2021", "unlabelled"):
        return f"BraTS2021_{index:05d}"
    if layout == "brats2020":
        return f"BraTS20_Training_{index + 1:03d}"  # the 2020 release counts from 001
    if layout == "brats2023":
        return f"BraTS-GLI-{index:05d}-000"
    if layout == "msd":
        return f"BRATS_{index + 1:03d}"
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _nifti_bytes(arr: np.ndarray) -> bytes:
    """A gzip-compressed NIfTI-1 file of ``arr`` with a 1 mm identity affine, byte-reproducible."""
    return nifti_bytes(arr, compresslevel=1)  # level 1 like nibabel's default


def _in_convention(seg: np.ndarray, convention: str) -> np.ndarray:
    """A BraTS 2021 label map (uint8) in the values of ``convention`` (the inverse table)."""
    lut = np.zeros(256, np.uint8)
    for src, dst in LABEL_CONVENTIONS[convention].items():
        lut[dst] = src
    return lut[seg]


def write_case(out_dir, layout: str, index: int, images: dict, seg: np.ndarray | None) -> str:
    """Write one case in ``layout`` under ``out_dir`` (each file atomically); return its id."""
    out_dir = Path(out_dir)
    cid = case_id_for(layout, index)
    if layout == "msd":
        stack = np.stack([images[m] for m in MSD_DEFAULT_ORDER], axis=-1)  # (X, Y, Z, 4)
        atomic_write_bytes(out_dir / "imagesTr" / f"{cid}.nii.gz", _nifti_bytes(stack))
        label = _in_convention(seg, "msd")  # necrotic/non-enh 2, edema 1, enhancing 3
        atomic_write_bytes(out_dir / "labelsTr" / f"{cid}.nii.gz", _nifti_bytes(label))
        return cid
    tags, sep = _TAGS[layout]
    folder = out_dir / cid
    for mod in MODALITIES:
        atomic_write_bytes(folder / f"{cid}{sep}{tags[mod]}.nii.gz", _nifti_bytes(images[mod]))
    if layout != "unlabelled" and seg is not None:
        label = _in_convention(seg, "brats2023") if layout == "brats2023" else seg
        atomic_write_bytes(folder / f"{cid}{sep}seg.nii.gz", _nifti_bytes(label))
    return cid


def _make_and_write(out_dir: str, layout: str, index: int, shape, seed: int) -> str:
    images, seg = make_case(shape, seed=case_seed(seed, index))
    return write_case(out_dir, layout, index, images, seg)


def _write_msd_json(out_dir: Path) -> None:
    """``dataset.json`` of MSD Task01 listing every case present in ``imagesTr``."""
    names = sorted(p.name for p in (out_dir / "imagesTr").glob("BRATS_*.nii.gz"))
    meta = {
        "name": "BRATS",
        "description": "Synthetic BraTS-like cases (dgseg data_prep.synthetic)",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {
            "0": "background",
            "1": "edema",
            "2": "non-enhancing tumor",
            "3": "enhancing tumour",
        },
        "numTraining": len(names),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "test": [],
    }
    atomic_write_text(out_dir / "dataset.json", json.dumps(meta, indent=4) + "\n")


def write_dataset(
    out_dir,
    n_cases: int,
    *,
    shape: Sequence[int] = (240, 240, 155),
    seed: int = 0,
    layout: str = "brats2021",
    workers: int = 1,
    start_index: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[str]:
    """Write cases ``start_index .. start_index + n_cases - 1`` in ``layout``; return their ids.

    Case ``i`` is drawn with ``case_seed(seed, i)``, so a case is the same whatever ``workers``
    and however the dataset is split into runs. ``progress(done, total, case_id)`` is called in
    this process after each case.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, value, least in (
        ("n_cases", n_cases, 0),
        ("workers", workers, 1),
        ("start_index", start_index, 0),
        ("seed", seed, 0),
    ):
        if int(value) != value or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    shape = _check_shape(shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    indices = range(int(start_index), int(start_index) + int(n_cases))
    ids: dict[int, str] = {}
    if workers == 1 or len(indices) <= 1:
        for i in indices:
            ids[i] = _make_and_write(str(out), layout, i, shape, seed)
            if progress:
                progress(len(ids), len(indices), ids[i])
    else:
        # spawn: no forked copies of the caller's threads (torch, BLAS) in the workers
        with ProcessPoolExecutor(min(workers, len(indices)), mp_context=get_context("spawn")) as ex:
            futures = {
                ex.submit(_make_and_write, str(out), layout, i, shape, seed): i for i in indices
            }
            for fut in as_completed(futures):
                ids[futures[fut]] = fut.result()
                if progress:
                    progress(len(ids), len(indices), ids[futures[fut]])
    if layout == "msd":
        _write_msd_json(out)
    return [ids[i] for i in indices]


def _read_case_dir(folder: Path) -> tuple[dict, np.ndarray | None]:
    """Images and 2021-valued label of a BraTS 2020/2021/2023 case folder (for the montage)."""
    images, seg = {}, None
    for mod in MODALITIES:
        hits = [
            p
            for layout in ("brats2021", "brats2023")
            for p in folder.glob(f"*{_TAGS[layout][1]}{_TAGS[layout][0][mod]}.nii.gz")
        ]
        if not hits:
            raise ValueError(f"no {mod} image in {folder}")
        images[mod] = np.asarray(nib.load(hits[0]).dataobj)
    seg_files = list(folder.glob("*seg.nii.gz"))
    if seg_files:
        seg = np.asarray(nib.load(seg_files[0]).dataobj).astype(np.uint8)
        if "-seg" in seg_files[0].name:  # BraTS 2023: enhancing is 3
            seg[seg == 3] = 4
    return images, seg


def save_montage(cases, path, *, dpi: int = 80) -> None:
    """PNG montage of synthetic cases (``dgseg.viz.save_montage``): one axial slice per case x
    modality, plus the labels.

    Args:
        cases: case folders (BraTS 2020/2021/2023 layouts) or ``(images, seg)`` pairs as
            returned by :func:`make_case`.
        path: output PNG, written atomically.
        dpi: resolution; each panel is 2 inches wide.

    Needs matplotlib (``pip install dgseg[viz]``).
    """
    loaded = [_read_case_dir(Path(c)) if isinstance(c, (str, os.PathLike)) else c for c in cases]
    viz_montage(loaded, path, dpi=dpi)

"""Data-path benchmarks: shard storage options, loader vs NIfTI.gz, preparation vs decompression.

Each function returns a plain dict (seconds, rates, ratios, sizes) for ``tools/benchmark.py``.
``work_dir`` is where temporary files go (a temporary folder inside it, removed afterwards).
Without ``input_dir`` they generate synthetic BraTS-2021-layout cases (default full size
240x240x155) there; with it they use its first ``n_cases`` usable cases. Timings are medians of
wall-clock runs; the page cache is warm (the files were just written), which is the steady state
of a training run whose data fit in memory.

* :func:`bench_storage` -- write/read time and file size of one shard per storage option
  (uncompressed contiguous / one chunk per volume / 64^3 chunks, lzf + shuffle, gzip-1 + shuffle);
  reads of one modality, of all four, and of a random patch. Source of the defaults in
  ``data_prep.shards.STORAGE_DEFAULTS``.
* :func:`bench_loader` -- ``ShardDataset`` samples/s vs loading the same cases from ``.nii.gz``
  (nibabel) and cropping / z-scoring them, both followed by the same transforms (goal >= 10x).
* :func:`bench_prepare` -- preparation seconds per case (load, check, crop, z-score, write) vs the
  bare time to read and decompress its five files (goal <= 1.5x).
"""

from __future__ import annotations

import gzip
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import h5py
import nibabel as nib
import numpy as np
import torch

from dgseg.constants import MODALITIES
from dgseg.data.dataset import ShardDataset, augment, region_channels
from dgseg.data.window import crop_window
from dgseg.transforms.labels import convert_labels

from .layouts import discover_cases
from .loading import load_raw_case
from .pipeline import prepare
from .preprocess import brain_bbox, preprocess_case, zscore_nonzero
from .shards import STORAGE_DEFAULTS, ShardWriter
from .synthetic import write_dataset

__all__ = ["bench_storage", "bench_loader", "bench_prepare", "STORAGE_VARIANTS"]

# (name, compression, chunks) of bench_storage.
STORAGE_VARIANTS = (
    ("none/contiguous", "none", "contiguous"),
    ("none/volume", "none", "volume"),
    ("none/64", "none", 64),
    ("lzf/volume", "lzf", "volume"),
    ("lzf/64", "lzf", 64),
    ("gzip1/volume", "gzip", "volume"),
    ("gzip1/64", "gzip", 64),
)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _raw_cases(input_dir, work: Path, n_cases: int, shape: Sequence[int], seed: int):
    """Discovered cases of ``input_dir``, or freshly generated synthetic ones."""
    if input_dir is None:
        input_dir = work / "raw"
        write_dataset(input_dir, n_cases, shape=tuple(shape), seed=seed, layout="brats2021")
    cases, _ = discover_cases(input_dir)
    if not cases:
        raise ValueError(f"no usable cases in {input_dir}")
    return Path(input_dir), cases[:n_cases]


def _read_volumes(f: h5py.File, ids, modalities, *, with_label: bool) -> None:
    """Read whole volumes with ``read_direct`` into one buffer, as ``ShardDataset`` does."""
    shape = f[ids[0]][modalities[0]].shape
    vol, lab = np.empty(shape, np.float32), np.empty(shape, np.uint8)
    for cid in ids:
        for m in modalities:
            f[cid][m].read_direct(vol)
        if with_label:
            f[cid]["label"].read_direct(lab)


def _read_patches(f: h5py.File, ids, starts, patch: int) -> None:
    box = np.empty((patch,) * 3, np.float32)
    for cid, (a, b, c) in zip(ids, starts):
        sel = np.s_[a : a + patch, b : b + patch, c : c + patch]
        f[cid]["t2"].read_direct(box, source_sel=sel)


def bench_storage(
    work_dir: Path | str | None = None,
    *,
    input_dir: Path | str | None = None,
    n_cases: int = 4,
    shape: Sequence[int] = (240, 240, 155),
    size: int = 128,
    patch: int = 96,
    repeats: int = 5,
    seed: int = 0,
    variants=STORAGE_VARIANTS,
) -> dict:
    """Per storage option: MiB per case, write s per case, read ms (1 modality, 4, a patch)."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        _, raws = _raw_cases(input_dir, work, n_cases, shape, seed)
        prepared = [preprocess_case(load_raw_case(r, stack=False), size) for r in raws]
        meta = {"patient": "", "layout": "", "source_files": {}, "source_sha256": {}}
        rng = np.random.default_rng(seed)
        out: dict = {
            "n_cases": len(prepared),
            "stored_shape": list(prepared[0].images.shape[1:]),
            "variants": {},
        }
        for name, compression, chunks in variants:
            path = work / f"{name.replace('/', '_')}.h5"
            t = time.perf_counter()
            with ShardWriter(
                path,
                plan=[],
                fingerprint={},
                compression=compression,
                chunks=chunks,
                label_compression=compression,
            ) as w:
                for p in prepared:
                    w.add_case(p, {**meta, "patient": p.case_id})
            write_s = (time.perf_counter() - t) / len(prepared)
            ids = [p.case_id for p in prepared]
            d, h, wd = out["stored_shape"]
            starts = [
                tuple(int(rng.integers(0, max(1, s - patch + 1))) for s in (d, h, wd)) for _ in ids
            ]
            with h5py.File(path, "r") as f:
                read_one = partial(_read_volumes, f, ids, ("t2",), with_label=False)
                read_all = partial(_read_volumes, f, ids, MODALITIES, with_label=True)
                read_patch = partial(_read_patches, f, ids, starts, patch)
                read_all()  # warm the page cache
                res = {
                    "mib_per_case": path.stat().st_size / 2**20 / len(prepared),
                    "write_s_per_case": write_s,
                    "read_1mod_ms": 1e3 * _median_time(read_one, repeats) / len(ids),
                    "read_4mod_label_ms": 1e3 * _median_time(read_all, repeats) / len(ids),
                    f"read_patch{patch}_ms": 1e3 * _median_time(read_patch, repeats) / len(ids),
                }
            out["variants"][name] = res
        return out


class _NiftiBaseline:
    """The naive loader the shards replace: nibabel-load ``.nii.gz``, crop, z-score, pad."""

    def __init__(self, raws, modalities: Sequence[str], size: int) -> None:
        self.raws, self.modalities, self.size = list(raws), tuple(modalities), size

    def load(self, i: int):
        raw = self.raws[i]
        vols = {
            m: np.asanyarray(nib.load(str(raw.files[m])).dataobj)
            for m in dict.fromkeys(self.modalities)
        }
        lab = np.asanyarray(nib.load(str(raw.label_file)).dataobj)
        lab = convert_labels(lab, raw.label_convention)
        nz = np.any([v != 0 for v in vols.values()], axis=0)  # (X, Y, Z) brain of these channels
        start, stop = brain_bbox(nz)
        off, shp = crop_window(start, stop, self.size)
        image = np.zeros((len(self.modalities), *shp.tolist()), np.float32)
        label = np.zeros(shp.tolist(), np.uint8)
        a = np.maximum(off, 0)
        b = np.minimum(off + shp, lab.shape)
        src = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
        dst = tuple(slice(int(x - o), int(y - o)) for x, y, o in zip(a, b, off))
        for c, m in enumerate(self.modalities):
            v = vols[m]
            image[c][dst] = zscore_nonzero(v[src], v[src] != 0)
        label[dst] = lab[src]
        return torch.from_numpy(image), torch.from_numpy(label)


def _shard_epochs(ds: ShardDataset, idx, epochs: int) -> None:
    for e in range(epochs):
        ds.set_epoch(e)
        for i in idx:
            ds[i]


# The write-up's three Bezier domains dealt by patient (dgseg.presets.WRITEUP_DOMAINS).
_PARTITION = dict(
    intensity_augs=("none", "bezier_increasing", "bezier_decreasing"), domain_assignment="patient"
)


def _nifti_epochs(
    ds: ShardDataset, base: _NiftiBaseline, idx, epochs: int, seed: int, kw: dict
) -> None:
    """The same samples as ``_shard_epochs``, loaded from NIfTI and augmented alike."""
    for e in range(epochs):
        for j, i in enumerate(idx):
            img, lab = base.load(j)
            g = torch.Generator().manual_seed(seed + e * 1000 + i)
            pool = kw.get("intensity_augs", ())
            entry = pool[ds.domains[ds.case_ids[i]]] if ds.domains else "none"
            img, lab = augment(
                img,
                lab,
                g,
                intensity=entry,
                flip=kw.get("flip", False),
                rot90=kw.get("rot90", False),
                rotation_degrees=kw.get("rotation_degrees", 0.0),
            )
            region_channels(lab)


def bench_loader(
    work_dir: Path | str | None = None,
    *,
    input_dir: Path | str | None = None,
    n_cases: int = 4,
    shape: Sequence[int] = (240, 240, 155),
    size: int = 128,
    modalities: Sequence[str] = ("t2",),
    epochs: int = 2,
    seed: int = 0,
) -> dict:
    """Samples/s of ``ShardDataset`` vs a NIfTI.gz loader, without and with augmentation.

    "io": no transforms (pure loading); "aug": Bezier partition curves + flips + 90-degree turns
    (+ 10-degree rotation under "aug_rot"), applied identically after both loaders.
    """
    torch.set_num_threads(1)  # a DataLoader worker's setting
    settings = {
        "io": dict(),
        "aug": dict(_PARTITION, flip=True, rot90=True),
        "aug_rot": dict(_PARTITION, flip=True, rot90=True, rotation_degrees=10.0),
    }
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        src_dir, raws = _raw_cases(input_dir, work, n_cases, shape, seed)
        res = prepare(
            src_dir, work / "prepared", size=size, workers=1, split=(1.0, 0.0, 0.0), progress=False
        )
        if not res.prepared:
            raise ValueError(f"nothing prepared from {src_dir}: {res.skipped}")
        raws = [r for r in raws if r.case_id in set(res.prepared) and r.has_label]
        base = _NiftiBaseline(raws, modalities, size)
        out: dict = {
            "n_cases": len(raws),
            "epochs": epochs,
            "modalities": list(modalities),
            "size": size,
        }
        for name, kw in settings.items():
            ds = ShardDataset(work / "prepared", "train", modalities, seed=seed, **kw)
            order = {cid: i for i, cid in enumerate(ds.case_ids)}
            idx = [order[r.case_id] for r in raws]

            shard_epochs = partial(_shard_epochs, ds, idx, epochs)
            nifti_epochs = partial(_nifti_epochs, ds, base, idx, epochs, seed, kw)
            shard_epochs()  # warm-up: open files, page cache
            t_shard = _median_time(shard_epochs, 3)
            t_nifti = _median_time(nifti_epochs, 1)
            n = epochs * len(idx)
            out[name] = {
                "shard_samples_per_s": n / t_shard,
                "nifti_samples_per_s": n / t_nifti,
                "speedup": t_nifti / t_shard,
            }
            ds.close()
        return out


def _decompress(files) -> None:
    for p in files:
        data = p.read_bytes()
        if data[:2] == b"\x1f\x8b":
            gzip.decompress(data)


def _prepare_one(raw, size: int, shard: Path) -> tuple:
    """Prepare one case into ``shard``: (wall total, cpu total, load, crop + z-score, write)."""
    t = [time.perf_counter(), time.process_time()]
    loaded = load_raw_case(raw, stack=False)
    t += [time.perf_counter()]
    prepared = preprocess_case(loaded, size)
    t += [time.perf_counter()]
    meta = {
        "patient": raw.patient_id,
        "layout": raw.layout,
        "label_convention": raw.label_convention,
        "source_files": {r: raw.rel(p) for r, p in raw.source_files()},
        "source_sha256": loaded.source_sha256,
    }
    with ShardWriter(shard, plan=[], fingerprint={}, **STORAGE_DEFAULTS) as w:
        w.add_case(prepared, meta)
    t += [time.perf_counter(), time.process_time()]
    return t[4] - t[0], t[5] - t[1], t[2] - t[0], t[3] - t[2], t[4] - t[3]


def bench_prepare(
    work_dir: Path | str | None = None,
    *,
    input_dir: Path | str | None = None,
    n_cases: int = 3,
    shape: Sequence[int] = (240, 240, 155),
    size: int = 128,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Seconds per case: full preparation (one process) vs reading + gunzipping its five files.

    Wall-clock and CPU-time ratios both: on a shared machine the CPU ratio is the steadier one
    (wall time also holds the shard's fsync).
    """
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        _, raws = _raw_cases(input_dir, work, n_cases, shape, seed)
        med = statistics.median
        rows = []
        for k, raw in enumerate(raws):
            decompress = partial(_decompress, [p for _, p in raw.source_files()])
            prepare_one = partial(_prepare_one, raw, size, work / f"s{k}.h5")
            decompress()  # both paths read from a warm page cache
            bare_wall, bare_cpu = [], []
            for _ in range(repeats):
                c = time.process_time()
                bare_wall.append(_median_time(decompress, 1))
                bare_cpu.append(time.process_time() - c)
            runs = [prepare_one() for _ in range(repeats)]
            rows.append(
                (med(bare_wall), med(bare_cpu), *[med(r[j] for r in runs) for j in range(5)])
            )
        col = [med(r[j] for r in rows) for j in range(7)]
        return {
            "n_cases": len(raws),
            "decompress_s_per_case": col[0],
            "prepare_s_per_case": col[2],
            "ratio": col[2] / col[0],
            "decompress_cpu_s": col[1],
            "prepare_cpu_s": col[3],
            "ratio_cpu": col[3] / col[1],
            "load_check_s": col[4],
            "crop_zscore_s": col[5],
            "write_s": col[6],
            "size": size,
            "raw_shape": list(shape),
        }

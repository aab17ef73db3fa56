"""HDF5 shards: several prepared cases per file, written atomically, checked on re-use.

Layout of one shard (the format ``dgseg.data`` reads)::

    /<case_id>                 group, attrs: case_id, layout, modalities, original_shape (3,),
                               affine (4, 4), spacing (3,), bbox_start (3,), bbox_stop (3,),
                               offset (3,) [original index = stored index + offset],
                               label_convention="brats2021", has_label, record (JSON)
    /<case_id>/t1, t1ce, t2, flair   float32 (D, H, W), z-scored over the brain, background 0
    /<case_id>/label           uint8 (D, H, W) BraTS 2021 values (absent when unlabelled)
    root attrs                 format, version, fingerprint (storage parameters), plan (JSON: the
                               candidate cases with their source file sizes / mtimes, or their
                               discovery problem), plan_sha256, cases (JSON), skipped (JSON)

A shard is published with ``os.replace`` only after every case is written, so its existence means
it is complete; :func:`check_shard` re-opens it and compares the plan, which makes a re-run skip it
only when its inputs and parameters are unchanged. ``stored_crc32`` (per case and dataset) lets
``--verify`` detect corrupted data that HDF5 itself would read without complaint.

Storage defaults (uncompressed, contiguous) come from :func:`data_prep.bench.bench_storage`; see
``STORAGE_DEFAULTS`` and the README for the numbers.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from dgseg.atomic import atomic_path
from dgseg.constants import MODALITIES, REGION_LABELS

from .preprocess import PreparedCase

__all__ = [
    "SHARD_FORMAT",
    "SHARD_VERSION",
    "STORAGE_DEFAULTS",
    "COMPRESSIONS",
    "ShardInvalid",
    "ShardWriter",
    "stored_checksum",
    "region_voxels",
    "check_shard",
    "dataset_kwargs",
    "shard_name",
]

SHARD_FORMAT = "dgseg-shard"
SHARD_VERSION = 1
COMPRESSIONS = ("none", "lzf", "gzip")

# Chosen with bench_storage (README): uncompressed contiguous datasets read fastest (one 128^3
# modality ~1 ms from the page cache, vs ~1-3 ms for one chunk per volume, ~6 ms for 64^3 chunks,
# ~18 ms lzf + shuffle, ~57 ms gzip-1 + shuffle) for ~1.7-1.9x the disk space of the filters.
# Labels likewise: lzf would save 2 MiB per 128^3 case but reads ~20x slower than a raw copy.
STORAGE_DEFAULTS: dict[str, Any] = {
    "compression": "none",  # "none" | "lzf" | "gzip" (gzip level 1 + shuffle)
    "chunks": "contiguous",  # "contiguous" (no chunks; needs "none") | "volume" | int edge
    "label_compression": "none",
}


class ShardInvalid(Exception):
    """A shard that is missing, unreadable, stale or does not match its manifest."""


def shard_name(index: int) -> str:
    """Relative path of shard ``index`` inside the output folder."""
    return f"shards/shard-{index:05d}.h5"


def dataset_kwargs(
    shape: Sequence[int], *, compression: str, chunks: str | int, dtype=np.float32
) -> dict:
    """h5py ``create_dataset`` keywords for one (D, H, W) array of ``dtype``."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    kw: dict[str, Any] = {}
    if chunks == "contiguous":
        if compression != "none":
            raise ValueError(
                "chunks='contiguous' needs compression='none' (HDF5 filters need chunks)"
            )
        return kw
    if chunks == "volume":
        kw["chunks"] = tuple(int(s) for s in shape)
    elif isinstance(chunks, (int, np.integer)) and int(chunks) > 0:
        kw["chunks"] = tuple(min(int(chunks), int(s)) for s in shape)
    else:
        raise ValueError(f"chunks must be 'volume', 'contiguous' or a positive int, got {chunks!r}")
    shuffle = np.dtype(dtype).itemsize > 1  # byte shuffle only helps multi-byte values
    if compression == "lzf":
        kw.update(compression="lzf", shuffle=shuffle)
    elif compression == "gzip":
        kw.update(compression="gzip", compression_opts=1, shuffle=shuffle)
    return kw


def stored_checksum(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """CRC-32 (hex) of each stored array's C-order bytes, by dataset name.

    CRC-32 rather than SHA-256: it detects corruption as well (this is not about tampering) at
    half the cost, which matters because every prepared case is checksummed once more.
    """
    out = {}
    for name in (*MODALITIES, "label"):
        if name in arrays:
            a = np.ascontiguousarray(arrays[name])
            out[name] = f"{zlib.crc32(memoryview(a).cast('B')):08x}"
    return out


def region_voxels(label: np.ndarray | None) -> dict[str, int] | None:
    """Voxel counts of WT (1∪2∪4), TC (1∪4), ET (4) of a BraTS 2021 label map."""
    if label is None:
        return None
    counts = np.bincount(label.ravel(), minlength=256)
    return {r: int(counts[list(values)].sum()) for r, values in REGION_LABELS.items()}


class ShardWriter:
    """Write one shard to a temporary file; :meth:`commit` publishes it with ``os.replace``.

    Example::

        with ShardWriter(path, plan=plan, fingerprint=fp) as w:
            w.add_case(prepared, meta)
            w.add_skipped("BraTS2021_00007", "t2: image is all zero (no brain)")
        # committed on a clean exit, discarded on an exception
    """

    def __init__(
        self,
        path: Path | str,
        *,
        plan: list[dict],
        fingerprint: dict,
        compression: str = STORAGE_DEFAULTS["compression"],
        chunks: str | int = STORAGE_DEFAULTS["chunks"],
        label_compression: str = STORAGE_DEFAULTS["label_compression"],
    ) -> None:
        self.path = Path(path)
        self.plan = plan
        self.fingerprint = fingerprint
        self.compression, self.chunks = compression, chunks
        self.label_compression = label_compression
        dataset_kwargs((4, 4, 4), compression=compression, chunks=chunks)  # validate early
        dataset_kwargs((4, 4, 4), compression=label_compression, chunks=self._label_chunks())
        self.records: list[dict] = []
        self.skipped: list[dict] = []
        self._ctx = None
        self._file: h5py.File | None = None

    def __enter__(self) -> ShardWriter:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._file = h5py.File(tmp, "w")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:  # discard the temporary file, let the error propagate
            self._file.close()
            self._ctx.__exit__(exc_type, exc, tb)
            return False
        try:
            self._finish()
            self._file.close()
        except BaseException:
            self._file.close()
            self._ctx.__exit__(*sys.exc_info())
            raise
        self._ctx.__exit__(None, None, None)  # fsync + os.replace: the shard is now published
        return False

    def _label_chunks(self) -> str | int:
        # a filtered label needs chunks even when the images are contiguous
        if self.chunks == "contiguous" and self.label_compression != "none":
            return "volume"
        return self.chunks

    def discard_case(self, case_id: str) -> None:
        """Remove a half-written case group after an error while storing it."""
        if case_id in self._file:
            del self._file[case_id]

    def add_skipped(self, case_id: str, reason: str) -> None:
        self.skipped.append({"case_id": case_id, "reason": reason})

    def add_case(self, case: PreparedCase, meta: dict) -> dict:
        """Store one case; ``meta`` holds id, patient, layout, source files/sha256, convention.

        Returns the manifest record of the case.
        """
        f = self._file
        g = f.create_group(case.case_id)
        arrays = {m: case.images[i] for i, m in enumerate(MODALITIES)}
        shape = case.images.shape[1:]
        kw = dataset_kwargs(shape, compression=self.compression, chunks=self.chunks)
        for m in MODALITIES:
            g.create_dataset(m, data=arrays[m], **kw)
        if case.label is not None:
            arrays["label"] = case.label
            g.create_dataset(
                "label",
                data=case.label,
                **dataset_kwargs(
                    shape,
                    compression=self.label_compression,
                    chunks=self._label_chunks(),
                    dtype=np.uint8,
                ),
            )
        record = {
            "id": case.case_id,
            "patient": meta["patient"],
            "layout": meta["layout"],
            "has_label": case.label is not None,
            "source_label_convention": meta.get("label_convention"),
            "shape": [int(s) for s in shape],
            "original_shape": case.original_shape.tolist(),
            "offset": case.offset.tolist(),
            "bbox_start": case.bbox_start.tolist(),
            "bbox_stop": case.bbox_stop.tolist(),
            "region_voxels": region_voxels(case.label),
            "source_files": meta["source_files"],
            "source_sha256": meta["source_sha256"],
            "stored_crc32": stored_checksum(arrays),
        }
        a = g.attrs
        a["case_id"] = case.case_id
        a["layout"] = meta["layout"]
        a["modalities"] = list(MODALITIES)
        a["original_shape"] = case.original_shape.astype(np.int64)
        a["affine"] = case.affine.astype(np.float64)
        a["spacing"] = case.spacing.astype(np.float64)
        a["bbox_start"] = case.bbox_start.astype(np.int64)
        a["bbox_stop"] = case.bbox_stop.astype(np.int64)
        a["offset"] = case.offset.astype(np.int64)
        a["label_convention"] = "brats2021"
        a["has_label"] = case.label is not None
        a["record"] = json.dumps(record)
        self.records.append(record)
        return record

    def _finish(self) -> None:
        a = self._file.attrs
        a["format"] = SHARD_FORMAT
        a["version"] = SHARD_VERSION
        a["fingerprint"] = json.dumps(self.fingerprint, sort_keys=True)
        a["plan"] = json.dumps(self.plan)
        a["plan_sha256"] = plan_sha256(self.plan, self.fingerprint)
        a["cases"] = json.dumps([r["id"] for r in self.records])
        a["skipped"] = json.dumps(self.skipped)


def plan_sha256(plan: list[dict], fingerprint: dict) -> str:
    """Hash of what a shard was built from: candidate inputs (or problems) and parameters."""
    blob = json.dumps({"plan": plan, "fingerprint": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _attr_str(attrs, key: str) -> str:
    v = attrs[key]
    return v.decode() if isinstance(v, bytes) else str(v)


def check_shard(
    path: Path | str,
    *,
    plan: list[dict] | None = None,
    fingerprint: dict | None = None,
    deep: bool = False,
    expected: dict[str, str] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Open a shard and check it; returns (case records, skipped entries).

    Args:
        path: the shard file.
        plan, fingerprint: when given, the shard must have been built from exactly these.
        deep: re-read every array and compare its CRC-32 with the stored record.
        expected: case id -> stored checksums (``stored_crc32``) from a manifest; ids and
            checksums must match.

    Raises:
        ShardInvalid: one-line reason.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardInvalid(f"{path.name}: missing")
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            if _attr_str(a, "format") != SHARD_FORMAT or int(a["version"]) != SHARD_VERSION:
                raise ShardInvalid(f"{path.name}: not a version-{SHARD_VERSION} dgseg shard")
            if plan is not None and _attr_str(a, "plan_sha256") != plan_sha256(plan, fingerprint):
                raise ShardInvalid(f"{path.name}: built from other inputs or parameters")
            ids = json.loads(_attr_str(a, "cases"))
            skipped = json.loads(_attr_str(a, "skipped"))
            if expected is not None and sorted(ids) != sorted(expected):
                raise ShardInvalid(
                    f"{path.name}: holds cases {sorted(ids)}, manifest says {sorted(expected)}"
                )
            records = []
            for cid in ids:
                if cid not in f:
                    raise ShardInvalid(f"{path.name}: case {cid} missing")
                g = f[cid]
                rec = json.loads(_attr_str(g.attrs, "record"))
                names = [*MODALITIES, "label"] if rec["has_label"] else list(MODALITIES)
                for n in names:
                    if n not in g or tuple(g[n].shape) != tuple(rec["shape"]):
                        raise ShardInvalid(f"{path.name}: {cid}/{n} missing or of wrong shape")
                if deep or expected is not None:
                    want = rec["stored_crc32"] if expected is None else expected[cid]
                    got = stored_checksum({n: g[n][()] for n in names})
                    bad = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))
                    if bad:
                        raise ShardInvalid(
                            f"{path.name}: {cid} stored data checksum mismatch ({', '.join(bad)})"
                        )
                records.append(rec)
    except ShardInvalid:
        raise
    except Exception as e:  # truncated / corrupt HDF5, missing attrs, bad JSON
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ShardInvalid(f"{path.name}: unreadable ({type(e).__name__}: {msg})") from None
    return records, skipped

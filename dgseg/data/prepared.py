"""Open a prepared folder once, before any work: the manifest against its schema, and every shard
the run will read.

:func:`check_prepared` is the cheap metadata pass that training and evaluation run before their
first step: :func:`dgseg.data.manifest.load_manifest` (format, version, the keys and types of
every case record), then each shard holding a case of the splits in use is opened once (HDF5
metadata only: no voxel is read) and must hold every such case as a group with the modalities the
run reads (and ``label`` where the case has one), each of the case's stored shape. A fault is
one ``ValueError`` line naming the shard and case, pointing to ``tools/prepare_brats.py
--verify`` (which also checks the stored data against its checksums).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import h5py

from .manifest import load_manifest, split_cases

__all__ = ["check_prepared"]


class _ShardFault(ValueError):
    """A fault found in a shard that opened (already worded)."""


_FIX = "(check the folder with tools/prepare_brats.py --verify, or prepare it again)"


def check_prepared(
    root: Path | str,
    *,
    splits: Sequence[str],
    modalities: Sequence[str],
    fold: Optional[int] = None,
) -> dict:
    """The manifest of ``root`` after checking every shard that ``splits`` read.

    Args:
        root: the prepared folder (``manifest.json`` and ``shards/``).
        splits: the manifest splits the run reads ("train", "val", "test", "all", ...).
        modalities: the modalities the run reads from each case.
        fold: cross-validation fold of the train/val splits (as :func:`split_cases`).

    Raises:
        FileNotFoundError: no manifest.
        ValueError: a bad manifest, a missing, unreadable or incomplete shard (one line).
    """
    root = Path(root)
    manifest = load_manifest(root)
    by_shard: dict[str, list[dict]] = {}
    for split in dict.fromkeys(splits):
        for case in split_cases(manifest, split, fold):
            by_shard.setdefault(case["shard"], []).append(case)
    for rel, cases in by_shard.items():
        _check_shard(root, rel, cases, tuple(dict.fromkeys(modalities)))
    return manifest


def _check_shard(root: Path, rel: str, cases: list[dict], modalities: tuple[str, ...]) -> None:
    path = root / rel
    if not path.is_file():
        raise ValueError(
            f"{path}: shard missing (listed for case {cases[0]['id']!r} in "
            f"{root / 'manifest.json'}) {_FIX}"
        )
    try:
        with h5py.File(path, "r") as f:
            for case in cases:
                cid = case["id"]
                if cid not in f or not isinstance(f[cid], h5py.Group):
                    raise _ShardFault(f"{path}: no group for case {cid!r} {_FIX}")
                names = [*modalities, "label"] if case["has_label"] else list(modalities)
                for name in names:
                    if name not in f[cid]:
                        raise _ShardFault(f"{path}: case {cid!r} has no {name!r} {_FIX}")
                    shape = tuple(f[cid][name].shape)
                    if shape != tuple(case["shape"]):
                        raise _ShardFault(
                            f"{path}: {cid}/{name} has shape {shape}, the manifest says "
                            f"{tuple(case['shape'])} {_FIX}"
                        )
    except _ShardFault:
        raise
    except Exception as e:  # truncated or corrupt HDF5 (OSError), odd objects (KeyError, ...)
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{path}: unreadable shard ({msg}) {_FIX}") from None

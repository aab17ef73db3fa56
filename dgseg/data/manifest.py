"""Read the ``manifest.json`` that ``tools/prepare_brats.py`` writes next to its HDF5 shards.

Format ``dgseg-shards`` version 1 (written by ``data_prep.pipeline``)::

    {"format": "dgseg-shards", "version": 1, "params": {...}, "modalities": [t1, t1ce, t2, flair],
     "label_convention": "brats2021", "split_counts": {...},
     "shards": [{"file": "shards/shard-00000.h5", "cases": [ids]}],
     "cases": [{"id", "patient", "split", "shard", "layout", "has_label", "shape",
                "original_shape", "offset", "bbox_start", "bbox_stop", "region_voxels",
                "source_files", "source_sha256", "stored_crc32", ...}]}

``split`` is "train", "val", "test" (patient level, seeded, or from a split file) or
"unlabelled". Optional per case: ``fold`` (cross-validation fold, ``--folds K`` or fold indices in
the split file). ``params.size`` is the stored cube of
train cases ("full": every case its brain box); ``params.eval_size`` ("full" or the same int,
absent in older manifests, where every case is stored at ``size``) says how val and test cases
were stored.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "SPLITS",
    "load_manifest",
    "check_manifest_schema",
    "split_cases",
    "scored_extent",
]

MANIFEST_FORMAT = "dgseg-shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test", "unlabelled", "all")


def load_manifest(root: Path | str) -> dict:
    """The parsed manifest of a prepared folder (``root`` or ``root/manifest.json``).

    Raises:
        FileNotFoundError: no manifest.
        ValueError: not JSON, or not a dgseg-shards manifest of a supported version.
    """
    path = Path(root)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (a folder prepared by "
            "tools/prepare_brats.py holds manifest.json)"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:  # truncated or not JSON
        raise ValueError(f"{path}: not a JSON manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {MANIFEST_FORMAT!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path}: manifest version {manifest.get('version')!r} is not supported "
            f"(expected {MANIFEST_VERSION}); re-run tools/prepare_brats.py"
        )
    check_manifest_schema(manifest, path)
    return manifest


# Keys every case record needs, and the check of each value: what the readers index without .get.
def _is_triple(v) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 3
        and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    )


_CASE_SCHEMA = {
    "id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "split": (lambda v: v in SPLITS[:-1], f"one of {SPLITS[:-1]}"),
    "shard": (lambda v: isinstance(v, str) and v != "", "a shard file name"),
    "shape": (lambda v: _is_triple(v) and min(v) > 0, "3 positive integers"),
    "has_label": (lambda v: isinstance(v, bool), "true or false"),
    "offset": (_is_triple, "3 integers"),
    "bbox_start": (_is_triple, "3 integers"),
    "bbox_stop": (_is_triple, "3 integers"),
}
_OPTIONAL_SCHEMA = {
    "original_shape": (lambda v: _is_triple(v) and min(v) > 0, "3 positive integers"),
    "fold": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
}


def check_manifest_schema(manifest: dict, path: Path | str = "manifest.json") -> None:
    """Refuse a manifest whose ``cases`` (or ``shards``) lack keys the readers need, or hold
    values of the wrong type, naming the key and the case id.

    Raises:
        ValueError: one line ending with how to check or rebuild the folder.
    """
    fix = "(check the folder with tools/prepare_brats.py --verify, or prepare it again)"
    cases = manifest.get("cases")
    if not isinstance(cases, list):
        raise ValueError(
            f"{path}: 'cases' must be a list of case records, got {_kind(cases)} {fix}"
        )
    seen: set[str] = set()
    for k, case in enumerate(cases):
        if not isinstance(case, dict):
            raise ValueError(f"{path}: case #{k} is {_kind(case)}, not a record {fix}")
        cid = case.get("id")
        who = f"case {cid!r}" if isinstance(cid, str) and cid else f"case #{k}"
        for key, (ok, want) in _CASE_SCHEMA.items():
            if key not in case:
                raise ValueError(f"{path}: {who} lacks {key!r} {fix}")
            if not ok(case[key]):
                raise ValueError(f"{path}: {who}: {key!r} = {case[key]!r} must be {want} {fix}")
        for key, (ok, want) in _OPTIONAL_SCHEMA.items():
            if key in case and not ok(case[key]):
                raise ValueError(f"{path}: {who}: {key!r} = {case[key]!r} must be {want} {fix}")
        if cid in seen:
            raise ValueError(f"{path}: case {cid!r} is listed twice {fix}")
        seen.add(cid)


def _kind(value) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"


def split_cases(manifest: dict, split: str, fold: int | None = None) -> list[dict]:
    """Case records of ``split`` ("train", "val", "test", "unlabelled" or "all"), manifest order.

    With ``fold = i`` (cross-validation): "val" is the non-test cases of fold i and "train" the
    other non-test cases (split "train" or "val", fold != i, cases without a fold included);
    "test", "unlabelled" and "all" do not change.

    Raises:
        ValueError: unknown split; ``fold`` given but the manifest has no folds, or out of range.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if fold is not None:
        n_folds = 1 + max((c["fold"] for c in manifest["cases"] if "fold" in c), default=-1)
        if n_folds == 0:
            raise ValueError(
                "fold given but the manifest has no folds: prepare with --folds K or "
                "a split file with fold indices"
            )
        if int(fold) != fold or not 0 <= fold < n_folds:
            raise ValueError(
                f"fold must be in 0..{n_folds - 1} (the manifest's folds), got {fold!r}"
            )
        if split in ("train", "val"):
            pool = [c for c in manifest["cases"] if c["split"] in ("train", "val")]
            return [c for c in pool if (c.get("fold") == fold) == (split == "val")]
    return [c for c in manifest["cases"] if split == "all" or c["split"] == split]


def scored_extent(manifest: dict, split: str) -> dict:
    """What evaluating ``split`` scores: how many of its cases cover their whole brain box.

    A stored window covers the brain when it contains the joint nonzero box (stored as the box, or
    a crop/pad larger than it); otherwise tumour outside the window is in neither truth nor
    prediction. Returns ``{"n_cases", "whole_brain", "cropped", "sizes", "text"}`` where
    ``sizes`` lists the distinct stored shapes of the cropped cases and ``text`` is one line for
    a table footer.
    """
    cases = split_cases(manifest, split)
    whole, cropped_shapes = 0, []
    for c in cases:
        lo = [o <= a for o, a in zip(c["offset"], c["bbox_start"])]
        hi = [o + s >= b for o, s, b in zip(c["offset"], c["shape"], c["bbox_stop"])]
        if all(lo) and all(hi):
            whole += 1
        else:
            cropped_shapes.append("x".join(str(s) for s in c["shape"]))
    sizes = sorted(set(cropped_shapes))
    text = f"Scored volume ('{split}'): {whole} of {len(cases)} case(s) whole brain box"
    if cropped_shapes:
        text += (
            f"; {len(cropped_shapes)} cropped to {', '.join(sizes)} (tumour outside the crop "
            "is in neither truth nor prediction)"
        )
    return {
        "n_cases": len(cases),
        "whole_brain": whole,
        "cropped": len(cropped_shapes),
        "sizes": sizes,
        "text": text + ".",
    }

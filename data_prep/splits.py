"""User-given splits and cross-validation folds for ``manifest.json``.

Split file (``tools/prepare_brats.py --split-file FILE``), replacing the seeded split:

* JSON: an object ``{"<case id>": "train" | "val" | "test" | <fold index>, ...}``;
* CSV: a header ``case_id,split`` and one row per case with the same values.

A fold index (integer >= 0) puts the case into the development pool (split "train") with that
fold; "train" / "val" / "test" set the split directly. Every labelled case that the input holds
must be listed (a missing one would silently join no split); every listed id must exist in the
input; cases of one patient (BraTS 2023 time points) must share split and fold. Unlabelled cases
may be listed or not: they stay "unlabelled". Violations raise one ``ValueError`` that names the
offending ids.

Folds (``--folds K``): the labelled non-test patients are ordered by SHA-256 of
``"<seed>:fold:<patient>"`` and dealt round-robin into folds 0..K-1 (sizes differ by at most one
patient); every case gets its patient's fold. Training with ``data.fold = i`` then validates on
fold i and trains on the other non-test cases (:func:`dgseg.data.manifest.split_cases`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

__all__ = ["SPLIT_NAMES", "assign_folds", "check_split_ids", "read_split_file", "splits_from_file"]

SPLIT_NAMES = ("train", "val", "test")
_SHOWN = 20  # ids named in one error line before "... and N more"


def _names(ids) -> str:
    ids = sorted(ids)
    more = f" ... and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return ", ".join(ids[:_SHOWN]) + more


def _value(raw, case_id: str) -> str | int:
    """A split name or a fold index from JSON / CSV text; ValueError naming the case."""
    if isinstance(raw, int) and not isinstance(raw, bool):  # JSON true/false are no folds
        value = raw
    elif isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        value = int(raw.strip())
    elif isinstance(raw, str) and raw.strip().lower() in SPLIT_NAMES:
        return raw.strip().lower()
    else:
        raise ValueError(
            f"case {case_id}: split {raw!r} is not one of {SPLIT_NAMES} or a fold index"
        )
    if value < 0:
        raise ValueError(f"case {case_id}: fold index {value} must be >= 0")
    return value


def read_split_file(path: Path | str) -> dict[str, str | int]:
    """``{case id: "train" | "val" | "test" | fold index}`` from a JSON or CSV split file.

    JSON when the file name ends in ``.json`` (or the text starts with ``{``), else CSV.

    Raises:
        ValueError: unreadable file, wrong structure, duplicate ids or invalid values.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"split file {path}: {e}") from e
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text, object_pairs_hook=lambda pairs: pairs)  # keep duplicates
        except ValueError as e:
            raise ValueError(f"split file {path}: not valid JSON: {e}") from e
        if not isinstance(data, list) or not text.lstrip().startswith("{"):
            raise ValueError(f"split file {path}: expected a JSON object {{case_id: split}}")
        items = data
    else:
        rows = list(csv.reader(text.splitlines()))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        if header[:2] != ["case_id", "split"]:
            raise ValueError(
                f"split file {path}: expected a CSV header 'case_id,split', got "
                f"{','.join(header) or 'nothing'}"
            )
        items = [(r[0].strip(), r[1] if len(r) > 1 else "") for r in rows[1:] if any(r)]
    counts: dict[str, int] = {}
    for cid, _ in items:
        counts[str(cid)] = counts.get(str(cid), 0) + 1
    dup = [cid for cid, n in counts.items() if n > 1]
    if dup:
        raise ValueError(f"split file {path}: case ids listed more than once: {_names(dup)}")
    out = {}
    for cid, raw in items:
        try:
            out[str(cid)] = _value(raw, str(cid))
        except ValueError as e:
            raise ValueError(f"split file {path}: {e}") from None
    if not out:
        raise ValueError(f"split file {path}: lists no case")
    return out


def check_split_ids(
    mapping: Mapping[str, str | int],
    known: set[str],
    labelled: set[str],
    source: str = "split file",
) -> None:
    """ValueError naming the ids of ``mapping`` the input lacks and the labelled ones it misses.

    Args:
        known: every case id found in the input (usable or not).
        labelled: the labelled case ids that will be prepared.
    """
    unknown = set(mapping) - known
    missing = labelled - set(mapping)
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} unknown case id(s) not in the input: {_names(unknown)}")
    if missing:
        parts.append(f"{len(missing)} labelled case(s) missing from it: {_names(missing)}")
    if parts:
        raise ValueError(f"{source}: " + "; ".join(parts))


def splits_from_file(
    mapping: Mapping[str, str | int], patients: Mapping[str, str], source: str = "split file"
) -> tuple[dict[str, str], dict[str, int]]:
    """Split and fold of every labelled case (``patients``: case id -> patient) from ``mapping``.

    Returns:
        ``({case id: split}, {case id: fold})``; a fold index means split "train".

    Raises:
        ValueError: labelled cases missing from ``mapping``, or one patient's cases in
            different splits or folds (named).
    """
    missing = set(patients) - set(mapping)
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} labelled case(s) missing from it: {_names(missing)}"
        )
    splits, folds = {}, {}
    for cid in patients:
        value = mapping[cid]
        splits[cid] = "train" if isinstance(value, int) else value
        if isinstance(value, int):
            folds[cid] = value
    by_patient: dict[str, set] = {}
    for cid, pid in patients.items():
        by_patient.setdefault(pid, set()).add((splits[cid], folds.get(cid)))
    used = sorted(set(folds.values()))
    if used and used != list(range(len(used))):
        raise ValueError(f"{source}: fold indices must be 0..K-1 with every fold used, got {used}")
    mixed = [pid for pid, values in by_patient.items() if len(values) > 1]
    if mixed:
        raise ValueError(
            f"{source}: patients with cases in different splits or folds (test "
            f"cases would leak into training): {_names(mixed)}"
        )
    return splits, folds


def assign_folds(patients: Mapping[str, str], k: int, seed: int) -> dict[str, int]:
    """Case id -> fold in 0..k-1, per patient, deterministic from ``seed`` (see module doc)."""
    if int(k) != k or k < 2:
        raise ValueError(f"folds must be an integer >= 2, got {k!r}")
    pids = sorted(set(patients.values()))
    if len(pids) < k:
        raise ValueError(f"{k} folds need at least {k} non-test patients, got {len(pids)}")
    order = sorted(pids, key=lambda p: hashlib.sha256(f"{seed}:fold:{p}".encode()).hexdigest())
    fold_of = {p: i % k for i, p in enumerate(order)}
    return {cid: fold_of[p] for cid, p in patients.items()}

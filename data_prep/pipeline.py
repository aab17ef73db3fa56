"""Raw BraTS-style folder -> HDF5 shards + ``manifest.json``: parallel, resumable, verifiable.

Plan. All case ids found (usable or not) are sorted and cut into consecutive groups of
``cases_per_shard``; group ``i`` becomes ``shards/shard-<i>.h5``. The grouping depends only on the
ids present, so a re-run knows which shard every case belongs to before it reads anything.
Each group's *plan* lists its cases with the size and mtime of every source file (or the problem
found while discovering it); the plan and the storage parameters are hashed into the shard.

Resume. A shard is written to a temporary file and published with ``os.replace`` only when all its
cases are in, so after any interruption (``kill -9`` included) every shard file present is
complete. A re-run opens each existing shard, compares its plan hash (and, with ``--verify``,
every array's CRC-32) and rebuilds only the shards that are missing, unreadable or stale. Cases
that failed are recorded inside their shard with the reason, so they are not re-read either.
``manifest.json`` is removed before any shard is rebuilt and written last, so a folder with a
manifest is always complete and consistent.

Output. ``manifest.json`` (format and version: ``dgseg.data.manifest``): preparation parameters,
shard list, and per case its shard, split, layout, source-file SHA-256, stored-array CRC-32s,
geometry and WT/TC/ET voxel counts. ``skipped.json``: ``{case_id: one-line reason}``. Both
written atomically.

Splits. Patient-level (BraTS 2023 time points of one patient stay together), deterministic from
the seed: patients are ordered by SHA-256 of ``"<seed>:<patient>"`` and cut at the requested
fractions, so test patients are never in train, whichever modality a model is trained on.
Unlabelled cases get the split ``"unlabelled"`` (usable for prediction, never for training).
A split file (``split_file``) replaces the seeded split, and ``folds=K`` writes a per-case
``fold`` for K-fold cross-validation over the non-test patients (:mod:`data_prep.splits`).

Evaluation cases (``eval_size="full"``, the command line's default). Val and test cases are stored
as their whole brain box, so that scoring covers the whole brain: a ``size`` crop would drop
tumour outside it from truth and prediction alike. Train cases stay cropped/padded to ``size``.
The split each case will get is known before it is read (the same :func:`assign_splits` over the
discovered labelled cases); a case whose final split differs (a case failing to load moves the
cut) is still read correctly: ``ShardDataset`` crops a train case to ``size`` on the fly, and a
cropped evaluation case is reported as such (``dgseg.data.manifest.scored_extent``).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dgseg import __version__
from dgseg.atomic import atomic_write_json, atomic_write_text, remove_stale_temps
from dgseg.constants import MODALITIES
from dgseg.data.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, load_manifest
from dgseg.logging_utils import Progress

from .layouts import RawCase, discover_cases
from .loading import CaseError, load_raw_case
from .preprocess import preprocess_case
from .shards import (
    SHARD_VERSION,
    STORAGE_DEFAULTS,
    ShardInvalid,
    ShardWriter,
    check_shard,
    dataset_kwargs,
    shard_name,
)
from .splits import assign_folds, check_split_ids, read_split_file, splits_from_file

__all__ = [
    "EVAL_SIZES",
    "PREPROCESS_VERSION",
    "PrepareResult",
    "prepare",
    "verify_output",
    "assign_splits",
    "plan_shards",
]

PREPROCESS_VERSION = 1  # bump when preprocess_case changes what it stores: forces a rebuild
MAX_REASON = 400  # characters of one skip reason
EVAL_SIZES = ("full", "same")  # val/test storage: whole brain box | the training ``size``


@dataclass
class PrepareResult:
    """Outcome of :func:`prepare`; ``exit_code`` is what the command line returns."""

    output: Path
    prepared: list[str]
    skipped: dict[str, str]
    shards_built: list[str]
    shards_reused: list[str]
    verify_errors: list[str] = field(default_factory=list)
    exit_code: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"prepared {len(self.prepared)} case(s) into {self.output} "
            f"({len(self.shards_built)} shard(s) built, {len(self.shards_reused)} reused) "
            f"in {self.seconds:.1f} s",
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} case(s) (see skipped.json):")
            lines += [f"  {cid}: {why}" for cid, why in self.skipped.items()]
        if self.verify_errors:
            lines.append(f"verify: {len(self.verify_errors)} problem(s):")
            lines += [f"  {e}" for e in self.verify_errors]
        return "\n".join(lines)


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _stat(raw: RawCase) -> dict[str, Any]:
    """Role -> [relative path, size, mtime_ns] (None for size/mtime when stat fails)."""
    out = {}
    for role, p in raw.source_files():
        try:
            st = p.stat()
            out[role] = [raw.rel(p), st.st_size, st.st_mtime_ns]
        except OSError:
            out[role] = [raw.rel(p), None, None]
    return out


@dataclass
class _ShardTask:
    index: int
    rel: str
    plan: list[dict]
    raws: dict[str, RawCase]


def plan_shards(
    cases: Sequence[RawCase], problems: Sequence[tuple[str, str]], cases_per_shard: int
) -> list[_ShardTask]:
    """Group all ids (usable and not) into shards: sorted ids cut every ``cases_per_shard``."""
    if int(cases_per_shard) != cases_per_shard or cases_per_shard < 1:
        raise ValueError(f"cases_per_shard must be a positive integer, got {cases_per_shard!r}")
    by_id = {c.case_id: c for c in cases}
    reasons: dict[str, list[str]] = {}
    for cid, why in problems:
        reasons.setdefault(cid, []).append(_one_line(why))
    ids = sorted(set(by_id) | set(reasons))
    tasks = []
    for i in range(0, len(ids), cases_per_shard):
        chunk = ids[i : i + cases_per_shard]
        plan, raws = [], {}
        for cid in chunk:
            if cid in reasons:
                plan.append({"id": cid, "problem": "; ".join(reasons[cid])})
            else:
                plan.append({"id": cid, "files": _stat(by_id[cid])})
                raws[cid] = by_id[cid]
        k = i // cases_per_shard
        tasks.append(_ShardTask(k, shard_name(k), plan, raws))
    return tasks


def _plan_eval_boxes(
    tasks: list[_ShardTask], cases: Sequence[RawCase], split: Sequence[float], seed: int
) -> None:
    """Mark the plan entries of future val/test cases ``"size": "full"`` (whole brain box).

    The mark is part of the plan, hence of the shard's plan hash: a shard whose cases change
    split (another seed or split) is rebuilt. Train and unlabelled cases keep ``size``.
    """
    labelled = {c.case_id: c.patient_id or c.case_id for c in cases if c.has_label}
    planned = assign_splits(labelled, split, seed)
    for t in tasks:
        for entry in t.plan:
            if planned.get(entry["id"]) in ("val", "test") and "files" in entry:
                entry["size"] = "full"


# ---------------------------------------------------------------------------------------------
# Worker side

_PROGRESS_QUEUE = None


def _init_worker(queue) -> None:
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = queue


def _build_shard(
    out_dir: str, task: _ShardTask, fingerprint: dict, size, storage: dict, progress=None
) -> tuple[list[dict], list[dict]]:
    """Prepare every case of one shard and publish the shard; returns (records, skipped)."""
    tick = progress or (lambda ok: _PROGRESS_QUEUE.put(ok) if _PROGRESS_QUEUE else None)
    with ShardWriter(
        Path(out_dir) / task.rel, plan=task.plan, fingerprint=fingerprint, **storage
    ) as w:
        for entry in task.plan:
            cid = entry["id"]
            if "problem" in entry:
                w.add_skipped(cid, entry["problem"])
                tick(False)
                continue
            raw = task.raws[cid]
            try:
                loaded = load_raw_case(raw, stack=False)  # file views: crop before converting
                # evaluation cases planned as their whole brain box (see _plan_eval_boxes)
                prepared = preprocess_case(loaded, None if entry.get("size") == "full" else size)
                meta = {
                    "patient": raw.patient_id or cid,
                    "layout": raw.layout,
                    "label_convention": raw.label_convention,
                    "source_files": {r: raw.rel(p) for r, p in raw.source_files()},
                    "source_sha256": loaded.source_sha256,
                }
                del loaded
                w.add_case(prepared, meta)
                tick(True)
            except CaseError as e:
                w.add_skipped(cid, _one_line(f"{e}"))
                tick(False)
            except Exception as e:  # an unforeseen fault of one case must not stop the batch
                w.discard_case(cid)
                w.add_skipped(cid, _one_line(f"unexpected {type(e).__name__}: {e}"))
                tick(False)
    return w.records, w.skipped


# ---------------------------------------------------------------------------------------------
# Parent side


def assign_splits(
    patients: dict[str, str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Case id -> "train" | "val" | "test", patient-level and deterministic from ``seed``.

    Patients are ordered by SHA-256 of ``"<seed>:<patient>"``; the first ``n_test`` are test, the
    next ``n_val`` val, the rest train. Counts follow ``fractions`` (train, val, test) by largest
    remainder, and every split with a positive fraction gets a patient when there are enough.
    """
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 or not math.isfinite(f) for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(
            f"split must be three non-negative fractions summing to 1 "
            f"(train val test), got {list(fractions)}"
        )
    pids = sorted(set(patients.values()))
    n = len(pids)
    raw = [f * n for f in fr]
    counts = [int(math.floor(r)) for r in raw]
    for k in sorted(range(3), key=lambda k: (counts[k] - raw[k], k))[: n - sum(counts)]:
        counts[k] += 1  # largest remainders first
    for k in range(3):  # a requested split must not end up empty
        if fr[k] > 0 and counts[k] == 0 and n >= sum(f > 0 for f in fr):
            donor = max(range(3), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[k] += 1
    order = sorted(pids, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    _, n_val, n_test = counts
    split_of = {}
    for i, p in enumerate(order):
        split_of[p] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return {cid: split_of[p] for cid, p in patients.items()}


def _fingerprint(size, storage: dict) -> dict:
    return {
        "shard_version": SHARD_VERSION,
        "preprocess_version": PREPROCESS_VERSION,
        "size": size,
        **storage,
    }


class _Tally:
    """Cases done, skipped ones counted, on one :class:`dgseg.logging_utils.Progress` line."""

    def __init__(self, bar: Progress) -> None:
        self.bar, self.skipped = bar, 0

    def tick(self, ok: bool) -> None:
        self.skipped += 0 if ok else 1
        self.bar.step(note=f"{self.skipped} skipped")

    def show(self) -> None:
        self.bar.show()


def _run_tasks(
    out_dir: Path,
    tasks: list[_ShardTask],
    fingerprint: dict,
    size,
    storage: dict,
    workers: int,
    progress: _Tally,
) -> tuple[dict[int, tuple], dict[int, str]]:
    """Build shards; returns ({index: (records, skipped)}, {index: failure reason})."""
    results: dict[int, tuple] = {}
    failures: dict[int, str] = {}
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            try:
                results[t.index] = _build_shard(
                    str(out_dir), t, fingerprint, size, storage, progress=progress.tick
                )
            except Exception as e:  # e.g. disk full while writing the shard
                failures[t.index] = _one_line(f"shard {t.rel} not written: {type(e).__name__}: {e}")
        return results, failures

    todo = list(tasks)
    for _attempt in range(2):  # a crashed worker breaks the pool: retry the rest once
        if not todo:
            break
        ctx = mp.get_context("spawn")  # no forked copies of the caller's threads / h5py state
        queue = ctx.Queue()
        broken: list[_ShardTask] = []
        with ProcessPoolExecutor(
            min(workers, len(todo)), mp_context=ctx, initializer=_init_worker, initargs=(queue,)
        ) as ex:
            futs = {
                ex.submit(_build_shard, str(out_dir), t, fingerprint, size, storage): t
                for t in todo
            }
            pending = set(futs)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    try:
                        progress.tick(queue.get_nowait())
                    except Exception:
                        break
                progress.show()
                for f in done:
                    t = futs[f]
                    try:
                        results[t.index] = f.result()
                    except BrokenProcessPool:
                        broken.append(t)
                    except Exception as e:
                        failures[t.index] = _one_line(
                            f"shard {t.rel} not written: {type(e).__name__}: {e}"
                        )
        while not queue.empty():
            try:
                progress.tick(queue.get_nowait())
            except Exception:
                break
        todo = broken
    for t in todo:
        failures[t.index] = f"shard {t.rel} not written: a worker process died (out of memory?)"
    return results, failures


def prepare(
    input_dir: Path | str,
    output_dir: Path | str,
    *,
    size: int | None = 128,
    workers: int = 1,
    seed: int = 0,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    cases_per_shard: int = 8,
    compression: str = STORAGE_DEFAULTS["compression"],
    chunks: str | int | None = None,
    label_compression: str = STORAGE_DEFAULTS["label_compression"],
    verify: bool = False,
    allow_skipped: bool = False,
    progress: bool = True,
    split_file: Path | str | None = None,
    folds: int | None = None,
    eval_size: str = "same",
) -> PrepareResult:
    """Prepare every case of ``input_dir`` into shards under ``output_dir`` (see module doc).

    Args:
        size: cube edge of the stored volume, or None to keep each brain box ("full").
        workers: worker processes (1 = in this process).
        seed: split seed.
        split: train, val, test fractions (patient level).
        cases_per_shard: cases per HDF5 file.
        compression, chunks, label_compression: storage (``data_prep.shards.dataset_kwargs``);
            ``chunks=None``: the default layout when uncompressed, one chunk per volume when
            filtered (HDF5 filters need chunks).
        verify: deep-check re-used shards and re-read everything against the manifest at the end.
        allow_skipped: exit code 0 even when cases were skipped (by default a skipped case is a
            failure of the batch: the others are prepared, the exit code is 1).
        progress: progress line on stderr.
        split_file: JSON or CSV ``case id -> train | val | test | fold index`` replacing the
            seeded split (:func:`data_prep.splits.read_split_file`); checked against the input
            before any work.
        folds: K >= 2: seeded per-patient cross-validation folds of the non-test cases, written
            as each case's ``fold``.
        eval_size: "full" stores val and test cases as their whole brain box (train cases at
            ``size``); "same" stores every case at ``size`` (tools/prepare_brats.py: "full").

    Returns:
        a :class:`PrepareResult`; ``exit_code`` 1 when nothing was prepared, a shard could not be
        written, verification failed, or any case was skipped (unless ``allow_skipped``).
    """
    t0 = time.monotonic()
    if size is not None and (int(size) != size or size < 1):
        raise ValueError(f"size must be a positive integer or None (full), got {size!r}")
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if chunks is None:
        chunks = STORAGE_DEFAULTS["chunks"] if compression == "none" else "volume"
    assign_splits({}, split, seed)  # validates the fractions before any work
    mapping = read_split_file(split_file) if split_file is not None else None
    if folds is not None and (int(folds) != folds or folds < 2):
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if folds is not None and mapping and any(isinstance(v, int) for v in mapping.values()):
        raise ValueError("folds and fold indices in the split file exclude each other")
    if eval_size not in EVAL_SIZES:
        raise ValueError(f"eval_size must be one of {EVAL_SIZES}, got {eval_size!r}")
    dataset_kwargs((2, 2, 2), compression=compression, chunks=chunks)  # and the storage options
    dataset_kwargs(
        (2, 2, 2),
        compression=label_compression,
        chunks="volume" if label_compression != "none" else chunks,
    )
    out = Path(output_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out / "shards")
    remove_stale_temps(out)
    storage = {"compression": compression, "chunks": chunks, "label_compression": label_compression}
    fingerprint = _fingerprint(size, storage)

    cases, problems = discover_cases(input_dir)
    if mapping is not None:  # unknown / missing ids: refuse before any work
        check_split_ids(
            mapping,
            {c.case_id for c in cases} | {cid for cid, _ in problems},
            {c.case_id for c in cases if c.has_label},
            f"split file {split_file}",
        )
    tasks = plan_shards(cases, problems, cases_per_shard)
    if eval_size == "full" and size is not None:
        _plan_eval_boxes(tasks, cases, split, seed)

    # Re-use complete, current shards; rebuild the others.
    results: dict[int, tuple] = {}
    todo: list[_ShardTask] = []
    for t in tasks:
        try:
            results[t.index] = check_shard(
                out / t.rel, plan=t.plan, fingerprint=fingerprint, deep=verify
            )
        except ShardInvalid:
            todo.append(t)
    reused = [t.rel for t in tasks if t.index in results]
    # Shard files beyond the current plan belong to an earlier, larger input: remove them.
    keep = {Path(t.rel).name for t in tasks}
    for p in (out / "shards").glob("shard-*.h5"):
        if p.name not in keep:
            p.unlink()

    if todo:  # an old manifest would describe shards about to change: readers must not trust it
        (out / "manifest.json").unlink(missing_ok=True)
    bar = Progress(sum(len(t.plan) for t in todo), label="prepare:", unit="cases", enabled=progress)
    bar.show(force=True)
    built, failures = _run_tasks(out, todo, fingerprint, size, storage, workers, _Tally(bar))
    bar.close()
    results.update(built)

    # Assemble the manifest from the shards (fresh or re-used) in shard order.
    records: list[dict] = []
    skipped: dict[str, str] = {}
    shard_list = []
    for t in tasks:
        if t.index in failures:
            for e in t.plan:
                skipped[e["id"]] = failures[t.index]
            continue
        recs, skips = results[t.index]
        for r in recs:
            records.append({**r, "shard": t.rel})
        for s in skips:
            skipped[s["case_id"]] = s["reason"]
        shard_list.append({"file": t.rel, "cases": [r["id"] for r in recs]})
    labelled = {r["id"]: r["patient"] for r in records if r["has_label"]}
    fold_of: dict[str, int] = {}
    if mapping is None:
        splits = assign_splits(labelled, split, seed)
    else:
        splits, fold_of = splits_from_file(mapping, labelled, f"split file {split_file}")
    if folds is not None:
        fold_of = assign_folds(
            {c: p for c, p in labelled.items() if splits[c] != "test"}, folds, seed
        )
    for r in records:
        r["split"] = splits.get(r["id"], "unlabelled")
        r.pop("fold", None)
        if r["id"] in fold_of:
            r["fold"] = fold_of[r["id"]]
    counts = {
        s: sum(r["split"] == s for r in records) for s in ("train", "val", "test", "unlabelled")
    }
    split_params = {"split_source": "seed" if mapping is None else "file"}
    if mapping is not None:
        split_params["split_file"] = Path(split_file).name
        split_params["split_file_sha256"] = hashlib.sha256(
            Path(split_file).read_bytes()
        ).hexdigest()
    if fold_of:
        split_params["folds"] = max(fold_of.values()) + 1
        split_params["fold_counts"] = [
            sum(f == k for f in fold_of.values()) for k in range(split_params["folds"])
        ]
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": f"dgseg {__version__} data_prep.pipeline",
        "params": {
            "input": str(input_dir),
            "size": "full" if size is None else int(size),
            "seed": int(seed),
            "split": [float(f) for f in split],
            **split_params,
            "cases_per_shard": int(cases_per_shard),
            **storage,
            "eval_size": "full" if eval_size == "full" or size is None else int(size),
            "preprocess_version": PREPROCESS_VERSION,
            "shard_version": SHARD_VERSION,
            "zscore": "per modality over its own nonzero voxels, float32, background 0",
            "crop": "joint nonzero box of all modalities, centred crop/pad to size"
            + ("; val/test: the whole box" if eval_size == "full" and size else ""),
        },
        "modalities": list(MODALITIES),
        "label_convention": "brats2021",
        "split_counts": counts,
        "shards": shard_list,
        "cases": [_ordered(r) for r in records],
    }
    atomic_write_text(out / "manifest.json", _dump_manifest(manifest))
    atomic_write_json(out / "skipped.json", dict(sorted(skipped.items())))

    res = PrepareResult(
        output=out,
        prepared=[r["id"] for r in records],
        skipped=skipped,
        shards_built=[t.rel for t in todo if t.index in built],
        shards_reused=reused,
    )
    if verify:
        res.verify_errors = verify_output(out)
    failed_write = bool(failures)
    if not records or res.verify_errors or failed_write or (skipped and not allow_skipped):
        res.exit_code = 1
    res.seconds = time.monotonic() - t0
    return res


def _dump_manifest(manifest: dict) -> str:
    """JSON with one line per case and per shard (readable, diff-friendly for large sets)."""
    lines = ["{"]
    keys = list(manifest)
    for k, key in enumerate(keys):
        comma = "," if k < len(keys) - 1 else ""
        value = manifest[key]
        if key in ("cases", "shards") and value:
            lines.append(f" {json.dumps(key)}: [")
            lines += [
                f"  {json.dumps(v)}{',' if j < len(value) - 1 else ''}" for j, v in enumerate(value)
            ]
            lines.append(f" ]{comma}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


_KEY_ORDER = ("id", "patient", "split", "fold", "shard", "layout", "has_label")


def _ordered(rec: dict) -> dict:
    return {
        **{k: rec[k] for k in _KEY_ORDER if k in rec},
        **{k: v for k, v in rec.items() if k not in _KEY_ORDER},
    }


def verify_output(output_dir: Path | str) -> list[str]:
    """Re-read every shard of a prepared folder and check it against ``manifest.json``.

    Checks: manifest format, every listed shard readable with exactly the listed cases, each
    case's stored arrays matching its ``stored_crc32``, and every case's ``shard`` entry
    pointing at the shard that holds it. Returns one line per problem (empty: all good).
    """
    out = Path(output_dir)
    errors: list[str] = []
    try:
        manifest = load_manifest(out)
    except (OSError, ValueError) as e:  # missing, not JSON, other format or version
        return [str(e)]
    by_shard: dict[str, dict[str, str]] = {}
    try:
        for c in manifest["cases"]:
            by_shard.setdefault(c["shard"], {})[c["id"]] = c["stored_crc32"]
        shards = [(str(s["file"]), list(s["cases"])) for s in manifest["shards"]]
    except (KeyError, TypeError) as e:  # hand-edited or damaged: a problem, not a crash
        return [f"{out / 'manifest.json'}: a case or shard record lacks {e} or is malformed"]
    listed = {rel for rel, _ in shards}
    for rel in sorted(set(by_shard) - listed):
        errors.append(f"cases point at shard {rel}, which the shard list lacks")
    for rel, ids in shards:
        expected = by_shard.get(rel, {})
        if sorted(expected) != sorted(ids):
            errors.append(f"{rel}: shard list and case list disagree")
        try:
            check_shard(out / rel, expected=expected)
        except ShardInvalid as e:
            errors.append(str(e))
    return errors

"""Find the cases of a raw BraTS-style data folder and recognise its layout.

Layouts (docs/SPEC.md, "Labels"):

* ``brats2021`` / ``brats2020`` -- one folder per case,
  ``<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz``; labels 0, 1, 2, 4.
* ``brats2023`` (GLI and the other 2023 tasks) -- ``<id>/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz``;
  labels 1 NETC, 2 SNFH, 3 ET.
* ``msd`` (Medical Segmentation Decathlon Task01_BrainTumour) -- ``imagesTr/<id>.nii.gz`` holds a
  4D (X, Y, Z, 4) image, channel order from ``dataset.json`` (FLAIR, T1w, T1gd, T2w), label in
  ``labelsTr/<id>.nii.gz``; labels 1 edema, 2 non-enhancing, 3 enhancing. ``imagesTs`` is
  unlabelled.
* ``file`` -- one 3D NIfTI file of a known modality (prediction on a single scan), made by
  :func:`single_file_case`, never by discovery.
* Unlabelled cases (validation / test sets): the same layouts without label files. Within one
  parent folder, if no case has a label file the cases are unlabelled; if some have one, a case
  without it is a problem (a missing file), not an unlabelled case.

``discover_cases`` never raises for bad input: every case it cannot use becomes a
``(case_id, reason)`` problem, one line each, and the caller decides what to do. What a case must
hold is the caller's: preparation needs all four modalities (the default), prediction only the
ones its model reads (``required=("t2",)``, ``labels=False``).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dgseg.constants import MODALITIES

__all__ = [
    "RawCase",
    "discover_cases",
    "single_file_case",
    "patient_id",
    "LAYOUTS",
    "MSD_DEFAULT_ORDER",
]

LAYOUTS = ("brats2021", "brats2020", "brats2023", "msd")

# File-name token (after the last "_" or "-") -> modality, per naming scheme.
_TOKENS_2021 = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
_TOKENS_2023 = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}
_EXAMPLE = {"brats2021": "_{}.nii.gz", "brats2023": "-{}.nii.gz"}
_INV_2023 = {v: k for k, v in _TOKENS_2023.items()}

# MSD Task01 dataset.json: {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}.
MSD_DEFAULT_ORDER = ("flair", "t1", "t1ce", "t2")
_MSD_NAMES = {
    "flair": "flair",
    "t1w": "t1",
    "t1": "t1",
    "t1gd": "t1ce",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t2w": "t2",
    "t2": "t2",
}

_NIFTI = re.compile(r"^(?P<stem>.+)\.nii(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class RawCase:
    """One raw case as found on disk.

    Attributes:
        case_id: folder name (BraTS) or file stem (MSD); unique within a run.
        layout: one of ``LAYOUTS``, or ``"file"`` for :func:`single_file_case`.
        files: modality -> file, keyed by ``MODALITIES`` names, the modalities discovery was
            asked for (all four by default); MSD: ``{"4d": path}`` (all four channels).
        label_file: the segmentation, or None for an unlabelled case.
        label_convention: "brats2021" | "brats2023" | "msd", or None when unlabelled.
        channel_order: for a 4D file, the modality of each channel (MSD ``dataset.json``).
        patient_id: the patient this case belongs to (2023: id without the time-point suffix).
    """

    case_id: str
    layout: str
    files: dict[str, Path]
    label_file: Path | None
    label_convention: str | None
    channel_order: tuple[str, ...] | None = None
    patient_id: str = ""
    root: Path | None = field(default=None, compare=False)

    @property
    def has_label(self) -> bool:
        return self.label_file is not None

    def source_files(self) -> list[tuple[str, Path]]:
        """All input files, images first then the label, as (role, path)."""
        out = [(k, self.files[k]) for k in (*MODALITIES, "4d") if k in self.files]
        if self.label_file is not None:
            out.append(("seg", self.label_file))
        return out

    def rel(self, path: Path) -> str:
        """``path`` relative to the discovery root (for messages and the manifest)."""
        if self.root is not None:
            try:
                return path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return path.as_posix()


def patient_id(case_id: str, layout: str) -> str:
    """Patient of a case: BraTS 2023 ids end with a time point (``BraTS-GLI-00000-001``)."""
    if layout == "brats2023":
        m = re.match(r"^(.*)-\d{3}$", case_id)
        if m:
            return m.group(1)
    return case_id


def _nifti_stem(name: str) -> str | None:
    if name.startswith("."):  # hidden files and macOS "._x.nii.gz" resource forks (MSD tarball)
        return None
    m = _NIFTI.match(name)
    return m.group("stem") if m else None


def _classify(stem: str) -> tuple[str, str] | None:
    """(naming scheme, modality-or-seg) of a file stem, or None if it is not a case file."""
    low = stem.lower()
    tok = low.rsplit("-", 1)[-1]
    if "-" in low and tok in _TOKENS_2023:
        return "brats2023", _TOKENS_2023[tok]
    tok = low.rsplit("_", 1)[-1]
    if "_" in low and tok in _TOKENS_2021:
        return "brats2021", _TOKENS_2021[tok]
    return None


def _msd_order(folder: Path) -> tuple[str, ...]:
    try:
        meta = json.loads((folder / "dataset.json").read_text())
        mod = meta["modality"]
        order = tuple(_MSD_NAMES[str(mod[str(i)]).lower()] for i in range(len(mod)))
        if sorted(order) == sorted(MODALITIES):
            return order
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no or odd dataset.json: the documented Task01 order
    return MSD_DEFAULT_ORDER


def _discover_msd(
    root: Path,
    folder: Path,
    subdirs: set[str],
    entries: list,
    problems: list,
    use_labels: bool = True,
) -> None:
    """MSD cases under ``folder`` as (id, location, case or None, reason or None) entries."""
    order = _msd_order(folder)
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        img_dir = folder / images
        if images not in subdirs:
            continue
        try:
            names = sorted(os.listdir(img_dir))
        except OSError as e:
            problems.append((images, f"unreadable folder {_rel(root, img_dir)}: {e.strerror}"))
            continue
        lab_dir = folder / labels
        lab_names: set[str] | None = None
        if use_labels and labels in subdirs:
            try:
                lab_names = set(os.listdir(lab_dir))
            except OSError as e:
                problems.append((labels, f"unreadable folder {_rel(root, lab_dir)}: {e.strerror}"))
                lab_names = set()
        for name in names:
            stem = _nifti_stem(name)
            if stem is None:
                continue
            loc = _rel(root, img_dir / name)
            label = None
            if lab_names is not None:
                if name not in lab_names:
                    entries.append(
                        (stem, loc, None, f"missing label file {_rel(root, lab_dir / name)}")
                    )
                    continue
                label = lab_dir / name
            entries.append(
                (
                    stem,
                    loc,
                    RawCase(
                        case_id=stem,
                        layout="msd",
                        files={"4d": img_dir / name},
                        label_file=label,
                        label_convention="msd" if label is not None else None,
                        channel_order=order,
                        patient_id=stem,
                        root=root,
                    ),
                    None,
                )
            )


def _rel(root: Path, p: Path) -> str:
    try:
        return p.relative_to(root).as_posix() or "."
    except ValueError:
        return p.as_posix()


def _folder_entry(
    root: Path,
    folder: Path,
    scheme: str | None,
    mods: dict[str, list[Path]],
    labelled: bool,
    required: tuple[str, ...],
) -> tuple[str, str, RawCase | None, str | None]:
    """(id, location, case or None, reason or None) of one BraTS case folder."""
    cid, loc = folder.name, _rel(root, folder)
    if scheme is None:
        return cid, loc, None, f"mixed BraTS 2021 and 2023 file names in {loc}"
    tag = (lambda m: m) if scheme == "brats2021" else (lambda m: _INV_2023[m])
    wanted = (*required, "seg") if labelled else required  # other modality files are ignored
    missing = [m for m in wanted if m not in mods]
    if missing:
        what = ", ".join(f"{m} (*{_EXAMPLE[scheme].format(tag(m))})" for m in missing)
        kind = "label file" if missing == ["seg"] else "modality file(s)"
        return cid, loc, None, f"missing {kind} in {loc}: {what}"
    multi = [m for m in wanted if len(mods[m]) > 1]
    if multi:
        names = ", ".join(p.name for p in mods[multi[0]])
        return cid, loc, None, f"ambiguous: {len(mods[multi[0]])} files for {multi[0]}: {names}"
    layout = scheme
    if scheme == "brats2021" and cid.lower().startswith("brats20_"):
        layout = "brats2020"  # same names and labels; the 2020 ids read BraTS20_Training_001
    label = mods["seg"][0] if labelled and "seg" in mods else None
    conv = None if label is None else ("brats2023" if scheme == "brats2023" else "brats2021")
    return (
        cid,
        loc,
        RawCase(
            case_id=cid,
            layout=layout,
            files={m: mods[m][0] for m in required},
            label_file=label,
            label_convention=conv,
            patient_id=patient_id(cid, layout),
            root=root,
        ),
        None,
    )


def discover_cases(
    root: Path | str, *, required: Sequence[str] = MODALITIES, labels: bool = True
) -> tuple[list[RawCase], list[tuple[str, str]]]:
    """Walk ``root`` and return (usable cases sorted by id, problems as (case_id, reason)).

    Problems found here: unreadable folders, missing or ambiguous modality files, a missing label
    in a labelled set, mixed file naming inside one case folder, and duplicate case ids (every
    copy of a duplicated id is rejected: which one is right cannot be decided).

    Args:
        root: a case folder or a dataset folder.
        required: the modalities a BraTS case folder must hold (``MODALITIES`` names, kept in
            ``MODALITIES`` order); ``RawCase.files`` has exactly these, and the files of other
            modalities are neither needed nor checked. MSD 4D files always hold all four.
        labels: False ignores label files: every case is unlabelled (prediction).

    Raises:
        ValueError: ``root`` is not a folder, or a bad ``required``.
    """
    root = Path(root)
    problems: list[tuple[str, str]] = []
    if not required or any(m not in MODALITIES for m in required):
        raise ValueError(f"required must be names from {MODALITIES}, got {tuple(required)}")
    required = tuple(m for m in MODALITIES if m in required)  # canonical order, no repeats
    if not root.is_dir():
        raise ValueError(f"input folder does not exist or is not a folder: {root}")

    # parent folder -> list of (case folder, scheme, {modality: [files]})
    groups: dict[Path, list[tuple[Path, str | None, dict[str, list[Path]]]]] = defaultdict(list)
    msd_entries: list[tuple[str, str, RawCase | None, str | None]] = []

    def onerror(err: OSError) -> None:
        p = Path(err.filename) if err.filename else root
        problems.append((p.name, f"unreadable folder {_rel(root, p)}: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        subdirs = set(dirnames)
        if "imagesTr" in subdirs or "imagesTs" in subdirs:
            _discover_msd(root, here, subdirs, msd_entries, problems, labels)
            dirnames[:] = [
                d for d in dirnames if d not in ("imagesTr", "imagesTs", "labelsTr", "labelsTs")
            ]
        by_mod: dict[str, list[Path]] = defaultdict(list)
        schemes = set()
        for name in sorted(filenames):
            stem = _nifti_stem(name)
            if stem is None:
                continue
            kind = _classify(stem)
            if kind is None:
                continue
            schemes.add(kind[0])
            by_mod[kind[1]].append(here / name)
        if by_mod:
            scheme = schemes.pop() if len(schemes) == 1 else None
            groups[here.parent].append((here, scheme, dict(by_mod)))

    # Every case folder (usable or not) as (id, location, case or None, reason or None).
    entries: list[tuple[str, str, RawCase | None, str | None]] = list(msd_entries)
    for members in groups.values():
        labelled = labels and any("seg" in mods for _, _, mods in members)
        for folder, scheme, mods in members:
            entries.append(_folder_entry(root, folder, scheme, mods, labelled, required))

    # Duplicate ids, usable copies or not: reject every copy (which one is right is unknowable).
    where: dict[str, list[str]] = defaultdict(list)
    for cid, loc, _, _ in entries:
        where[cid].append(loc)
    cases = []
    for cid, _loc, case, reason in entries:
        if len(where[cid]) > 1:
            continue
        if case is not None:
            cases.append(case)
        else:
            problems.append((cid, reason))
    for cid in sorted(c for c, locs in where.items() if len(locs) > 1):
        problems.append((cid, f"duplicate case id, found at: {', '.join(sorted(where[cid]))}"))
    cases.sort(key=lambda c: c.case_id)
    problems.sort()
    return cases, problems


def single_file_case(path: Path | str, modality: str) -> RawCase:
    """An unlabelled case of one NIfTI file (``.nii`` / ``.nii.gz``) holding ``modality``.

    The case id is the file name without its NIfTI suffix (``scan.nii.gz`` -> ``scan``).

    Raises:
        ValueError: an unknown modality, a name without a NIfTI suffix, or no such file.
    """
    path = Path(path)
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    stem = _nifti_stem(path.name)
    if stem is None:
        raise ValueError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz)")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    return RawCase(
        case_id=stem,
        layout="file",
        files={modality: path},
        label_file=None,
        label_convention=None,
        patient_id=stem,
    )

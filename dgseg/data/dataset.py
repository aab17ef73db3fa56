"""``ShardDataset``: prepared HDF5 shards -> training / evaluation samples.

Training sample, in the order of docs/SPEC.md's intensity pipeline:

1. read only the requested modality datasets (a random patch when ``patch_size`` is smaller than
   the stored volume; zero padding when larger);
2. the intensity augmentation of the sample's training domain, an entry of the pool
   ``intensity_augs`` (``dgseg.transforms.sdg``: the write-up's Bezier curves, GIN, IPA, RandConv,
   Fourier amplitude, SLAug location-scale, contrast re-synthesis) drawn per sample or fixed per
   patient (``dgseg.data.domains``), on the patch and its label map;
3. random flips / 90-degree turns / small rotations on image and label together.

Evaluation (any split but "train"): no augmentation, domain 0, the whole stored volume
(or a centred patch when ``patch_size`` is given). Prepared folders store val/test cases as their
whole brain box by default (variable shapes) and train cases at the manifest's ``size``; a train
case stored otherwise (its split changed after preparation) is cropped/padded to ``size`` here,
centred as the preprocessing would have done, before any patch is cut. Testing a T2 model on T1
is just ``ShardDataset(root, "test", ("t1",))``.

Randomness: each sample builds its own ``torch.Generator`` from (seed, epoch, index, rank)
(``domains.sample_seed``), so a sample is reproducible whatever the worker that loads it, and
changes every epoch. The epoch lives in shared memory (``set_epoch``), so DataLoader workers see
the new epoch also with ``persistent_workers=True``; call ``set_epoch`` before iterating.

Processes: HDF5 files are opened lazily, once per process (the handle is dropped when the dataset
is pickled and re-opened after a fork), as h5py handles must not cross ``fork``.
"""

from __future__ import annotations

import os
from multiprocessing.context import get_spawning_popen
from multiprocessing.sharedctypes import RawValue
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from dgseg.constants import MODALITIES
from dgseg.transforms import random_flip, random_rot90, random_rotation
from dgseg.transforms.gradient_map import DEFAULT_SIGMAS, input_representation, repr_channels
from dgseg.transforms.location_scale import global_location_scale, local_location_scale
from dgseg.transforms.sdg import INTENSITY_AUGS, intensity_augment

from .domains import assign_domains, check_domains, sample_seed
from .manifest import load_manifest, split_cases

__all__ = ["ShardDataset", "augment", "region_channels"]


def _triple(value, name: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    t = (value,) * 3 if np.isscalar(value) else tuple(value)
    if len(t) != 3 or any(int(v) != v or v < 1 for v in t):
        raise ValueError(
            f"{name} must be None, a positive int or three positive ints, got {value!r}"
        )
    return tuple(int(v) for v in t)


def region_channels(label: torch.Tensor) -> torch.Tensor:
    """(D, H, W) uint8 BraTS 2021 labels -> (3, D, H, W) float32 WT, TC, ET.

    Same result as ``labels_to_channels(label).float()`` without its per-call value check
    (the values were checked when the shards were prepared), written straight into float32:
    4x faster, and this runs for every sample.
    """
    out = torch.empty((3, *label.shape), dtype=torch.float32)
    torch.gt(label, 0, out=out[0])  # WT = 1 ∪ 2 ∪ 4
    torch.eq(label, 4, out=out[2])  # ET = 4
    torch.eq(label, 1, out=out[1])
    out[1] += out[2]  # TC = 1 ∪ 4 (disjoint, so the sum stays 0/1)
    return out


def augment(
    image: torch.Tensor,
    label: torch.Tensor | None,
    g: torch.Generator,
    *,
    intensity: str = "none",
    flip: bool = False,
    rot90: bool = False,
    rotation_degrees: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training transforms in SPEC order: the intensity augmentation ``intensity`` (a name of
    ``dgseg.transforms.sdg``), then the spatial ones.

    Args:
        image: (C, D, H, W) float32, z-scored, background 0.
        label: (D, H, W) uint8 label map (or None).
        g: the sample's generator.
    """
    if intensity != "none":
        image = intensity_augment(intensity, image, label, g)
    if flip:
        image, label = random_flip(image, label, g)
    if rot90:
        image, label = random_rot90(image, label, g)
    if rotation_degrees > 0:
        image, label = random_rotation(image, label, g, max_degrees=rotation_degrees)
    return image, label


def _shift(src: tuple, dst: tuple, start: Sequence[int], shape: Sequence[int]):
    """Window ``src`` of a virtual volume starting at ``start`` of the stored one (negative:
    padding), clipped to the stored ``shape``; ``dst`` shrinks by what was clipped.

    Returns (src, dst) in stored / output coordinates, or (None, dst) when nothing overlaps.
    """
    out_src, out_dst = [], []
    for s, d, a0, n in zip(src, dst, start, shape):
        a, b = s.start + a0, s.stop + a0
        lo, hi = max(a, 0), min(b, n)
        if hi <= lo:
            return None, dst
        out_src.append(slice(lo, hi))
        out_dst.append(slice(d.start + lo - a, d.stop - (b - hi)))
    return tuple(out_src), tuple(out_dst)


class ShardDataset(Dataset):
    """Cases of one split of a prepared folder.

    Args:
        root: folder with ``manifest.json`` and ``shards/``.
        split: "train", "val", "test", "unlabelled" or "all"; only "train" is augmented.
        modalities: channels by name, repeats allowed (("t1", "t1") feeds T1 to a 2-channel net).
        patch_size: None = the whole stored volume; int / 3 ints = random (train) or centred patch,
            zero-padded when the volume is smaller.
        flip, rot90: random axis flips / 90-degree turns (p = 0.5 each).
        rotation_degrees: max angle of a random small rotation (p = 0.5); 0 = off.
        seed: seeds domains and per-sample randomness.
        rank: distributed rank, part of the per-sample seed.
        intensity_augs: the pool of training domains, names of ``dgseg.transforms.sdg``; a
            sample's entry index is its domain label. Empty: the source image as it is.
        domain_assignment: "sample" (an entry drawn per sample and epoch) or "patient" (fixed
            subsets of patients, see ``dgseg.data.domains``).
        fold: cross-validation fold held out as "val" (``split_cases``); None: manifest splits.
        saliency_pair: SLAug's two views for saliency-balanced training: "image" is the global
            location-scale view and "image_local" the class-wise one, both under the same
            spatial augmentation (``dgseg.training.steps`` fuses them). Not with a pool.
        views: training views per sample for GIN-IPA's consistency loss; above 1, each view
            draws its own entry from ``intensity_augs`` and all views share one spatial
            augmentation. The first view's draw is the sample's domain.
        input_repr, gradient_sigmas: the network input (``dgseg.transforms.gradient_map``),
            computed last, from the augmented image (every view), in every split.

    Sample: ``{"image": float32 (C, D, H, W), "label": float32 (3, D, H, W) WT/TC/ET (zeros when
    unlabelled), "domain": int64 scalar, "case_id": str, "has_label": bool}``, and with
    ``saliency_pair`` (training) ``"image_local"`` of the image's shape, and with ``views`` > 1
    (training) ``"views"`` float32 (V, C, D, H, W), of which "image" is the first.
    """

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        modalities: Sequence[str] = ("t2",),
        *,
        patch_size: int | Sequence[int] | None = None,
        flip: bool = False,
        rot90: bool = False,
        rotation_degrees: float = 0.0,
        seed: int = 0,
        rank: int = 0,
        intensity_augs: Sequence[str] = (),
        domain_assignment: str = "sample",
        fold: int | None = None,
        saliency_pair: bool = False,
        views: int = 1,
        input_repr: str = "intensity",
        gradient_sigmas: Sequence[float] = DEFAULT_SIGMAS,
    ) -> None:
        self.root = Path(root)
        manifest = load_manifest(self.root)
        if isinstance(modalities, str):
            modalities = (modalities,)
        modalities = tuple(modalities)
        bad = [m for m in modalities if m not in MODALITIES]
        if not modalities or bad:
            raise ValueError(
                f"modalities must be a non-empty selection of {MODALITIES}, got {modalities!r}"
            )
        intensity_augs = tuple(intensity_augs)
        unknown = [a for a in intensity_augs if a not in INTENSITY_AUGS]
        if unknown:
            raise ValueError(
                f"unknown intensity augmentation(s) {unknown}; valid: {INTENSITY_AUGS}"
            )
        check_domains(intensity_augs, domain_assignment, views=views, saliency_pair=saliency_pair)
        if not 0.0 <= float(rotation_degrees) <= 180.0:
            raise ValueError(f"rotation_degrees must lie in [0, 180], got {rotation_degrees!r}")
        for name, v in (("seed", seed), ("rank", rank)):
            if int(v) != v or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        self.cases = split_cases(manifest, split, fold)
        size = manifest.get("params", {}).get("size")
        # Train samples start from the size³ cube the preprocessing stores for train cases.
        self.train_size = (size,) * 3 if split == "train" and isinstance(size, int) else None
        if not self.cases:
            raise ValueError(f"split {split!r} of {self.root} holds no cases")
        self.split = split
        self.modalities = modalities
        self.patch_size = _triple(patch_size, "patch_size")
        self.train = split == "train"
        self.flip, self.rot90 = bool(flip), bool(rot90)
        self.rotation_degrees = float(rotation_degrees)
        self.intensity_augs = intensity_augs if self.train else ()
        self.domain_assignment = domain_assignment
        self.saliency_pair = bool(saliency_pair) and self.train
        self.views = int(views) if self.train else 1
        self.seed, self.rank = int(seed), int(rank)
        ids = [c["id"] for c in self.cases]
        patients = {c["id"]: c.get("patient", c["id"]) for c in self.cases}
        # Domains partition the train split's patients (the dataset holds exactly those here).
        by_patient = self.intensity_augs and domain_assignment == "patient"
        k = len(self.intensity_augs)
        self.domains = assign_domains(ids, k, self.seed, patients=patients) if by_patient else {}
        repr_channels(1, input_repr, gradient_sigmas)  # ValueError on an unknown representation
        self.input_repr, self.gradient_sigmas = input_repr, tuple(float(s) for s in gradient_sigmas)
        self._epoch = RawValue("q", 0)  # shared memory: visible to (persistent) workers
        self._handles: dict[str, h5py.File] = {}
        self._pid = os.getpid()

    # --- process handling -------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # never ship an open HDF5 handle to another process
        if get_spawning_popen() is None:  # plain pickling (copy, save): a snapshot of the epoch
            state["_epoch"] = int(self._epoch.value)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if isinstance(self._epoch, int):
            self._epoch = RawValue("q", self._epoch)
        self._pid = os.getpid()

    def _file(self, rel: str) -> h5py.File:
        if os.getpid() != self._pid:  # forked worker: the parent's handles are not ours
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(rel)
        if f is None:
            # Default locking on purpose: HDF5 refuses a second open of the same file in one
            # process with other locking flags (shared storage without locks:
            # HDF5_USE_FILE_LOCKING=FALSE).
            f = h5py.File(self.root / rel, "r")
            self._handles[rel] = f
        return f

    def close(self) -> None:
        """Close the HDF5 files this process opened."""
        if os.getpid() == self._pid:
            for f in self._handles.values():
                f.close()
        self._handles = {}

    # --- epochs and metadata ----------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the per-sample randomness (all processes, also running workers)."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    @property
    def case_ids(self) -> list[str]:
        return [c["id"] for c in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def case_meta(self, index: int) -> dict:
        """Shard attributes of case ``index`` (numpy arrays: offset, original_shape, affine, ...)
        plus its manifest record under ``"manifest"``."""
        case = self.cases[index]
        attrs = self._file(case["shard"])[case["id"]].attrs
        meta = {}
        for k, v in attrs.items():
            if k == "record":
                continue
            meta[k] = v.decode() if isinstance(v, bytes) else v
        meta["manifest"] = dict(case)
        return meta

    # --- samples ----------------------------------------------------------------------------

    def _window(self, shape: Sequence[int], g: torch.Generator):
        """(source slices, destination slices, output shape) of the patch to read."""
        if self.patch_size is None:
            full = tuple(slice(0, s) for s in shape)
            return full, full, tuple(shape)
        src, dst = [], []
        for s, p in zip(shape, self.patch_size):
            if s > p:
                if self.train:
                    a = int(torch.randint(0, s - p + 1, (1,), generator=g))
                else:
                    a = (s - p) // 2
                src.append(slice(a, a + p))
                dst.append(slice(0, p))
            else:
                b = (p - s) // 2  # centred zero padding
                src.append(slice(0, s))
                dst.append(slice(b, b + s))
        return tuple(src), tuple(dst), self.patch_size

    def _spatial_together(
        self, parts: list[torch.Tensor], lab: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One spatial augmentation for several (C, D, H, W) views of a sample and its label map:
        returns the views stacked, (V, C, D, H, W), and the label."""
        img, lab = augment(
            torch.cat(parts),
            lab,
            g,
            flip=self.flip,
            rot90=self.rot90,
            rotation_degrees=self.rotation_degrees,
        )  # (V·C, D, H, W)
        return img.reshape(len(parts), -1, *img.shape[1:]), lab

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.cases):
            raise IndexError(f"index {index} out of range for {len(self.cases)} cases")
        case = self.cases[index]
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index, self.rank))
        grp = self._file(case["shard"])[case["id"]]
        shape = tuple(case["shape"])
        if self.train_size is None or shape == self.train_size:
            src, dst, out_shape = self._window(shape, g)
        else:  # e.g. a whole-box case that became train: the centred size³ cube first
            src, dst, out_shape = self._window(self.train_size, g)
            src, dst = _shift(
                src, dst, [(s - t) // 2 for s, t in zip(shape, self.train_size)], shape
            )
        padded = src is None or any(d.start != 0 or d.stop != o for d, o in zip(dst, out_shape))
        alloc = np.zeros if padded else np.empty

        image = alloc((len(self.modalities), *out_shape), np.float32)  # (C, D, H, W)
        first: dict[str, int] = {}
        for c, m in enumerate(self.modalities):
            if m in first:  # a repeated modality is read once
                image[c] = image[first[m]]
                continue
            first[m] = c
            if src is not None:
                grp[m].read_direct(image[c], source_sel=src, dest_sel=dst)
        has_label = bool(case["has_label"])
        label = np.zeros(out_shape, np.uint8)  # (D, H, W)
        if has_label and src is not None:
            grp["label"].read_direct(label, source_sel=src, dest_sel=dst)
        img = torch.from_numpy(image)
        lab = torch.from_numpy(label)

        domain, intensity = 0, "none"
        if self.domains:  # fixed per patient
            domain = self.domains[case["id"]]
        elif self.intensity_augs:  # drawn per sample
            domain = int(torch.randint(0, len(self.intensity_augs), (1,), generator=g))
        if self.intensity_augs:
            intensity = self.intensity_augs[domain]
        local = views = None
        if self.views > 1:  # every view its own intensity draw, then one spatial augmentation
            names = [intensity] + [
                self.intensity_augs[
                    int(torch.randint(0, len(self.intensity_augs), (1,), generator=g))
                ]
                for _ in range(self.views - 1)
            ]
            parts = [augment(img, lab, g, intensity=n)[0] for n in names]
            views, lab = self._spatial_together(parts, lab, g)  # (V, C, D, H, W)
            img = views[0]
        elif self.saliency_pair:  # both views, then one spatial augmentation for the two
            parts = [global_location_scale(img, g), local_location_scale(img, lab, g)]
            (img, local), lab = self._spatial_together(parts, lab, g)
        elif self.train:
            img, lab = augment(
                img,
                lab,
                g,
                intensity=intensity,
                flip=self.flip,
                rot90=self.rot90,
                rotation_degrees=self.rotation_degrees,
            )
        if self.input_repr != "intensity":  # from the augmented image, as the network sees it
            img, local, views = (
                None if t is None else self._represent(t) for t in (img, local, views)
            )
        sample = {
            "image": img.contiguous(),
            "label": region_channels(lab),  # (3, D, H, W) float32 WT, TC, ET
            "domain": torch.tensor(domain, dtype=torch.int64),
            "case_id": case["id"],
            "has_label": has_label,
        }
        if local is not None:
            sample["image_local"] = local.contiguous()
        if views is not None:
            sample["views"] = views.contiguous()
        return sample

    def _represent(self, image: torch.Tensor) -> torch.Tensor:
        return input_representation(image, self.input_repr, self.gradient_sigmas)

    def __repr__(self) -> str:
        return (
            f"ShardDataset(root={str(self.root)!r}, split={self.split!r}, "
            f"modalities={self.modalities}, n={len(self)}, patch_size={self.patch_size}, "
            f"intensity_augs={self.intensity_augs}, epoch={self.epoch})"
        )

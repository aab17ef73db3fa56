"""Synthetic intensity domains for single-source domain generalisation (docs/SPEC.md, "Domains").

The training patients of the source modality are partitioned into K disjoint subsets
(deterministic from the case ids and the seed). With K = 3 (the write-up's setting): domain 0 keeps
its intensities, domain 1 gets a fresh increasing Bezier curve per sample and epoch, domain 2 a
fresh decreasing one (Zhou et al., CVPR 2022, "style augmentation and dual normalization"; the
curve itself is in ``dgseg.transforms.bezier``). The domain index is the label of the GRL domain
classifier (Ganin et al., JMLR 2016).

Modes (``ShardDataset(bezier=...)``):

* ``"none"``      every sample domain 0, no curve.
* ``"partition"`` K subsets, curve kind = domain (0 identity, 1 increasing, 2 decreasing), K <= 3.
* ``"pair"``      two subsets with curves increasing / decreasing, domain labels 0 / 1 (the
                  write-up's 50:50 variant without the untouched domain).
* ``"random"``    every sample and epoch draws its kind in {0, 1, 2}; label = kind.

Per-sample randomness comes from :func:`sample_seed` of (seed, epoch, index, rank), so a sample is
reproducible and differs from epoch to epoch (the original code re-seeded per patient and drew the
same curve every epoch).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import numpy as np

__all__ = ["BEZIER_MODES", "PARTITION_MAX_DOMAINS", "assign_domains", "curve_kind", "sample_seed"]

BEZIER_MODES = ("none", "partition", "pair", "random")
PARTITION_MAX_DOMAINS = 3  # "partition" curve kinds: identity, increasing, decreasing


def _key(seed: int, name: str) -> str:
    return hashlib.sha256(f"{int(seed)}:{name}".encode()).hexdigest()


def assign_domains(
    case_ids: Iterable[str],
    num_domains: int,
    seed: int,
    *,
    patients: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Partition cases into ``num_domains`` disjoint, near-equal subsets; case id -> domain.

    Units (patients when ``patients`` maps case id -> patient, else cases) are ordered by
    SHA-256 of ``"<seed>:<unit>"`` and dealt round-robin, so subset sizes differ by at most one
    and the result depends neither on the input order nor on the process.

    Raises:
        ValueError: ``num_domains`` < 1.
    """
    if int(num_domains) != num_domains or num_domains < 1:
        raise ValueError(f"num_domains must be a positive integer, got {num_domains!r}")
    ids = list(dict.fromkeys(case_ids))  # unique, order kept (order does not matter below)
    unit = {cid: (patients.get(cid, cid) if patients else cid) for cid in ids}
    order = sorted(set(unit.values()), key=lambda u: (_key(seed, u), u))
    dom = {u: i % int(num_domains) for i, u in enumerate(order)}
    return {cid: dom[unit[cid]] for cid in ids}


def curve_kind(mode: str, domain: int) -> int:
    """Bezier curve kind (0 identity, 1 increasing, 2 decreasing) of a fixed-domain mode."""
    if mode == "none":
        return 0
    if mode == "partition":
        return int(domain)
    if mode == "pair":
        return int(domain) + 1
    raise ValueError(f"curve kind of mode {mode!r} is drawn per sample, not fixed")


def sample_seed(seed: int, epoch: int, index: int, rank: int = 0) -> int:
    """A 63-bit seed for one sample from (seed, epoch, index, rank) via ``np.random.SeedSequence``.

    SeedSequence hashes the four integers together, so neighbouring indices or epochs give
    unrelated streams (unlike ``seed + index``).
    """
    for name, v in (("seed", seed), ("epoch", epoch), ("index", index), ("rank", rank)):
        if int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    lo, hi = np.random.SeedSequence([int(seed), int(epoch), int(index), int(rank)]).generate_state(
        2, np.uint32
    )
    return int((int(hi) << 32 | int(lo)) & ((1 << 63) - 1))

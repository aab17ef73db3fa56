"""Training domains for single-source domain generalisation (docs/SPEC.md, "Domains").

A training sample's domain is an entry of the intensity-augmentation pool
(``DataConfig.intensity_augs``, names of :mod:`dgseg.transforms.sdg`); the entry's index is the
label of the GRL domain classifier. How a sample gets its entry (``domain_assignment``):

* ``"sample"``   every sample and epoch draws an entry uniformly.
* ``"patient"``  the training patients are dealt into len(pool) disjoint, fixed subsets
                 (:func:`assign_domains`); subset k always gets entry k. The write-up's three
                 domains are the pool ("none", "bezier_increasing", "bezier_decreasing") dealt
                 by patient (Zhou et al., CVPR 2022; the curves in ``dgseg.transforms.bezier``).

Per-sample randomness comes from :func:`sample_seed` of (seed, epoch, index, rank), so a sample is
reproducible and differs from epoch to epoch.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["DOMAIN_ASSIGNMENTS", "assign_domains", "check_domains", "sample_seed"]

DOMAIN_ASSIGNMENTS = ("sample", "patient")


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


def check_domains(
    pool: Sequence[str],
    assignment: str,
    *,
    views: int = 1,
    saliency_pair: bool = False,
    prefix: str = "",
) -> None:
    """The rules of a training-domain setting, in one place (the config and the dataset call it).

    Raises:
        ValueError: naming the setting (with ``prefix``, e.g. "data.") and why.
    """
    if assignment not in DOMAIN_ASSIGNMENTS:
        raise ValueError(
            f"{prefix}domain_assignment={assignment!r} is not one of {DOMAIN_ASSIGNMENTS}"
        )
    if assignment == "patient" and not pool:
        raise ValueError(
            f"{prefix}domain_assignment='patient' deals patients onto {prefix}intensity_augs, "
            "which is empty"
        )
    if int(views) != views or views < 1:
        raise ValueError(f"{prefix}consistency_views={views!r} must be a positive integer")
    if views > 1 and (not pool or assignment != "sample"):
        raise ValueError(
            f"{prefix}consistency_views={views} draws every view from {prefix}intensity_augs per "
            f"sample: it needs a non-empty pool and {prefix}domain_assignment='sample'"
        )
    if saliency_pair and pool:
        raise ValueError(
            f"the saliency-balanced step makes its own two location-scale views: it does not "
            f"combine with {prefix}intensity_augs"
        )


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

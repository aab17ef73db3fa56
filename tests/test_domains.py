"""Domain partition and per-sample seeds (docs/SPEC.md "Domains")."""

from __future__ import annotations

import random

import pytest

from dgseg.data.domains import assign_domains, check_domains, sample_seed

IDS = [f"BraTS2021_{i:05d}" for i in range(31)]


def test_partition_is_disjoint_balanced_and_complete():
    d = assign_domains(IDS, 3, seed=0)
    assert set(d) == set(IDS) and set(d.values()) == {0, 1, 2}
    sizes = sorted(sum(v == k for v in d.values()) for k in range(3))
    assert sizes == [10, 10, 11]


def test_partition_deterministic_and_order_free():
    d = assign_domains(IDS, 3, seed=7)
    shuffled = IDS[:]
    random.Random(1).shuffle(shuffled)
    assert assign_domains(shuffled, 3, seed=7) == d
    assert assign_domains(IDS, 3, seed=8) != d  # another seed, another partition
    # a case's domain does not depend on other cases being present in a different order
    assert assign_domains(list(reversed(IDS)), 3, seed=7) == d


def test_partition_keeps_patients_together():
    ids = [f"BraTS-GLI-{p:05d}-{t:03d}" for p in range(12) for t in range(2)]
    patients = {c: c[:-4] for c in ids}
    d = assign_domains(ids, 3, seed=0, patients=patients)
    for p in set(patients.values()):
        assert len({d[c] for c in ids if patients[c] == p}) == 1
    assert sorted(sum(v == k for v in d.values()) for k in range(3)) == [8, 8, 8]


def test_partition_rejects_bad_k():
    with pytest.raises(ValueError, match="num_domains"):
        assign_domains(IDS, 0, seed=0)


def test_domain_rules_name_the_setting():
    check_domains(("none", "bezier_increasing"), "patient")
    check_domains(("gin", "ipa"), "sample", views=3)
    check_domains((), "sample", saliency_pair=True)
    bad = [
        (((), "patient"), {}, "empty"),
        ((("gin",), "patient"), {"views": 3}, "consistency_views=3"),
        (((), "sample"), {"views": 2}, "consistency_views=2"),
        ((("gin",), "sample"), {"saliency_pair": True}, "saliency"),
        ((("gin",), "per_case"), {}, "domain_assignment='per_case'"),
    ]
    for args, kw, words in bad:
        with pytest.raises(ValueError, match=words):
            check_domains(*args, prefix="data.", **kw)


def test_sample_seed_reproducible_and_sensitive_to_every_part():
    base = sample_seed(0, 1, 2, 3)
    assert base == sample_seed(0, 1, 2, 3) and 0 <= base < 2**63
    others = {
        sample_seed(1, 1, 2, 3),
        sample_seed(0, 2, 2, 3),
        sample_seed(0, 1, 3, 3),
        sample_seed(0, 1, 2, 0),
        sample_seed(0, 2, 1, 3),
    }
    assert base not in others and len(others) == 5
    with pytest.raises(ValueError, match="epoch"):
        sample_seed(0, -1, 0, 0)

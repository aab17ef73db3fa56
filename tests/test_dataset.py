"""ShardDataset: stored content, patches, domains and curves, reproducibility, workers."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dgseg.data.dataset import ShardDataset
from dgseg.data.domains import assign_domains
from dgseg.data.manifest import load_manifest, split_cases
from dgseg.data.window import restore_to_original
from dgseg.presets import WRITEUP_DOMAINS


def _stored(root, case, name):
    with h5py.File(root / case["shard"], "r") as f:
        return f[case["id"]][name][()]


def _channels(lab: np.ndarray) -> np.ndarray:
    """WT, TC, ET written out by hand (docs/SPEC.md "Labels")."""
    return np.stack([lab > 0, (lab == 1) | (lab == 4), lab == 4]).astype(np.float32)


def test_eval_split_is_whole_volume_without_augmentation(tiny_shards):
    ds = ShardDataset(
        tiny_shards,
        "test",
        ("t2",),
        flip=True,
        rot90=True,
        rotation_degrees=10,
        intensity_augs=WRITEUP_DOMAINS,
        domain_assignment="patient",
    )
    want = [c["id"] for c in split_cases(load_manifest(tiny_shards), "test")]
    assert len(ds) == len(want) >= 1 and ds.case_ids == want
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        for i, case in enumerate(ds.cases):
            s = ds[i]
            assert s["case_id"] == case["id"] and s["has_label"]
            assert s["image"].dtype == torch.float32 and s["image"].shape == (1, 32, 32, 32)
            np.testing.assert_array_equal(s["image"][0].numpy(), _stored(tiny_shards, case, "t2"))
            np.testing.assert_array_equal(
                s["label"].numpy(), _channels(_stored(tiny_shards, case, "label"))
            )
            assert s["domain"].dtype == torch.int64 and int(s["domain"]) == 0


def test_modality_selection_and_repeats(tiny_shards):
    case = split_cases(load_manifest(tiny_shards), "val")[0]
    s = ShardDataset(tiny_shards, "val", ("t1ce", "t2"))[0]
    np.testing.assert_array_equal(s["image"][0].numpy(), _stored(tiny_shards, case, "t1ce"))
    np.testing.assert_array_equal(s["image"][1].numpy(), _stored(tiny_shards, case, "t2"))
    s = ShardDataset(tiny_shards, "val", ("t1", "t1"))[0]
    np.testing.assert_array_equal(s["image"][0].numpy(), _stored(tiny_shards, case, "t1"))
    np.testing.assert_array_equal(s["image"][1].numpy(), s["image"][0].numpy())
    s = ShardDataset(tiny_shards, "val", ("t1", "t1ce", "t2", "flair"))[0]
    assert s["image"].shape[0] == 4


def _find(block: np.ndarray, vol: np.ndarray) -> tuple[int, int, int]:
    p = block.shape[0]
    n = vol.shape[0] - p + 1
    hits = [
        (a, b, c)
        for a in range(n)
        for b in range(n)
        for c in range(n)
        if np.array_equal(vol[a : a + p, b : b + p, c : c + p], block)
    ]
    assert len(hits) == 1
    return hits[0]


def test_random_patch_is_a_block_of_the_stored_volume(tiny_shards):
    ds = ShardDataset(tiny_shards, "train", ("flair",), patch_size=20)
    starts = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        s = ds[0]
        assert s["image"].shape == (1, 20, 20, 20) and s["label"].shape == (3, 20, 20, 20)
        vol = _stored(tiny_shards, ds.cases[0], "flair")
        a, b, c = _find(s["image"][0].numpy(), vol)
        lab = _stored(tiny_shards, ds.cases[0], "label")[a : a + 20, b : b + 20, c : c + 20]
        np.testing.assert_array_equal(s["label"].numpy(), _channels(lab))
        starts.add((a, b, c))
    assert len(starts) > 1  # a new crop every epoch


def test_patch_larger_than_volume_is_centred_zero_padding(tiny_shards):
    ds = ShardDataset(tiny_shards, "val", ("t2",), patch_size=(36, 32, 40))
    s = ds[0]
    vol = _stored(tiny_shards, ds.cases[0], "t2")
    img = s["image"][0].numpy()
    assert img.shape == (36, 32, 40)
    np.testing.assert_array_equal(img[2:34, :, 4:36], vol)
    assert not img[:2].any() and not img[34:].any() and not img[:, :, :4].any()


def test_same_seed_epoch_index_gives_same_sample(tiny_shards):
    kw = dict(
        patch_size=24,
        flip=True,
        rot90=True,
        rotation_degrees=10,
        intensity_augs=WRITEUP_DOMAINS,
        seed=5,
    )
    a = ShardDataset(tiny_shards, "train", ("t2",), **kw)
    b = ShardDataset(tiny_shards, "train", ("t2",), **kw)
    for ds in (a, b):
        ds.set_epoch(4)
    n = min(len(a), 4)
    for i in range(n):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert int(x["domain"]) == int(y["domain"])
        assert torch.equal(a[i]["image"], x["image"])  # repeated reads agree too
    a.set_epoch(5)
    assert any(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(n))
    c = ShardDataset(tiny_shards, "train", ("t2",), rank=1, **kw)
    c.set_epoch(4)
    assert any(not torch.equal(c[i]["image"], b[i]["image"]) for i in range(n))


def _is_monotone(before: np.ndarray, after: np.ndarray, sign: int) -> bool:
    order = np.argsort(before, kind="stable")
    d = np.diff(after[order]) * sign
    return bool((d >= -1e-4).all()) and bool((d > 1e-3).any())


def test_partition_domains_and_curve_directions(tiny_shards):
    ds = ShardDataset(
        tiny_shards,
        "train",
        ("t2",),
        intensity_augs=WRITEUP_DOMAINS,
        domain_assignment="patient",
        seed=2,
    )
    assert ds.domains == assign_domains(ds.case_ids, 3, 2)
    assert set(ds.domains.values()) == {0, 1, 2}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        seen = {}
        for i, case in enumerate(ds.cases):
            s = ds[i]
            dom = int(s["domain"])
            assert dom == ds.domains[case["id"]]
            vol = _stored(tiny_shards, case, "t2")
            img = s["image"][0].numpy()
            brain = vol != 0
            assert not img[~brain].any()  # background stays exactly 0
            if dom == 0:
                np.testing.assert_array_equal(img, vol)  # no curve
            else:
                assert abs(img[brain].mean()) < 1e-4 and abs(img[brain].std() - 1) < 1e-3
                assert _is_monotone(vol[brain], img[brain], +1 if dom == 1 else -1)
            seen[case["id"]] = img
        if epoch == 0:
            first = seen
    changed = [
        cid for cid in first if ds.domains[cid] and not np.array_equal(first[cid], seen[cid])
    ]
    assert sorted(changed) == sorted(c for c in ds.case_ids if ds.domains[c])  # fresh curves


def test_pair_mode_labels_and_directions(tiny_shards):
    ds = ShardDataset(
        tiny_shards,
        "train",
        ("t2",),
        intensity_augs=WRITEUP_DOMAINS[1:],
        domain_assignment="patient",
        seed=1,
    )
    assert set(ds.domains.values()) == {0, 1}
    for i, case in enumerate(ds.cases):
        s = ds[i]
        vol = _stored(tiny_shards, case, "t2")
        brain = vol != 0
        sign = +1 if int(s["domain"]) == 0 else -1  # label 0 increasing, 1 decreasing
        assert _is_monotone(vol[brain], s["image"][0].numpy()[brain], sign)


def test_random_mode_label_is_curve_kind(tiny_shards):
    ds = ShardDataset(tiny_shards, "train", ("t2",), intensity_augs=WRITEUP_DOMAINS, seed=0)
    kinds = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i, case in enumerate(ds.cases):
            s = ds[i]
            k = int(s["domain"])
            kinds.add(k)
            vol = _stored(tiny_shards, case, "t2")
            img = s["image"][0].numpy()
            if k == 0:
                np.testing.assert_array_equal(img, vol)
            else:
                assert _is_monotone(vol[vol != 0], img[vol != 0], +1 if k == 1 else -1)
    assert kinds == {0, 1, 2}


def test_dataloader_two_persistent_workers_follow_set_epoch(tiny_shards):
    ds = ShardDataset(
        tiny_shards,
        "train",
        ("t2",),
        patch_size=24,
        flip=True,
        intensity_augs=WRITEUP_DOMAINS,
        domain_assignment="patient",
        seed=3,
    )
    ref = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        ref[epoch] = {ds.case_ids[i]: ds[i] for i in range(len(ds))}  # opens files pre-fork
    loader = DataLoader(
        ds,
        batch_size=2,
        num_workers=2,
        persistent_workers=True,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        got = 0
        for batch in loader:
            assert batch["image"].shape[1:] == (1, 24, 24, 24)
            for j, cid in enumerate(batch["case_id"]):
                r = ref[epoch][cid]
                assert torch.equal(batch["image"][j], r["image"])
                assert torch.equal(batch["label"][j], r["label"])
                assert int(batch["domain"][j]) == int(r["domain"])
                got += 1
        assert got == len(ds)


def test_distributed_sampler_ranks_cover_the_split(tiny_shards):
    seen = []
    for rank in (0, 1):
        ds = ShardDataset(tiny_shards, "train", ("t2",), rank=rank, intensity_augs=WRITEUP_DOMAINS)
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        idx = list(sampler)
        seen += idx
        for i in idx:
            assert torch.equal(ds[i]["image"], ds[i]["image"])
    assert sorted(seen) == list(range(len(ds)))


def test_pickle_drops_handles_and_keeps_epoch(tiny_shards):
    ds = ShardDataset(tiny_shards, "train", ("t2",), intensity_augs=WRITEUP_DOMAINS)
    ds.set_epoch(7)
    first = ds[0]
    assert ds._handles  # opened lazily
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {} and clone.epoch == 7
    assert torch.equal(clone[0]["image"], first["image"])
    clone.set_epoch(8)
    assert ds.epoch == 7  # a pickled copy does not share the epoch
    ds.close()


def test_case_meta_and_restore_to_original(tiny_shards):
    ds = ShardDataset(tiny_shards, "test", ("t2",))
    meta = ds.case_meta(0)
    case = ds.cases[0]
    assert list(meta["offset"]) == case["offset"] and meta["affine"].shape == (4, 4)
    assert list(meta["modalities"]) == ["t1", "t1ce", "t2", "flair"]
    raw = Path(load_manifest(tiny_shards)["params"]["input"])
    raw_seg = raw / case["id"] / f"{case['id']}_seg.nii.gz"
    src = np.asanyarray(nib.load(str(raw_seg)).dataobj)
    back = restore_to_original(
        _stored(tiny_shards, case, "label"), case["offset"], case["original_shape"]
    )
    np.testing.assert_array_equal(back, src)


def test_unlabelled_split_returns_zero_labels(tmp_path):
    from data_prep.pipeline import prepare
    from data_prep.synthetic import write_dataset

    write_dataset(tmp_path / "raw", 2, shape=(24, 24, 20), seed=0, layout="unlabelled")
    prepare(tmp_path / "raw", tmp_path / "out", size=16, progress=False)
    ds = ShardDataset(tmp_path / "out", "unlabelled", ("t2",))
    s = ds[1]
    assert not s["has_label"] and s["label"].shape == (3, 16, 16, 16) and not s["label"].any()
    with pytest.raises(ValueError, match="no cases"):
        ShardDataset(tmp_path / "out", "train")


def test_bad_arguments(tiny_shards):
    with pytest.raises(ValueError, match="modalities"):
        ShardDataset(tiny_shards, "train", ("t3",))
    with pytest.raises(ValueError, match="domain_assignment"):
        ShardDataset(tiny_shards, "train", domain_assignment="curvy")
    with pytest.raises(ValueError, match="empty"):
        ShardDataset(tiny_shards, "train", domain_assignment="patient")
    with pytest.raises(ValueError, match="split"):
        ShardDataset(tiny_shards, "training")
    with pytest.raises(ValueError, match="patch_size"):
        ShardDataset(tiny_shards, "train", patch_size=(16, 16))
    bad = tiny_shards.parent / "bad_manifest"
    bad.mkdir(exist_ok=True)
    (bad / "manifest.json").write_text(json.dumps({"format": "dgseg-shards", "version": 99}))
    with pytest.raises(ValueError, match="version"):
        load_manifest(bad)


def test_region_channels_equals_labels_to_channels():
    from dgseg.data.dataset import region_channels
    from dgseg.transforms import labels_to_channels

    lab = torch.tensor([0, 1, 2, 4], dtype=torch.uint8)[torch.randint(0, 4, (9, 8, 7))]
    out = region_channels(lab)
    assert out.dtype == torch.float32 and out.shape == (3, 9, 8, 7)
    assert torch.equal(out, labels_to_channels(lab).float())


def test_intensity_augs_draw_one_per_sample_and_label_its_domain(tiny_shards):
    from dgseg.transforms.sdg import intensity_augment

    augs = ("none", "gin", "resynthesis")
    ds = ShardDataset(tiny_shards, "train", ("t2",), intensity_augs=augs, seed=3)
    plain = ShardDataset(tiny_shards, "train", ("t2",), seed=3)
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(ds)):
            s, p = ds[i], plain[i]
            d = int(s["domain"])
            assert 0 <= d < len(augs)
            seen.add(d)
            img = s["image"]
            brain = p["image"] != 0
            assert torch.isfinite(img).all()
            assert (img[~brain] == 0).all()  # background stays 0
            if augs[d] == "none":
                assert torch.equal(img, p["image"])
            else:  # re-z-scored over the brain
                assert abs(float(img[brain].mean())) < 1e-3
                assert abs(float(img[brain].std(correction=0)) - 1) < 1e-2
                assert not torch.equal(img, p["image"])
            torch.testing.assert_close(s["label"], p["label"])  # no spatial aug here
    assert seen == {0, 1, 2}
    # The drawn augmentation is the one named by the label, applied with the sample's generator.
    with pytest.raises(ValueError, match="unknown intensity augmentation"):
        intensity_augment("curves", torch.zeros(1, 4, 4, 4), None, torch.Generator())
    with pytest.raises(ValueError, match="unknown intensity augmentation"):
        ShardDataset(tiny_shards, "train", ("t2",), intensity_augs=("gin", "nope"))


def test_saliency_pair_gives_two_location_scale_views_under_one_spatial_augmentation(tiny_shards):
    ds = ShardDataset(
        tiny_shards, "train", ("t2",), flip=True, rotation_degrees=10, seed=2, saliency_pair=True
    )
    plain = ShardDataset(tiny_shards, "train", ("t2",), seed=2)
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            g, loc = s["image"], s["image_local"]
            assert g.shape == loc.shape == plain[i]["image"].shape
            assert torch.isfinite(g).all() and torch.isfinite(loc).all()
            assert not torch.equal(g, loc)
            # one spatial transform for both: the same brain support (rotation blurs the rim, so
            # compare where either is clearly inside)
            inside_g, inside_l = g.abs() > 1e-3, loc.abs() > 1e-3
            assert (inside_g ^ inside_l).float().mean() < 0.02
            assert int(s["domain"]) == 0
    val = ShardDataset(tiny_shards, "val", ("t2",), saliency_pair=True)
    assert "image_local" not in val[0]  # only training samples carry the pair
    with pytest.raises(ValueError, match="saliency"):
        ShardDataset(tiny_shards, "train", ("t2",), saliency_pair=True, intensity_augs=("gin",))
    with pytest.raises(ValueError, match="saliency"):
        ShardDataset(
            tiny_shards, "train", ("t2",), saliency_pair=True, intensity_augs=WRITEUP_DOMAINS
        )


def test_views_draw_their_own_intensity_augmentation_under_one_spatial_augmentation(tiny_shards):
    kw = dict(flip=True, rotation_degrees=10, seed=3, intensity_augs=("gin", "ipa"))
    ds = ShardDataset(tiny_shards, "train", ("t2",), views=3, **kw)
    for i in range(len(ds)):
        s = ds[i]
        v = s["views"]
        assert v.shape == (3, *s["image"].shape) and torch.equal(v[0], s["image"])
        assert torch.isfinite(v).all()
        assert not torch.equal(v[0], v[1]) and not torch.equal(v[1], v[2])
        inside = v.abs() > 1e-3  # one spatial transform: the same brain support in every view
        assert (inside[0] ^ inside[1]).float().mean() < 0.02
        assert (inside[0] ^ inside[2]).float().mean() < 0.02
        for view in v:  # each view follows the intensity contract on its own
            brain = view != 0
            assert abs(float(view[brain].mean())) < 0.05
        torch.testing.assert_close(ds[i]["views"], v)  # reproducible
    assert "views" not in ShardDataset(tiny_shards, "val", ("t2",), views=3, **kw)[0]
    with pytest.raises(ValueError, match="consistency_views=2"):
        ShardDataset(tiny_shards, "train", ("t2",), views=2)
    with pytest.raises(ValueError, match="consistency_views=0 must be"):
        ShardDataset(tiny_shards, "train", ("t2",), views=0, intensity_augs=("gin",))


def test_eval_splits_ignore_intensity_augs(tiny_shards):
    ds = ShardDataset(tiny_shards, "test", ("t2",), intensity_augs=("gin",))
    case = ds.cases[0]
    np.testing.assert_array_equal(ds[0]["image"][0].numpy(), _stored(tiny_shards, case, "t2"))
    assert int(ds[0]["domain"]) == 0

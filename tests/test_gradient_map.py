"""The gradient-map input: hand computations, invariances, and its use in the dataset and config."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from dgseg.config import DataConfig, apply_overrides
from dgseg.presets import get_preset
from dgseg.transforms.gradient_map import (
    equalize,
    gaussian_kernel1d,
    gradient_magnitude,
    gradient_map,
    input_representation,
    repr_channels,
)


def _np_reference(vol: np.ndarray, sigma: float) -> np.ndarray:
    """Independent numpy: separable Gaussian and central differences, symmetric padding."""
    r = int(4 * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    s = vol.astype(np.float64)
    for ax in range(3):
        pad = [(0, 0)] * 3
        pad[ax] = (r, r)
        p = np.pad(s, pad, mode="symmetric")
        s = sum(
            w[k] * np.take(p, np.arange(k, k + vol.shape[ax]), axis=ax) for k in range(2 * r + 1)
        )
    sq = 0.0
    for ax in range(3):
        pad = [(0, 0)] * 3
        pad[ax] = (1, 1)
        p = np.pad(s, pad, mode="symmetric")
        n = vol.shape[ax]
        sq = (
            sq + (np.take(p, np.arange(2, n + 2), axis=ax) - np.take(p, np.arange(n), axis=ax)) ** 2
        )
    return np.sqrt(sq)


def test_kernel_matches_scipy_definition():
    w = gaussian_kernel1d(0.5).double()
    assert w.numel() == 5  # radius int(4 * 0.5 + 0.5) = 2
    e = [math.exp(-0.5 * (k / 0.5) ** 2) for k in range(-2, 3)]
    assert torch.allclose(w, torch.tensor(e, dtype=torch.float64) / sum(e), atol=1e-7)


def test_ramp_has_twice_its_slope_everywhere():
    # A linear ramp survives the Gaussian (symmetric weights), and the (-1, 0, 1) difference of
    # slope a is 2a; symmetric padding keeps the ramp's slope at the border only to first order,
    # so check the interior.
    d = torch.arange(12, dtype=torch.float32).view(12, 1, 1).expand(12, 10, 10)
    m = gradient_magnitude((0.3 * d)[None], 0.5)[0]
    assert torch.allclose(m[3:-3, 3:-3, 3:-3], torch.full((6, 4, 4), 0.6), atol=1e-5)
    diag = (d + torch.arange(10).view(1, 10, 1) + torch.arange(10).view(1, 1, 10)).float()
    m = gradient_magnitude(diag[None], 0.5)[0]
    assert torch.allclose(m[3:-3, 3:-3, 3:-3], torch.full((6, 4, 4), 2 * math.sqrt(3)), atol=1e-4)


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_magnitude_equals_numpy_reference(sigma):
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(9, 8, 7, generator=g)
    ref = _np_reference(vol.numpy(), sigma)
    got = gradient_magnitude(vol[None], sigma)[0].double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_equalize_is_the_empirical_cdf_on_the_mask():
    m = torch.tensor([0.0, 3.0, 1.0, 2.0, 2.0, 0.0, 5.0, 0.0]).view(1, 2, 2, 2)
    # masked values 3, 1, 2, 2, 5 (n = 5): shares <= each: 4/5, 1/5, 3/5, 3/5, 5/5
    want = torch.tensor([0.0, 0.8, 0.2, 0.6, 0.6, 0.0, 1.0, 0.0]).view(1, 2, 2, 2)
    assert torch.allclose(equalize(m), want)


def _brain(seed=1, shape=(20, 18, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[:3] = 0  # background rows
    return x[None]  # (1, D, H, W)


def test_invariant_to_adding_a_constant():
    x = _brain()
    a = gradient_map(x)
    b = gradient_map(x + 2.5)
    # magnitudes agree up to float rounding; near-equal magnitudes may swap ranks (1/n each)
    assert torch.allclose(gradient_magnitude(x), gradient_magnitude(x + 2.5), atol=1e-5)
    assert (a - b).abs().max() < 3 / (a > 0).sum()


@pytest.mark.parametrize("scale", [3.0, 0.2, -1.5])
def test_scaling_scales_magnitude_and_leaves_map(scale):
    x = _brain()
    m, ms = gradient_magnitude(x), gradient_magnitude(scale * x)
    assert torch.allclose(ms, abs(scale) * m, rtol=1e-4, atol=1e-6)  # covariant: |a| m
    a, b = gradient_map(x), gradient_map(scale * x)  # invariant after equalisation
    assert (a - b).abs().max() < 3 / (a > 0).sum()
    assert a.min() >= 0 and a.max() == 1


def test_background_stays_zero_and_channels_stack():
    x = torch.zeros(2, 16, 16, 16)
    x[:, 6:10, 6:10, 6:10] = torch.randn(2, 4, 4, 4)  # radius 4 (sigma 1) + 1 stays inside
    out = gradient_map(x, (0.5, 1.0))  # channel c*S + s
    assert out.shape == (4, 16, 16, 16)
    assert torch.equal(out[0], gradient_map(x[:1], (0.5,))[0])
    assert torch.equal(out[3], gradient_map(x[1:], (1.0,))[0])
    assert out[:, 0].abs().max() == 0  # far from the brain: background
    both = input_representation(x[None], "both", (0.5,))
    assert both.shape == (1, 4, 16, 16, 16) and torch.equal(both[0, :2], x)


def test_config_channels_and_presets():
    assert repr_channels(2, "both", (0.5, 1.0)) == 6
    assert DataConfig(input_repr="gradient", gradient_sigmas=(0.5, 1.0)).in_channels == 2
    assert get_preset("segresnet_t2_gradmap").data.in_channels == 1
    assert get_preset("segresnet_t2_sdg_gradmap").data.input_repr == "gradient"
    # the recommended preset is the gradient-map pool, under its own run name
    rec, gm = get_preset("segresnet_t2_sdg"), get_preset("segresnet_t2_sdg_gradmap")
    assert dataclasses.replace(rec, run=gm.run) == gm and rec.run.name == "segresnet_t2_sdg"
    assert get_preset("segresnet_t2_sdg_intensity").data.input_repr == "intensity"
    cfg = apply_overrides(get_preset("segresnet_t2_noaug"), ["data.input_repr=both"])
    assert cfg.data.in_channels == 2
    with pytest.raises(ValueError, match="data.input_repr"):
        DataConfig(input_repr="edges")
    with pytest.raises(ValueError, match="data.gradient_sigmas"):
        DataConfig(gradient_sigmas=(0.0,))


def test_dataset_maps_the_augmented_patch(tiny_shards):
    from dgseg.data.dataset import ShardDataset

    kw = dict(patch_size=16, flip=True, intensity_augs=("location_scale",), seed=3)
    raw = ShardDataset(tiny_shards, "train", ("t2",), **kw)
    rep = ShardDataset(tiny_shards, "train", ("t2",), input_repr="gradient", **kw)
    a, b = raw[0], rep[0]  # same sample generator: same draws
    assert torch.equal(b["image"], gradient_map(a["image"]))
    assert torch.equal(a["label"], b["label"])
    val = ShardDataset(tiny_shards, "val", ("t2",), input_repr="both")
    v0 = ShardDataset(tiny_shards, "val", ("t2",))[0]["image"]
    assert torch.equal(val[0]["image"], torch.cat([v0, gradient_map(v0)]))

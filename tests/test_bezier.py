"""Bezier domain curves: monotonicity, LUT accuracy, identity, background and z-scoring."""

import numpy as np
import pytest
import torch

from dgseg.transforms import (
    apply_lut,
    bezier_curve,
    bezier_domain_transform,
    bezier_lut,
    intensity_augment,
)

from intensity_phantoms import check_contract, gen, synthetic_brain


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _brain_image(seed: int, channels: int = 1, shape=(12, 14, 10)) -> torch.Tensor:
    """z-scored-like random intensities inside an ellipsoid, exact zeros outside."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(channels, *shape, generator=g) * 1.5 + 0.3
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.8  # (D, H, W)
    return img * inside


def test_curve_endpoints_and_identity_at_v0():
    for v in (-0.8, 0.0, 0.5):
        x, y = bezier_curve(v, n_samples=1001)
        assert x[0] == pytest.approx(-1) and x[-1] == pytest.approx(1)
        assert y[0] == pytest.approx(-1) and y[-1] == pytest.approx(1)
        assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)
    grid = torch.linspace(-1, 1, 1024)
    torch.testing.assert_close(bezier_lut(0.0, lut_size=1024), grid, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        bezier_lut(0.0, decreasing=True, lut_size=1024), -grid, atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="1.5"):
        bezier_lut(1.5)


def test_lut_matches_dense_curve():
    rng = np.random.default_rng(0)
    q = rng.uniform(-1, 1, 20_000)
    qt = torch.from_numpy(q)
    for v in np.linspace(-0.9, 0.9, 13):
        xs, ys = bezier_curve(v)
        want = np.interp(q, xs, ys)
        got = apply_lut(qt, bezier_lut(v)).numpy()
        assert np.abs(got - want).max() < 1e-3, v
        # the curve maps to itself under x → −x, y → −y (P0↔P3, P1↔P2): f is odd
        lut = bezier_lut(v).numpy()
        np.testing.assert_allclose(lut[::-1], -lut, atol=1e-6)
    # |v| → 1 makes f nearly vertical/flat at x = ±1, where a 4096-entry LUT is coarser
    for v in (-0.999, 0.99):
        xs, ys = bezier_curve(v)
        err = np.abs(apply_lut(qt, bezier_lut(v)).numpy() - np.interp(q, xs, ys))
        assert (err > 1e-3).mean() < 0.005 and err.max() < 0.05


def test_apply_lut_is_linear_interpolation():
    lut = torch.tensor([0.0, 1.0, 4.0, 9.0, 10.0])
    x = torch.tensor([-1.0, -0.75, -0.6, 0.0, 0.3, 1.0, 1.5, -2.0])
    want = np.interp(x.clamp(-1, 1).numpy(), np.linspace(-1, 1, 5), lut.numpy())
    torch.testing.assert_close(apply_lut(x, lut), torch.from_numpy(want).float())
    assert apply_lut(x.double(), lut).dtype == torch.float64


@pytest.mark.parametrize("curve,sign", [(1, 1.0), (2, -1.0)])
def test_domains_are_monotone(curve, sign):
    img = _brain_image(0, channels=1)
    brain = img[0] != 0
    x = img[0][brain].numpy()
    for seed in range(25):  # 25 random v (or w) ~ U(−1, 1)
        out = bezier_domain_transform(img, curve, torch.Generator().manual_seed(seed))
        assert spearman(x, out[0][brain].numpy()) == pytest.approx(sign, abs=1e-6), seed


def test_domain2_mirrors_domain1_for_the_same_draw():
    img = _brain_image(1, channels=2)
    up = bezier_domain_transform(img, 1, torch.Generator().manual_seed(5))
    down = bezier_domain_transform(img, 2, torch.Generator().manual_seed(5))
    torch.testing.assert_close(down, -up, atol=1e-5, rtol=0)


def test_background_zero_and_brain_zscored():
    img = _brain_image(2, channels=3)
    brain = (img != 0).any(0)
    out = bezier_domain_transform(img, 1, torch.Generator().manual_seed(0))
    assert out.shape == img.shape and out.dtype == img.dtype
    assert (out[:, ~brain] == 0).all()  # background stays exactly 0
    for c in range(3):
        v = out[c][brain].double()
        assert v.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert v.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    # each channel draws its own curve: same input channels, different outputs
    same = img[:1].repeat(2, 1, 1, 1)
    out2 = bezier_domain_transform(same, 1, torch.Generator().manual_seed(0))
    assert not torch.allclose(out2[0], out2[1])


def test_identity_seed_and_brain_mask():
    img = _brain_image(3, channels=2)
    g = torch.Generator().manual_seed(0)
    assert bezier_domain_transform(img, 0, g) is img
    a = bezier_domain_transform(img, 1, torch.Generator().manual_seed(7))
    b = bezier_domain_transform(img, 1, torch.Generator().manual_seed(7))
    c = bezier_domain_transform(img, 1, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    boxed = torch.zeros_like(img)
    boxed[:, 3:9, 4:10, 2:8] = img[:, 3:9, 4:10, 2:8]  # the brain: voxels nonzero in a channel
    mask = (boxed != 0).any(0)
    out = bezier_domain_transform(boxed, 2, torch.Generator().manual_seed(1))
    assert (out[:, ~mask] == 0).all() and (out[:, mask] != 0).any()
    with pytest.raises(ValueError, match="curve"):
        bezier_domain_transform(img, 3, g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    img = _brain_image(4, channels=2)
    cpu = bezier_domain_transform(img, 2, torch.Generator().manual_seed(3))
    gpu = bezier_domain_transform(img.cuda(), 2, torch.Generator().manual_seed(3))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


def test_sdg_pool_bezier_draws_both_curves_per_sample():
    """The ``bezier`` entry of the SDG pool: the write-up's curve 1 or 2, with the same contract
    as every pool transform, and the decreasing draws invert the order of the intensities."""
    image = synthetic_brain(channels=2)
    brain = (image != 0).any(0)
    signs = []
    for seed in range(12):
        out = intensity_augment("bezier", image, None, gen(seed))
        check_contract(image, out)
        assert torch.equal(out, intensity_augment("bezier", image, None, gen(seed)))
        r = np.corrcoef(image[0, brain].numpy(), out[0, brain].numpy())[0, 1]
        signs.append(r > 0)
    assert any(signs) and not all(signs)  # both curve kinds drawn, ~half each

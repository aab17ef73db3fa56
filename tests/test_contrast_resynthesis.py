"""Contrast re-synthesis: contract, determinism, non-monotonic classes, class machinery."""

import math

import pytest
import torch
import torch.nn.functional as F

from dgseg.transforms.contrast_resynthesis import _blur, _class_centres, resynthesize_contrast

from intensity_phantoms import check_contract, gen, phantom

# every random corruption off, zero texture gain, hard boundaries: each class maps to a constant
PLAIN = {
    "n_classes": (3, 3),
    "texture_scale": (0.0, 0.0),
    "temperature": 0.0,
    "boundary_sigma": 0.0,
    "bias_field": 0.0,
    "blur_sigma": (0.0, 0.0),
    "gamma": 0.0,
    "noise_std": 0.0,
}


@pytest.mark.parametrize("method", ["quantile", "kmeans"])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("with_label", [True, False])
def test_contract_and_determinism(method, channels, with_label):
    img, lab, _ = phantom(channels)
    kw = {"label": lab if with_label else None, "method": method}
    for seed in range(3):
        check_contract(img, resynthesize_contrast(img, gen(seed), **kw))
    a = resynthesize_contrast(img, gen(7), **kw)
    assert torch.equal(a, resynthesize_contrast(img, gen(7), **kw))
    assert not torch.equal(a, resynthesize_contrast(img, gen(8), **kw))
    if channels == 2:  # each channel draws its own contrast
        assert not torch.allclose(a[0], a[1], atol=0.1)
    assert torch.equal(img, phantom(channels)[0])  # input untouched


@pytest.mark.parametrize("with_label", [True, False])
def test_swaps_tissue_order(with_label):
    # A < B < C in the input; every class draws its own intensity, so some draw reorders them.
    # A monotone transform could never pass this.
    img, lab, tissue = phantom()
    swapped = 0
    for seed in range(6):
        out = resynthesize_contrast(img, gen(seed), label=lab if with_label else None)[0]
        a, b, c = (out[tissue == t].mean() for t in (1, 2, 3))
        swapped += bool(a > b or b > c)
    assert swapped >= 1


def test_classes_map_to_constants_without_corruptions():
    # texture gain 0, hard classes, no bias/blur/gamma/noise: one value per class. Every tumour
    # label is a class of its own; the healthy brain takes K = 3 values, up to the few voxels in
    # the one LUT bin (1/1024 of the range) that straddles a class threshold
    img, lab, _ = phantom(noise=0.2)
    brain = img[0] != 0

    def top_share(out: torch.Tensor, n: int) -> float:
        counts = out[brain].unique(return_counts=True)[1].sort(descending=True).values
        return counts[:n].sum().item() / brain.sum().item()

    for seed in range(3):
        out = resynthesize_contrast(img, gen(seed), label=lab, **PLAIN)[0]
        for t in (1, 2, 4):
            v = out[lab == t]
            assert v.max() - v.min() < 1e-5, (seed, t)
        assert top_share(out, 3 + 3) > 0.99
    # without a label the tumour voxels fall into the intensity classes: K values in all
    assert top_share(resynthesize_contrast(img, gen(0), **PLAIN)[0], 3) > 0.99


def test_isointense_tumour_classes_take_healthy_intensities():
    # isointense=1: every tumour class takes one of the K healthy intensities, so the whole brain
    # holds K values; isointense=0 (the default) gives the tumour classes values of their own
    img, lab, _ = phantom(noise=0.2)
    brain = img[0] != 0
    for seed in range(3):
        out = resynthesize_contrast(img, gen(seed), label=lab, isointense=1.0, **PLAIN)[0]
        healthy = out[brain & (lab == 0)].unique()
        for t in (1, 2, 4):
            v = out[lab == t]
            assert v.max() - v.min() < 1e-5
            assert (healthy - v[0]).abs().min() < 1e-4, (seed, t)  # a healthy class's value
        plain = resynthesize_contrast(img, gen(seed), label=lab, **PLAIN)[0]
        assert min((healthy - plain[lab == t][0]).abs().min() for t in (1, 2, 4)) > 1e-3
    with pytest.raises(ValueError, match="isointense"):
        resynthesize_contrast(img, gen(0), label=lab, isointense=1.5)


def test_texture_kept_within_a_class():
    # soft intensity classes, no corruptions: within the noisy edema class the map is affine with
    # one gain s_k, so the output is perfectly correlated (or anti-correlated) with the input
    img, lab, _ = phantom(noise=0.2)
    plain = {**PLAIN, "texture_scale": (-0.5, 1.5)}
    edema = lab == 2
    for seed in range(3):
        out = resynthesize_contrast(img, gen(seed), label=lab, **plain)[0]
        r = torch.corrcoef(torch.stack([img[0][edema], out[edema]]))[0, 1]
        assert abs(abs(r.item()) - 1) < 1e-4, seed


def test_kmeans_finds_unequal_tissues():
    # 10 % / 30 % / 60 % tissues: equal-count bins split the largest, k-means finds all three
    g = gen(0)
    xs = torch.cat(
        [v + 0.01 * torch.randn(n, generator=g) for v, n in ((0.1, 1000), (0.5, 3000), (0.9, 6000))]
    )
    centres, thresholds = _class_centres(xs, 3, "kmeans", 5)
    assert torch.allclose(centres, torch.tensor([0.1, 0.5, 0.9]), atol=2e-3)
    assert torch.allclose(thresholds, torch.tensor([0.3, 0.7]), atol=2e-3)
    centres, _ = _class_centres(xs, 3, "quantile", 5)
    assert (centres > 0.8).sum() == 2  # two bins inside the 60 % tissue


def test_blur_matches_conv3d():
    x = torch.randn(2, 9, 10, 11, generator=gen(1))
    for sigma in (0.5, 1.3):
        r = math.ceil(3 * sigma)
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1.0) / sigma) ** 2)
        k = k / k.sum()
        want = x[:, None]  # (N, 1, D, H, W)
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = 2 * r + 1
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
            want = F.conv3d(F.pad(want, pad, mode="replicate"), k.view(shape))
        assert torch.allclose(_blur(x, sigma), want[:, 0], atol=1e-5)


def test_bad_arguments():
    img, lab, _ = phantom()
    g = gen(0)
    with pytest.raises(ValueError, match="shape"):
        resynthesize_contrast(img[0], g)
    with pytest.raises(ValueError, match=r"\(0, 3\)"):
        resynthesize_contrast(img, g, n_classes=(0, 3))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        resynthesize_contrast(img, g, n_classes=(4, 2))
    with pytest.raises(ValueError, match="'foo'"):
        resynthesize_contrast(img, g, method="foo")
    with pytest.raises(ValueError, match="kmeans_iters"):
        resynthesize_contrast(img, g, kmeans_iters=0)
    with pytest.raises(ValueError, match="texture_scale"):
        resynthesize_contrast(img, g, texture_scale=(1.0, 0.0))
    with pytest.raises(ValueError, match="blur_sigma"):
        resynthesize_contrast(img, g, blur_sigma=(-1.0, 1.0))
    for name in ("temperature", "boundary_sigma", "bias_field", "gamma", "noise_std"):
        with pytest.raises(ValueError, match=name):
            resynthesize_contrast(img, g, **{name: -0.5})
    with pytest.raises(ValueError, match="bias_grid"):
        resynthesize_contrast(img, g, bias_grid=1)
    bad = lab.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        resynthesize_contrast(img, g, label=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda():
    img, lab, _ = phantom(2)
    gpu, lab_gpu = img.cuda(), lab.cuda()
    for method in ("quantile", "kmeans"):
        for g in (torch.Generator(device="cuda").manual_seed(0), gen(0)):
            out = resynthesize_contrast(gpu, g, label=lab_gpu, method=method)
            assert out.is_cuda
            check_contract(img, out.cpu())
    # a CPU generator makes the same draws: the same image up to float rounding
    want = resynthesize_contrast(img, gen(4), label=lab)
    got = resynthesize_contrast(gpu, gen(4), label=lab_gpu).cpu()
    assert torch.allclose(got, want, atol=1e-3)

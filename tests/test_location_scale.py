"""SLAug location-scale: contract, determinism, GLA monotone, LLA class-wise, saliency fusion."""

import pytest
import torch

from dgseg.transforms.intensity import uniform
from dgseg.transforms.location_scale import (
    global_location_scale,
    local_location_scale,
    location_scale,
    saliency_map,
    saliency_mix,
)

from intensity_phantoms import N, check_contract, gen, phantom

TRANSFORMS = {
    "gla": lambda img, lab, g: global_location_scale(img, g),
    "lla": lambda img, lab, g: local_location_scale(img, lab, g),
    "lla_nolabel": lambda img, lab, g: local_location_scale(img, None, g),
    "either": lambda img, lab, g: location_scale(img, lab, g),
}


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("channels", [1, 2])
def test_contract_and_determinism(name, channels):
    img, lab, _ = phantom(channels)
    f = TRANSFORMS[name]
    for seed in range(3):
        check_contract(img, f(img, lab, gen(seed)))
    assert torch.equal(f(img, lab, gen(7)), f(img, lab, gen(7)))
    assert not torch.equal(f(img, lab, gen(7)), f(img, lab, gen(8)))
    assert torch.equal(img, phantom(channels)[0])  # input untouched


def test_gla_is_non_decreasing():
    # GLA's guarantee: one non-decreasing map per channel (increasing Bezier, scale > 0, clip);
    # ties where the clip saturates, so ranks are not strictly kept, order never reversed
    img, _, tissue = phantom(noise=0.2)
    brain = tissue > 0
    x = img[0][brain]
    order = torch.argsort(x)
    for seed in range(10):
        out = global_location_scale(img, gen(seed))[0]
        assert (torch.diff(out[brain][order]) >= -1e-5).all(), seed
        a, b, c = (out[tissue == t].mean() for t in (1, 2, 3))  # so the tissue order is kept
        assert a <= b + 1e-5 and b <= c + 1e-5, seed


def test_lla_swaps_tissue_order():
    # A < B < C in the input; LLA gives each intensity class its own curve and location, so some
    # draw reorders them. A monotone transform could never pass this.
    img, lab, tissue = phantom()
    swapped = 0
    for seed in range(8):
        out = local_location_scale(img, lab, gen(seed))[0]
        a, b, c = (out[tissue == t].mean() for t in (1, 2, 3))
        swapped += bool(a > b or b > c)
    assert swapped >= 1


def test_lla_one_curve_per_label_class():
    img, lab, _ = phantom(noise=0.2)
    core, edema = lab == 1, lab == 2
    x = img[0][edema]
    order = torch.argsort(x)
    for seed in range(6):
        out = local_location_scale(img, lab, gen(seed))[0]
        assert out[core].max() - out[core].min() < 1e-5  # constant class stays constant
        d = torch.diff(out[edema][order])  # one monotone curve: all up or all down
        assert (d >= -1e-5).all() or (d <= 1e-5).all(), seed


def test_lla_soft_classes_are_continuous_in_intensity():
    # a fine intensity ramp over the brain: hard equal-count classes jump at each threshold (the
    # salt and pepper of a tissue split in two), the default soft blend is continuous, also in a
    # second channel whose classes come from the first
    _, _, tissue = phantom()
    brain = tissue > 0
    ramp = torch.zeros(2, N, N, N)
    ramp[:, brain] = torch.linspace(-1.7, 1.7, int(brain.sum()))
    order = torch.argsort(ramp[0][brain])

    def max_jump(out: torch.Tensor) -> float:
        return torch.diff(out[brain][order]).abs().max().item()

    hard = [
        max_jump(local_location_scale(ramp[:1], None, gen(s), temperature=0)[0]) for s in range(4)
    ]
    assert max(hard) > 0.2
    for seed in range(4):
        out = local_location_scale(ramp, None, gen(seed))
        assert max_jump(out[0]) < 0.05 and max_jump(out[1]) < 0.05, seed


def test_lla_label_none_uses_intensity_classes_only():
    img, _, tissue = phantom()
    out = local_location_scale(img, None, gen(0), n_background_classes=1)
    # one class over the whole brain: one monotone curve, so the tissue order is kept or reversed
    a, b, c = (out[0][tissue == t].mean() for t in (1, 2, 3))
    assert (a <= b <= c) or (a >= b >= c)


def test_location_scale_picks_gla_or_lla():
    img, lab, _ = phantom()
    for p_local, other in (
        (0.0, lambda g: global_location_scale(img, g)),
        (1.0, lambda g: local_location_scale(img, lab, g)),
    ):
        g = gen(3)
        uniform(g, 0.0, 1.0)  # the convenience function's own 50:50 draw
        assert torch.equal(location_scale(img, lab, gen(3), p_local=p_local), other(g))


def test_saliency_map_and_mix():
    img, lab, _ = phantom()
    gla = global_location_scale(img, gen(0))
    lla = local_location_scale(img, lab, gen(1))
    # gradient only in the first of 3x3x3 cells: s = 1 there, 0 beyond the next cell centres
    grad = torch.zeros(1, 1, N, N, N)
    grad[..., :8, :8, :8] = torch.rand(8, 8, 8, generator=gen(0)) - 0.5
    s = saliency_map(grad, grid=3)
    assert s.shape == (1, 1, N, N, N) and s.min() == 0 and s.max() == 1
    mixed = saliency_mix(gla[None], lla[None], grad, grid=3)[0]
    assert torch.equal(mixed[:, :3, :3, :3], gla[:, :3, :3, :3])  # s ≡ 1
    assert torch.equal(mixed[:, 12:], lla[:, 12:])  # s ≡ 0
    assert (mixed[:, ~(img != 0).any(0)] == 0).all()
    # unbatched, any channel count; a flat gradient gives s ≡ 1: the GLA view
    assert saliency_map(grad[0].expand(3, -1, -1, -1)).shape == (1, N, N, N)
    assert torch.equal(saliency_mix(gla, lla, torch.ones_like(gla)), gla)
    assert torch.equal(saliency_mix(gla, lla, torch.zeros_like(gla)), gla)


def test_bad_arguments():
    img, lab, _ = phantom()
    g = gen(0)
    with pytest.raises(ValueError, match="shape"):
        global_location_scale(img[0], g)
    with pytest.raises(ValueError, match="float"):
        global_location_scale(img.long(), g)
    with pytest.raises(ValueError, match="0.6"):
        global_location_scale(img, g, percentile=0.6)
    with pytest.raises(ValueError, match="scale_range"):
        global_location_scale(img, g, scale_range=(1.1, 0.9))
    with pytest.raises(ValueError, match="-1"):
        global_location_scale(img, g, location_std=-1.0)
    bad = lab.clone()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"\[3\]"):
        local_location_scale(img, bad, g)
    with pytest.raises(ValueError, match="label shape"):
        local_location_scale(img, lab[:-1], g)
    with pytest.raises(ValueError, match="integer"):
        local_location_scale(img, lab.float(), g)
    with pytest.raises(ValueError, match="n_background_classes"):
        local_location_scale(img, lab, g, n_background_classes=0)
    with pytest.raises(ValueError, match="1.5"):
        local_location_scale(img, lab, g, p_invert_tumour=1.5)
    with pytest.raises(ValueError, match="temperature"):
        local_location_scale(img, lab, g, temperature=-1.0)
    with pytest.raises(ValueError, match="p_local"):
        location_scale(img, lab, g, p_local=2.0)
    with pytest.raises(ValueError, match="differ"):
        saliency_mix(img, img[:, :-1], img)
    with pytest.raises(ValueError, match="saliency shape"):
        saliency_mix(img, img, img[None])
    with pytest.raises(ValueError, match="grid"):
        saliency_map(img, grid=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda():
    img, lab, _ = phantom(2)
    gpu, lab_gpu = img.cuda(), lab.cuda()
    for name, f in TRANSFORMS.items():
        for g in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):
            out = f(gpu, lab_gpu, g)
            assert out.is_cuda, name
            check_contract(img, out.cpu())
    # CPU generator: the same draws, so the same result up to float rounding
    cpu = local_location_scale(img, lab, gen(5))
    assert torch.allclose(local_location_scale(gpu, lab_gpu, gen(5)).cpu(), cpu, atol=1e-4)
    mixed = saliency_mix(gpu, gpu.flip(1), torch.randn(2, N, N, N, device="cuda"))
    assert mixed.is_cuda

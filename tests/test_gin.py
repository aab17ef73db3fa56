"""GIN and IPA: intensity contract, seeding, non-monotonicity, and IPA's smooth blending field."""

import numpy as np
import pytest
import torch

from dgseg.transforms.gin import gin, ipa, ipa_field, ipa_pair

from intensity_phantoms import check_contract, gen, spearman, synthetic_brain

TRANSFORMS = {"gin": gin, "ipa": ipa}


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("channels", [1, 2])
def test_contract(name, channels, one_thread):
    image = synthetic_brain(channels)
    before = image.clone()
    out = TRANSFORMS[name](image, gen(0))
    check_contract(image, out)
    assert torch.equal(image, before)  # input untouched
    out64 = TRANSFORMS[name](image.double(), gen(0))
    check_contract(image.double(), out64)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_seeding(name, one_thread):
    image = synthetic_brain(2)
    f = TRANSFORMS[name]
    assert torch.equal(f(image, gen(3)), f(image, gen(3)))
    assert not torch.allclose(f(image, gen(3)), f(image, gen(4)), atol=1e-3)


def test_non_monotonic(one_thread):
    image = synthetic_brain(1)
    brain = image[0] != 0
    x = image[0][brain].numpy()
    # the criterion can fail: a monotone intensity map keeps every rank
    assert spearman(x, np.exp(x)) > 0.999
    for f, seeds in [
        (gin, range(8)),
        (ipa, range(8)),
        # 1-tap layers make GIN a point-wise map of intensity: rank changes are non-monotonicity
        (lambda im, g: gin(im, g, kernel_sizes=(1,)), range(20)),
    ]:
        rho = [spearman(x, f(image, gen(s))[0][brain].numpy()) for s in seeds]
        assert min(rho) < 0.9, rho


def test_gin_with_1_tap_kernels_is_a_function_of_intensity(one_thread):
    image = synthetic_brain(1)
    brain = image[0] != 0
    levels = image.mul(2).round().div(2) * brain  # a few distinct brain intensities
    out = gin(levels, gen(1), kernel_sizes=(1,))[0]
    for v in levels[0][brain].unique():
        same = out[(levels[0] == v) & brain]
        assert same.max() - same.min() < 1e-5


def test_ipa_pair_and_ipa_agree(one_thread):
    image = synthetic_brain(2)
    x1, x2 = ipa_pair(image, gen(5))
    assert torch.equal(ipa(image, gen(5)), x1)
    check_contract(image, x2)
    assert not torch.allclose(x1, x2, atol=1e-3)


def test_ipa_field_in_unit_range_and_smooth():
    for seed in range(4):
        m = ipa_field((32, 30, 28), gen(seed))
        assert m.shape == (32, 30, 28) and m.dtype == torch.float32
        assert m.min() == 0 and m.max() == 1
        # control points ~1/4 of the size (7-8 voxels) apart: neighbours differ by a few percent
        # at most (white noise scaled to [0, 1] would differ by up to ~1)
        steps = [m.diff(dim=d).abs() for d in range(3)]
        assert max(s.max() for s in steps) < 0.25
        assert max(s.mean() for s in steps) < 0.05
    assert not torch.equal(ipa_field((8, 8, 8), gen(0)), ipa_field((8, 8, 8), gen(1)))


def test_bad_arguments():
    image = synthetic_brain(1, size=16)
    with pytest.raises(ValueError, match="n_layers.*0"):
        gin(image, gen(0), n_layers=0)
    with pytest.raises(ValueError, match="hidden.*0"):
        gin(image, gen(0), hidden=0)
    with pytest.raises(ValueError, match=r"\(1, 4\)"):
        gin(image, gen(0), kernel_sizes=(1, 4))
    with pytest.raises(ValueError, match=r"\(\)"):
        ipa(image, gen(0), kernel_sizes=())
    for spacing in (0.0, 1.5):
        with pytest.raises(ValueError, match=str(spacing)):
            ipa(image, gen(0), grid_spacing=spacing)
    with pytest.raises(ValueError, match="16, 16"):
        gin(image[0], gen(0))
    with pytest.raises(ValueError, match="int64"):
        ipa(image.long(), gen(0))
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        ipa_field((8, 8), gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", TRANSFORMS)
def test_cuda(name):
    image = synthetic_brain(2).cuda()
    f = TRANSFORMS[name]
    out = f(image, gen(0, "cuda"))
    check_contract(image, out)
    assert torch.allclose(out, f(image, gen(0, "cuda")), atol=1e-5)  # cuDNN may pick other algos
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the caller's autocast is ignored
        check_contract(image, f(image, gen(0, "cuda")))
    with pytest.raises(ValueError, match="generator"):
        f(image, gen(0))

"""RandConv: intensity contract, seeding, kernel scaling, non-monotonicity, the shared 3D conv."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgseg.transforms.random_conv import conv3d_same, random_conv

from intensity_phantoms import check_contract, gen, spearman, synthetic_brain


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("channels", [1, 2])
def test_contract(channels, mix, one_thread):
    image = synthetic_brain(channels)
    before = image.clone()
    for seed in range(3):  # covers several kernel sizes
        check_contract(image, random_conv(image, gen(seed), mix=mix))
    assert torch.equal(image, before)
    check_contract(image.double(), random_conv(image.double(), gen(0), mix=mix))


def test_seeding(one_thread):
    image = synthetic_brain(2)
    assert torch.equal(random_conv(image, gen(3)), random_conv(image, gen(3)))
    assert not torch.allclose(random_conv(image, gen(3)), random_conv(image, gen(4)), atol=1e-3)


def test_one_tap_one_channel_is_a_sign_flip_at_most(one_thread):
    # a 1³ kernel on one channel is w·x: after re-z-scoring ±x, whatever w
    image = synthetic_brain(1)
    signs = set()
    for seed in range(6):
        out = random_conv(image, gen(seed), kernel_sizes=(1,), mix=False)
        sign = float(out[image != 0][0].sign() * image[image != 0][0].sign())
        assert torch.allclose(out, sign * image, atol=1e-5)
        signs.add(sign)
    assert signs == {-1.0, 1.0}  # N(0, σ²) weights take both signs


def test_non_monotonic(one_thread):
    image = synthetic_brain(1)
    brain = image[0] != 0
    x = image[0][brain].numpy()
    assert spearman(x, np.exp(x)) > 0.999  # the criterion can fail: monotone maps keep all ranks
    for mix in (True, False):
        rho = [spearman(x, random_conv(image, gen(s), mix=mix)[0][brain].numpy()) for s in range(8)]
        assert min(rho) < 0.9, rho


def test_conv3d_same_matches_plain_conv(one_thread):
    g = gen(0)
    for c_in, c_out, k in [(1, 2, 3), (2, 2, 3), (2, 1, 5), (1, 1, 1), (3, 2, 1)]:
        x = torch.randn(1, c_in, 9, 8, 7, generator=g)
        w = torch.randn(c_out, c_in, k, k, k, generator=g)
        b = torch.randn(c_out, generator=g)
        out = conv3d_same(x, w, b)
        assert out.shape == (1, c_out, 9, 8, 7)
        assert torch.allclose(out, F.conv3d(x, w, b, padding=k // 2), atol=1e-5)


def test_bad_arguments():
    image = synthetic_brain(1, size=16)
    for sizes, shown in [((1, 2), r"\(1, 2\)"), ((), r"\(\)"), ((0,), r"\(0,\)")]:
        with pytest.raises(ValueError, match=shown):
            random_conv(image, gen(0), kernel_sizes=sizes)
    with pytest.raises(ValueError, match="16, 16"):
        random_conv(image[0], gen(0))
    with pytest.raises(ValueError, match="int64"):
        random_conv(image.long(), gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    image = synthetic_brain(2).cuda()
    out = random_conv(image, gen(0, "cuda"))
    check_contract(image, out)
    assert torch.allclose(out, random_conv(image, gen(0, "cuda")), atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the caller's autocast is ignored
        check_contract(image, random_conv(image, gen(0, "cuda")))
    with pytest.raises(ValueError, match="generator"):
        random_conv(image, gen(0))

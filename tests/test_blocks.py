"""SegResNet building blocks: shapes, hand-counted parameters, identities."""

import pytest
import torch
import torch.nn.functional as F

from dgseg.layers import DownSample, FinalConv, ResBlock, UpSample, group_norm


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("channels, groups", [(16, 8), (128, 8), (12, 6), (7, 7), (4, 4), (1, 1)])
def test_group_norm_groups(channels, groups):
    assert group_norm(channels).num_groups == groups


def test_group_norm_rejects_zero_channels():
    with pytest.raises(ValueError, match="0"):
        group_norm(0)


def test_resblock_is_identity_when_last_conv_is_zero():
    torch.manual_seed(0)
    block = ResBlock(8)
    with torch.no_grad():
        block.conv2.weight.zero_()
    x = torch.randn(2, 8, 5, 6, 7)
    assert torch.equal(block(x), x)


def test_resblock_parameter_count_and_input_untouched():
    c = 16
    block = ResBlock(c)
    assert n_params(block) == 2 * c * c * 27 + 2 * 2 * c  # two bias-free 3^3 convs, two GNs
    x = torch.randn(1, c, 4, 4, 4, requires_grad=True)
    h = x * 1.0  # non-leaf tensor read by two consumers
    before = h.detach().clone()
    out = block(h)
    (out.sum() + h.square().sum()).backward()  # would fail if the block wrote into `h`
    assert torch.equal(h.detach(), before)
    assert out.shape == x.shape


@pytest.mark.parametrize("size, expected", [((8, 8, 8), (4, 4, 4)), ((5, 7, 9), (3, 4, 5))])
def test_downsample_halves_with_ceil(size, expected):
    down = DownSample(4, 8)
    assert n_params(down) == 4 * 8 * 27
    assert down(torch.randn(1, 4, *size)).shape == (1, 8, *expected)


def test_upsample_size_matches_scale_two_and_keeps_constants():
    torch.manual_seed(0)
    up = UpSample(8, 4)
    assert n_params(up) == 8 * 4
    x = torch.randn(1, 8, 3, 4, 5)
    assert torch.allclose(up(x), up(x, size=(6, 8, 10)), atol=1e-6)
    assert up(x, size=(5, 7, 9)).shape == (1, 4, 5, 7, 9)
    # trilinear interpolation of a constant field is that constant, for any target size
    with torch.no_grad():
        up.conv.weight.fill_(1.0 / 8)
    const = up(torch.full((1, 8, 3, 4, 5), 2.0), size=(5, 7, 9))
    assert torch.allclose(const, torch.full_like(const, 2.0), atol=1e-6)


def test_final_conv_is_norm_relu_conv_with_bias():
    torch.manual_seed(0)
    head = FinalConv(16, 3)
    assert n_params(head) == 2 * 16 + 16 * 3 + 3
    x = torch.randn(2, 16, 4, 5, 6)
    expected = F.conv3d(F.relu(F.group_norm(x, 8)), head.conv.weight, head.conv.bias)
    assert torch.allclose(head(x), expected, atol=1e-6)

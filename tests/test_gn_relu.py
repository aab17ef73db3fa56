"""dgseg.layers.gn_relu: the one-node GroupNorm + ReLU equals relu(GroupNorm(x)), with gradients."""

import pytest
import torch
import torch.nn.functional as F

from dgseg.layers.gn_relu import _GroupNormReLU, group_norm_relu

CL = torch.channels_last_3d


def _norm(channels, groups, dtype=torch.float32):
    torch.manual_seed(1)
    norm = torch.nn.GroupNorm(groups, channels).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_gradcheck_float64(layout):
    norm = _norm(6, 3, torch.float64)
    x = (torch.randn(2, 6, 3, 4, 5, dtype=torch.float64) * 3 + 1).contiguous(memory_format=layout)
    x.requires_grad_()

    def fn(a, w, b):
        return _GroupNormReLU.apply(a, w, b, 3, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, norm.weight, norm.bias))


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_matches_relu_of_group_norm_in_float32(layout):
    norm = _norm(16, 8)
    x0 = (torch.randn(1, 16, 6, 7, 5) * 2 - 0.5).contiguous(memory_format=layout)
    dy = torch.randn(1, 16, 6, 7, 5).contiguous(memory_format=layout)
    results = []
    for fn in (
        lambda a: F.relu(norm(a)),
        lambda a: _GroupNormReLU.apply(a, norm.weight, norm.bias, 8, norm.eps),
    ):
        norm.zero_grad()
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.backward(dy)
        results.append((y, x.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert results[1][0].is_contiguous(memory_format=layout)
    assert results[1][1].is_contiguous(memory_format=layout)  # dx keeps the input's layout


def test_dispatch_fuses_only_large_channels_last_cpu_maps():
    norm = _norm(16, 8)
    big = torch.randn(1, 16, 44, 44, 44).contiguous(memory_format=CL).requires_grad_()
    small = torch.randn(1, 16, 8, 8, 8).requires_grad_()
    assert type(group_norm_relu(big, norm).grad_fn).__name__ == "_GroupNormReLUBackward"
    assert type(group_norm_relu(small, norm).grad_fn).__name__ != "_GroupNormReLUBackward"
    ref = F.relu(norm(big))
    torch.testing.assert_close(group_norm_relu(big, norm), ref, rtol=1e-5, atol=1e-5)
    x = small.detach().clone()
    group_norm_relu(x, norm)
    torch.testing.assert_close(x, small.detach())  # the in-place ReLU never touches the input

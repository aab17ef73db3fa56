"""dgseg.layers.upsample: the separable matrix-product upsampling is PyTorch's trilinear
interpolation (values and gradients), in every size the decoder asks for."""

import pytest
import torch
import torch.nn.functional as F

from dgseg.layers.conv import native_conv3d
from dgseg.layers.upsample import interpolation_matrix, upsample_trilinear


def _reference(x, size):
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)


def test_matrix_by_hand():
    # 2 -> 4: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (edge: sample 1 twice)
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    assert torch.equal(interpolation_matrix(2, 4).float(), expected)
    assert torch.allclose(
        interpolation_matrix(5, 9).sum(1), torch.ones(9, dtype=torch.float64)
    )  # rows are averages


@pytest.mark.parametrize(
    "shape, size",
    [((1, 4, 4, 4, 4), (8, 8, 8)), ((2, 3, 3, 5, 4), (5, 9, 8)), ((1, 2, 6, 6, 6), (4, 5, 6))],
)
def test_values_and_gradients_equal_pytorchs(shape, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    y = upsample_trilinear(x, size)
    ref = _reference(x, size)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, dy)
    (gref,) = torch.autograd.grad(ref, x, dy)
    torch.testing.assert_close(gx, gref, rtol=1e-12, atol=1e-12)


def test_bf16_autocast_within_bf16_rounding():
    x = torch.randn(1, 8, 6, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = upsample_trilinear(x.bfloat16(), (12, 12, 12))
    assert y.dtype == torch.bfloat16
    ref = _reference(x, (12, 12, 12))
    # three products, each rounded to bf16 (8 mantissa bits) once
    torch.testing.assert_close(y.float(), ref, rtol=3 * 2**-8, atol=3 * 2**-8)


def test_other_layouts_and_the_native_switch_take_pytorchs_kernel(monkeypatch):
    calls = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 4, 4, 4, 4)
    upsample_trilinear(x, (8, 8, 8))
    assert calls == []
    upsample_trilinear(x.contiguous(memory_format=torch.channels_last_3d), (8, 8, 8))
    with native_conv3d():
        upsample_trilinear(x, (8, 8, 8))
    assert len(calls) == 2

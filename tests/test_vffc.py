"""VFFC: reference outputs of the published implementation, Fourier identities, gradcheck,
edge ratios, odd and non-cubic sizes, mixed precision."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgseg.layers import FFC, VFFC, FourierUnit, SpectralTransform

REFERENCE = Path(__file__).parent / "data" / "vffc_reference.npz"


@pytest.fixture(scope="module")
def ref():
    with np.load(REFERENCE) as d:
        return {k: torch.from_numpy(d[k]) for k in d.files}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- reference outputs (published VFFC code, norms replaced by identity) ---------------------


def test_fourier_unit_matches_reference(ref):
    fu = FourierUnit(4, 4, norm="none")
    with torch.no_grad():
        fu.conv.weight.copy_(ref["fu_conv_weight"])
    out = fu(ref["fu_input"])
    assert out.shape == ref["fu_output"].shape
    torch.testing.assert_close(out, ref["fu_output"], rtol=1e-5, atol=1e-5)


def test_spectral_transform_with_lfu_matches_reference(ref):
    st = SpectralTransform(16, 16, norm="none", lfu=True)
    with torch.no_grad():
        st.conv1[0].weight.copy_(ref["st_conv1_weight"])
        st.fu.conv.weight.copy_(ref["st_fu_conv_weight"])
        st.lfu.conv.weight.copy_(ref["st_lfu_conv_weight"])
        st.conv2.weight.copy_(ref["st_conv2_weight"])
    torch.testing.assert_close(st(ref["st_input"]), ref["st_output"], rtol=1e-5, atol=1e-5)
    # the LFU term matters: without it the output is different
    st.lfu = None
    assert not torch.allclose(st(ref["st_input"]), ref["st_output"], atol=1e-3)


# --- Fourier identities ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [(5, 7, 9), (6, 8, 10), (1, 1, 1)])
def test_rfftn_irfftn_roundtrip(size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    spec = torch.fft.rfftn(x, dim=(-3, -2, -1), norm="ortho")  # (B, C, D, H, W//2+1)
    back = torch.fft.irfftn(spec, s=size, dim=(-3, -2, -1), norm="ortho")
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(5, 7, 9), (4, 6, 8)])
def test_fourier_unit_identity_weights_on_impulse(size):
    # A unit impulse at the origin has the flat spectrum 1/sqrt(N) (real, >= 0): with identity
    # weights the ReLU keeps it and the unit returns the impulse; a negative impulse has a
    # negative real spectrum, which the ReLU zeroes.
    fu = FourierUnit(2, 2, norm="none")
    with torch.no_grad():
        fu.conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1, 1))
    x = torch.zeros(1, 2, *size)
    x[0, 0, 0, 0, 0] = 1.0
    x[0, 1, 0, 0, 0] = -1.0
    out = fu(x)
    torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 1], torch.zeros_like(out[:, 1]), rtol=0, atol=1e-6)


def test_fourier_unit_channel_interleaving():
    # Weight keeping only input channel 1 (= Im of channel 0) into output channel 0 (= Re): a
    # real impulse has zero imaginary spectrum, so the result must vanish; routing channel 0
    # (= Re) instead returns the impulse. Pins "2c = Re c, 2c + 1 = Im c".
    x = torch.zeros(1, 1, 3, 4, 5)
    x[..., 0, 0, 0] = 1.0
    for source, expected in ((1, torch.zeros_like(x)), (0, x)):
        fu = FourierUnit(1, 1, norm="none")
        with torch.no_grad():
            fu.conv.weight.zero_()
            fu.conv.weight[0, source] = 1.0
        torch.testing.assert_close(fu(x), expected, rtol=0, atol=1e-6)


def test_fourier_unit_gradcheck_float64():
    torch.manual_seed(0)
    fu = FourierUnit(2, 2, norm="group").double()
    x = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fu, (x,), eps=1e-6, atol=1e-5)


def test_spectral_transform_gradcheck_float64_odd_size():
    # odd H and W exercise the LFU replicate-pad / crop path
    torch.manual_seed(0)
    st = SpectralTransform(8, 8, norm="none").double()
    x = torch.randn(1, 8, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(st, (x,), eps=1e-6, atol=1e-5)


# --- local Fourier unit: tiling and odd sizes ------------------------------------------------


def test_lfu_output_tiles_2x2():
    torch.manual_seed(0)
    st = SpectralTransform(32, 32, norm="none")
    h = torch.randn(1, 16, 6, 8, 10)
    y = st._local_fourier(st.lfu, h)  # (1, 16, 6, 8, 10)
    assert y.shape == h.shape
    torch.testing.assert_close(y[..., :4, :], y[..., 4:, :], rtol=0, atol=0)  # period H/2
    torch.testing.assert_close(y[..., :5], y[..., 5:], rtol=0, atol=0)  # period W/2
    assert not torch.equal(y[:, :, :3], y[:, :, 3:])  # D is not split


def test_lfu_odd_size_is_replicate_padded_then_cropped():
    torch.manual_seed(0)
    st = SpectralTransform(16, 16, norm="none")
    h = torch.randn(1, 8, 4, 5, 7)
    padded = F.pad(h, (0, 1, 0, 1, 0, 0), mode="replicate")  # (1, 8, 4, 6, 8)
    expected = st._local_fourier(st.lfu, padded)[..., :5, :7]
    torch.testing.assert_close(st._local_fourier(st.lfu, h), expected, rtol=0, atol=0)


# --- FFC edge ratios -------------------------------------------------------------------------


def test_ffc_ratio_zero_is_plain_conv():
    torch.manual_seed(0)
    ffc = FFC(16, 8, ratio_gin=0, ratio_gout=0, norm="group")
    assert ffc.convl2g is None and ffc.convg2l is None and ffc.convg2g is None
    x = torch.randn(2, 16, 5, 7, 9)
    expected = F.conv3d(x, ffc.convl2l.weight, padding=1)
    torch.testing.assert_close(ffc(x), expected, rtol=0, atol=0)
    y_l, y_g = ffc((x, None))
    assert y_g is None
    torch.testing.assert_close(y_l, expected, rtol=0, atol=0)


def test_ffc_ratio_one_is_spectral_transform_alone():
    torch.manual_seed(0)
    ffc = FFC(16, 16, ratio_gin=1, ratio_gout=1)
    assert ffc.convl2l is None and ffc.convl2g is None and ffc.convg2l is None
    x = torch.randn(1, 16, 4, 6, 5)
    torch.testing.assert_close(ffc(x), ffc.convg2g(x), rtol=0, atol=0)


def test_ffc_local_output_is_one_conv_over_all_channels():
    # FFC Eq. 1: Y_l = conv_l2l(X_l) + conv_g2l(X_g) is a single conv of [X_l, X_g]
    torch.manual_seed(0)
    ffc = FFC(16, 16, ratio_gin=0.5, ratio_gout=0.5)
    x = torch.randn(1, 16, 4, 5, 6)
    y_l, _ = ffc((x[:, :8], x[:, 8:]))
    w = torch.cat([ffc.convl2l.weight, ffc.convg2l.weight], dim=1)  # (8, 16, 3, 3, 3)
    torch.testing.assert_close(y_l, F.conv3d(x, w, padding=1), rtol=1e-5, atol=1e-5)


def test_vffc_ratio_zero_equals_its_local_conv_path():
    torch.manual_seed(0)
    vffc = VFFC(8, ratio=0.0, norm="none")
    block = vffc.blocks[0]
    x = torch.randn(1, 8, 5, 6, 7)
    h = F.relu(F.conv3d(x, block.ffc1.convl2l.weight, padding=1))
    expected = x + F.relu(F.conv3d(h, block.ffc2.convl2l.weight, padding=1))
    torch.testing.assert_close(vffc(x), expected, rtol=1e-5, atol=1e-5)


# --- shapes, parameters, validation ----------------------------------------------------------


@pytest.mark.parametrize("size", [(5, 7, 9), (6, 8, 10), (3, 1, 2), (2, 1, 3)])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_vffc_shapes_odd_and_non_cubic(size, ratio):
    torch.manual_seed(0)
    vffc = VFFC(16, ratio=ratio, n_blocks=2)
    x = torch.randn(1, 16, *size)
    y = vffc(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_vffc_batch_norm_option_runs():
    vffc = VFFC(16, norm="batch")
    assert vffc(torch.randn(2, 16, 4, 5, 6)).shape == (2, 16, 4, 5, 6)


def test_vffc_parameter_count_at_128_channels():
    # Hand count, C = 128, ratio 0.5 -> 64 local + 64 global channels, one block of two FFCs:
    #   l2l, l2g, g2l: 3 * 64 * 64 * 27                       = 331,776
    #   SpectralTransform(64 -> 64): conv1 64*32 + GN(32) 64 + FU conv 64*64 + GN(64) 128
    #     + LFU conv 64*64 + GN(64) 128 + conv2 32*64         =  12,608
    # two FFCs 2 * 344,384 + four GroupNorm(64) 4 * 128        = 689,280
    assert n_params(VFFC(128)) == 689_280


def test_vffc_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layer"):
        VFFC(16, norm="layer")
    with pytest.raises(ValueError, match="1.5"):
        VFFC(16, ratio=1.5)
    with pytest.raises(ValueError, match="lfu=False"):
        VFFC(16, ratio=0.25)  # 4 global channels -> 2 in the LFU: no 2x2 patches of C/4
    assert VFFC(16, ratio=0.25, lfu=False)(torch.randn(1, 16, 3, 3, 3)).shape == (1, 16, 3, 3, 3)
    with pytest.raises(ValueError, match="32"):
        VFFC(16)(torch.randn(1, 32, 3, 3, 3))


# --- mixed precision -------------------------------------------------------------------------


def test_fourier_unit_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    fu = FourierUnit(4, 4)
    x = torch.randn(1, 4, 5, 6, 7)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = fu(x)
        y_bf16 = fu(x.bfloat16())
    assert torch.equal(y, fu(x))  # autocast disabled inside: bit-identical to float32
    assert y_bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vffc_bf16_autocast_finite_and_input_dtype(dtype):
    torch.manual_seed(0)
    vffc = VFFC(16)
    x = torch.randn(1, 16, 5, 6, 7).to(dtype)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = vffc(x)
    assert y.dtype == dtype
    assert torch.isfinite(y.float()).all()

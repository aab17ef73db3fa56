"""dgseg.layers.conv: every kernel path computes F.conv3d's convolution and its gradients."""

import pytest
import torch
import torch.nn.functional as F

from dgseg.layers.conv import Conv3d, conv3d, conv_path, native_conv3d

CL = torch.channels_last_3d


def _fwd_bwd(fn, x, w, b):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, w, b)
    g = torch.linspace(-1, 1, y.numel()).view(y.shape)
    (y * g).sum().backward()
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


# (in, out, size, kernel, stride, padding, bias, expected path at batch 1)
CASES = [
    (8, 8, 12, 3, 1, 1, False, "onednn"),  # SegResNet ResBlock conv on a small map
    (4, 8, 11, 3, 2, 1, False, "onednn"),  # DownSample, odd size
    (3, 5, 7, 3, 1, 1, True, "onednn"),  # with bias
    (16, 3, 9, 1, 1, 0, True, "pointwise"),  # FinalConv
    (12, 6, 5, 1, 1, 0, False, "pointwise"),  # UpSample's 1x1x1
    (32, 32, 32, 3, 1, 1, False, "native"),  # C*D*H = 32768 > 20480: PyTorch already uses oneDNN
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cin,cout,size,k,stride,pad,bias,path", CASES)
def test_every_path_matches_f_conv3d(cin, cout, size, k, stride, pad, bias, path, layout):
    torch.manual_seed(0)
    x = torch.randn(1, cin, size, size, size)
    w = torch.randn(cout, cin, k, k, k) / (cin * k**3) ** 0.5
    b = torch.randn(cout) if bias else None
    if layout == "channels_last":
        x, w = x.contiguous(memory_format=CL), w.contiguous(memory_format=CL)
    assert conv_path(x, w, [stride] * 3, [pad] * 3, [1] * 3, 1) == path
    got = _fwd_bwd(lambda a, v, c: conv3d(a, v, c, stride, pad), x, w, b)
    ref = _fwd_bwd(lambda a, v, c: F.conv3d(a, v, c, stride, pad), x, w, b)
    for g, r in zip(got, ref):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    if layout == "channels_last" and path == "pointwise":
        assert got[0].is_contiguous(memory_format=CL)  # the layout is kept


def test_conv3d_module_is_nn_conv3d_with_the_same_state():
    torch.manual_seed(0)
    ref = torch.nn.Conv3d(4, 6, 3, padding=1, bias=False)
    mine = Conv3d(4, 6, 3, padding=1, bias=False)
    assert isinstance(mine, torch.nn.Conv3d) and repr(mine) == repr(ref)
    mine.load_state_dict(ref.state_dict())
    assert list(mine.state_dict()) == ["weight"]
    x = torch.randn(1, 4, 10, 9, 8)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)


def test_paths_that_stay_native():
    x = torch.randn(1, 8, 6, 6, 6)
    w = torch.randn(8, 8, 3, 3, 3)
    args = ([1] * 3, [1] * 3, [1] * 3, 1)
    assert conv_path(x, w, *args) == "onednn"
    assert conv_path(torch.randn(2, 8, 6, 6, 6), w, *args) == "native"  # batch > 1: oneDNN anyway
    assert conv_path(x.double(), w.double(), *args) == "native"  # float64 (gradcheck) as before
    with native_conv3d():
        assert conv_path(x, w, *args) == "native"
    assert conv_path(x, w, *args) == "onednn"  # the context restores the routing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_path(x, w, *args) == "native"  # autocast decides the dtype, PyTorch the kernel


def test_gradcheck_float64_through_the_module():
    torch.manual_seed(0)
    conv = Conv3d(2, 3, 3, padding=1).double()
    x = torch.randn(1, 2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,))

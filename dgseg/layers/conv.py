"""A ``Conv3d`` that takes the fast CPU kernel for the shapes of batch-1 3D segmentation.

PyTorch picks a CPU convolution kernel by a heuristic (``ConvParams::use_mkldnn`` in
aten/src/ATen/native/Convolution.cpp): a float32 convolution goes to oneDNN only if the batch is
> 1, the kernel is larger than 3, there are groups, or ``N·C·D·H > 20480``; otherwise it runs
``slow_conv3d``, an im2col + GEMM that, at batch 1, is one thread copying a 27·C-row column
matrix. At batch 1 that is every SegResNet level below the first two (e.g. 64 channels at 16³ or
128 at 8³) and, at 32³ patches, all of them; oneDNN runs those shapes several times faster
(per-convolution timings: benchmarks/README.rst).

:func:`conv3d` therefore routes, on the CPU in float32 (no autocast):

* ``"onednn"``: a convolution with a kernel > 1 that the heuristic would send to ``slow_conv3d``
  goes to ``torch.mkldnn_convolution``; its backward calls ``convolution_backward`` with the input
  as a oneDNN tensor, which selects oneDNN's backward kernels too;
* ``"pointwise"``: a 1×1×1 convolution (stride 1, no padding, one group) is a matrix product
  over the voxels (``F.linear`` on the channels-last view, ``matmul`` on the contiguous one);
* ``"native"``: everything else (GPU, bf16, batches > 1, large maps) stays on ``F.conv3d``.

All three compute the same convolution (float32 rounding aside: ~1e-6 relative); parameters,
state-dict keys and ``repr`` are those of ``nn.Conv3d``. :func:`native_conv3d` switches the
routing off for A/B measurements.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv3d", "conv3d", "conv_path", "kernel_paths_enabled", "native_conv3d"]

_ROUTING = contextvars.ContextVar("dgseg_conv_routing", default=True)
_SLOW_CONV_LIMIT = 20480  # PyTorch's N*C*D*H threshold below which batch-1 fp32 is slow_conv3d


@contextlib.contextmanager
def native_conv3d() -> Iterator[None]:
    """Within this context every :func:`conv3d` is a plain ``F.conv3d``, and the upsampling of
    ``dgseg.layers.upsample`` a plain ``F.interpolate`` (PyTorch's kernels, for comparisons)."""
    token = _ROUTING.set(False)
    try:
        yield
    finally:
        _ROUTING.reset(token)


def kernel_paths_enabled() -> bool:
    """False inside :func:`native_conv3d`."""
    return _ROUTING.get()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)  # torch >= 2.3
    return bool(compiler is not None and compiler.is_compiling())


def _triple(v: int | Sequence[int]) -> list[int]:
    return [int(v)] * 3 if isinstance(v, int) else [int(a) for a in v]


def conv_path(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> str:
    """The kernel :func:`conv3d` uses for these arguments: "onednn", "pointwise" or "native"."""
    if _compiling():  # first: the compiler sees an ordinary convolution (and no ContextVar)
        return "native"
    if (
        not _ROUTING.get()
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.dim() != 5
        or torch.is_autocast_enabled("cpu")
    ):
        return "native"
    k = tuple(weight.shape[2:])
    if k == (1, 1, 1) and groups == 1 and all(s == 1 for s in stride) and not any(padding):
        return "pointwise"
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return "native"
    n, c, d, h = x.shape[:4]
    native_is_onednn = groups > 1 or n > 1 or n * c * d * h > _SLOW_CONV_LIMIT
    return "native" if native_is_onednn else "onednn"


class _OneDNNConv3d(torch.autograd.Function):
    """``torch.mkldnn_convolution`` forward; backward through oneDNN as well."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        need = ctx.needs_input_grad
        mask = [need[0], need[1], has_bias and need[2]]
        # A oneDNN-layout input makes convolution_backward choose the oneDNN backend.
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.contiguous(memory_format=_layout(x)),
            x.to_mkldnn(),
            weight,
            [weight.shape[0]] if has_bias else None,
            stride,
            padding,
            dilation,
            False,  # transposed
            [0, 0, 0],  # output_padding
            groups,
            mask,
        )
        return gx, gw, gb, None, None, None, None


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """1×1×1 convolution as one matrix product over the voxels, in the input's layout."""
    w = weight.flatten(1)  # (C_out, C_in)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        y = F.linear(x.permute(0, 2, 3, 4, 1), w, bias)  # (B, D, H, W, C_out)
        return y.permute(0, 4, 1, 2, 3)  # (B, C_out, D, H, W), channels-last strides
    b, c = x.shape[:2]
    y = torch.matmul(w, x.reshape(b, c, -1))  # (B, C_out, D·H·W)
    if bias is not None:
        y = y + bias.view(1, -1, 1)
    return y.view(b, -1, *x.shape[2:])  # (B, C_out, D, H, W)


def conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv3d`` (zero padding given as ints) through the fastest CPU kernel path."""
    stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
    path = conv_path(x, weight, stride, padding, dilation, groups)
    if path == "pointwise":
        return _pointwise(x, weight, bias)
    if path == "onednn":
        return _OneDNNConv3d.apply(x, weight, bias, stride, padding, dilation, groups)
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state-dict keys) computed by :func:`conv3d`."""

    def _conv_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        return conv3d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

"""Trilinear upsampling (``align_corners=False``) as three matrix products on the CPU.

Linear interpolation along one axis from n to m samples is a fixed (m, n) matrix ``A`` with two
non-zeros per row: output j reads source position s = (j + ½)·n/m − ½, clamped at 0, from
samples ⌊s⌋ and ⌊s⌋ + 1 (the last one repeated at the edge) with weights 1 − (s − ⌊s⌋) and
s − ⌊s⌋, as PyTorch's ``upsample_trilinear3d`` computes them. The trilinear map is separable:

    Y = X ×_W A_W ×_H A_H ×_D A_D,

so on a contiguous (B, C, D, H, W) tensor it is three ``matmul`` calls over contiguous views,
which oneDNN/MKL run vectorised (in bf16 under autocast); PyTorch's own CPU kernel for the
channels-first layout is scalar per output voxel. Its backward is the transposed products,
derived by autograd. Channels-last inputs, other devices and the compiler keep ``F.interpolate``
(its channels-last CPU kernel is vectorised over channels already).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dgseg.layers.conv import kernel_paths_enabled

__all__ = ["interpolation_matrix", "upsample_trilinear"]


@functools.lru_cache(maxsize=64)
def interpolation_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of 1-D linear interpolation, ``align_corners=False``."""
    j = torch.arange(n_out, dtype=torch.float64)
    src = ((j + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((j.long(), i0), 1.0 - w1, accumulate=True)
    m.index_put_((j.long(), i1), w1, accumulate=True)
    return m


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def upsample_trilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="trilinear", align_corners=False)`` for (B, C, D, H, W)."""
    size = tuple(int(s) for s in size)
    if (
        _compiling()
        or not kernel_paths_enabled()
        or x.device.type != "cpu"
        or x.dim() != 5
        or not x.is_contiguous()
        or not x.is_floating_point()
    ):
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    b, c, d, h, w = x.shape
    big_d, big_h, big_w = size
    mats = [interpolation_matrix(n, m) for n, m in ((d, big_d), (h, big_h), (w, big_w))]
    # Under autocast matmul casts float32 operands to bf16 itself.
    dtype = torch.float32 if torch.is_autocast_enabled("cpu") else x.dtype
    mats = [m.to(dtype) for m in mats]
    a_d, a_h, a_w = mats
    y = torch.matmul(x.reshape(b * c * d * h, w), a_w.t())  # (B·C·D·H, W')
    y = torch.matmul(a_h, y.view(b * c * d, h, big_w))  # (B·C·D, H', W')
    y = torch.matmul(a_d, y.view(b * c, d, big_h * big_w))  # (B·C, D', H'·W')
    return y.view(b, c, big_d, big_h, big_w)

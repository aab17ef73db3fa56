"""GroupNorm followed by ReLU as one autograd node (Wu & He 2018, "Group Normalization", eq. 1).

SegResNet applies ``ReLU(GN(x))`` before every convolution. On the CPU PyTorch's GroupNorm
backward is several times slower for channels-last tensors than for contiguous ones, and ReLU
adds its own pass and buffer. Here the
forward is PyTorch's ``native_group_norm`` with the ReLU applied in place on its fresh output,
and the backward is written out per channel. With ``x̂ = (x − μ_g)·r_g`` (group mean μ_g,
inverse std r_g over the ``M = (C/G)·D·H·W`` values of group g), ``z = γ_c·x̂ + β_c``,
``y = max(z, 0)`` and ``dz = dy·[y > 0]``, the per-channel sums ``A_c = Σ dz`` and
``B_c = Σ dz·x`` give

    dβ_c = A_c,    dγ_c = r_g·(B_c − μ_g·A_c),
    P_g = Σ_{c∈g} γ_c·A_c,    Q_g = Σ_{c∈g} γ_c·r_g·(B_c − μ_g·A_c),
    dx = r_g·γ_c·dz − (r_g²·Q_g / M)·x + (r_g / M)·(r_g·Q_g·μ_g − P_g),

two reductions and one fused multiply-add pass over the volume, in the input's memory layout.
The small per-channel algebra runs in float64. :func:`group_norm_relu` uses it where it is faster
(large channels-last CPU maps, no autocast) and ``relu(norm(x))`` elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["group_norm_relu"]


def _channel_sums(t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) sums of ``t`` and of ``t·x`` over the volume: two (N, C) tensors."""
    n, c = x.shape[:2]
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        t2 = t.permute(0, 2, 3, 4, 1).reshape(n, -1, c)  # (N, DHW, C), a view when t is CL
        x2 = x.permute(0, 2, 3, 4, 1).reshape(n, -1, c)
        return t2.sum(1), (t2 * x2).sum(1)
    t2, x2 = t.reshape(n, c, -1), x.reshape(n, c, -1)  # (N, C, DHW)
    return t2.sum(2), (t2 * x2).sum(2)


class _GroupNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):  # type: ignore[override]
        n, c = x.shape[:2]
        y, mean, rstd = torch.ops.aten.native_group_norm(
            x, weight, bias, n, c, x[0, 0].numel(), groups, eps
        )
        y = y.relu_()  # in place on a fresh tensor: the GN backward needs x, not its output
        ctx.groups = groups
        ctx.save_for_backward(x, y, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, y, weight, mean, rstd = ctx.saved_tensors
        n, c, g = x.shape[0], x.shape[1], ctx.groups
        m = (c // g) * x[0, 0].numel()  # values per group
        dz = torch.ops.aten.threshold_backward(dy, y, 0)  # dy where y > 0
        a_sum, b_sum = _channel_sums(dz, x)  # (N, C) each
        f64 = torch.float64
        a_sum = a_sum.to(f64).view(n, g, -1)  # (N, G, C/G)
        b_sum = b_sum.to(f64).view(n, g, -1)
        gam = weight.to(f64).view(1, g, -1)
        mu = mean.to(f64).view(n, g, 1)
        r = rstd.to(f64).view(n, g, 1)
        centred = r * (b_sum - mu * a_sum)  # Σ dz·x̂ per channel, (N, G, C/G)
        p = (gam * a_sum).sum(-1, keepdim=True)  # (N, G, 1)
        q = (gam * centred).sum(-1, keepdim=True)
        coef_dz = (r * gam).reshape(n, c)
        coef_x = (-r * r * q / m).expand(n, g, c // g).reshape(n, c)
        shift = (r / m * (r * q * mu - p)).expand(n, g, c // g).reshape(n, c)
        shape = (n, c, 1, 1, 1)
        dx = torch.addcmul(shift.to(x.dtype).view(shape), x, coef_x.to(x.dtype).view(shape))
        dx = dx.addcmul_(dz, coef_dz.to(x.dtype).view(shape))
        dweight = centred.sum(0).reshape(c).to(weight.dtype)
        dbias = a_sum.sum(0).reshape(c).to(weight.dtype)
        return dx, dweight, dbias, None, None


_FUSED_MIN_NUMEL = 1 << 20  # below ~1M values the extra small ops cost more than they save


def group_norm_relu(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``relu(norm(x))`` for an affine ``nn.GroupNorm``.

    One autograd node for large channels-last CPU maps; PyTorch's kernels elsewhere, where they
    are faster (the contiguous layout), with the ReLU in place on the fresh GN output.
    """
    compiler = getattr(torch, "compiler", None)
    compiling = compiler is not None and compiler.is_compiling()  # the compiler fuses it itself
    fused = (
        not compiling
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == 5
        and x.numel() >= _FUSED_MIN_NUMEL
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
        and norm.affine
        and not torch.is_autocast_enabled("cpu")
    )
    if not fused:
        return F.relu(norm(x), inplace=True)  # GN's backward needs its input, not its output
    return _GroupNormReLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)

"""Building blocks of SegResNet (Myronenko 2018, "3D MRI brain tumor segmentation using
autoencoder regularization", arXiv:1810.11654), without the VAE branch.

The blocks follow the paper's Fig. 1 and MONAI's ``segresnet_block`` (same layers, same
parameter count), written out for 3D only:

- ``ResBlock``: pre-activation residual block ``x + Conv(ReLU(GN(Conv(ReLU(GN(x))))))``,
  3x3x3 convolutions without bias, GroupNorm with 8 groups.
- ``DownSample``: 3x3x3 convolution with stride 2 (no bias) that doubles the channels.
- ``UpSample``: 1x1x1 convolution halving the channels, then trilinear x2 upsampling.
- ``FinalConv``: ``GN -> ReLU -> Conv1x1x1`` (with bias) to the output channels.

The only in-place operation is the ReLU on GroupNorm's fresh output (``group_norm_relu``): the
deepest features are read by both the decoder and a domain classifier head, and an in-place ReLU
or ``+=`` on a shared tensor would corrupt autograd. Convolutions are ``dgseg.layers.conv.Conv3d``
(``nn.Conv3d`` with the fast CPU kernel path; same parameters and state-dict keys).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from dgseg.layers.conv import Conv3d
from dgseg.layers.gn_relu import group_norm_relu
from dgseg.layers.upsample import upsample_trilinear

__all__ = ["group_norm", "ResBlock", "DownSample", "UpSample", "FinalConv"]


def group_norm(channels: int, *, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with ``max_groups`` groups, or the largest divisor of ``channels`` below it.

    SegResNet uses 8 groups; narrow test networks (or VFFC branches with e.g. 12 channels) fall
    back to the largest divisor of ``channels`` that is <= ``max_groups`` so any width works.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _check_channels(**named: int) -> None:
    for name, value in named.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv2(relu(gn2(conv1(relu(gn1(x))))))``."""

    def __init__(self, channels: int, *, kernel_size: int = 3) -> None:
        super().__init__()
        _check_channels(channels=channels)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep the size, got {kernel_size}")
        pad = kernel_size // 2
        self.norm1 = group_norm(channels)
        self.conv1 = Conv3d(channels, channels, kernel_size, padding=pad, bias=False)
        self.norm2 = group_norm(channels)
        self.conv2 = Conv3d(channels, channels, kernel_size, padding=pad, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(group_norm_relu(x, self.norm1))  # ReLU on the GN output, never on `x`
        h = self.conv2(group_norm_relu(h, self.norm2))
        return x + h  # out-of-place add keeps `x` intact for other readers


class DownSample(nn.Module):
    """Stride-2 3x3x3 convolution (no bias); spatial size n -> ceil(n / 2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels)
        self.conv = Conv3d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpSample(nn.Module):
    """1x1x1 convolution (no bias) then trilinear upsampling (``align_corners=False``).

    ``forward(x, size)`` interpolates to ``size`` (the skip connection's spatial size) when given,
    which equals x2 upsampling for even sizes and also handles odd sizes, where the stride-2
    convolution gave ceil(n / 2).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels)
        self.conv = Conv3d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor, size: Optional[Sequence[int]] = None) -> torch.Tensor:
        x = self.conv(x)
        if size is None:
            size = [2 * s for s in x.shape[2:]]
        return upsample_trilinear(x, size)  # F.interpolate's values, faster on the CPU


class FinalConv(nn.Module):
    """Output head ``GN -> ReLU -> Conv1x1x1`` (with bias) producing the logits."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels)
        self.norm = group_norm(in_channels)
        self.conv = Conv3d(in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(group_norm_relu(x, self.norm))

"""3D U-Net baseline (Cicek et al. 2016, "3D U-Net: Learning Dense Volumetric Segmentation from
Sparse Annotation", MICCAI), the write-up's first table.

Each level is a double convolution ``(Conv3x3x3 -> GroupNorm -> ReLU) x 2``; the encoder goes
down with 2x max pooling, the decoder up with a stride-2 transposed convolution, concatenates
the skip (``[skip, up]`` on channels) and applies a double convolution; a 1x1x1 convolution gives
the logits. GroupNorm replaces the paper's BatchNorm because training runs at batch size 1 per
GPU. Same ``encode`` / ``decode`` API as ``SegResNet``, including the optional ``bottleneck``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dgseg.layers.blocks import group_norm
from dgseg.layers.conv import Conv3d

__all__ = ["DoubleConv", "UNet3D"]


class DoubleConv(nn.Sequential):
    """``(Conv3x3x3 (no bias) -> GroupNorm -> ReLU) x 2``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            group_norm(out_channels),
            nn.ReLU(),
            Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            group_norm(out_channels),
            nn.ReLU(),
        )


class UNet3D(nn.Module):
    """3D U-Net with ``len(features)`` levels of widths ``features``.

    Args:
        in_channels: input channels.
        out_channels: output channels (WT, TC, ET logits).
        features: width of each level, shallow to deep; the last is the bottleneck width.
        bottleneck: optional module applied to the deepest features inside ``encode``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 3,
        *,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        bottleneck: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        features = tuple(features)
        if len(features) < 2 or any(c < 1 for c in features):
            raise ValueError(f"features needs >= 2 positive widths, got {features}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"channels must be >= 1, got in_channels={in_channels}, out_channels={out_channels}"
            )
        self.features = features
        self.bottleneck_channels = features[-1]
        widths_in = (in_channels,) + features[:-1]
        self.enc = nn.ModuleList(DoubleConv(ci, co) for ci, co in zip(widths_in, features))
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = bottleneck if bottleneck is not None else nn.Identity()
        self.ups = nn.ModuleList()
        self.dec = nn.ModuleList()
        for deep, shallow in zip(features[:0:-1], features[-2::-1]):  # deepest pair first
            self.ups.append(nn.ConvTranspose3d(deep, shallow, 2, stride=2))
            self.dec.append(DoubleConv(2 * shallow, shallow))
        self.final = Conv3d(features[0], out_channels, 1)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Return (post-bottleneck deepest features, skips ordered shallow -> deep)."""
        min_size = 2 ** (len(self.features) - 1)  # every pooling must leave >= 1 voxel
        if x.ndim != 5 or min(x.shape[2:]) < min_size:
            raise ValueError(
                f"expected (B, C, D, H, W) with every spatial size >= {min_size}, "
                f"got shape {tuple(x.shape)}"
            )
        skips: List[torch.Tensor] = []
        for i, block in enumerate(self.enc):
            x = block(self.pool(x) if i > 0 else x)
            skips.append(x)
        skips.pop()  # deepest level: bottleneck, not a skip
        return self.bottleneck(x), skips

    def decode(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Upsample ``x`` through the decoder, concatenating ``skips`` (shallow -> deep)."""
        for up, block, skip in zip(self.ups, self.dec, reversed(list(skips))):
            x = up(x)  # (B, C_skip, 2 * floor-pooled size)
            # odd sizes: pooling floored, so pad the upsampled map at the end to the skip's size
            pad = [0, 0] * 3
            for k in range(3):
                pad[2 * (2 - k) + 1] = skip.shape[2 + k] - x.shape[2 + k]
            if any(pad):
                x = F.pad(x, pad)
            x = block(torch.cat([skip, x], dim=1))  # (B, 2 C_skip, ...) -> (B, C_skip, ...)
        return self.final(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat, skips = self.encode(x)
        return self.decode(feat, skips)

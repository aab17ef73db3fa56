"""SegResNet (Myronenko 2018, "3D MRI brain tumor segmentation using autoencoder regularization",
arXiv:1810.11654) without the VAE branch, layer-for-layer equivalent to MONAI's ``SegResNet``
(same parameters: 4,702,227 for ``init_filters=16``, 4 input and 3 output channels).

Encoder: ``conv3x3x3(in -> F)``, optional dropout, then level i (width F * 2^i) is
``[DownSample if i > 0] + blocks_down[i] x ResBlock``. Decoder, from the deepest level up:
``UpSample(halve channels, trilinear x2) + skip -> blocks_up[j] x ResBlock``; then ``FinalConv``.

An optional ``bottleneck`` module (e.g. a ``VFFC``) is applied to the deepest features inside
``encode``, so ``encode`` returns post-bottleneck features: the tensor a domain classifier reads.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dgseg.layers.blocks import DownSample, FinalConv, ResBlock, UpSample
from dgseg.layers.conv import Conv3d

__all__ = ["SegResNet"]


class SegResNet(nn.Module):
    """SegResNet encoder-decoder with an optional bottleneck module.

    Args:
        in_channels: input channels (MRI modalities).
        out_channels: output channels (WT, TC, ET logits).
        init_filters: width of the first level; doubled at every level down.
        blocks_down: ResBlocks per encoder level (its length is the number of levels).
        blocks_up: ResBlocks per decoder level; one entry fewer than ``blocks_down``.
        dropout: channel dropout (``Dropout3d``) after the first convolution, as in MONAI.
        bottleneck: module mapping the deepest features (B, ``bottleneck_channels``, ...) to the
            same shape, e.g. ``VFFC(init_filters * 8)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 3,
        *,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        dropout: Optional[float] = None,
        bottleneck: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        blocks_down, blocks_up = tuple(blocks_down), tuple(blocks_up)
        if in_channels < 1 or out_channels < 1 or init_filters < 1:
            raise ValueError(
                f"channels must be >= 1, got in_channels={in_channels}, "
                f"out_channels={out_channels}, init_filters={init_filters}"
            )
        if len(blocks_down) < 1 or any(n < 1 for n in blocks_down):
            raise ValueError(f"blocks_down must be positive counts, got {blocks_down}")
        if len(blocks_up) != len(blocks_down) - 1 or any(n < 0 for n in blocks_up):
            raise ValueError(
                f"blocks_up needs len(blocks_down) - 1 = {len(blocks_down) - 1} non-negative "
                f"counts, got {blocks_up}"
            )
        if dropout is not None and not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be None or in [0, 1), got {dropout}")
        f = init_filters
        n_levels = len(blocks_down)
        self.bottleneck_channels = f * 2 ** (n_levels - 1)

        self.conv_init = Conv3d(in_channels, f, 3, padding=1, bias=False)
        self.dropout = nn.Dropout3d(dropout) if dropout is not None else nn.Identity()
        self.down_layers = nn.ModuleList()
        for i, n_blocks in enumerate(blocks_down):
            width = f * 2**i
            pre = DownSample(width // 2, width) if i > 0 else nn.Identity()
            self.down_layers.append(nn.Sequential(pre, *[ResBlock(width) for _ in range(n_blocks)]))
        self.bottleneck = bottleneck if bottleneck is not None else nn.Identity()

        self.up_samples = nn.ModuleList()
        self.up_layers = nn.ModuleList()
        for j, n_blocks in enumerate(blocks_up):
            width = f * 2 ** (n_levels - 1 - j)  # channels coming up from the level below
            self.up_samples.append(UpSample(width, width // 2))
            self.up_layers.append(nn.Sequential(*[ResBlock(width // 2) for _ in range(n_blocks)]))
        self.final = FinalConv(f, out_channels)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Return (post-bottleneck deepest features, skips ordered shallow -> deep)."""
        if x.ndim != 5:
            raise ValueError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        x = self.dropout(self.conv_init(x))
        skips: List[torch.Tensor] = []
        for down in self.down_layers:
            x = down(x)
            skips.append(x)
        skips.pop()  # the deepest level is not a skip; it goes through the bottleneck
        return self.bottleneck(x), skips

    def decode(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Upsample ``x`` through the decoder, adding ``skips`` (shallow -> deep) on the way."""
        for up, layer, skip in zip(self.up_samples, self.up_layers, reversed(list(skips))):
            x = layer(up(x, size=skip.shape[2:]) + skip)  # size of skip: odd sizes work too
        return self.final(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat, skips = self.encode(x)
        return self.decode(feat, skips)

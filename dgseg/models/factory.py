"""``build_model``: one place that turns model settings (``ModelConfig`` fields) into a network.

``arch`` picks the segmenter (SegResNet or 3D U-Net); ``vffc=True`` puts a VFFC in its bottleneck;
``grl=True`` wraps it in a ``DomainAdversarialNet`` whose forward returns
``(seg_logits, domain_logits)`` and takes ``grl_lambda``. Otherwise forward returns logits.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from dgseg.layers.vffc import VFFC
from dgseg.models.domain_adversarial import DomainAdversarialNet
from dgseg.models.segresnet import SegResNet
from dgseg.models.unet3d import UNet3D

__all__ = ["ARCHS", "build_model"]

ARCHS = ("segresnet", "unet3d")


def build_model(
    in_channels: int,
    *,
    arch: str = "segresnet",
    out_channels: int = 3,
    init_filters: int = 16,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
    dropout: Optional[float] = None,
    unet_features: Sequence[int] = (16, 32, 64, 128, 256),
    vffc: bool = False,
    vffc_ratio: float = 0.5,
    vffc_blocks: int = 1,
    vffc_lfu: bool = True,
    vffc_norm: str = "group",
    vffc_padding: str = "zeros",
    grl: bool = False,
    num_domains: int = 3,
    domain_hidden: int = 128,
    domain_input_norm: bool = True,
) -> nn.Module:
    """Build the segmentation network described by the arguments.

    Tuple arguments also accept lists (configs read from JSON). SegResNet-only arguments
    (``init_filters``, ``blocks_*``, ``dropout``) are ignored for ``arch="unet3d"`` and
    ``unet_features`` for ``arch="segresnet"``.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "segresnet":
        width = int(init_filters) * 2 ** (len(blocks_down) - 1)  # deepest level's channels
    else:
        width = int(tuple(unet_features)[-1])
    bottleneck = None
    if vffc:
        bottleneck = VFFC(width, ratio=vffc_ratio, n_blocks=vffc_blocks, lfu=vffc_lfu,
                          norm=vffc_norm, padding_mode=vffc_padding)
    if arch == "segresnet":
        model: nn.Module = SegResNet(
            in_channels,
            out_channels,
            init_filters=init_filters,
            blocks_down=tuple(blocks_down),
            blocks_up=tuple(blocks_up),
            dropout=dropout,
            bottleneck=bottleneck,
        )
    else:
        model = UNet3D(in_channels, out_channels, features=tuple(unet_features),
                       bottleneck=bottleneck)
    if grl:
        model = DomainAdversarialNet(model, num_domains, hidden=domain_hidden,
                                     input_norm=domain_input_norm)
    return model

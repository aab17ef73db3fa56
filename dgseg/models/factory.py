"""``build_model``: the one place that turns a ``ModelConfig`` into a network; the settings and
their defaults live in ``dgseg.config.ModelConfig`` alone.

``arch`` picks the segmenter (SegResNet or 3D U-Net); ``vffc=True`` puts a VFFC in its bottleneck;
``grl=True`` wraps it in a ``DomainAdversarialNet`` whose forward returns
``(seg_logits, domain_logits)`` and takes ``grl_lambda``. Otherwise forward returns logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch.nn as nn

from dgseg.config import ModelConfig
from dgseg.layers.vffc import VFFC
from dgseg.models.domain_adversarial import DomainAdversarialNet
from dgseg.models.segresnet import SegResNet
from dgseg.models.unet3d import UNet3D

__all__ = ["build_model"]


def build_model(
    in_channels: int, config: Optional[ModelConfig] = None, **changes: Any
) -> nn.Module:
    """The network ``config`` describes, with ``in_channels`` inputs (``cfg.data.in_channels``).

    ``changes`` replace fields of ``config`` (default ``ModelConfig()``): ``build_model(1,
    arch="unet3d")`` is the default 3D U-Net. Tuple fields also accept lists (configs read from
    JSON). SegResNet-only fields (``init_filters``, ``blocks_*``, ``dropout``) are ignored for
    ``arch="unet3d"`` and ``unet_features`` for ``arch="segresnet"``.
    """
    cfg = dataclasses.replace(config if config is not None else ModelConfig(), **changes)
    if cfg.arch == "segresnet":
        width = int(cfg.init_filters) * 2 ** (len(cfg.blocks_down) - 1)  # deepest level's channels
    else:
        width = int(tuple(cfg.unet_features)[-1])
    bottleneck = None
    if cfg.vffc:
        bottleneck = VFFC(
            width,
            ratio=cfg.vffc_ratio,
            n_blocks=cfg.vffc_blocks,
            lfu=cfg.vffc_lfu,
            norm=cfg.vffc_norm,
            padding_mode=cfg.vffc_padding,
        )
    if cfg.arch == "segresnet":
        model: nn.Module = SegResNet(
            in_channels,
            cfg.out_channels,
            init_filters=cfg.init_filters,
            blocks_down=tuple(cfg.blocks_down),
            blocks_up=tuple(cfg.blocks_up),
            dropout=cfg.dropout,
            bottleneck=bottleneck,
        )
    else:
        model = UNet3D(
            in_channels, cfg.out_channels, features=tuple(cfg.unet_features), bottleneck=bottleneck
        )
    if cfg.grl:
        model = DomainAdversarialNet(
            model, cfg.num_domains, hidden=cfg.domain_hidden, input_norm=cfg.domain_input_norm
        )
    return model

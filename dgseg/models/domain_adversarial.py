"""Domain-adversarial segmentation network (DANN, Ganin et al., JMLR 2016) around a segmenter.

``forward(x, grl_lambda)`` returns ``(seg_logits, domain_logits)``: the segmenter's encoder
features (after its bottleneck, e.g. a VFFC) go to the decoder and, through a gradient reversal
layer scaled by ``grl_lambda``, to a domain classifier. Minimising
``seg_loss + domain_loss`` then trains the classifier to recognise the (Bezier-simulated) domain
while the reversed gradient pushes the encoder towards domain-invariant features.

The domain head always runs (even at ``grl_lambda = 0``) so the autograd graph is the same every
step, which keeps DDP's ``find_unused_parameters`` off. Validation and inference never see the
domain head: they run :func:`segmenter_of` the model, which always returns the logits tensor.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from dgseg.layers.grl import DomainClassifier, grad_reverse

__all__ = ["DomainAdversarialNet", "segmenter_of"]


class DomainAdversarialNet(nn.Module):
    """Segmenter with a GRL domain classifier on its deepest (post-bottleneck) features.

    Args:
        segmenter: module with ``encode(x) -> (feat, skips)``, ``decode(feat, skips)`` and a
            ``bottleneck_channels`` attribute (``SegResNet``, ``UNet3D``).
        num_domains: number of domain labels (0 .. num_domains - 1).
        hidden: width of the classifier's hidden layer.
        dropout: dropout in the classifier's hidden layer.
        input_norm: LayerNorm on the pooled features (see ``DomainClassifier``; the original
            code had none).
    """

    def __init__(
        self,
        segmenter: nn.Module,
        num_domains: int,
        *,
        hidden: int = 128,
        dropout: float = 0.0,
        input_norm: bool = True,
    ) -> None:
        super().__init__()
        for name in ("encode", "decode", "bottleneck_channels"):
            if not hasattr(segmenter, name):
                raise ValueError(f"segmenter {type(segmenter).__name__} has no {name!r}")
        self.segmenter = segmenter
        self.bottleneck_channels = int(segmenter.bottleneck_channels)
        self.domain_classifier = DomainClassifier(
            self.bottleneck_channels,
            num_domains,
            hidden=hidden,
            dropout=dropout,
            input_norm=input_norm,
        )

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        return self.segmenter.encode(x)

    def decode(self, feat: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.segmenter.decode(feat, skips)

    def forward(
        self, x: torch.Tensor, grl_lambda: float = 1.0
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        feat, skips = self.segmenter.encode(x)  # (B, C_b, d, h, w) post-bottleneck
        seg_logits = self.segmenter.decode(feat, skips)  # (B, out, D, H, W)
        domain_logits = self.domain_classifier(grad_reverse(feat, grl_lambda))  # (B, K)
        return seg_logits, domain_logits


def segmenter_of(model: nn.Module) -> nn.Module:
    """The network that maps images to segmentation logits: the segmenter of a
    :class:`DomainAdversarialNet`, else ``model`` itself (validation and inference call it)."""
    return model.segmenter if isinstance(model, DomainAdversarialNet) else model

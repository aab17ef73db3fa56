"""Gradient reversal layer and domain classifier (Ganin & Lempitsky, "Unsupervised Domain
Adaptation by Backpropagation", ICML 2015; Ganin et al., "Domain-Adversarial Training of Neural
Networks", JMLR 2016).

The GRL ``R_lambda`` is the identity in the forward pass and multiplies the incoming gradient by
``-lambda`` in the backward pass (JMLR 2016, Eq. 13-14). Put between a feature extractor and a
domain classifier, minimising the classifier's loss trains the classifier to tell domains apart
while pushing the features towards domain invariance.

Note: the backward pass is by design *not* the derivative of the forward pass, so
``torch.autograd.gradcheck`` of ``grad_reverse`` alone fails for any lambda != -1.

``dann_lambda`` is the schedule of JMLR 2016, Sec. 5.2.2:
``lambda(p) = lambda_max * (2 / (1 + exp(-10 p)) - 1)`` with training progress p in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import torch
import torch.nn as nn

__all__ = ["grad_reverse", "GradientReversal", "DomainClassifier", "dann_lambda"]


class _GradReverse(torch.autograd.Function):
    """Identity forward, ``-lambd * grad`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)  # a new tensor object, so autograd records this node

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad_output * (-ctx.lambd), None  # no gradient for lambd


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Return ``x`` unchanged; gradients flowing back through it are scaled by ``-lambd``."""
    if torch.compiler.is_compiling():  # a Python check here would break the graph every step
        return _GradReverse.apply(x, lambd)
    lambd = float(lambd)
    if not math.isfinite(lambd):
        raise ValueError(f"lambd must be finite, got {lambd}")
    return _GradReverse.apply(x, lambd)


class GradientReversal(nn.Module):
    """Module form of ``grad_reverse``; set ``.lambd`` each step to follow a schedule."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


class DomainClassifier(nn.Module):
    """Global average pooling -> [LayerNorm] -> Linear -> ReLU -> (Dropout) -> Linear.

    (B, C, ...) -> (B, K) logits. ``input_norm`` (default on) normalises the pooled features
    before the MLP. Without it the reversed gradient lets the feature extractor win the minimax
    by inflating the feature scale: the classifier becomes confidently wrong and its
    cross-entropy grows without bound. With it, the domain loss is bounded by the classifier's
    own weights, which the classifier keeps small because it minimises that loss, so the encoder
    can only change the *direction* of its features, which is the domain-invariance DANN asks for.
    """

    def __init__(
        self,
        in_channels: int,
        num_domains: int,
        *,
        hidden: int = 128,
        dropout: float = 0.0,
        input_norm: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.norm = nn.LayerNorm(in_channels) if input_norm else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_domains),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim > 2:
            x = x.flatten(2).mean(dim=-1)  # (B, C, D, H, W) -> (B, C): global average pool
        return self.mlp(self.norm(x))  # (B, K) logits


def dann_lambda(progress: float, lambda_max: float = 1.0) -> float:
    """DANN schedule ``lambda_max * (2 / (1 + exp(-10 p)) - 1)``; p is clipped to [0, 1].

    Rises from 0 at p = 0 to ~lambda_max (0.99991 lambda_max) at p = 1.
    """
    p = float(progress)
    if not math.isfinite(p):
        raise ValueError(f"progress must be finite, got {progress}")
    p = min(max(p, 0.0), 1.0)
    return float(lambda_max) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)

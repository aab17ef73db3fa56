"""Segmentation losses: soft Dice on sigmoid outputs (+ optional binary cross-entropy).

Soft Dice after Milletari et al. 2016 (V-Net, eq. 1), in the form of MONAI's ``DiceLoss``: for
every sample b and region channel c,

    D_bc = (2 Σ p·g + smooth_nr) / (Σ p^k + Σ g^k + smooth_dr),   p = sigmoid(logits),

with k = 1 (or k = 2 with ``squared_pred``), and the loss is the mean of 1 − D_bc over b and c.
Channels are independent sigmoids (WT, TC, ET overlap), not a softmax.

Smoothing: dgseg uses ``smooth_nr = 0`` and ``smooth_dr = 1e-5``, the values MONAI's BraTS
SegResNet tutorial passes. MONAI's ``DiceLoss`` *defaults* (which the write-up's code used) are
1e-5 for both. With ``smooth_nr = 0`` a channel that is empty in the truth has D = 0 whatever the
prediction: a constant loss of 1 with no Dice gradient (the optional BCE term still acts there).

Everything is computed in float32 with autocast disabled: under bf16/fp16 autocast the sums over
128³ voxels lose most of their digits.

:func:`view_consistency_loss` is GIN-IPA's consistency term (Ouyang et al., IEEE TMI 2022)
for sigmoid channels: the KL divergence from the views' mean prediction to each view's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dice_loss", "SegLoss", "view_consistency_loss"]


def _check_pair(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape or logits.ndim < 3:
        raise ValueError(
            f"expected logits and target of equal shape (B, C, ...), got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    squared_pred: bool = False,
    smooth_nr: float = 0.0,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Mean soft Dice loss over samples and channels, on ``sigmoid(logits)``.

    Args:
        logits: (B, C, *spatial) raw network outputs, any float dtype.
        target: (B, C, *spatial) binary targets (bool or float).
        squared_pred: square prediction and target in the denominator (Milletari's form).
        smooth_nr: added to the numerator (0: an empty truth channel scores D = 0).
        smooth_dr: added to the denominator (keeps empty channels finite).

    Returns:
        float32 scalar.
    """
    _check_pair(logits, target)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = torch.sigmoid(logits.float()).flatten(2)  # (B, C, N) float32
        g = target.float().flatten(2)  # (B, C, N)
        inter = (p * g).sum(-1)  # (B, C)
        if squared_pred:
            denom = (p * p).sum(-1) + (g * g).sum(-1)
        else:
            denom = p.sum(-1) + g.sum(-1)
        dice = (2.0 * inter + smooth_nr) / (denom + smooth_dr)  # (B, C)
        return (1.0 - dice).mean()


class SegLoss(nn.Module):
    """Soft Dice (see :func:`dice_loss`) plus ``bce_weight`` × binary cross-entropy with logits.

    Args:
        bce_weight: weight of the mean BCE term; 0 (default) gives a pure Dice loss, as in
            the write-up.
        squared_pred: forwarded to :func:`dice_loss`.
    """

    def __init__(self, *, bce_weight: float = 0.0, squared_pred: bool = False) -> None:
        super().__init__()
        if bce_weight < 0:
            raise ValueError(f"bce_weight must be >= 0, got {bce_weight}")
        self.bce_weight = float(bce_weight)
        self.squared_pred = bool(squared_pred)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = dice_loss(logits, target, squared_pred=self.squared_pred)
        if self.bce_weight > 0:
            with torch.autocast(device_type=logits.device.type, enabled=False):
                bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
            loss = loss + self.bce_weight * bce
        return loss

    def extra_repr(self) -> str:
        return f"bce_weight={self.bce_weight}, squared_pred={self.squared_pred}"


def view_consistency_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean KL divergence from the views' mean prediction to each view's, per sigmoid channel.

    For V views of the same samples with probabilities p_v = sigmoid(logits_v) and their mean
    p̄ = (1/V) Σ_v p_v, every channel of every voxel is a Bernoulli variable and

        L = mean over v, b, c, voxels of  p̄·(log p̄ − log p_v) + (1 − p̄)·(log(1 − p̄) − log(1 − p_v)).

    It is 0 exactly when all views predict the same, and positive otherwise. Ouyang et al. use
    ``nn.KLDivLoss()(log_softmax(view), mean softmax)`` over softmax classes with the mean not
    detached; this is the same with the sigmoid's two outcomes summed (their elementwise mean
    also divides by the number of classes), and the gradient also flows through p̄ as theirs.

    Args:
        logits: (V, B, C, *spatial) raw outputs of the V views, V >= 2.

    Returns:
        float32 scalar.
    """
    if logits.ndim < 4 or logits.shape[0] < 2:
        raise ValueError(f"expected logits (V >= 2, B, C, ...), got {tuple(logits.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.float()
        log_p, log_q = F.logsigmoid(z), F.logsigmoid(-z)  # log p_v, log(1 − p_v)
        mean = torch.sigmoid(z).mean(0, keepdim=True)  # (1, B, C, ...) p̄
        eps = torch.finfo(torch.float32).tiny  # 0·log 0 = 0 where p̄ reaches 0 or 1
        kl = mean * (torch.log(mean.clamp_min(eps)) - log_p) + (1.0 - mean) * (
            torch.log((1.0 - mean).clamp_min(eps)) - log_q
        )
        return kl.mean()

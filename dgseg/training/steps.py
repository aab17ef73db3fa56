"""The training steps, one per ``loss.step``: forward, objective and backward of one batch.

``plain``              L = L_seg(y, f(x)).
``adversarial``        DANN (Ganin & Lempitsky 2015): L = L_seg + w_dom · CE(d, D(GRL_λ(E(x)))),
                       with λ(p) = λmax·(2 / (1 + e^(−10p)) − 1) set per step by the epoch loop.
                       The domain head runs even when λ = 0, so the autograd graph never changes.
``saliency_balanced``  SLAug (Su et al. 2023, Sec. 3.2): L_seg on the global location-scale view
                       x_g, whose input gradient gives the saliency s; then L_seg on
                       x_g·s + x_l·(1 − s). Both gradients go into one optimizer step.
``consistency``        GIN-IPA (Ouyang et al. 2022): the V views of each sample as one batch of
                       V·B; L = L_seg(y, f(x_1)) + w_cons · mean_v KL(p̄ ‖ p_v), p̄ = mean sigmoid.

Every step returns float32 scalars "loss", "seg_loss", "domain_loss", "consistency_loss" and the
first view's "logits" with its "label", without a host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from dgseg.training.losses import view_consistency_loss
from dgseg.training.precision import autocast
from dgseg.transforms.location_scale import saliency_mix

__all__ = ["StepContext", "STEPS", "STEP_NAMES", "forward_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepContext:
    """What a step needs besides the batch: where and how to run, and the loss weights."""

    device: torch.device
    amp: str = "none"
    channels_last: bool = False
    lambd: float = 0.0  # GRL coefficient of this step (adversarial)
    domain_weight: float = 0.0  # adversarial
    consistency_weight: float = 0.0  # consistency


def forward_loss(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    loss_fn: LossFn,
    ctx: StepContext,
    domain: torch.Tensor | None = None,
) -> Dict[str, torch.Tensor]:
    """Forward ``image`` (B, C, D, H, W) and build the objective, no backward. With ``domain``
    (B,) the model is a DomainAdversarialNet returning (seg_logits, domain_logits)."""
    image = image.to(ctx.device, non_blocking=True)
    label = label.to(ctx.device, non_blocking=True)  # (B, 3, D, H, W)
    if ctx.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    with autocast(ctx.device, ctx.amp):
        out = model(image) if domain is None else model(image, grl_lambda=ctx.lambd)
    seg_logits, dom_logits = (out, None) if domain is None else out
    seg_loss = loss_fn(seg_logits, label)  # float32 (autocast disabled inside the loss)
    zero = torch.zeros((), device=seg_loss.device)
    dom_loss = zero
    if dom_logits is not None:
        dom_loss = F.cross_entropy(dom_logits.float(), domain.to(ctx.device).view(-1))
    return {
        "loss": seg_loss + ctx.domain_weight * dom_loss,
        "seg_loss": seg_loss,
        "domain_loss": dom_loss,
        "consistency_loss": zero,
        "logits": seg_logits,
        "label": label,
    }


def plain_step(model: nn.Module, batch: Dict[str, Any], loss_fn: LossFn, ctx: StepContext):
    out = forward_loss(model, batch["image"], batch["label"], loss_fn, ctx)
    out["loss"].backward()
    return out


def adversarial_step(model: nn.Module, batch: Dict[str, Any], loss_fn: LossFn, ctx: StepContext):
    out = forward_loss(model, batch["image"], batch["label"], loss_fn, ctx, batch["domain"])
    out["loss"].backward()
    return out


def saliency_balanced_step(
    model: nn.Module, batch: Dict[str, Any], loss_fn: LossFn, ctx: StepContext
):
    image = batch["image"].to(ctx.device, non_blocking=True).requires_grad_(True)  # global view
    local = batch["image_local"].to(ctx.device, non_blocking=True)  # class-wise view
    first = forward_loss(model, image, batch["label"], loss_fn, ctx)
    first["loss"].backward()
    fused = saliency_mix(image.detach(), local, image.grad)  # data: no gradient into saliency
    out = forward_loss(model, fused, batch["label"], loss_fn, ctx)
    out["loss"].backward()
    total = first["loss"].detach() + out["loss"].detach()
    return {**out, "loss": total, "seg_loss": total}


def consistency_step(model: nn.Module, batch: Dict[str, Any], loss_fn: LossFn, ctx: StepContext):
    views = batch["views"].to(ctx.device, non_blocking=True)  # (B, V, C, D, H, W)
    b, v = views.shape[:2]
    x = views.transpose(0, 1).reshape(v * b, *views.shape[2:])  # (V·B, C, D, H, W), view-major

    def first_view(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits[:b], label)  # the segmentation loss sees the first view only

    out = forward_loss(model, x, batch["label"], first_view, ctx)
    logits = out["logits"]  # (V·B, K, D, H, W)
    consistency = view_consistency_loss(logits.reshape(v, b, *logits.shape[1:]))  # (V, B, K, …)
    loss = out["loss"] + ctx.consistency_weight * consistency
    loss.backward()
    return {**out, "loss": loss, "consistency_loss": consistency, "logits": logits[:b]}


STEPS: Dict[str, Callable[..., Dict[str, torch.Tensor]]] = {
    "plain": plain_step,
    "adversarial": adversarial_step,
    "saliency_balanced": saliency_balanced_step,
    "consistency": consistency_step,
}
STEP_NAMES = tuple(STEPS)

"""One training epoch and one validation pass (the ``engine`` of the ConvNeXt/DeiT layout).

Objective per step (DANN, Ganin & Lempitsky 2015, eqs. 9–14, with a segmentation task loss):

    L = L_seg(y, ŷ) + w_dom · CE(d, D(GRL_λ(E(x)))),     λ(p) = λmax·(2 / (1 + e^(−10p)) − 1),

where L_seg is the soft Dice (+ optional BCE) on the WT/TC/ET channels, E the encoder, D the
domain classifier and GRL_λ the gradient-reversal layer (identity forward, −λ·grad backward).
p = step / total_steps is updated every optimizer step. The domain head runs on every step even
when λ = 0 so that the autograd graph never changes (DDP needs no ``find_unused_parameters``).

With ``data.saliency_balancing`` (SLAug, Su et al. AAAI 2023, Sec. 3.2) a step is two passes:
L_seg on the global location-scale view x_g, whose input gradient gives the saliency s; then
L_seg on x_g·s + x_l·(1 − s) (x_l the class-wise view); gradients of both accumulate into one
optimizer step, as in the authors' code.

With ``data.consistency_views`` = V > 1 (GIN-IPA, Ouyang et al. IEEE TMI 2022) the V views
of each sample go through the network as one batch of V·B, and

    L = L_seg(y, ŷ_1) + w_cons · mean_v KL(p̄ ‖ p_v),    p̄ = mean of the V views' sigmoids,

with the segmentation loss on the first view only, as in the authors' code.

The step issues no host synchronisation: losses, Dice and a "first non-finite step" marker are
accumulated on the device and read with ``.item()`` only every ``run.log_every`` steps.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dgseg.config import Config
from dgseg.evaluation.metrics import dice_per_region
from dgseg.inference.sliding_window import sliding_window_inference
from dgseg.layers import dann_lambda
from dgseg.logging_utils import JsonlWriter, format_progress, log
from dgseg.models import segmenter_of
from dgseg.training.distributed import DistState, all_reduce_min, all_reduce_sum
from dgseg.training.losses import view_consistency_loss
from dgseg.training.precision import resolve_amp
from dgseg.transforms.location_scale import saliency_mix

__all__ = [
    "NonFiniteLossError",
    "autocast",
    "check_cpu_bf16_depths",
    "channels_last_choice",
    "use_channels_last",
    "grl_lambda",
    "forward_loss",
    "consistency_forward_loss",
    "saliency_balanced_backward",
    "train_one_epoch",
    "validate",
]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; ``step`` is the 1-based optimizer step where it did."""

    def __init__(self, step: int, epoch: int) -> None:
        super().__init__(
            f"non-finite training loss at step {step} (epoch {epoch}); stopping. The last "
            "good checkpoint (last.pt of the previous epoch) is left untouched."
        )
        self.step = step
        self.epoch = epoch


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """bf16 autocast for ``amp`` "bf16" (or "auto" where bf16 is native), disabled otherwise."""
    resolved, _ = resolve_amp(amp, device)  # the capability probe is cached
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolved == "bf16")


def channels_last_choice(
    cfg: Config, device: torch.device, spatial: Sequence[int]
) -> Tuple[bool, str]:
    """``run.channels_last`` for an input of ``spatial`` size, and why: "auto" on the CPU
    times both layouts once per machine and setting (dgseg.training.layout_probe)."""
    from dgseg.training.layout_probe import choose_channels_last

    return choose_channels_last(cfg, device, spatial)


def use_channels_last(cfg: Config, device: torch.device, spatial: Sequence[int]) -> bool:
    """Whether an input of ``spatial`` size runs channels-last (:func:`channels_last_choice`)."""
    return channels_last_choice(cfg, device, spatial)[0]


def check_cpu_bf16_depths(cfg: Config, dist: DistState, input_shape: Sequence[int]) -> None:
    """Refuse CPU bf16 training where a feature map is 2 voxels deep.

    oneDNN 3.12 (torch 2.13 CPU) computes the bf16 Conv3d (3³) weight gradient wrongly when the
    input depth is 2: NaN or run-to-run different values (seen on AVX512-BF16 CPUs, e.g. a 16³
    patch whose deepest SegResNet level is 2³). Inference is unaffected.
    """
    if dist.device.type != "cpu" or resolve_amp(cfg.run.amp, dist.device)[0] != "bf16":
        return
    levels = (
        len(cfg.model.blocks_down)
        if cfg.model.arch == "segresnet"
        else len(cfg.model.unet_features)
    )
    depth = int(input_shape[0])
    for level in range(levels):
        if depth == 2:
            raise ValueError(
                f"input depth {input_shape[0]} gives a 2-voxel-deep feature map at level {level}; "
                "CPU bf16 Conv3d weight gradients are wrong for that shape (oneDNN). Use another "
                "data.patch_size or --set run.amp=none"
            )
        depth = (depth + 1) // 2  # stride-2 conv, kernel 3, padding 1


def grl_lambda(step: int, total_steps: int, lambda_max: float) -> float:
    """DANN λ at 0-based ``step`` of ``total_steps``: λmax·(2/(1+e^(−10p))−1), p = step/total."""
    return dann_lambda(step / max(total_steps, 1), lambda_max)


def forward_loss(
    model: nn.Module,
    batch: Dict[str, Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    grl: bool = False,
    lambd: float = 0.0,
    domain_weight: float = 0.0,
    amp: str = "none",
    channels_last: bool = False,
) -> Dict[str, torch.Tensor]:
    """Forward one batch and build the objective (no backward); the defaults: a plain segmenter.

    Args:
        model: segmenter (returns logits) or, with ``grl``, a DomainAdversarialNet (returns
            ``(seg_logits, domain_logits)``), possibly DDP/compile-wrapped.
        batch: dict from ShardDataset's collate: "image" (B,C,D,H,W), "label" (B,3,D,H,W),
            "domain" (B,) int64.
        lambd: GRL coefficient for this step.

    Returns:
        dict with scalar float32 "loss", "seg_loss", "domain_loss" and the "logits"/"label".
    """
    image = batch["image"].to(device, non_blocking=True)  # (B, C, D, H, W)
    label = batch["label"].to(device, non_blocking=True)  # (B, 3, D, H, W)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    with autocast(device, amp):
        out = model(image, grl_lambda=lambd) if grl else model(image)
    seg_logits, dom_logits = out if grl else (out, None)
    seg_loss = loss_fn(seg_logits, label)  # float32 (autocast disabled inside the loss)
    if dom_logits is not None:
        domain = batch["domain"].to(device, non_blocking=True).view(-1)  # (B,)
        dom_loss = F.cross_entropy(dom_logits.float(), domain)
        # Always added, even with weight 0, so that the graph is identical on every step.
        loss = seg_loss + domain_weight * dom_loss
    else:
        dom_loss = torch.zeros((), device=seg_loss.device)
        loss = seg_loss
    return {
        "loss": loss,
        "seg_loss": seg_loss,
        "domain_loss": dom_loss,
        "logits": seg_logits,
        "label": label,
    }


def consistency_forward_loss(
    model: nn.Module,
    batch: Dict[str, Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    weight: float,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
) -> Dict[str, torch.Tensor]:
    """GIN-IPA's objective on a batch with "views" (B, V, C, D, H, W); no backward.

    Returns:
        :func:`forward_loss`'s dict (its "logits" those of the first view) with
        "consistency_loss" added.
    """
    views = batch["views"].to(device, non_blocking=True)  # (B, V, C, D, H, W)
    b, v = views.shape[:2]
    x = views.transpose(0, 1).reshape(v * b, *views.shape[2:])  # (V·B, C, D, H, W), view-major

    def first_view(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits[:b], label)  # the segmentation loss sees the first view's B samples

    out = forward_loss(
        model,
        {**batch, "image": x},
        first_view,
        device=device,
        amp=amp,
        channels_last=channels_last,
    )
    logits = out["logits"]  # (V·B, K, D, H, W)
    consistency = view_consistency_loss(logits.reshape(v, b, *logits.shape[1:]))  # (V, B, K, ...)
    return {
        **out,
        "loss": out["loss"] + weight * consistency,
        "consistency_loss": consistency,
        "logits": logits[:b],
    }


def saliency_balanced_backward(
    model: nn.Module,
    batch: Dict[str, Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
) -> Dict[str, torch.Tensor]:
    """SLAug's two passes on a batch with "image" (global view) and "image_local"; backward of
    both done (the caller zeroes the gradients before and steps after).

    Returns:
        :func:`forward_loss`'s dict for the fused view, with "loss" and "seg_loss" the sum of the
        two passes' losses (the objective whose gradient was accumulated).
    """
    image = batch["image"].to(device, non_blocking=True).requires_grad_(True)  # (B, C, D, H, W)
    local = batch["image_local"].to(device, non_blocking=True)
    kw = dict(device=device, amp=amp, channels_last=channels_last)
    first = forward_loss(model, {**batch, "image": image}, loss_fn, **kw)
    first["loss"].backward()
    # the fused view is data: no gradient flows back into the saliency
    fused = saliency_mix(image.detach(), local, image.grad)  # (B, C, D, H, W)
    out = forward_loss(model, {**batch, "image": fused}, loss_fn, **kw)
    out["loss"].backward()
    total = first["loss"].detach() + out["loss"].detach()
    return {**out, "loss": total, "seg_loss": total}


def _batch_dice(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the hard Dice averaged over WT/TC/ET (no host sync)."""
    with torch.no_grad():
        return dice_per_region(logits.detach() > 0, label > 0.5).mean(1).sum()  # sigmoid > 0.5


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    cfg: Config,
    dist: DistState,
    epoch: int,
    step: int,
    total_steps: int,
    writer: Optional[JsonlWriter] = None,
) -> Tuple[Dict[str, float], int]:
    """Train over ``loader`` once.

    Args:
        epoch: 0-based epoch index (the sampler's ``set_epoch`` is the caller's job).
        step: optimizer steps completed before this epoch (drives λ and the per-step cosine).
        total_steps: optimizer steps of the whole run.
        scheduler: stepped after every optimizer step when ``optim.schedule_interval == "step"``.

    Returns:
        (epoch means over all ranks: loss, seg_loss, domain_loss, consistency_loss, dice;
            the updated step).

    Raises:
        NonFiniteLossError: a loss was NaN/inf (detected at the next log point or epoch end).
    """
    model.train()
    dev = dist.device
    per_step_sched = scheduler is not None and cfg.optim.schedule_interval == "step"
    params = [p for p in model.parameters() if p.requires_grad]
    # Device-side accumulators: [loss, seg_loss, domain_loss, consistency_loss, dice, samples].
    window = torch.zeros(6, device=dev, dtype=torch.float64)
    totals = torch.zeros(6, device=dev, dtype=torch.float64)
    first_bad = torch.full((), math.inf, device=dev, dtype=torch.float64)
    zero = torch.zeros((), device=dev)  # the consistency loss of steps without views
    t_epoch = t_window = time.perf_counter()
    steps_in_window = steps_in_epoch = n = 0
    lambd = 0.0

    def report(now: float) -> None:
        """Progress line and log record of the steps since the last report (all ranks reduce)."""
        rec = _window_record(window, cfg, dist, epoch, step, total_steps, lambd, optimizer)
        rec["samples_per_s"] = steps_in_window * n * dist.world_size / max(now - t_window, 1e-9)
        rec["eta_s"] = (now - t_epoch) / max(steps_in_epoch, 1) * (total_steps - step)
        log(format_progress(rec), is_main=dist.is_main)
        if writer is not None:
            writer.write(rec)

    for batch in loader:
        lambd = grl_lambda(step, total_steps, cfg.loss.lambda_max) if cfg.model.grl else 0.0
        channels_last = use_channels_last(cfg, dev, batch["image"].shape[2:])
        optimizer.zero_grad(set_to_none=True)
        if "image_local" in batch:
            out = saliency_balanced_backward(
                model, batch, loss_fn, device=dev, amp=cfg.run.amp, channels_last=channels_last
            )
        elif "views" in batch:
            out = consistency_forward_loss(
                model,
                batch,
                loss_fn,
                weight=cfg.loss.consistency_weight,
                device=dev,
                amp=cfg.run.amp,
                channels_last=channels_last,
            )
            out["loss"].backward()
        else:
            out = forward_loss(
                model,
                batch,
                loss_fn,
                grl=cfg.model.grl,
                lambd=lambd,
                domain_weight=cfg.loss.domain_weight,
                device=dev,
                amp=cfg.run.amp,
                channels_last=channels_last,
            )
            out["loss"].backward()
        loss = out["loss"]
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)  # returns a tensor, no sync
        optimizer.step()
        if per_step_sched:
            scheduler.step()
        step += 1
        n = out["label"].shape[0]
        stats = torch.stack(
            [
                loss.detach() * n,
                out["seg_loss"].detach() * n,
                out["domain_loss"].detach() * n,
                out.get("consistency_loss", zero).detach() * n,
                _batch_dice(out["logits"], out["label"]),
                torch.ones((), device=loss.device) * n,
            ]
        ).to(torch.float64)
        window += stats
        # Remember the first step whose loss is not finite, without a host sync.
        first_bad = torch.minimum(
            first_bad, torch.where(torch.isfinite(loss.detach()), math.inf, float(step))
        )
        steps_in_window += 1
        steps_in_epoch += 1
        if step % cfg.run.log_every == 0:
            _check_finite(first_bad, epoch)
            totals += window
            now = time.perf_counter()
            report(now)
            window.zero_()
            t_window, steps_in_window = now, 0
    _check_finite(first_bad, epoch)
    totals += window
    if steps_in_window:  # the tail of the epoch also gets a record
        report(time.perf_counter())
    totals = all_reduce_sum(totals).tolist()
    count = max(totals[5], 1.0)
    summary = {
        "loss": totals[0] / count,
        "seg_loss": totals[1] / count,
        "domain_loss": totals[2] / count,
        "consistency_loss": totals[3] / count,
        "dice": totals[4] / count,
        "lambda": lambd,
        "epoch_time_s": time.perf_counter() - t_epoch,
    }
    return summary, step


def _check_finite(first_bad: torch.Tensor, epoch: int) -> None:
    bad = all_reduce_min(first_bad).item()  # every rank stops together
    if math.isfinite(bad):
        raise NonFiniteLossError(int(bad), epoch + 1)


def _window_record(
    window: torch.Tensor,
    cfg: Config,
    dist: DistState,
    epoch: int,
    step: int,
    total_steps: int,
    lambd: float,
    optimizer: torch.optim.Optimizer,
) -> Dict[str, Any]:
    loss, seg, dom, cons, dice, count = all_reduce_sum(window).tolist()
    count = max(count, 1.0)
    return {
        "kind": "train",
        "epoch": epoch + 1,
        "epochs": cfg.optim.epochs,
        "step": step,
        "total_steps": total_steps,
        "loss": loss / count,
        "seg_loss": seg / count,
        "domain_loss": dom / count,
        "consistency_loss": cons / count,
        "dice": dice / count,
        "lambda": lambd,
        "lr": optimizer.param_groups[0]["lr"],
        "time": time.time(),
    }


@torch.no_grad()
def validate(
    model: nn.Module,
    dataset: Any,
    *,
    cfg: Config,
    dist: DistState,
    indices: Optional[Sequence[int]] = None,
) -> Dict[str, float]:
    """Whole-volume Dice (sigmoid > 0.5) on the validation cases, sharded over ranks.

    Rank r predicts cases ``indices[r::world]`` (uneven counts are fine: no collective runs per
    case), then per-region Dice sums and the case count are all-reduced.

    Args:
        model: the *unwrapped* module (not DDP, whose forward may issue collectives); a
            domain-adversarial model is validated through its segmenter (``segmenter_of``).
        dataset: item i → {"image": (C,D,H,W), "label": (3,D,H,W)}; whole stored volumes.
        indices: cases to use (default: all).

    Returns:
        {"dice_WT", "dice_TC", "dice_ET", "dice_mean", "n_cases"}.
    """
    was_training = model.training
    model.eval()
    dev = dist.device
    roi = cfg.eval_roi  # None: one window covering the volume
    if indices is None:
        indices = range(len(dataset))
    mine = list(indices)[dist.rank :: dist.world_size]
    sums = torch.zeros(4, device=dev, dtype=torch.float64)  # WT, TC, ET, cases

    segmenter = segmenter_of(model)  # logits only: the domain head plays no part here

    def predictor(x: torch.Tensor) -> torch.Tensor:
        if use_channels_last(cfg, dev, x.shape[2:]):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with autocast(dev, cfg.run.amp):
            return segmenter(x)

    for i in mine:
        item = dataset[i]
        image = item["image"].unsqueeze(0).to(dev, non_blocking=True)  # (1, C, D, H, W)
        label = item["label"].unsqueeze(0).to(dev, non_blocking=True)  # (1, 3, D, H, W)
        # a single covering window needs no blending weights
        logits = sliding_window_inference(
            predictor,
            image,
            roi,
            overlap=cfg.run.val_overlap,
            blend="gaussian" if roi is not None else "constant",
        )
        dice = dice_per_region(logits > 0, label > 0.5)[0]  # (3,)
        sums[:3] += dice.to(torch.float64)
        sums[3] += 1
    sums = all_reduce_sum(sums).tolist()
    model.train(was_training)
    n = sums[3]
    if n == 0:
        return {**{f"dice_{r}": math.nan for r in ("WT", "TC", "ET", "mean")}, "n_cases": 0}
    res = {f"dice_{r}": sums[k] / n for k, r in enumerate(("WT", "TC", "ET"))}
    res["dice_mean"] = (res["dice_WT"] + res["dice_TC"] + res["dice_ET"]) / 3
    res["n_cases"] = int(n)
    return res

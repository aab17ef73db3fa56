"""One training epoch and one validation pass.

The epoch loop draws batches, sets the per-step GRL coefficient λ(p) = λmax·(2/(1+e^(−10p))−1)
(p = step / total_steps, DANN), calls the training step named by ``loss.step``
(:mod:`dgseg.training.steps`), steps the optimiser and the per-step cosine, and logs. It issues no
host synchronisation per step: losses, Dice and a "first non-finite step" marker accumulate on the
device and are read only every ``run.log_every`` steps. Validation is sliding-window inference
over whole stored volumes with the BraTS Dice rules.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from dgseg.config import Config
from dgseg.evaluation.metrics import dice_per_region
from dgseg.inference.sliding_window import sliding_window_inference
from dgseg.layers import dann_lambda
from dgseg.logging_utils import JsonlWriter, format_progress, log
from dgseg.models import segmenter_of
from dgseg.training.distributed import DistState, all_reduce_min, all_reduce_sum
from dgseg.training.precision import autocast, resolve_amp
from dgseg.training.steps import STEPS, StepContext

__all__ = [
    "NonFiniteLossError",
    "check_cpu_bf16_depths",
    "channels_last_choice",
    "use_channels_last",
    "grl_lambda",
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

    step_fn = STEPS[cfg.loss.step]
    for batch in loader:
        lambd = grl_lambda(step, total_steps, cfg.loss.lambda_max) if cfg.model.grl else 0.0
        channels_last = use_channels_last(cfg, dev, batch["image"].shape[2:])
        optimizer.zero_grad(set_to_none=True)
        ctx = StepContext(
            device=dev,
            amp=cfg.run.amp,
            channels_last=channels_last,
            lambd=lambd,
            domain_weight=cfg.loss.domain_weight,
            consistency_weight=cfg.loss.consistency_weight,
        )
        out = step_fn(model, batch, loss_fn, ctx)
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
                out["consistency_loss"].detach() * n,
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

"""The optimiser and learning-rate schedule of a training run, built in one place from ``optim.*``.

The write-up gives lr 1e-4 and weight decay 1e-5 but names no optimiser. Its public code used
``torch.optim.Adam(params, lr, weight_decay=1e-5, amsgrad=True)``: Adam (Kingma & Ba 2015) with the
AMSGrad maximum of the second moments (Reddi et al. 2018) and the decay added to the gradient
(coupled, i.e. L2 regularisation, which the adaptive step then rescales per parameter). dgseg
defaults to AdamW (Loshchilov & Hutter 2019), whose decay ``θ ← θ − lr·wd·θ`` is decoupled from
the adaptive step; ``optim.name="adam"`` with ``optim.amsgrad=true`` restores the original.

The schedule is the write-up's cosine annealing (Loshchilov & Hutter 2017, SGDR without restarts)
from lr to ``min_lr`` over the whole run, stepped every optimizer step (default) or every epoch.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "SCHEDULE_INTERVALS",
    "build_optimizer",
    "build_scheduler",
    "fused_supported",
]

OPTIMIZERS = ("adamw", "adam")  # accepted optim.name values (OptimConfig reads this)
SCHEDULES = ("cosine", "constant")  # accepted optim.schedule values
SCHEDULE_INTERVALS = ("step", "epoch")  # the cosine advances every optimizer step or epoch


def fused_supported(device: torch.device | str) -> bool:
    """Whether Adam/AdamW have a fused kernel for parameters on ``device`` (CUDA; CPU since
    torch 2.4). On the CPU the default per-parameter loop costs about ten small passes per
    tensor, each a parallel region; the fused kernel updates a tensor in one pass."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and _cpu_fused())


@functools.lru_cache(maxsize=1)
def _cpu_fused() -> bool:
    try:  # an older torch refuses fused=True for CPU tensors
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: Any, *, fused: bool = False
) -> torch.optim.Optimizer:
    """Adam or AdamW over ``params`` with the settings of ``cfg`` (an ``OptimConfig``).

    Args:
        params: the parameters to optimise.
        cfg: object with ``name``, ``lr``, ``betas``, ``weight_decay`` and ``amsgrad``.
        fused: one fused kernel for all parameters (where :func:`fused_supported`).
    """
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {cfg.name!r}")
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    kwargs = dict(
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,  # Adam: added to the gradient (L2); AdamW: decoupled
        amsgrad=bool(cfg.amsgrad),
    )
    if fused:
        kwargs["fused"] = True
    return cls(params, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The lr schedule of ``cfg`` (an ``OptimConfig``): cosine to ``min_lr`` at the last step (or
    epoch, ``schedule_interval="epoch"``) of ``cfg.epochs``, or constant.

    The caller steps it after every optimizer step, or after every epoch for "epoch".
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.schedule == "cosine":
        t_max = cfg.epochs * steps_per_epoch if cfg.schedule_interval == "step" else cfg.epochs
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=t_max, eta_min=cfg.min_lr
        )
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)

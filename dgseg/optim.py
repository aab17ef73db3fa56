"""The optimiser of a training run, built in one place from ``optim.name`` / ``optim.amsgrad``.

The write-up gives lr 1e-4 and weight decay 1e-5 but names no optimiser. Its public code used
``torch.optim.Adam(params, lr, weight_decay=1e-5, amsgrad=True)``: Adam (Kingma & Ba 2015) with the
AMSGrad maximum of the second moments (Reddi et al. 2018) and the decay added to the gradient
(coupled, i.e. L2 regularisation, which the adaptive step then rescales per parameter). dgseg
defaults to AdamW (Loshchilov & Hutter 2019), whose decay ``θ ← θ − lr·wd·θ`` is decoupled from
the adaptive step; ``optim.name="adam"`` with ``optim.amsgrad=true`` restores the original.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = ("adamw", "adam")  # accepted optim.name values (OptimConfig reads this)


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: Any, *, fused: bool = False
) -> torch.optim.Optimizer:
    """Adam or AdamW over ``params`` with the settings of ``cfg`` (an ``OptimConfig``).

    Args:
        params: the parameters to optimise.
        cfg: object with ``name``, ``lr``, ``betas``, ``weight_decay`` and ``amsgrad``.
        fused: one fused kernel for all parameters (CUDA only).
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

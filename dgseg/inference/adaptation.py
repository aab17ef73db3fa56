"""Per-case test-time adaptation, and the one path from a stored volume to probabilities.

:class:`CasePredictor` turns a z-scored test volume (1, C, D, H, W) into WT/TC/ET probabilities:
optional intensity matching, the checkpoint's input representation
(``dgseg.transforms.gradient_map``), optional adaptation of a *deep copy* of the trained network
(so nothing carries over between cases or inputs), then the caller's sliding-window prediction.
No label is read. Methods (``--adapt``):

* ``tent`` (Wang et al., ICLR 2021; DequanWang/tent): minimise the mean binary entropy
  H(p) = −p log p − (1−p) log(1−p) of the sigmoid outputs with Adam, only the affine weight and
  bias of the normalisation layers trainable (GroupNorm here); episodic, reset for every case
  (by default one step, as TENT's episodic mode). Deviations: per-voxel binary entropy of the
  three sigmoid channels instead of the softmax entropy, averaged over the brain (input ≠ 0)
  rather than every voxel; the prediction is made after the last update (TENT returns the
  output of the last adapting pass); BatchNorm layers, if any, keep their running statistics
  (TENT re-estimates them per batch).
* ``prior`` (GM-Guided DG's class-prior-informed adaptation, ``PseudoLabelAgent``): with the
  training prior π per region (``dgseg.inference.source_stats``) smoothed as q = (1−α)π + α/2,
  each step averages the logits of the volume and of its flip along the last axis (L1
  consistency between them, weight λc), takes the pseudo-label p/q > (1−p)/(1−q), minimises the
  BCE of the foreground pseudo-labels only (the authors' mask on the tumour class) with AdamW on
  the norm affine parameters, and moves q towards the pseudo-label shares:
  q ← αq + (1−α)(α/2 + (1−α)·share). The output is the prior-corrected probability
  (p/q) / (p/q + (1−p)/(1−q)). Deviations: sigmoid channels as three binary problems (the
  authors: softmax over classes, their BraTS task WT only); the loss is averaged over brain voxels
  (theirs: every pixel of the slice); their first step, mixing BatchNorm running statistics with
  the test batch's (momentum 0.4), does nothing for GroupNorm and is left out; the final
  probabilities come from a pass after the last update.
* ``match`` (SRCSM-style test-time intensity mapping, Thaler et al. 2025): the brain voxels of
  each channel are mapped piecewise-linearly from their own quantiles to the source modality's
  stored quantiles (101 landmarks, Nyúl-style histogram matching); background stays 0. A
  monotone map: it cannot make an iso-intense tumour brighter. SRCSM's mapping is learned-free
  too but semantic-aware; this one is global.
* ``match+tent``, ``match+prior``: matching first, then the adaptation.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgseg.inference.sliding_window import covering_roi
from dgseg.inference.source_stats import SOURCE_STATS_KEY
from dgseg.training.checkpoint import load_checkpoint
from dgseg.transforms.gradient_map import input_representation

__all__ = [
    "ADAPT_METHODS",
    "AdaptSettings",
    "NO_ADAPT",
    "norm_affine_parameters",
    "binary_entropy",
    "match_quantiles",
    "tent_adapt",
    "prior_adapt",
    "CasePredictor",
    "load_case_predictor",
    "add_adapt_arguments",
    "adapt_settings",
]

ADAPT_METHODS = ("none", "tent", "prior", "match", "match+tent", "match+prior")
# Defaults per network update method: episodic TENT (one Adam step at 1e-3 per batch, reset
# after it: its CIFAR setting); the authors' BraTS T2->T1 script for prior (2 steps, AdamW lr
# 1e-2, alpha 0.5, consistency 1).
_DEFAULTS = {"tent": (1, 1e-3), "prior": (2, 1e-2)}
_NORMS = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

# model, network input (1, C', D, H, W) -> probabilities (1, 3, D, H, W)
PredictFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AdaptSettings:
    """Which adaptation, and its step count / learning rate (None: the method's default)."""

    method: str = "none"
    steps: Optional[int] = None
    lr: Optional[float] = None
    alpha: float = 0.5  # prior: smoothing towards uniform, and the prior's update rate
    consistency: float = 1.0  # prior: weight of the flip-consistency L1 term

    def __post_init__(self) -> None:
        if self.method not in ADAPT_METHODS:
            raise ValueError(f"--adapt {self.method!r} is not one of {ADAPT_METHODS}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--adapt-steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--adapt-lr must be > 0, got {self.lr}")

    @property
    def update(self) -> Optional[str]:
        """ "tent" / "prior" when the network is adapted, else None."""
        last = self.method.split("+")[-1]
        return last if last in _DEFAULTS else None

    @property
    def match(self) -> bool:
        return self.method.startswith("match")

    def resolved(self) -> tuple[int, float]:
        steps, lr = _DEFAULTS.get(self.update or "", (0, 0.0))
        return self.steps or steps, self.lr or lr

    def describe(self) -> str:
        if self.method == "none":
            return "none"
        parts = []
        if self.match:
            parts.append("intensity matching to the source quantiles")
        if self.update:
            steps, lr = self.resolved()
            opt = "Adam" if self.update == "tent" else "AdamW"
            extra = f", alpha {self.alpha}, consistency {self.consistency}"
            parts.append(
                f"{self.update} ({steps} step(s), {opt} lr {lr:g}"
                f"{extra if self.update == 'prior' else ''}; norm affine parameters only, "
                "restarted from the trained weights for every case)"
            )
        return " then ".join(parts)


NO_ADAPT = AdaptSettings()  # the unadapted prediction


def norm_affine_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The affine weights and biases of the normalisation layers of ``model``."""
    params = []
    for m in model.modules():
        if isinstance(m, _NORMS):
            params += [p for p in (m.weight, m.bias) if p is not None]
    return params


def _trainable_copy(model: nn.Module) -> tuple[nn.Module, List[nn.Parameter]]:
    net = copy.deepcopy(model).eval()
    net.requires_grad_(False)
    params = norm_affine_parameters(net)
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ValueError("the network has no normalisation affine parameters to adapt")
    return net, params


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-voxel H(sigmoid(z)) in nats, from logits (stable: p·softplus(−z) + (1−p)·softplus(z))."""
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) through (xp, fp), xp non-decreasing; constant beyond the ends."""
    x = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    span = x1 - x0
    w = torch.where(span > 0, (x - x0) / span.clamp_min(1e-12), torch.zeros_like(x))
    return y0 + w * (y1 - y0)


def match_quantiles(
    image: torch.Tensor, source_quantiles: Sequence[Sequence[float]], levels: Sequence[float]
) -> torch.Tensor:
    """Map each channel's brain voxels (≠ 0) of (1, C, D, H, W) onto the source quantiles."""
    out = image.clone()
    lv = torch.tensor(levels, dtype=torch.float64, device=image.device)
    for c in range(image.shape[1]):
        ch = image[0, c]
        brain = ch != 0
        if int(brain.sum()) < 2:
            continue
        vals = ch[brain].double()
        own = torch.quantile(vals, lv)
        src = torch.tensor(source_quantiles[c], dtype=torch.float64, device=image.device)
        out[0, c][brain] = _interp(vals, own, src).to(image.dtype)
    return out


def _forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of the whole volume with gradients: zero-padded (background) to the covering
    window, as the sliding-window prediction pads, and cropped back."""
    spatial = x.shape[2:]
    pads = [r - s for r, s in zip(covering_roi(spatial), spatial)]
    pad_arg: List[int] = []
    for p in reversed(pads):
        pad_arg += [p // 2, p - p // 2]
    logits = net(F.pad(x, pad_arg) if any(pads) else x)  # (1, 3, padded D, H, W)
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, spatial))
    return logits[(..., *crop)].float()


def tent_adapt(
    model: nn.Module,
    x: torch.Tensor,
    brain: torch.Tensor,
    *,
    steps: int,
    lr: float,
) -> nn.Module:
    """A copy of ``model`` after ``steps`` entropy-minimisation steps on ``x`` (1, C, D, H, W);
    ``brain`` (D, H, W) bool selects the voxels averaged."""
    net, params = _trainable_copy(model)
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = binary_entropy(_forward(net, x))[0][:, brain].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.requires_grad_(False)


def prior_adapt(
    model: nn.Module,
    x: torch.Tensor,
    brain: torch.Tensor,
    prior: Sequence[float],
    *,
    steps: int,
    lr: float,
    alpha: float = 0.5,
    consistency: float = 1.0,
) -> tuple[nn.Module, torch.Tensor]:
    """GM-Guided DG's class-prior-informed adaptation (module docstring) of a copy of ``model``.

    Returns the adapted copy and the final foreground prior q (3,).
    """
    net, params = _trainable_copy(model)
    opt = torch.optim.AdamW(params, lr=lr)
    pi = torch.tensor(prior, dtype=torch.float32, device=x.device)
    q = (1 - alpha) * pi + alpha / 2  # (3,) foreground; background is 1 - q
    n_brain = brain.sum().clamp_min(1)
    with torch.enable_grad():
        for _ in range(steps):
            logits = _forward(net, x)  # (1, 3, D, H, W)
            cons = 0.0
            if consistency:
                flipped = _forward(net, x.flip(-1)).flip(-1)
                cons = (logits - flipped).abs().mean() / 2
                logits = (logits + flipped) / 2
            p = torch.sigmoid(logits.detach())[0]  # (3, D, H, W)
            qv = q.view(3, 1, 1, 1)
            pseudo = (p / qv > (1 - p) / (1 - qv)) & brain  # (3, D, H, W)
            bce = F.softplus(-logits[0])  # BCE against target 1
            loss = (bce * pseudo).sum() / n_brain + consistency * cons
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            share = pseudo.flatten(1).sum(1).float() / n_brain  # (3,)
            q = alpha * q + (1 - alpha) * (alpha / 2 + (1 - alpha) * share)
    return net.requires_grad_(False), q


def prior_correct(prob: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(p/q) / (p/q + (1−p)/(1−q)) per region channel of (1, 3, D, H, W)."""
    qv = q.view(1, -1, 1, 1, 1).to(prob)
    a = prob / qv
    return a / (a + (1 - prob) / (1 - qv))


class CasePredictor:
    """Stored z-scored volume -> probabilities, with the checkpoint's input representation and an
    optional per-case adaptation (module docstring).

    Args:
        model: the trained segmenter (never modified).
        data_cfg: the checkpoint's ``DataConfig`` (input representation and training modalities).
        settings: the adaptation.
        source_stats: the checkpoint's ``source_stats`` (needed by "prior" and "match").

    The adaptation passes see the whole volume in one window (memory grows with the volume; the
    prediction after adaptation uses the caller's sliding windows).
    """

    def __init__(
        self,
        model: nn.Module,
        data_cfg: Any,
        settings: AdaptSettings = NO_ADAPT,
        source_stats: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.model, self.settings = model, settings
        self.input_repr = data_cfg.input_repr
        self.sigmas = tuple(data_cfg.gradient_sigmas)
        self.stats = source_stats
        if (settings.match or settings.update == "prior") and source_stats is None:
            raise ValueError(
                f"--adapt {settings.method} needs the source statistics stored in the "
                "checkpoint; add them with tools/add_source_stats.py"
            )

    def __call__(self, image: torch.Tensor, predict: PredictFn) -> torch.Tensor:
        s = self.settings
        if s.method == "none":  # exactly the unadapted path
            return predict(self.model, input_representation(image, self.input_repr, self.sigmas))
        brain = (image[0] != 0).any(dim=0)  # (D, H, W), from the stored intensities
        if s.match:
            image = match_quantiles(image, self.stats["quantiles"], self.stats["quantile_levels"])
        x = input_representation(image, self.input_repr, self.sigmas)
        if s.update is None:
            return predict(self.model, x)
        steps, lr = s.resolved()
        if s.update == "tent":
            net = tent_adapt(self.model, x, brain, steps=steps, lr=lr)
            return predict(net, x)
        net, q = prior_adapt(
            self.model,
            x,
            brain,
            self.stats["region_prior"],
            steps=steps,
            lr=lr,
            alpha=s.alpha,
            consistency=s.consistency,
        )
        return prior_correct(predict(net, x), q)


def load_case_predictor(
    checkpoint: Any, model: nn.Module, data_cfg: Any, settings: AdaptSettings
) -> CasePredictor:
    """The :class:`CasePredictor` of a loaded segmenter, with the source statistics stored in
    ``checkpoint`` (read only when the adaptation needs them)."""
    stats = None
    if settings.match or settings.update == "prior":
        stats = load_checkpoint(checkpoint).get(SOURCE_STATS_KEY)
        if stats is None:
            raise ValueError(
                f"{checkpoint} holds no source statistics, which --adapt {settings.method} "
                "needs: add them with tools/add_source_stats.py --checkpoint "
                f"{checkpoint} --data <the training shards>"
            )
    return CasePredictor(model, data_cfg, settings, stats)


def _default_text(k: int) -> str:
    return ", ".join(f"{name} {v[k]:g}" for name, v in _DEFAULTS.items())


def add_adapt_arguments(parser: argparse.ArgumentParser) -> None:
    """``--adapt``, ``--adapt-steps``, ``--adapt-lr`` (tools/evaluate.py, tools/predict.py)."""
    parser.add_argument(
        "--adapt",
        choices=ADAPT_METHODS,
        default="none",
        help="per-case test-time adaptation (dgseg.inference.adaptation); never sees a label",
    )
    parser.add_argument(
        "--adapt-steps",
        type=int,
        default=None,
        help=f"adaptation steps per case (default: {_default_text(0)})",
    )
    parser.add_argument(
        "--adapt-lr",
        type=float,
        default=None,
        help=f"adaptation learning rate (default: {_default_text(1)})",
    )


def adapt_settings(args: argparse.Namespace) -> AdaptSettings:
    """The :class:`AdaptSettings` of parsed arguments (ValueError: one line naming the option)."""
    return AdaptSettings(args.adapt, args.adapt_steps, args.adapt_lr)

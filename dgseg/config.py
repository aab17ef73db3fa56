"""Typed, frozen training configuration and one preset per experiment of the write-up.

The write-up ("Cross-modality single-source domain generalization", see docs/SPEC.md) trains a
SegResNet or a 3D UNet on one source modality with lr 1e-4, weight decay 1e-5, cosine annealing
over 100 epochs and, for the adversarial variant, a gradient-reversal weight that follows the DANN
schedule λ(p) = λmax·(2 / (1 + exp(−10·p)) − 1) (Ganin & Lempitsky 2015, eq. 14). The write-up
names no optimiser: its code used Adam with amsgrad and coupled (L2) weight decay; dgseg defaults
to AdamW (decoupled weight decay) and keeps the original behind ``optim.name=adam``,
``optim.amsgrad=true`` (the ``segresnet_t2_vffc_grl_original`` preset).

A :class:`Config` holds one frozen dataclass per concern. Every field can be overridden from the
command line as ``--set section.field=value``; the value is parsed according to the field's type
annotation (bool, int, float, str, tuples, ``None`` for optional fields). The resolved config is
saved as ``config.json`` in the run folder and, as a plain dict, inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from dgseg.constants import DEFAULT_DATA_ROOT, MODALITIES
from dgseg.data.domains import DOMAIN_ASSIGNMENTS, check_domains
from dgseg.layers.vffc import NORMS, PADDING_MODES
from dgseg.training.distributed import DEVICES
from dgseg.training.optim import OPTIMIZERS, SCHEDULE_INTERVALS, SCHEDULES
from dgseg.training.precision import AMP_CHOICES
from dgseg.training.steps import STEP_NAMES
from dgseg.transforms.gradient_map import INPUT_REPRS, check_sigmas, repr_channels
from dgseg.transforms.sdg import INTENSITY_AUGS

__all__ = [
    "ARCHS",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "LossConfig",
    "RunConfig",
    "Config",
    "apply_overrides",
    "add_set_argument",
    "config_diff",
    "valid_keys",
]

# Choice lists live with the code that acts on them (dgseg.layers.vffc, dgseg.training.optim, ...);
# the architectures with ModelConfig, which dgseg.models.build_model turns into a network.
ARCHS = ("segresnet", "unet3d")


def _check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass(frozen=True)
class DataConfig:
    """Which shards, which channels, which augmentation (see dgseg.data.ShardDataset)."""

    root: str = DEFAULT_DATA_ROOT  # tools/prepare_brats.py --output default (manifest.json)
    modalities: Tuple[str, ...] = ("t2",)  # source modality(ies), one input channel each, in order
    patch_size: Optional[int] = None  # None: whole stored volume (128³ after prep); int: cube crop
    flip: bool = False  # random flips on the three axes (write-up: "random flipping")
    rot90: bool = False  # random 90° rotations in a random plane
    rotation_degrees: float = 0.0  # random small rotation, max angle (write-up: "random rotation")
    # The training domains: a pool of intensity augmentations (dgseg.transforms.sdg; "none" is
    # the source image, "bezier_increasing"/"bezier_decreasing" the write-up's curves) and how a
    # sample gets its entry: "sample" draws one per sample and epoch, "patient" deals the
    # patients into len(pool) fixed subsets (the write-up's domains). The entry's index is the
    # sample's domain label.
    intensity_augs: Tuple[str, ...] = ()  # () = the source image as it is
    domain_assignment: str = "sample"  # "sample" | "patient"
    consistency_views: int = 1  # views per sample of loss.step="consistency" (the authors: 3)
    workers: int = 2  # DataLoader worker processes per rank (0: load in the main process)
    val_split: str = "val"  # manifest split used for validation / best checkpoint
    fold: Optional[int] = None  # CV fold i: validate on fold i, train on the other non-test cases
    # GM-Guided DG's equalised gradient magnitude (dgseg.transforms.gradient_map) as input.
    input_repr: str = "intensity"  # "intensity" | "gradient" | "both" (intensity, then gradient)
    gradient_sigmas: Tuple[float, ...] = (0.5,)  # Gaussian scale(s) of the gradient map, voxels

    def __post_init__(self) -> None:
        if len(self.modalities) == 0:
            raise ValueError("data.modalities must name at least one modality")
        for m in self.modalities:
            _check_choice("data.modalities entry", m, MODALITIES)
        if self.patch_size is not None:
            _check_positive("data.patch_size", self.patch_size)
        _check_positive("data.rotation_degrees", self.rotation_degrees, allow_zero=True)
        for a in self.intensity_augs:
            _check_choice("data.intensity_augs entry", a, INTENSITY_AUGS)
        _check_choice("data.domain_assignment", self.domain_assignment, DOMAIN_ASSIGNMENTS)
        _check_positive("data.workers", self.workers, allow_zero=True)
        _check_positive("data.consistency_views", self.consistency_views)
        if self.fold is not None:
            _check_positive("data.fold", self.fold, allow_zero=True)
        _check_choice("data.input_repr", self.input_repr, INPUT_REPRS)
        try:
            check_sigmas(self.gradient_sigmas)
        except ValueError as e:
            raise ValueError(f"data.gradient_sigmas: {e}") from None

    @property
    def in_channels(self) -> int:
        """Network input channels: per listed modality (repeats allowed), one for "intensity",
        one per gradient sigma for "gradient", both counts added for "both"."""
        return repr_channels(len(self.modalities), self.input_repr, self.gradient_sigmas)


@dataclass(frozen=True)
class ModelConfig:
    """The network: ``dgseg.models.build_model(cfg.data.in_channels, cfg.model)`` builds it."""

    arch: str = "segresnet"  # "segresnet" (Myronenko 2018, no VAE) | "unet3d" (Çiçek 2016)
    out_channels: int = 3  # WT, TC, ET sigmoid channels
    init_filters: int = 16  # SegResNet width of the first stage (MONAI default)
    blocks_down: Tuple[int, ...] = (1, 2, 2, 4)  # SegResNet residual blocks per encoder stage
    blocks_up: Tuple[int, ...] = (1, 1, 1)  # SegResNet residual blocks per decoder stage
    dropout: Optional[float] = None  # SegResNet dropout probability (None: no dropout layer)
    unet_features: Tuple[int, ...] = (16, 32, 64, 128, 256)  # 3D UNet channels per level
    vffc: bool = False  # volumetric fast Fourier convolution in the bottleneck
    vffc_ratio: float = 0.5  # share of channels in the global (Fourier) branch
    vffc_blocks: int = 1  # number of VFFC blocks in the bottleneck
    vffc_lfu: bool = True  # local Fourier unit (FFC paper, Chi et al. 2020)
    vffc_norm: str = "group"  # "group" (works at batch 1) | "batch" (original code) | "none"
    vffc_padding: str = "zeros"  # VFFC 3³ conv padding: "zeros" | "reflect" (original code)
    grl: bool = False  # domain classifier behind a gradient-reversal layer (DANN)
    num_domains: int = 3  # domain classes of the GRL head: len(data.intensity_augs)
    domain_hidden: int = 128  # hidden width of the domain classifier MLP (original code: 64)
    domain_input_norm: bool = True  # LayerNorm on the pooled features (original code: none)

    def __post_init__(self) -> None:
        _check_choice("model.arch", self.arch, ARCHS)
        _check_positive("model.out_channels", self.out_channels)
        _check_positive("model.init_filters", self.init_filters)
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout!r} must be in [0, 1) or None")
        if not 0.0 <= self.vffc_ratio <= 1.0:
            raise ValueError(f"model.vffc_ratio={self.vffc_ratio!r} must be in [0, 1]")
        _check_positive("model.vffc_blocks", self.vffc_blocks)
        _check_choice("model.vffc_norm", self.vffc_norm, NORMS)
        _check_choice("model.vffc_padding", self.vffc_padding, PADDING_MODES)
        if self.num_domains < 2:
            raise ValueError(f"model.num_domains={self.num_domains!r} must be >= 2")
        _check_positive("model.domain_hidden", self.domain_hidden)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser + cosine annealing (lr, weight decay and schedule from the write-up).

    The write-up names no optimiser. Its code used ``torch.optim.Adam(amsgrad=True)`` with the
    weight decay added to the gradient (coupled, L2); dgseg defaults to AdamW, whose decay is
    decoupled from the adaptive step (Loshchilov & Hutter 2019). See :mod:`dgseg.training.optim`.
    """

    name: str = "adamw"  # "adamw" (decoupled decay) | "adam" (coupled L2 decay, original code)
    amsgrad: bool = False  # AMSGrad variant (original code: True)
    lr: float = 1e-4  # learning rate (write-up)
    weight_decay: float = 1e-5  # weight decay (write-up); decoupled for adamw, L2 for adam
    betas: Tuple[float, ...] = (0.9, 0.999)  # Adam(W) betas (PyTorch default)
    epochs: int = 100  # training epochs (write-up)
    batch_size: int = 1  # samples per process per step (write-up: 1 per GPU on 4 GPUs)
    grad_clip: Optional[float] = None  # max global gradient norm (None: no clipping)
    schedule: str = "cosine"  # "cosine" annealing to min_lr at the end | "constant"
    schedule_interval: str = "step"  # cosine stepped every "step" or every "epoch"
    min_lr: float = 0.0  # learning rate reached at the end of the cosine

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, OPTIMIZERS)
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas!r} must be two numbers in [0, 1)")
        _check_positive("optim.epochs", self.epochs)
        _check_positive("optim.batch_size", self.batch_size)
        if self.grad_clip is not None:
            _check_positive("optim.grad_clip", self.grad_clip)
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        _check_choice("optim.schedule_interval", self.schedule_interval, SCHEDULE_INTERVALS)
        _check_positive("optim.min_lr", self.min_lr, allow_zero=True)


@dataclass(frozen=True)
class LossConfig:
    """Segmentation loss (Dice [+ BCE]) plus the domain cross-entropy through the GRL."""

    bce_weight: float = 0.0  # weight of the BCE term added to the Dice loss (0: Dice only)
    squared_pred: bool = False  # Dice denominator with squared predictions (V-Net variant)
    domain_weight: float = 1.0  # weight of the domain cross-entropy (used when model.grl)
    lambda_max: float = 1.0  # λmax of the DANN schedule; λ reaches it at the last step
    consistency_weight: float = 10.0  # of the KL view consistency (GIN-IPA's 10)
    # "adversarial" needs model.grl; "consistency" data.consistency_views > 1 (training.steps)
    step: str = "plain"  # "plain" | "adversarial" | "saliency_balanced" | "consistency"

    def __post_init__(self) -> None:
        _check_positive("loss.bce_weight", self.bce_weight, allow_zero=True)
        _check_positive("loss.domain_weight", self.domain_weight, allow_zero=True)
        _check_positive("loss.lambda_max", self.lambda_max, allow_zero=True)
        _check_positive("loss.consistency_weight", self.consistency_weight, allow_zero=True)
        _check_choice("loss.step", self.step, STEP_NAMES)


@dataclass(frozen=True)
class RunConfig:
    """Where to write, how to run fast, how often to validate and log."""

    name: str = "run"  # run folder name under `out` (presets set their own name)
    out: str = "runs"  # parent folder of the run folder
    seed: int = 0  # sampler / model-init seed (same on every rank); RNG seed is seed + rank
    device: str = "auto"  # "auto" (CUDA when available) | "cpu" | "cuda"
    amp: str = "auto"  # "auto": bf16 where native (training.precision), else fp32 | "bf16" | "none"
    channels_last: Optional[bool] = None  # channels_last_3d; None ("auto"): on CPU for big maps
    compile: bool = False  # torch.compile the model (state dicts are saved unwrapped)
    deterministic: bool = False  # cuDNN deterministic kernels instead of cudnn.benchmark
    val_every: int = 1  # validate every N epochs (and always after the last one)
    val_roi: Optional[int] = None  # sliding-window size; None: data.patch_size or whole volume
    val_overlap: float = 0.5  # sliding-window overlap
    log_every: int = 10  # progress line / log.jsonl record every N optimizer steps
    plot: bool = True  # write curves.png when matplotlib is installed
    layout_probe: bool = True  # channels_last "auto" on the CPU: time both layouts (cached)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"run.name={self.name!r} must be a plain folder name")
        _check_choice("run.device", self.device, DEVICES)
        _check_choice("run.amp", self.amp, AMP_CHOICES)
        _check_positive("run.val_every", self.val_every)
        if self.val_roi is not None:
            _check_positive("run.val_roi", self.val_roi)
        if not 0.0 <= self.val_overlap < 1.0:
            raise ValueError(f"run.val_overlap={self.val_overlap!r} must be in [0, 1)")
        _check_positive("run.log_every", self.log_every)


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "run": RunConfig,
}


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of one training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        d, step = self.data, self.loss.step
        if (step == "adversarial") != self.model.grl:
            raise ValueError(
                f"loss.step={step!r} with model.grl={self.model.grl}: the adversarial step and "
                "the GRL domain head go together"
            )
        if step == "adversarial" and len(d.intensity_augs) != self.model.num_domains:
            raise ValueError(
                f"data.intensity_augs={d.intensity_augs} makes {len(d.intensity_augs)} domains "
                f"but model.num_domains={self.model.num_domains}"
            )
        views = d.consistency_views
        if (step == "consistency") != (views > 1):
            raise ValueError(
                f"loss.step={step!r} with data.consistency_views={views}: views above 1 are "
                "for the consistency step, which needs them"
            )
        check_domains(
            d.intensity_augs,
            d.domain_assignment,
            views=views,
            saliency_pair=step == "saliency_balanced",
            prefix="data.",
        )

    @property
    def eval_roi(self) -> Optional[int]:
        """Sliding-window edge of validation and evaluation: run.val_roi, else data.patch_size;
        None: one window covering the whole volume
        (``dgseg.inference.sliding_window.covering_roi``)."""
        return self.run.val_roi or self.data.patch_size

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """Plain nested dict (tuples become lists), JSON- and weights_only-safe."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        """Inverse of :meth:`to_dict`; unknown sections or fields raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        d = _upgrade(d)
        unknown = sorted(set(d) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; valid: {sorted(_SECTIONS)}")
        sections = {}
        for name, sec_cls in _SECTIONS.items():
            values = d.get(name, {})
            hints = _hints(sec_cls)
            bad = sorted(set(values) - set(hints))
            if bad:
                raise ValueError(
                    f"unknown config keys {[f'{name}.{k}' for k in bad]}; valid: {valid_keys()}"
                )
            sections[name] = sec_cls(
                **{k: _convert(v, hints[k], f"{name}.{k}") for k, v in values.items()}
            )
        return cls(**sections)


_WRITEUP_DOMAINS = ("none", "bezier_increasing", "bezier_decreasing")


def _upgrade(d: Dict[str, Any]) -> Dict[str, Any]:
    """A config saved before training domains were one pool and the step one field: its
    ``data.bezier`` becomes a pool with an assignment, ``data.saliency_balancing`` / ``model.grl``
    / ``data.consistency_views`` become ``loss.step``."""
    data = dict(d.get("data", {}))
    if "bezier" not in data and "saliency_balancing" not in data:
        return d
    model, loss = d.get("model", {}), dict(d.get("loss", {}))
    bezier = data.pop("bezier", "none")
    saliency = data.pop("saliency_balancing", False)
    if bezier != "none":
        if data.get("intensity_augs"):
            raise ValueError(
                f"data.bezier={bezier!r} together with data.intensity_augs has no equivalent "
                "any more: put the Bezier entries in the pool"
            )
        k = model.get("num_domains", 3)
        pools = {
            "partition": (_WRITEUP_DOMAINS[:k], "patient"),
            "pair": (_WRITEUP_DOMAINS[1:], "patient"),
            "random": (_WRITEUP_DOMAINS, "sample"),
        }
        if bezier not in pools:
            raise ValueError(f"data.bezier={bezier!r} is not one of {tuple(pools)}")
        data["intensity_augs"], data["domain_assignment"] = pools[bezier]
    if "step" not in loss:
        loss["step"] = (
            "adversarial"
            if model.get("grl")
            else "saliency_balanced"
            if saliency
            else "consistency"
            if data.get("consistency_views", 1) > 1
            else "plain"
        )
    return {**d, "data": data, "loss": loss}


def _hints(sec_cls: type) -> Dict[str, Any]:
    # Resolve the string annotations (from __future__) into typing objects.
    return typing.get_type_hints(sec_cls)


def valid_keys() -> List[str]:
    """All overridable dotted keys, e.g. ``["data.bezier", ..., "run.val_every"]``."""
    return [f"{s}.{f.name}" for s, c in _SECTIONS.items() for f in dataclasses.fields(c)]


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check / convert an already-parsed value (from JSON or Python) to the field type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _convert(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r} must be a list/tuple")
        return tuple(_convert(v, args[0], key) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be a bool")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}={value!r} must be an int")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}={value!r} must be a number")
        if not math.isfinite(value):
            raise ValueError(f"{key}={value!r} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}={value!r} must be a string")
        return value
    raise ValueError(f"{key}: unsupported field type {tp!r}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse(text: str, tp: Any, key: str) -> Any:
    """Parse command-line text into the field type ``tp`` (the --set coercion)."""
    text = text.strip()
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]: "none"/"null" means None
        inner = [a for a in args if a is not type(None)][0]
        if text.lower() in ("none", "null") or (inner is bool and text.lower() == "auto"):
            return None  # Optional[bool] fields read None as "auto"
        return _parse(text, inner, key)
    if origin is tuple:  # "1,2,2,4" or "(1, 2, 2, 4)" or "[t1ce,t2]"
        body = text.strip("()[] ")
        items = [t for t in (s.strip().strip("'\"") for s in body.split(",")) if t]
        return tuple(_parse(t, args[0], key) for t in items)
    try:
        if tp is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            value = float(text)
    except ValueError:
        raise ValueError(f"{key}={text!r} cannot be parsed as {tp.__name__}") from None
    if tp is float:
        return _convert(value, tp, key)  # finite
    if tp is str:
        return text.strip("'\"")
    raise ValueError(f"{key}: unsupported field type {tp!r}")


def add_set_argument(parser: Any, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option of the tools (into ``args.overrides``), whose
    items :func:`apply_overrides` applies."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Return ``cfg`` with ``section.field=value`` overrides applied (validated, typed).

    Raises:
        ValueError: malformed item, unknown key (the message lists the valid keys), or a value
            that does not parse as the field's type or fails the field's check.
    """
    changes: Dict[str, Dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, text = item.split("=", 1)
        key = key.strip()
        section, _, name = key.partition(".")
        hints = _hints(_SECTIONS[section]) if section in _SECTIONS else {}
        if name not in hints:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
        changes.setdefault(section, {})[name] = _parse(text, hints[name], key)
    sections = {s: dataclasses.replace(getattr(cfg, s), **c) for s, c in changes.items()}
    return dataclasses.replace(cfg, **sections)


def config_diff(a: Config, b: Config) -> List[str]:
    """``section.field: a -> b`` for every field where ``a`` and ``b`` differ."""
    da, db = a.to_dict(), b.to_dict()
    return [
        f"{s}.{k}: {da[s][k]!r} -> {db[s][k]!r}" for s in da for k in da[s] if da[s][k] != db[s][k]
    ]

"""One preset per experiment: the write-up's table rows, their ablations, the single-source DG
methods, and ``tiny`` for tests.

Each preset is a :class:`~dgseg.config.Config` plus one line saying what it trains
(``python tools/train.py --list-presets`` prints them). :data:`CPU_RECIPE` is the small network
and learning rate with which every preset learns in minutes on a CPU: the demo, the ``tiny``
preset and ``tools/run_experiments.py --scale cpu`` all start from it.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple

from dgseg.config import _SECTIONS, Config, RunConfig, apply_overrides
from dgseg.constants import MODALITIES

__all__ = [
    "PRESETS",
    "PRESET_ABOUT",
    "CPU_RECIPE",
    "SDG_POOL",
    "get_preset",
    "format_presets",
]

# `--set` items that make any preset small enough for a 2-core CPU: eight filters, one residual
# block per level, a learning rate that learns in minutes, BCE beside Dice (it empties the
# background faster than Dice alone on few steps), loading in the training process.
CPU_RECIPE = (
    "model.init_filters=8",
    "model.blocks_down=1,1,1,1",
    "model.unet_features=8,16,32,64,128",
    "optim.lr=2e-3",
    "loss.bce_weight=1",
    "data.workers=0",
    "run.log_every=100",
)

# The write-up's spatial augmentation ("random flipping and random rotation for all domains").
_SPATIAL = dict(flip=True, rotation_degrees=10.0)
# The write-up's three domains: untouched, increasing Bezier curve, decreasing Bezier curve.
WRITEUP_DOMAINS = ("none", "bezier_increasing", "bezier_decreasing")
# ... one per subset of patients, as the write-up deals them.
_BEZIER_PARTITION = dict(intensity_augs=WRITEUP_DOMAINS, domain_assignment="patient", **_SPATIAL)
_ADVERSARIAL = dict(step="adversarial")
# The SDG pool (one drawn per sample), and the pool with the write-up's Bezier curve, which the
# recommended preset `segresnet_t2_sdg` trains on, with the gradient-map input.
SDG_POOL = ("location_scale", "resynthesis")
_SDG_BEZIER = (*SDG_POOL, "bezier")


class _Preset(NamedTuple):
    config: Config
    about: str


def _preset(name: str, about: str, **sections: Dict[str, Any]) -> _Preset:
    parts = {s: _SECTIONS[s](**sections.get(s, {})) for s in _SECTIONS if s != "run"}
    return _Preset(Config(**parts, run=RunConfig(name=name, **sections.get("run", {}))), about)


def _sdg(name: str, about: str, augs: tuple, **sections: Dict[str, Any]) -> _Preset:
    data = dict(intensity_augs=augs, **_SPATIAL, **sections.pop("data", {}))
    return _preset(name, about, data=data, **sections)


_ALL = (
    # The write-up's experiments.
    _preset("segresnet_t2_noaug", "write-up: SegResNet on T2, no augmentation (the baseline)"),
    _preset(
        "segresnet_t2_bezier",
        "write-up: SegResNet on T2, a random Bezier curve per sample + flips/rotations",
        data=dict(intensity_augs=WRITEUP_DOMAINS, **_SPATIAL),
    ),
    _preset(
        "segresnet_t2_vffc_grl",
        "write-up's method: VFFC bottleneck + GRL domain head on three Bezier patient domains",
        data=_BEZIER_PARTITION,
        model=dict(vffc=True, grl=True, num_domains=3),
        loss=_ADVERSARIAL,
    ),
    _preset(
        "segresnet_t1ce_t2_bezier",
        "write-up: two source sequences (T1CE + T2 channels), random Bezier curves",
        data=dict(modalities=("t1ce", "t2"), intensity_augs=WRITEUP_DOMAINS, **_SPATIAL),
    ),
    _preset("unet_t2_noaug", "write-up: 3D UNet on T2, no augmentation", model=dict(arch="unet3d")),
    _preset(
        "unet_stacked",
        "write-up: 3D UNet on the four sequences stacked (the multi-sequence reference)",
        data=dict(modalities=MODALITIES),
        model=dict(arch="unet3d"),
    ),
    # Ablations of the write-up's method.
    _preset(
        "segresnet_t2_grl",
        "ablation: GRL domain head on the Bezier patient domains, no VFFC",
        data=_BEZIER_PARTITION,
        model=dict(grl=True, num_domains=3),
        loss=_ADVERSARIAL,
    ),
    _preset(
        "segresnet_t2_vffc",
        "ablation: VFFC bottleneck on the Bezier patient domains, no GRL",
        data=_BEZIER_PARTITION,
        model=dict(vffc=True),
    ),
    _preset(
        "segresnet_t2_spatial",
        "control: the augmented presets' flips and 10-degree rotations, no intensity change",
        data=dict(_SPATIAL),
    ),
    # The network as the write-up's code built it: SegResNet F32 with dropout 0.2, three
    # reflect-padded BatchNorm VFFC blocks, the domain head Linear(256, 64) -> ReLU -> Linear(64, K)
    # without input LayerNorm, Adam with amsgrad and coupled (L2) weight decay.
    _preset(
        "segresnet_t2_vffc_grl_original",
        "the write-up's method with the network and optimiser of its public code",
        data=_BEZIER_PARTITION,
        model=dict(
            init_filters=32,
            dropout=0.2,
            vffc=True,
            vffc_blocks=3,
            vffc_norm="batch",
            vffc_padding="reflect",
            grl=True,
            num_domains=3,
            domain_hidden=64,
            domain_input_norm=False,
        ),
        optim=dict(name="adam", amsgrad=True),
        loss=_ADVERSARIAL,
    ),
    # Single-source DG intensity augmentations (dgseg.transforms.sdg), one preset each.
    _sdg("segresnet_t2_gin", "SDG: GIN random shallow conv nets (Ouyang et al. 2022)", ("gin",)),
    _sdg("segresnet_t2_ipa", "SDG: GIN views blended by a smooth random field (IPA)", ("ipa",)),
    _sdg("segresnet_t2_randconv", "SDG: random convolutions (Xu et al. 2021)", ("random_conv",)),
    _sdg("segresnet_t2_fourier", "SDG: Fourier amplitude mixing", ("fourier",)),
    _sdg(
        "segresnet_t2_slaug", "SDG: global/class-wise location-scale (SLAug)", ("location_scale",)
    ),
    _sdg("segresnet_t2_resynth", "SDG: per-tissue contrast re-synthesis", ("resynthesis",)),
    _sdg(
        "segresnet_t2_sdg_intensity",
        "SDG pool: location-scale or re-synthesis drawn per sample (the intensity input)",
        SDG_POOL,
    ),
    _sdg(
        "segresnet_t2_sdg_grl",
        "SDG pool + GRL domain head (domain = the drawn augmentation)",
        SDG_POOL,
        model=dict(grl=True, num_domains=len(SDG_POOL)),
        loss=_ADVERSARIAL,
    ),
    _sdg(
        "segresnet_t2_sdg_vffc",
        "SDG pool + VFFC bottleneck",
        SDG_POOL,
        model=dict(vffc=True),
    ),
    _sdg(
        "segresnet_t2_sdg_bezier",
        "SDG pool + the write-up's Bezier curve as a third draw",
        _SDG_BEZIER,
    ),
    _sdg(
        "segresnet_t2_sdg_bezier_vffc",
        "SDG pool + Bezier + VFFC bottleneck",
        _SDG_BEZIER,
        model=dict(vffc=True),
    ),
    _preset(
        "segresnet_t2_slaug_sbf",
        "SLAug as its authors train it: location-scale views fused by saliency, two passes a step",
        data=dict(_SPATIAL),
        loss=dict(step="saliency_balanced"),
    ),
    _sdg(
        "segresnet_t2_gin_ipa_cons",
        "GIN-IPA as its authors train it: three views, KL consistency (weight 10)",
        ("gin", "ipa"),
        data=dict(consistency_views=3),
        loss=dict(step="consistency"),
    ),
    _sdg(
        "segresnet_t2_sdg_bezier_cons",
        "pool + Bezier views with GIN-IPA's KL consistency (weight 10)",
        _SDG_BEZIER,
        data=dict(consistency_views=3),
        loss=dict(step="consistency"),
    ),
    _sdg(
        "segresnet_t2_sdg_iso",
        "location-scale, iso-intense re-synthesis (tumour takes healthy intensities), Bezier",
        ("location_scale", "resynthesis_iso", "bezier"),
    ),
    # GM-Guided DG's learning-free input (dgseg.transforms.gradient_map), the authors' sigma 0.5.
    _preset(
        "segresnet_t2_gradmap",
        "gradient-map input (GM-Guided DG, equalised |grad|) + flips/rotations",
        data=dict(input_repr="gradient", **_SPATIAL),
    ),
    _sdg(
        "segresnet_t2_sdg_gradmap",
        "pool with Bezier (location-scale / re-synthesis / Bezier), gradient-map input",
        _SDG_BEZIER,
        data=dict(input_repr="gradient"),
    ),
    # The recommended preset, chosen by docs/results/tta_gradmap: segresnet_t2_sdg_gradmap's
    # settings under the name users start from.
    _sdg(
        "segresnet_t2_sdg",
        "recommended: gradient-map input + pool with Bezier (= segresnet_t2_sdg_gradmap)",
        _SDG_BEZIER,
        data=dict(input_repr="gradient"),
    ),
)


def _tiny() -> _Preset:
    base = _preset("tiny", "tests and the CPU demo: the CPU recipe, 40 epochs").config
    cfg = apply_overrides(
        base, (*CPU_RECIPE, "optim.epochs=40", "run.log_every=20", "run.val_every=10")
    )
    return _Preset(cfg, "tests and the CPU demo: the CPU recipe, 40 epochs")


PRESETS: Dict[str, Config] = {p.config.run.name: p.config for p in (*_ALL, _tiny())}
PRESET_ABOUT: Dict[str, str] = {p.config.run.name: p.about for p in (*_ALL, _tiny())}


def get_preset(name: str) -> Config:
    """The named preset; ValueError listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def format_presets() -> str:
    """One line per preset: name and what it trains."""
    width = max(map(len, PRESETS))
    return "\n".join(f"{name:<{width}}  {PRESET_ABOUT[name]}" for name in PRESETS)

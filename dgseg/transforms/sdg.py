"""Single-source domain-generalization intensity augmentations, by the names the config uses.

Each name maps to one transform of this package, called as ``fn(image, label, generator)`` on a
(C, D, H, W) training patch that is z-scored over the brain with background 0, before the spatial
augmentation (docs/SPEC.md, "Intensity pipeline"). Every transform returns the brain re-z-scored
per channel and the background at exactly 0.

===================  ===================================================================  =====
name                 transform                                                            reads
===================  ===================================================================  =====
``none``             identity (the source image as it is)                                 –
``gin``              random shallow conv net, mixed with the input (GIN, Ouyang 2022)     image
``ipa``              two GIN views blended by a smooth random field (IPA, Ouyang 2022)    image
``random_conv``      one random convolution layer (RandConv, Xu et al. ICLR 2021)         image
``fourier``          low-frequency amplitude perturbation, phase kept (Xu 2021, FedDG)    image
``location_scale``   global or class-wise random curve + location/scale (SLAug, Su 2023)  label
``resynthesis``      random intensity per intensity class and tumour region (SynthSeg)    label
``resynthesis_iso``  ... each tumour class iso-intense to a healthy one with p = 1/2      label
``bezier``           the write-up's Bezier curve, increasing or decreasing (p = 1/2)      image
``bezier_increasing`` the write-up's domain 1: an increasing Bezier curve                 image
``bezier_decreasing`` the write-up's domain 2: a decreasing Bezier curve                  image
===================  ===================================================================  =====

"reads label" means the transform uses the tumour sub-regions of the training label map as
classes of their own, as SLAug and SynthSeg do; no transform knows how the data were generated.

``DataConfig.intensity_augs`` is the pool of training domains (``dgseg.data.domains``); the index
of a sample's entry is its domain label for the GRL domain classifier.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from dgseg.transforms.bezier import bezier_domain_transform
from dgseg.transforms.contrast_resynthesis import resynthesize_contrast
from dgseg.transforms.fourier_amplitude import fourier_amplitude
from dgseg.transforms.gin import gin, ipa
from dgseg.transforms.location_scale import location_scale
from dgseg.transforms.random_conv import random_conv

__all__ = ["INTENSITY_AUGS", "intensity_augment"]

Transform = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Generator], torch.Tensor]


def _bezier(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The write-up's domain 1 or 2 (docs/SPEC.md, "Domains"), drawn per sample: the pool's only
    whole-image inversion."""
    curve = 1 + int(torch.randint(2, (), generator=g, device=g.device))  # 1 up, 2 down
    return bezier_domain_transform(image, curve, g)


_TRANSFORMS: dict[str, Transform] = {
    "none": lambda image, label, g: image,
    "gin": lambda image, label, g: gin(image, g),
    "ipa": lambda image, label, g: ipa(image, g),
    "random_conv": lambda image, label, g: random_conv(image, g),
    "fourier": lambda image, label, g: fourier_amplitude(image, g),
    "location_scale": lambda image, label, g: location_scale(image, label, g),
    "resynthesis": lambda image, label, g: resynthesize_contrast(image, g, label=label),
    "resynthesis_iso": lambda image, label, g: resynthesize_contrast(
        image, g, label=label, isointense=0.5
    ),
    "bezier": lambda image, label, g: _bezier(image, g),
    "bezier_increasing": lambda image, label, g: bezier_domain_transform(image, 1, g),
    "bezier_decreasing": lambda image, label, g: bezier_domain_transform(image, 2, g),
}

INTENSITY_AUGS = tuple(_TRANSFORMS)


def intensity_augment(
    name: str, image: torch.Tensor, label: Optional[torch.Tensor], generator: torch.Generator
) -> torch.Tensor:
    """Apply the augmentation called ``name`` to a (C, D, H, W) image.

    Args:
        name: one of :data:`INTENSITY_AUGS`.
        image: (C, D, H, W) float, z-scored over the brain, background 0.
        label: (D, H, W) uint8 BraTS-2021 label map of the same patch, or None.
        generator: the sample's generator (every random draw comes from it).
    """
    if name not in _TRANSFORMS:
        raise ValueError(f"unknown intensity augmentation {name!r}; valid: {INTENSITY_AUGS}")
    return _TRANSFORMS[name](image, label, generator)

"""Label conversion, Bezier intensity domains, single-source DG intensity augmentations and
spatial augmentation (see docs/SPEC.md)."""

from dgseg.transforms.bezier import apply_lut, bezier_curve, bezier_domain_transform, bezier_lut
from dgseg.transforms.labels import (
    CONVENTIONS,
    channels_to_labels,
    convert_labels,
    labels_to_channels,
)
from dgseg.transforms.sdg import INTENSITY_AUGS, intensity_augment
from dgseg.transforms.spatial import random_flip, random_rot90, random_rotation

__all__ = [
    "CONVENTIONS",
    "labels_to_channels",
    "channels_to_labels",
    "convert_labels",
    "bezier_curve",
    "bezier_lut",
    "apply_lut",
    "bezier_domain_transform",
    "INTENSITY_AUGS",
    "intensity_augment",
    "random_flip",
    "random_rot90",
    "random_rotation",
]

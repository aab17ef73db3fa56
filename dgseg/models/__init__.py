"""Segmentation networks: SegResNet, 3D U-Net, and the domain-adversarial wrapper."""

from dgseg.models.domain_adversarial import DomainAdversarialNet, segmenter_of
from dgseg.models.factory import build_model
from dgseg.models.monai_weights import from_monai_state_dict
from dgseg.models.segresnet import SegResNet
from dgseg.models.unet3d import UNet3D

__all__ = [
    "SegResNet",
    "UNet3D",
    "DomainAdversarialNet",
    "build_model",
    "segmenter_of",
    "from_monai_state_dict",
]

"""Layers: SegResNet blocks, volumetric fast Fourier convolution, gradient reversal."""

from dgseg.layers.blocks import DownSample, FinalConv, ResBlock, UpSample, group_norm
from dgseg.layers.grl import (
    DomainClassifier,
    GradientReversal,
    dann_lambda,
    grad_reverse,
)
from dgseg.layers.vffc import FFC, VFFC, FourierUnit, SpectralTransform, VFFCBlock, make_norm

__all__ = [
    "ResBlock",
    "DownSample",
    "UpSample",
    "FinalConv",
    "group_norm",
    "FourierUnit",
    "SpectralTransform",
    "FFC",
    "VFFCBlock",
    "VFFC",
    "make_norm",
    "grad_reverse",
    "GradientReversal",
    "DomainClassifier",
    "dann_lambda",
]

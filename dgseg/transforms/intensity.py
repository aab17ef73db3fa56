"""Small helpers shared by the intensity augmentations (Bezier curves and the SDG transforms).

Every intensity augmentation in ``dgseg.transforms`` follows one contract (docs/SPEC.md,
"Intensity pipeline"): it takes a (C, D, H, W) float image that is z-scored over the brain with the
background at exactly 0, draws all of its randomness from the sample's ``torch.Generator``, and
returns a new image of the same shape whose brain voxels are z-scored again per channel
(mean 0, std 1) and whose background voxels are exactly 0.
"""

from __future__ import annotations

import torch

__all__ = ["brain_mask", "rezscore", "uniform", "check_image"]


def check_image(image: torch.Tensor) -> None:
    """ValueError unless ``image`` is a floating (C, D, H, W) tensor."""
    if image.ndim != 4:
        raise ValueError(f"expected image of shape (C, D, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a float tensor, got {image.dtype}")


def brain_mask(image: torch.Tensor) -> torch.Tensor:
    """(D, H, W) bool: voxels where any channel of the (C, D, H, W) image is nonzero."""
    return (image != 0).any(dim=0)


def rezscore(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Z-score each channel over the (D, H, W) ``mask`` and set everything outside it to 0.

    A channel that is constant over the brain becomes 0 there (no contrast left to scale).
    """
    m = mask.to(image.dtype)  # (D, H, W)
    n = m.sum().clamp_min(1.0)
    mean = (image * m).sum(dim=(1, 2, 3), keepdim=True) / n  # (C, 1, 1, 1)
    var = (((image - mean) * m) ** 2).sum(dim=(1, 2, 3), keepdim=True) / n
    std = var.sqrt()
    out = (image - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return out * m


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One U(low, high) draw from ``generator`` (on the generator's own device)."""
    u = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64)
    return low + (high - low) * float(u)

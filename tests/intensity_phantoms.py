"""Small 3D phantoms and checks shared by the intensity-augmentation tests."""

import numpy as np
import torch

from dgseg.transforms.intensity import rezscore

N = 24  # phantom side


def synthetic_brain(channels: int = 1, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Three piecewise-constant 'tissues' plus noise in a sphere, z-scored, background exactly 0."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.linspace(-1, 1, size)
    r = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij")).pow(2).sum(0).sqrt()  # (D, H, W)
    tissue = torch.stack(
        [
            torch.where(r < 0.35, 3.0 - c, torch.where(r < 0.6, 1.0, 2.0 + c))
            for c in range(channels)
        ]
    )  # (C, D, H, W)
    image = tissue + 0.2 * torch.randn(channels, size, size, size, generator=g)
    return rezscore(image, r < 0.9)


def phantom(channels: int = 1, noise: float = 0.05, seed: int = 0):
    """A 24³ brain: three equal-volume shells A < B < C (outer to inner), a tumour with edema
    (2, noisy), a constant core (1) and an enhancing rim (4); z-scored, background 0.

    Returns (image (C, N, N, N), label (N, N, N) uint8, tissue (N, N, N) long: 0 outside, 1 A,
    2 B, 3 C, 4 tumour).
    """
    g = torch.Generator().manual_seed(seed)
    ax = torch.arange(N, dtype=torch.float32) - (N - 1) / 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = (z**2 + y**2 + x**2).sqrt()
    rt = ((z - 4) ** 2 + y**2 + (x - 3) ** 2).sqrt()  # tumour centre off the middle
    brain = r < 10.5
    tissue = torch.where(
        r < 10.5 * (1 / 3) ** (1 / 3), 3, torch.where(r < 10.5 * (2 / 3) ** (1 / 3), 2, 1)
    )
    label = torch.zeros(N, N, N, dtype=torch.uint8)
    label[rt < 4] = 2
    label[rt < 2.5] = 4
    label[rt < 1.5] = 1
    label[~brain] = 0
    tissue = torch.where(label > 0, 4, tissue) * brain
    chans = []
    for c in range(channels):
        v = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0])[tissue] * (1 + 0.3 * c)  # healthy A < B < C
        v = v + noise * torch.randn(N, N, N, generator=g)
        v = torch.where(label == 2, 2.5 + noise * torch.randn(N, N, N, generator=g), v)
        v = torch.where(label == 4, 3.5, v)
        v = torch.where(label == 1, 0.5, v)  # constant: must stay constant under one curve
        v = (v - v[brain].mean()) / v[brain].std(correction=0)
        chans.append(v * brain)
    return torch.stack(chans), label, tissue


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks; no ties in noisy data)."""
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def check_contract(image: torch.Tensor, out: torch.Tensor) -> None:
    """Same shape/dtype, finite, background exactly 0, brain z-scored per channel."""
    assert out.shape == image.shape and out.dtype == image.dtype and out.device == image.device
    assert torch.isfinite(out).all() and out.is_contiguous()
    brain = (image != 0).any(dim=0)
    assert (out[:, ~brain] == 0).all()
    values = out[:, brain].double()  # (C, N)
    # plain comparisons: torch.testing's first call costs ~2 s of imports here
    assert (values.mean(1).abs() < 1e-5).all(), values.mean(1)
    assert ((values.std(1, correction=0) - 1).abs() < 1e-4).all(), values.std(1, correction=0)

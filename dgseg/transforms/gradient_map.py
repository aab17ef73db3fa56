"""Learning-free gradient-map input (GM-Guided DG, Li, Gao & He, ML4H 2023, adapted to 3D).

For each input channel x (z-scored, background 0) and each scale σ:

    s = G_σ * x                                  Gaussian, truncated at 4σ (radius int(4σ + .5))
    g_a = s[i+1] - s[i-1]   along each axis a     central difference, kernel (-1, 0, 1), not / 2
    m = sqrt(g_d² + g_h² + g_w²)
    map = F(m) on the mask m > ε·max(m), 0 elsewhere,   F = empirical CDF of m over the mask

Both filters pad by half-sample symmetry (scipy's "reflect", the authors' mode), so a linear ramp
keeps its slope to the border. Properties: adding a constant to x leaves m unchanged; scaling x by
a ≠ 0 scales m by |a| (the mask is relative, so it is unchanged); F is invariant to any increasing
map of m, so the *map* is invariant to both (up to float rounding of near ties). ``map`` ∈ (0, 1].

Deviations from the authors' 2D code (``datasets/DatasetProcessor.py``): three axes instead of
two; the equalisation is the exact empirical CDF (the authors' skimage ``equalize_hist`` bins m
into 256 bins and interpolates); the mask drops float noise (ε = 1e-4 relative, theirs: m > 0);
the map lies in [0, 1] with background 0 (theirs: ×255 then /127.5 − 1, background −1), so the
zero padding of patches and sliding windows equals background; several σ may be stacked as
channels (theirs: σ = 0.5 only); computed per sample after augmentation, on the patch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "INPUT_REPRS",
    "repr_channels",
    "check_sigmas",
    "gaussian_kernel1d",
    "gradient_magnitude",
    "equalize",
    "gradient_map",
    "input_representation",
]

INPUT_REPRS = ("intensity", "gradient", "both")
DEFAULT_SIGMAS = (0.5,)  # the authors' skimage.filters.gaussian(sigma=0.5)
_MASK_EPS = 1e-4  # relative: flat regions (float noise only) stay background


def repr_channels(n_modalities: int, mode: str, sigmas: Sequence[float]) -> int:
    """Network input channels of ``n_modalities`` under representation ``mode``."""
    per = {"intensity": 1, "gradient": len(sigmas), "both": 1 + len(sigmas)}
    if mode not in per:
        raise ValueError(f"input representation {mode!r} is not one of {INPUT_REPRS}")
    return n_modalities * per[mode]


def gaussian_kernel1d(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """scipy.ndimage's Gaussian weights: radius int(4σ + 0.5), normalised to sum 1."""
    if sigma <= 0:
        raise ValueError(f"gradient-map sigma must be > 0, got {sigma}")
    r = int(4.0 * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


def _pad_symmetric(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Half-sample symmetric padding (d c b a | a b c d | d c b a) of ``r`` on axis ``dim``."""
    if r == 0:
        return x
    n = x.shape[dim]
    if r > n:
        raise ValueError(f"volume side {n} is smaller than the filter radius {r}")
    lo = x.narrow(dim, 0, r).flip(dim)
    hi = x.narrow(dim, n - r, r).flip(dim)
    return torch.cat([lo, x, hi], dim=dim)


def _filter_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate every (D, H, W) volume of x (N, 1, D, H, W) with a 1D kernel along ``axis``."""
    r = (kernel.numel() - 1) // 2
    xp = _pad_symmetric(x, r, axis)
    shape = [1, 1, 1, 1, 1]
    shape[axis] = kernel.numel()
    return F.conv3d(xp, kernel.view(shape))


def gradient_magnitude(image: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """m = |∇(G_σ * x)| by central differences, per channel; same shape as ``image``.

    ``image``: (C, D, H, W) or (B, C, D, H, W).
    """
    lead = image.shape[:-3]
    x = image.reshape(-1, 1, *image.shape[-3:]).float()  # (N, 1, D, H, W)
    g = gaussian_kernel1d(sigma, device=x.device)
    for axis in (2, 3, 4):
        x = _filter_axis(x, g, axis)
    diff = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    sq = sum(_filter_axis(x, diff, axis) ** 2 for axis in (2, 3, 4))
    return sq.sqrt().reshape(*lead, *image.shape[-3:])


def equalize(mag: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each (D, H, W) volume over its mask m > ε·max(m).

    A masked voxel becomes the share of masked voxels whose m is ≤ its own (in (0, 1]); the
    rest 0.
    """
    flat = mag.reshape(-1, mag.shape[-3:].numel())  # (N, V)
    out = torch.zeros_like(flat)
    for k in range(flat.shape[0]):
        v = flat[k]
        mask = v > _MASK_EPS * v.max()
        vals = v[mask]
        if vals.numel() == 0:
            continue
        ranked = torch.sort(vals).values
        out[k, mask] = torch.searchsorted(ranked, vals, right=True).to(v.dtype) / vals.numel()
    return out.reshape(mag.shape)


def gradient_map(image: torch.Tensor, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> torch.Tensor:
    """Equalised gradient magnitudes, channel c·S + s = channel c at scale σ_s.

    ``image``: (C, D, H, W) or (B, C, D, H, W); returns (…, C·S, D, H, W) float32.
    """
    if len(sigmas) == 0:
        raise ValueError("the gradient map needs at least one sigma")
    maps = [equalize(gradient_magnitude(image, s)) for s in sigmas]  # S x (…, C, D, H, W)
    out = torch.stack(maps, dim=-4)  # (…, C, S, D, H, W)
    return out.flatten(-5, -4)


def input_representation(
    image: torch.Tensor, mode: str = "intensity", sigmas: Sequence[float] = DEFAULT_SIGMAS
) -> torch.Tensor:
    """The network input of a z-scored ``image`` (C, D, H, W) or (B, C, D, H, W).

    "intensity": unchanged; "gradient": :func:`gradient_map`; "both": the image's channels, then
    the gradient map's.
    """
    if mode == "intensity":
        return image
    if mode not in INPUT_REPRS:
        raise ValueError(f"input representation {mode!r} is not one of {INPUT_REPRS}")
    gmap = gradient_map(image, sigmas).to(image.dtype)
    if mode == "gradient":
        return gmap
    return torch.cat([image, gmap], dim=-4)


def check_sigmas(sigmas: Sequence[float]) -> None:
    """ValueError unless ``sigmas`` holds one or more positive finite numbers."""
    if len(sigmas) == 0 or any(not math.isfinite(s) or s <= 0 for s in sigmas):
        raise ValueError(f"gradient sigmas must be one or more positive numbers, got {sigmas}")

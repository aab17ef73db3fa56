"""Bezier intensity curves as lookup tables: the synthetic domains of single-source training.

Non-linear intensity maps from Models Genesis (Zhou et al. 2019/2021, "Non-linear
transformation") as used for single-source domain generalization by Dual-Normalization
(Zhou et al. CVPR 2022, Sec. 3.1). A cubic Bezier curve

    B(t) = (1−t)³ P0 + 3(1−t)² t P1 + 3(1−t) t² P2 + t³ P3,   t ∈ [0, 1],

with P0 = (−1, −1), P1 = (−v, v), P2 = (v, −v), P3 = (1, 1) is sampled densely; the x and y samples
are each sorted, which gives a monotone increasing map f: [−1, 1] → [−1, 1] even where the sampled
curve is not a function of x. Domains (docs/SPEC.md, "Domains"):

* 0: identity (no curve);
* 1: y = f_v(x), increasing, v ~ U(−1, 1);
* 2: y = −f_w(x), the decreasing mirror, w ~ U(−1, 1) (the write-up's code traced domain 1's
  curve backwards instead, which is the same increasing map).

One curve is stored as a lookup table (LUT) of f at ``lut_size`` evenly spaced x in [−1, 1] and
applied by linear interpolation: O(LUT) to build, O(voxels) to apply, on any device.

Intensity pipeline for domains 1 and 2, per channel: the brain (voxels where any channel is
nonzero) is scaled to [−1, 1] by its min–max (the curve sees the whole brain range and stays
strictly monotone on it); the curve is applied; the result is z-scored again over the brain
(mean 0, std 1); background stays 0.
"""

from __future__ import annotations

import numpy as np
import torch

from dgseg.transforms.intensity import brain_mask, check_image, uniform

__all__ = ["bezier_curve", "bezier_lut", "apply_lut", "bezier_domain_transform"]


def bezier_curve(v: float, *, n_samples: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Densely sampled, sorted curve of control points (−1,−1), (−v,v), (v,−v), (1,1).

    Returns:
        (x, y): float64 arrays of length ``n_samples``, each sorted ascending, so that
        ``np.interp(q, x, y)`` evaluates the increasing map f_v.
    """
    if not -1.0 <= v <= 1.0:
        raise ValueError(f"v must lie in [-1, 1], got {v}")
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2, got {n_samples}")
    t = np.linspace(0.0, 1.0, n_samples)
    b0, b1, b2, b3 = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3  # Bernstein
    x = -b0 - v * b1 + v * b2 + b3
    y = -b0 + v * b1 - v * b2 + b3
    return np.sort(x), np.sort(y)


# 2·10⁴ t samples suffice for a smooth cubic and keep the build cheap: the data loader draws a
# fresh curve per sample.
_LUT_SAMPLES = 20_000


def bezier_lut(
    v: float, *, decreasing: bool = False, n_samples: int = _LUT_SAMPLES, lut_size: int = 4096
) -> torch.Tensor:
    """Lookup table of the domain curve at ``x = linspace(−1, 1, lut_size)``.

    Args:
        v: curve parameter in [−1, 1] (v = 0 is the identity).
        decreasing: return the mirror −f_v (domain 2) instead of f_v (domain 1).
        n_samples: number of t samples of the Bezier curve.
        lut_size: number of LUT entries.

    Returns:
        (lut_size,) float32 tensor on the CPU.
    """
    if lut_size < 2:
        raise ValueError(f"lut_size must be >= 2, got {lut_size}")
    xs, ys = bezier_curve(v, n_samples=n_samples)
    lut = np.interp(np.linspace(-1.0, 1.0, lut_size), xs, ys)  # f on an even grid, float64
    if decreasing:
        lut = -lut
    return torch.from_numpy(lut.astype(np.float32))


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Evaluate the curve stored in ``lut`` at ``x`` (values in [−1, 1]) by linear interpolation.

    Values outside [−1, 1] are clamped. Runs on ``x``'s device; returns ``x``'s dtype.
    """
    if lut.ndim != 1 or lut.numel() < 2:
        raise ValueError(f"lut must be 1-D with >= 2 entries, got shape {tuple(lut.shape)}")
    n = lut.numel()
    lut = lut.to(device=x.device, dtype=torch.float32)
    # One row gather of (value, slope) instead of two element gathers: faster on CPU.
    table = torch.stack([lut[:-1], torch.diff(lut)], dim=1)  # (n-1, 2)
    pos = x.float().clamp(-1.0, 1.0).add_(1.0).mul_(0.5 * (n - 1))  # fractional index in [0, n-1]
    i0 = pos.to(torch.int32).clamp_(max=n - 2)  # floor (pos >= 0); n-2 so that i0 + 1 exists
    frac = pos.sub_(i0)
    rows = table[i0.long()]  # (..., 2)
    return torch.addcmul(rows[..., 0], frac, rows[..., 1]).to(x.dtype)


def _scale_to_unit(values: torch.Tensor) -> torch.Tensor:
    """Brain intensities (N,) → [−1, 1] by their min–max."""
    lo, hi = values.min(), values.max()
    span = hi - lo
    if span <= 0:  # constant brain: no contrast to map, put it at the curve's centre
        return torch.zeros_like(values)
    return ((values - lo) / span * 2.0 - 1.0).clamp(-1.0, 1.0)


def _zscore(values: torch.Tensor) -> torch.Tensor:
    std, mean = torch.std_mean(values, correction=0)
    return (values - mean) / std if std > 0 else values - mean


def bezier_domain_transform(
    image: torch.Tensor,
    curve: int,
    generator: torch.Generator,
    *,
    lut_size: int = 4096,
) -> torch.Tensor:
    """Apply a random domain curve to every channel of a (C, D, H, W) image.

    Args:
        image: (C, D, H, W) float tensor, any device (z-scored, background 0 in dgseg).
        curve: 0 identity, 1 increasing (v ~ U(−1, 1)), 2 decreasing mirror (w ~ U(−1, 1)).
        generator: source of every random draw; each channel gets its own curve.
        lut_size: LUT entries per curve.

    Returns:
        New (C, D, H, W) tensor: brain voxels mapped through the curve and z-scored per channel
        (mean 0, std 1 over the brain), background voxels exactly 0. For ``curve=0`` the input is
        returned unchanged (the very same tensor).
    """
    if curve not in (0, 1, 2):
        raise ValueError(
            f"curve must be 0 (identity), 1 (increasing) or 2 (decreasing), got {curve}"
        )
    check_image(image)
    if curve == 0:
        return image
    mask = brain_mask(image)  # (D, H, W) brain: nonzero in any channel
    out = torch.zeros_like(image)
    for c in range(image.shape[0]):
        # draw even for an empty brain so every channel consumes the same randomness
        v = uniform(generator, -1.0, 1.0)
        values = image[c][mask]  # (N,) brain voxels
        if values.numel() == 0:
            continue
        lut = bezier_lut(v, decreasing=curve == 2, lut_size=lut_size)
        mapped = apply_lut(_scale_to_unit(values.float()), lut)
        out[c][mask] = _zscore(mapped).to(image.dtype)
    return out

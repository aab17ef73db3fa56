"""GIN and IPA: random shallow networks and their spatially blended pairs (3D).

Ouyang et al., "Causality-inspired single-source domain generalization for medical image
segmentation", IEEE TMI 2022, Sec. III-B and III-C.

GIN (global intensity non-linear augmentation, Eq. 4): a shallow conv net g_θ drawn afresh for
every call (``n_layers`` 3D convolutions C → hidden → … → hidden → C, kernel size per layer drawn
from ``kernel_sizes``, leaky ReLU between layers, weights and biases Gaussian), mixed with the input
and rescaled to the input's Frobenius norm over the brain:

    GIN(x) = (α·g_θ(x) + (1 − α)·x) · ‖x‖_F / ‖α·g_θ(x) + (1 − α)·x‖_F,   α ~ U(0, 1).

IPA (interventional pseudo-correlation augmentation, Eq. 6): two independent GIN views blended
through a smooth random field m ∈ [0, 1] (a "pseudo-correlation map"),

    x1 = GIN₁(x)·m + GIN₂(x)·(1 − m),   x2 = GIN₁(x)·(1 − m) + GIN₂(x)·m.

The Frobenius rescaling matters only here: it keeps the two views on one scale so that neither
swamps the blend (after ``rezscore`` a single view would not depend on it).

3D choices (the authors released GIN in 3D but IPA only in 2D): weights are He-normal,
N(0, gain²/fan-in), instead of N(0, 1), so that 3³ kernels do not inflate g_θ(x) by ~10³
(identical to N(0, 1) for the paper's 2 channels and 1-tap kernels; see ``_gin_view``); the IPA
field is interpolated trilinearly rather than by B-spline (see ``ipa_field``); one sample per call,
so no grouped convolution.

Everything follows dgseg's intensity contract (``dgseg.transforms.intensity``): background (where
every input channel is 0) exactly 0 and brain voxels z-scored per channel on return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dgseg.transforms.intensity import brain_mask, check_image, rezscore, uniform
from dgseg.transforms.random_conv import (
    check_generator,
    check_kernel_sizes,
    conv3d_same,
    draw_kernel_size,
)

__all__ = ["gin", "ipa", "ipa_field", "ipa_pair"]


def _check_net_args(n_layers: int, hidden: int, kernel_sizes: Sequence[int]) -> tuple[int, ...]:
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
    return check_kernel_sizes(kernel_sizes)


def _gin_view(
    x: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    n_layers: int,
    hidden: int,
    kernel_sizes: tuple[int, ...],
    negative_slope: float,
) -> torch.Tensor:
    """One GIN view of the (C, D, H, W) float image ``x`` (background 0, brain ``mask`` (D, H, W)).

    Returns the Frobenius-rescaled mix with the background set to 0 (C, D, H, W).
    """
    c = x.shape[0]
    widths = [c] + [hidden] * (n_layers - 1) + [c]
    h = x.unsqueeze(0)  # (1, C, D, H, W)
    for i in range(n_layers):
        c_in, c_out, k = widths[i], widths[i + 1], draw_kernel_size(kernel_sizes, generator)
        # The paper's N(0, 1) weights would scale each 3³ layer by ~sqrt(27·c_in): g_θ(x) would
        # swamp (1 − α)·x and the N(0, 1) biases would no longer put the leaky-ReLU kinks in the
        # intensity range. He-normal, N(0, gain² / fan-in) with fan-in c_in·k³ and gain² ≈ 2 after
        # a rectified input, keeps every layer at the input's scale; with 2 channels and 1-tap
        # kernels it is the paper's N(0, 1) (to 1e-4).
        gain2 = 2.0 / (1.0 + negative_slope**2) if i > 0 else 1.0
        std = (gain2 / (c_in * k**3)) ** 0.5
        weight = std * torch.randn(
            c_out, c_in, k, k, k, generator=generator, device=x.device, dtype=x.dtype
        )  # (C_out, C_in, k, k, k)
        bias = torch.randn(c_out, generator=generator, device=x.device, dtype=x.dtype)
        h = conv3d_same(h, weight, bias)  # (1, C_out, D, H, W)
        if i < n_layers - 1:  # no activation after the last layer
            h = F.leaky_relu(h, negative_slope)
    alpha = uniform(generator, 0.0, 1.0)
    # (1 − α)·x + α·g_θ(x), accumulated into a copy of x: keeps x's layout (h may be
    # channels-last, see conv3d_same)
    mixed = ((1.0 - alpha) * x).add_(h[0], alpha=alpha).mul_(mask)  # (C, D, H, W)
    norm = torch.linalg.vector_norm(mixed)  # Frobenius norm over channels and brain voxels
    return mixed * (torch.linalg.vector_norm(x) / norm.clamp_min(1e-12))


def gin(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    n_layers: int = 4,
    hidden: int = 2,
    kernel_sizes: Sequence[int] = (1, 3),
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Global intensity non-linear augmentation of a (C, D, H, W) image (Ouyang et al. Eq. 4).

    Args:
        image: (C, D, H, W) float tensor, z-scored over the brain, background exactly 0.
        generator: source of every random draw, on ``image``'s device.
        n_layers: conv layers of the random net (the paper: 4).
        hidden: channels between layers (the paper: 2).
        kernel_sizes: odd kernel sizes, one drawn per layer (the paper: 1, 3).
        negative_slope: of the leaky ReLU between layers (``F.leaky_relu``'s default, as the
            authors' code).

    Returns:
        New (C, D, H, W) tensor of ``image``'s dtype: brain voxels z-scored per channel,
        background exactly 0.
    """
    check_image(image)
    check_generator(image, generator)
    sizes = _check_net_args(n_layers, hidden, kernel_sizes)
    # float32 at least (the CPU has no half conv3d); autocast off so that the caller's
    # precision context cannot change the augmentation
    mask = brain_mask(image)  # (D, H, W)
    x = image.to(torch.promote_types(image.dtype, torch.float32))
    with torch.autocast(image.device.type, enabled=False):
        out = _gin_view(x, mask, generator, n_layers, hidden, sizes, negative_slope)
        return rezscore(out, mask).to(image.dtype)


def ipa_field(
    size: Sequence[int], generator: torch.Generator, *, grid_spacing: float = 0.25
) -> torch.Tensor:
    """Smooth random field in [0, 1] of spatial ``size`` (D, H, W): IPA's pseudo-correlation map.

    Control points ~ N(0, 1) on a coarse grid ``grid_spacing`` of the image size apart (the
    paper: 1/4), L2-normalised over the grid, interpolated to ``size``, exponentiated and min–max
    scaled to [0, 1] (the authors' intermediate rescale to [0.7, 1.3] is affine, so the min–max
    undoes it). Trilinear ``F.interpolate`` instead of the authors' order-2 B-spline: one call on
    any device at O(voxels), while a 3D B-spline needs a transposed conv with a (3·spacing)³
    kernel; the field is continuous with kinks only at the control points, which a blending
    weight does not need to avoid.

    Returns:
        (D, H, W) float32 tensor on ``generator``'s device, min 0 and max 1.
    """
    size = tuple(size)
    if len(size) != 3 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"size must be three positive ints (D, H, W), got {size}")
    if not 0.0 < grid_spacing <= 1.0:
        raise ValueError(f"grid_spacing must lie in (0, 1], got {grid_spacing}")
    n = math.ceil(1.0 / grid_spacing - 1e-9) + 1  # control points per axis, 5 for 1/4
    cp = torch.randn(1, 1, n, n, n, generator=generator, device=generator.device)  # (1, 1, n, n, n)
    cp = cp / torch.linalg.vector_norm(cp)
    field = F.interpolate(cp, size=size, mode="trilinear", align_corners=True)[0, 0]  # (D, H, W)
    field = field.exp()
    lo, hi = field.min(), field.max()
    return (field - lo) / (hi - lo).clamp_min(1e-12)


def _ipa(
    image: torch.Tensor,
    generator: torch.Generator,
    grid_spacing: float,
    n_layers: int,
    hidden: int,
    kernel_sizes: Sequence[int],
    negative_slope: float,
    pair: bool,
) -> tuple[torch.Tensor, ...]:
    """(x1,) or (x1, x2); both share the draws, so x1 is the same either way."""
    check_image(image)
    check_generator(image, generator)
    sizes = _check_net_args(n_layers, hidden, kernel_sizes)
    if not 0.0 < grid_spacing <= 1.0:  # checked before any draw
        raise ValueError(f"grid_spacing must lie in (0, 1], got {grid_spacing}")
    mask = brain_mask(image)  # (D, H, W)
    x = image.to(torch.promote_types(image.dtype, torch.float32))
    with torch.autocast(image.device.type, enabled=False):
        g1 = _gin_view(x, mask, generator, n_layers, hidden, sizes, negative_slope)  # (C, D, H, W)
        g2 = _gin_view(x, mask, generator, n_layers, hidden, sizes, negative_slope)
        m = ipa_field(image.shape[1:], generator, grid_spacing=grid_spacing).to(x.dtype)
        views = [g2 + (g1 - g2) * m]  # g1·m + g2·(1 − m), one pass fewer
        if pair:
            views.append(g1 + (g2 - g1) * m)  # g1·(1 − m) + g2·m
        return tuple(rezscore(v, mask).to(image.dtype) for v in views)


def ipa(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    grid_spacing: float = 0.25,
    n_layers: int = 4,
    hidden: int = 2,
    kernel_sizes: Sequence[int] = (1, 3),
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Interventional pseudo-correlation augmentation: x1 = g1·m + g2·(1 − m) (Eq. 6).

    g1, g2 are two independent GIN views (the networks drawn as in ``gin``, before its
    re-z-scoring), m = ``ipa_field`` shared by all channels. Draw order: g1, g2, m.

    Args:
        image: (C, D, H, W) float tensor, z-scored over the brain, background exactly 0.
        generator: source of every random draw, on ``image``'s device.
        grid_spacing: control-point spacing of the field as a fraction of the image size, in
            (0, 1] (the paper: 1/4, i.e. 5 control points per axis).
        n_layers, hidden, kernel_sizes, negative_slope: of each GIN network, as in ``gin``.

    Returns:
        New (C, D, H, W) tensor of ``image``'s dtype: brain voxels z-scored per channel,
        background exactly 0.
    """
    args = (grid_spacing, n_layers, hidden, kernel_sizes, negative_slope)
    return _ipa(image, generator, *args, pair=False)[0]


def ipa_pair(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    grid_spacing: float = 0.25,
    n_layers: int = 4,
    hidden: int = 2,
    kernel_sizes: Sequence[int] = (1, 3),
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both IPA views of a (C, D, H, W) image, for the paper's consistency loss; see ``ipa``.

    Returns:
        (x1, x2): x1 = g1·m + g2·(1 − m) (equal to ``ipa`` with the same generator state) and
        x2 = g1·(1 − m) + g2·m, each a new tensor of ``image``'s dtype, z-scored per channel
        over the brain, background exactly 0.
    """
    args = (grid_spacing, n_layers, hidden, kernel_sizes, negative_slope)
    x1, x2 = _ipa(image, generator, *args, pair=True)
    return x1, x2

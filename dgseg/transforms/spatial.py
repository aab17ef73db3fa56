"""Random spatial augmentation applied to image and label together (docs/SPEC.md pipeline step 3).

Random flips per axis, random 90° rotations in a random axis plane, and an optional small-angle
rotation about the volume centre (trilinear for the image, nearest neighbour for the label, so
label channels stay binary), as in the BraTS SegResNet recipe (Myronenko 2018, Sec. 3.2: random
axis flips) and the write-up's "random flipping and random rotation".

Every function takes a (C, D, H, W) image, a label of shape (C', D, H, W) or (D, H, W) or None,
and an explicit ``torch.Generator``; it returns ``(image, label)``. Each call consumes a fixed
number of draws from the generator, whatever it decides, so streams stay reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_flip", "random_rot90", "random_rotation"]

# Spatial axis pairs (as negative dims, valid for 3-D and 4-D tensors) for 90° rotations.
_PLANES = ((-3, -2), (-3, -1), (-2, -1))


def _check(image: torch.Tensor, label: torch.Tensor | None, p: float) -> None:
    if image.ndim != 4:
        raise ValueError(f"expected image of shape (C, D, H, W), got {tuple(image.shape)}")
    if label is not None and (label.ndim not in (3, 4) or label.shape[-3:] != image.shape[-3:]):
        raise ValueError(
            f"label shape {tuple(label.shape)} does not match image shape {tuple(image.shape)}"
        )
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")


def _rand(generator: torch.Generator, n: int) -> list[float]:
    """``n`` U(0, 1) draws from ``generator`` as Python floats (float64 for exact thresholds)."""
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    return u.tolist()


def random_flip(
    image: torch.Tensor,
    label: torch.Tensor | None,
    generator: torch.Generator,
    *,
    p: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip each spatial axis independently with probability ``p``."""
    _check(image, label, p)
    u = _rand(generator, 3)
    dims = [axis - 3 for axis in range(3) if u[axis] < p]  # -3, -2, -1 = D, H, W
    if dims:
        image = torch.flip(image, dims)
        label = None if label is None else torch.flip(label, dims)
    return image, label


def random_rot90(
    image: torch.Tensor,
    label: torch.Tensor | None,
    generator: torch.Generator,
    *,
    p: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With probability ``p``, rotate by k·90° (k ∈ {1, 2, 3}) in a random plane of two axes.

    In a plane whose two sizes differ a quarter turn would swap them, so such a draw becomes a
    half turn (k = 2): the shape is kept and batches of equal shapes still collate.
    """
    _check(image, label, p)
    u = _rand(generator, 3)
    if u[0] >= p:
        return image, label
    dims = _PLANES[min(int(u[1] * 3), 2)]
    k = 1 + min(int(u[2] * 3), 2)
    if image.shape[dims[0]] != image.shape[dims[1]] and k != 2:
        k = 2
    image = torch.rot90(image, k, dims)
    label = None if label is None else torch.rot90(label, k, dims)
    return image, label


def _rotation_matrix(angles: tuple[float, float, float]) -> torch.Tensor:
    """3×3 rotation R = R_x · R_y · R_z (radians, about the x=W, y=H, z=D axes)."""
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = (
        math.cos(ax),
        math.sin(ax),
        math.cos(ay),
        math.sin(ay),
        math.cos(az),
        math.sin(az),
    )
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rx @ ry @ rz


def random_rotation(
    image: torch.Tensor,
    label: torch.Tensor | None,
    generator: torch.Generator,
    *,
    max_degrees: float = 10.0,
    p: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With probability ``p``, rotate about the centre by angles ~ U(−max, max) about each axis.

    The rotation is rigid in voxel units (also for non-cubic volumes); voxels mapped from outside
    the volume become 0. Image: trilinear; label: nearest neighbour (values stay those of the
    input, so binary channels stay binary).
    """
    _check(image, label, p)
    if not 0.0 <= max_degrees <= 180.0:
        raise ValueError(f"max_degrees must lie in [0, 180], got {max_degrees}")
    u = _rand(generator, 4)
    if u[0] >= p or max_degrees == 0.0:
        return image, label
    angles = tuple(math.radians((2.0 * a - 1.0) * max_degrees) for a in u[1:])
    d, h, w = image.shape[-3:]
    # affine_grid works in normalised coordinates (x, y, z) = (W, H, D) ∈ [−1, 1]; conjugate by
    # the half-extents so the rotation is rigid in voxels: theta = S⁻¹ R S.
    half = torch.tensor([(w - 1) / 2, (h - 1) / 2, (d - 1) / 2], dtype=torch.float64).clamp_min(1)
    rot = _rotation_matrix(angles)
    theta = torch.zeros(1, 3, 4, dtype=torch.float64)  # (1, 3, 4): no translation
    theta[0, :, :3] = rot * half[None, :] / half[:, None]  # S⁻¹ R S
    dtype = image.dtype if image.is_floating_point() else torch.float32
    grid = F.affine_grid(
        theta.to(device=image.device, dtype=dtype), [1, *image.shape], align_corners=True
    )  # (1, D, H, W, 3)
    image = F.grid_sample(
        image[None].to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )[0].to(image.dtype)  # (C, D, H, W), trilinear for 5-D input
    if label is not None:
        lab = label if label.ndim == 4 else label[None]  # (C', D, H, W)
        out = F.grid_sample(
            lab[None].to(dtype), grid, mode="nearest", padding_mode="zeros", align_corners=True
        )[0]  # (C', D, H, W)
        label = out.to(label.dtype) if label.ndim == 4 else out[0].to(label.dtype)
    return image, label

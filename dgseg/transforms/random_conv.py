"""RandConv: a freshly drawn random 3D convolution as an intensity and texture augmentation.

Xu et al., "Robust and generalizable visual representation learning via random convolutions",
ICLR 2021, Sec. 3. One convolution layer Θ (C → C channels, no bias) with kernel size k drawn from
``kernel_sizes`` and weights drawn i.i.d. from the Kaiming-normal distribution

    Θ ~ N(0, σ²),  σ² = 1 / (C · k³)                                     (fan-in, gain 1)

is applied to the image; with ``mix=True`` (the paper's "RC_mix", Eq. 1) the output is

    x' = α · x + (1 − α) · (Θ ∗ x),  α ~ U(0, 1).

In dgseg the result is then put back into the intensity contract (``dgseg.transforms.intensity``):
background (voxels where every input channel is 0) set to exactly 0 and brain voxels z-scored per
channel. A bias would only shift each channel by a constant, which the re-z-scoring removes, so
there is none.

``conv3d_same`` is shared with GIN (``dgseg.transforms.gin``): a zero-padded "same" 3D convolution
with a workaround for slow one-input-channel convolutions on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dgseg.transforms.intensity import brain_mask, check_image, rezscore, uniform

__all__ = ["conv3d_same", "random_conv"]


def check_kernel_sizes(kernel_sizes: Sequence[int]) -> tuple[int, ...]:
    """``kernel_sizes`` as a tuple; ValueError unless it is a non-empty sequence of odd ints ≥ 1."""
    sizes = tuple(kernel_sizes)
    if not sizes or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel_sizes must be a non-empty sequence of odd ints >= 1, got {sizes}")
    return sizes


def check_generator(image: torch.Tensor, generator: torch.Generator) -> None:
    """ValueError unless ``generator`` is on ``image``'s device type (it draws on that device)."""
    if generator.device.type != image.device.type:
        raise ValueError(
            f"generator is on {generator.device}, image on {image.device}: they must match"
        )


def draw_kernel_size(kernel_sizes: tuple[int, ...], generator: torch.Generator) -> int:
    """One kernel size drawn uniformly from ``kernel_sizes`` with ``generator``."""
    i = torch.randint(len(kernel_sizes), (), generator=generator, device=generator.device)
    return kernel_sizes[int(i)]


def conv3d_same(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Zero-padded stride-1 3D convolution that keeps the spatial size (odd kernels).

    Args:
        x: (1, C_in, D, H, W).
        weight: (C_out, C_in, k, k, k) with odd k.
        bias: (C_out,) or None.

    Returns:
        (1, C_out, D, H, W). On CPU with k > 1 in channels-last memory format, which the next
        such convolution reads without a copy; ``.contiguous()`` gives the default layout.
    """
    k = weight.shape[-1]
    if x.device.type != "cpu":
        return F.conv3d(x, weight, bias, padding=k // 2)
    if k == 1:  # a channel mix: fastest in the default layout on CPU
        return F.conv3d(x.contiguous(), weight, bias)
    # oneDNN on CPU prefers channels-last and has no fast path for one input channel, so one
    # input channel gets an all-zero second one (zero weights: same result).
    if x.shape[1] == 1:
        n, _, *size = x.shape
        xc = torch.empty(
            n, 2, *size, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d
        )  # (1, 2, D, H, W), channels-last
        xc[:, :1] = x
        xc[:, 1] = 0.0
        weight = torch.cat([weight, torch.zeros_like(weight)], dim=1)  # (C_out, 2, k, k, k)
    else:
        xc = x.contiguous(memory_format=torch.channels_last_3d)  # no copy if channels-last
    return F.conv3d(xc, weight, bias, padding=k // 2)


def random_conv(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    kernel_sizes: Sequence[int] = (1, 3, 5),
    mix: bool = True,
) -> torch.Tensor:
    """One random 3D convolution of a (C, D, H, W) image (RandConv, Xu et al. ICLR 2021).

    Args:
        image: (C, D, H, W) float tensor, z-scored over the brain, background exactly 0.
        generator: source of every random draw, on ``image``'s device.
        kernel_sizes: odd kernel sizes to draw k from, uniformly (the paper's 1, 3, 5 for small
            images; larger 3D kernels blur more than they recolour).
        mix: blend with the input, x' = α·x + (1 − α)·(Θ ∗ x), α ~ U(0, 1) ("RC_mix");
            False returns Θ ∗ x ("RC_img").

    Returns:
        New (C, D, H, W) tensor of ``image``'s dtype: brain voxels z-scored per channel,
        background exactly 0.
    """
    check_image(image)
    check_generator(image, generator)
    sizes = check_kernel_sizes(kernel_sizes)
    mask = brain_mask(image)  # (D, H, W)
    c = image.shape[0]
    # float32 at least (the CPU has no half conv3d), float64 kept; the caller's autocast must
    # not change the draw's outcome, so it is off here.
    dtype = torch.promote_types(image.dtype, torch.float32)
    with torch.autocast(image.device.type, enabled=False):
        k = draw_kernel_size(sizes, generator)
        std = (c * k**3) ** -0.5  # Kaiming normal, fan-in C·k³, gain 1 (the paper's default)
        weight = std * torch.randn(
            c, c, k, k, k, generator=generator, device=image.device, dtype=dtype
        )  # (C_out, C_in, k, k, k)
        x = image.to(dtype).unsqueeze(0)  # (1, C, D, H, W)
        out = conv3d_same(x, weight)[0]  # (C, D, H, W), maybe channels-last
        if mix:
            alpha = uniform(generator, 0.0, 1.0)
            out = (alpha * x[0]).add_(out, alpha=1.0 - alpha)  # in x's layout
        return rezscore(out.contiguous(), mask).to(image.dtype)

"""Fourier amplitude perturbation: new low-frequency "style", same phase ("content").

The amplitude spectrum of an image carries mostly low-level statistics (contrast, intensity
style), the phase carries structure. Following the amplitude mix of FACT (Xu et al., "A
Fourier-based framework for domain generalization", CVPR 2021, Eq. 2–3) restricted to the low
frequencies as in FedDG (Liu et al., "FedDG: Federated domain generalization on medical image
segmentation via episodic learning in continuous frequency space", CVPR 2021, Eq. 1–2):

    X = F(x) = A·e^{iP},   A' = (1 − λ)·A + λ·T  on the band,  A' = A elsewhere,
    x' = F⁻¹(A'·e^{iP}),   λ ~ U(0, strength).

The band holds the frequencies k with |k_j| < low_freq_ratio · n_j / 2 on every axis j, i.e. the
centred box of relative size ``low_freq_ratio`` of the fftshifted spectrum (FedDG's β). The target
amplitude T is a ``reference`` image's amplitude when one is given (FACT / FedDG, which mix
amplitudes across domains or clients), else — with only one source domain — the image's own
amplitude times log-normal factors, T = A·exp(ε), ε ~ N(0, 1) per frequency and channel.

In dgseg the result is then put back into the intensity contract (``dgseg.transforms.intensity``):
background (voxels where every input channel is 0) exactly 0, brain voxels z-scored per channel.
"""

from __future__ import annotations

import math

import torch

from dgseg.transforms.intensity import brain_mask, check_image, rezscore, uniform
from dgseg.transforms.random_conv import check_generator

__all__ = ["fourier_amplitude"]

_DIMS = (-3, -2, -1)


def _band_index(size: tuple[int, int, int], ratio: float, device: torch.device):
    """Index tensors of the low-frequency band in the unshifted rfftn layout (C, D, H, W//2+1).

    Returns (i_d, i_h, i_w, half): broadcastable (2b_d+1, 1, 1), (1, 2b_h+1, 1), (1, 1, b_w+1)
    integer indices and (b_d, b_h, b_w), or None when the band is empty. Half-widths stay below
    n/2, so no index repeats and the self-conjugate Nyquist planes are never touched.
    """
    half = tuple(math.ceil(ratio * n / 2) - 1 for n in size)  # |k| <= b  <=>  |k| < ratio·n/2
    if min(half) < 0:
        return None
    (d, h, _), (bd, bh, bw) = size, half
    i_d = torch.arange(-bd, bd + 1, device=device) % d  # negative frequencies wrap to the end
    i_h = torch.arange(-bh, bh + 1, device=device) % h
    i_w = torch.arange(0, bw + 1, device=device)  # rfft keeps k_w >= 0 only
    return i_d[:, None, None], i_h[None, :, None], i_w[None, None, :], half


def fourier_amplitude(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    low_freq_ratio: float = 0.1,
    strength: float = 1.0,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Perturb the low-frequency amplitude spectrum of a (C, D, H, W) image, keep its phase.

    Args:
        image: (C, D, H, W) float tensor, z-scored over the brain, background exactly 0.
        generator: source of every random draw, on ``image``'s device.
        low_freq_ratio: relative size of the perturbed band per axis, in [0, 1] (0: nothing is
            perturbed; 1: every frequency; FedDG's β).
        strength: λ ~ U(0, strength), in [0, 1]: how far the band's amplitude moves towards the
            target (FACT's η = 1; 0 returns the re-z-scored input).
        reference: optional (C, D, H, W) image whose amplitude is the target; default: the
            image's own amplitude times log-normal factors.

    Returns:
        New (C, D, H, W) tensor of ``image``'s dtype: brain voxels z-scored per channel,
        background exactly 0.
    """
    check_image(image)
    check_generator(image, generator)
    if not 0.0 <= low_freq_ratio <= 1.0:
        raise ValueError(f"low_freq_ratio must lie in [0, 1], got {low_freq_ratio}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    if reference is not None and reference.shape != image.shape:
        raise ValueError(
            f"reference shape {tuple(reference.shape)} differs from image {tuple(image.shape)}"
        )
    size = tuple(image.shape[1:])  # (D, H, W)
    c = image.shape[0]
    # FFT in float32 (float64 kept) with autocast off: CUDA autocast would run it in half
    # precision, which cuFFT supports only for power-of-two sizes (CPU silently uses float32).
    dtype = torch.promote_types(image.dtype, torch.float32)
    with torch.autocast(image.device.type, enabled=False):
        x = image.to(dtype)
        spec = torch.fft.rfftn(x, dim=_DIMS)  # (C, D, H, W//2+1) complex64
        lam = uniform(generator, 0.0, strength)
        band = _band_index(size, low_freq_ratio, image.device)
        if band is not None and lam > 0.0:
            i_d, i_h, i_w, (bd, bh, bw) = band
            low = spec[:, i_d, i_h, i_w]  # (C, 2b_d+1, 2b_h+1, b_w+1) complex64, a copy
            amp = low.abs()
            if reference is None:
                cube = (c, 2 * bd + 1, 2 * bh + 1, 2 * bw + 1)  # k in [-b, b]³, centred
                eps = torch.randn(cube, generator=generator, device=image.device, dtype=dtype)
                # average with the point reflection k -> -k so that T(k) = T(-k): the spectrum
                # of a real image stays Hermitian on the k_w = 0 plane, which irfftn assumes
                eps = (eps + eps.flip(1, 2, 3)) / math.sqrt(2.0)
                target = amp * eps[..., bw:].exp()  # k_w >= 0 half: (C, 2b_d+1, 2b_h+1, b_w+1)
            else:
                ref = reference.to(image.device, dtype)
                ref = torch.fft.rfftn(ref, dim=_DIMS)  # (C, D, H, W//2+1) complex64
                target = ref[:, i_d, i_h, i_w].abs()  # (C, 2b_d+1, 2b_h+1, b_w+1)
            new_amp = (1.0 - lam) * amp + lam * target
            spec[:, i_d, i_h, i_w] = torch.polar(new_amp, low.angle())  # same phase
        out = torch.fft.irfftn(spec, s=size, dim=_DIMS)  # (C, D, H, W) real; s= for odd W
        return rezscore(out, brain_mask(image)).to(image.dtype)

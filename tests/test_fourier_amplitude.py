"""Fourier amplitude perturbation: intensity contract, identity cases, phase kept, band only."""

import math

import pytest
import torch

from dgseg.transforms.fourier_amplitude import fourier_amplitude
from dgseg.transforms.intensity import rezscore

from intensity_phantoms import check_contract, gen, synthetic_brain

DIMS = (-3, -2, -1)


def low_band(size: tuple[int, int, int], ratio: float) -> torch.Tensor:
    """(D, H, W//2+1) bool: rfftn frequencies with |k_j| < ratio·n_j/2 on every axis."""
    kd, kh = (torch.fft.fftfreq(n) * n for n in size[:2])
    kw = torch.fft.rfftfreq(size[2]) * size[2]
    inside = [k.abs() < ratio * n / 2 for k, n in zip((kd, kh, kw), size)]
    return inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]


@pytest.mark.parametrize("channels", [1, 2])
def test_contract(channels, one_thread):
    image = synthetic_brain(channels)
    before = image.clone()
    check_contract(image, fourier_amplitude(image, gen(0)))
    check_contract(
        image, fourier_amplitude(image, gen(0), reference=synthetic_brain(channels, 24, 1))
    )
    check_contract(image, fourier_amplitude(image, gen(0), low_freq_ratio=1.0))
    check_contract(image.double(), fourier_amplitude(image.double(), gen(0)))
    assert torch.equal(image, before)


def test_seeding(one_thread):
    image = synthetic_brain(2)
    kw = {"low_freq_ratio": 0.3}
    assert torch.equal(
        fourier_amplitude(image, gen(3), **kw), fourier_amplitude(image, gen(3), **kw)
    )
    assert not torch.allclose(
        fourier_amplitude(image, gen(3), **kw), fourier_amplitude(image, gen(4), **kw), atol=1e-3
    )


def test_identity_cases(one_thread):
    image = synthetic_brain(2, size=21)  # odd sizes: irfftn needs s= to give them back
    want = rezscore(image, (image != 0).any(0))
    for kwargs in [
        {"strength": 0.0},
        {"low_freq_ratio": 0.0},
        {"reference": image.clone()},  # its own amplitude as the target
    ]:
        out = fourier_amplitude(image, gen(0), **kwargs)
        assert torch.allclose(out, want, atol=2e-5), kwargs
    assert not torch.allclose(fourier_amplitude(image, gen(0)), want, atol=1e-2)


@pytest.mark.parametrize("use_reference", [False, True])
def test_phase_kept_and_only_the_band_changes(use_reference, one_thread):
    # every voxel "brain": the final re-z-scoring is then one global affine map, whose scale
    # multiplies every coefficient and whose shift touches only k = 0
    g = gen(7)
    size = (15, 16, 17)
    image = rezscore(torch.randn(1, *size, generator=g), torch.ones(size, dtype=torch.bool))
    reference = torch.randn(1, *size, generator=g) if use_reference else None
    out = fourier_amplitude(image, gen(1), low_freq_ratio=0.4, reference=reference)
    X = torch.fft.rfftn(image.double(), dim=DIMS)[0]  # (D, H, W//2+1) complex128
    Y = torch.fft.rfftn(out.double(), dim=DIMS)[0]
    band = low_band(size, 0.4)
    band[0, 0, 0] = False  # DC: moved by the re-centring
    outside = ~low_band(size, 0.4)
    assert band.sum() > 20 and outside.sum() > 1000
    # outside the band: Y = X / σ for one σ > 0
    ratio = Y[outside] / X[outside]
    scale = ratio.real.mean()
    assert scale > 0 and torch.allclose(ratio, torch.full_like(ratio, scale), atol=1e-4)
    # in the band: Y·conj(X) real and positive (same phase), amplitudes changed
    cross = Y[band] * X[band].conj()
    angle = torch.atan2(cross.imag, cross.real)
    assert angle.abs().max() < 1e-3
    gain = Y[band].abs() / X[band].abs() / scale
    assert (gain - 1).abs().max() > 0.1


def test_band_is_low_frequency(one_thread):
    # a wider band changes the image more; ratio ~ 0.1 leaves it close to the input
    image = synthetic_brain(1, size=32)
    err = {
        r: (fourier_amplitude(image, gen(2), low_freq_ratio=r) - image).pow(2).mean().item()
        for r in (0.1, 1.0)
    }
    assert err[0.1] < err[1.0]
    assert math.isfinite(err[1.0])


def test_bad_arguments():
    image = synthetic_brain(1, size=16)
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match=str(ratio)):
            fourier_amplitude(image, gen(0), low_freq_ratio=ratio)
    for strength in (-1.0, 2.0):
        with pytest.raises(ValueError, match=str(strength)):
            fourier_amplitude(image, gen(0), strength=strength)
    with pytest.raises(ValueError, match=r"\(1, 16, 16, 15\)"):
        fourier_amplitude(image, gen(0), reference=image[..., :15])
    with pytest.raises(ValueError, match="16, 16"):
        fourier_amplitude(image[0], gen(0))
    with pytest.raises(ValueError, match="int64"):
        fourier_amplitude(image.long(), gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    image = synthetic_brain(2, size=21).cuda()  # odd sizes: cuFFT half precision would refuse
    out = fourier_amplitude(image, gen(0, "cuda"))
    check_contract(image, out)
    assert torch.allclose(out, fourier_amplitude(image, gen(0, "cuda")), atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # FFT stays float32 under autocast
        check_contract(image, fourier_amplitude(image, gen(0, "cuda"), reference=image.flip(1)))
    with pytest.raises(ValueError, match="generator"):
        fourier_amplitude(image, gen(0))

"""Random contrast re-synthesis: SynthSeg-style domain randomisation without tissue labels.

Billot et al., "SynthSeg: segmentation of brain scans of any contrast and resolution without
retraining", Medical Image Analysis 2023: an image is drawn from a label map by a Gaussian mixture
with a random mean per label (so any tissue may be brighter than any other), then corrupted by a
random bias field, blur, gamma and noise. We have no tissue labels for the healthy brain, so we
re-synthesise a real image instead. Per sample:

1. classes: the brain voxels of the first channel are split into K ~ U{n_classes} intensity
   classes (equal-count quantile bins, or 1-D k-means); tumour labels 1, 2, 4 of
   ``label``, when given, are three more classes;
2. per class k a random target intensity m_k ~ U(0, 1) and texture scale s_k ~ U(texture_scale),
   and every voxel maps as  x' = m_k + s_k (x − μ_k)  (μ_k: the class mean), which keeps the
   within-class texture while the class order is random (non-monotonic); with probability
   ``isointense`` a tumour class instead takes the intensity of a random healthy class, as
   lesions do in some sequences (edema and enhancing tumour are near grey matter on a native
   T1): the tumour must then be found by its shape, texture and boundaries, not its brightness;
3. soft class boundaries: intensity classes blend by a softmax over squared distances to the
   class centres (``temperature``), tumour classes by Gaussian-blurred one-hot masks
   (``boundary_sigma``);
4. a multiplicative bias field exp(upsampled N(0, σ_b) grid), a Gaussian blur, a gamma on the
   [0, 1]-scaled brain and additive Gaussian noise;
5. the brain is z-scored again, background exactly 0.

Intensities work in brain min-max [0, 1] units of each channel. No tissue-class table is known
here: classes come from the image's own intensities and from the tumour label map only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dgseg.transforms.bezier import apply_lut
from dgseg.transforms.intensity import brain_mask, check_image, rezscore, uniform

# the same label contract, brain range and percentile subsample as SLAug's LLA: one copy each
from dgseg.transforms.location_scale import _brain_range, _check_label, _subsample

__all__ = ["resynthesize_contrast"]

_METHODS = ("quantile", "kmeans")
_TUMOUR_LABELS = (1, 2, 4)  # BraTS 2021: necrotic/non-enhancing core, edema, enhancing
_LUT_SIZE = 1024  # entries of the intensity-class map (a smooth function of x0)


def _gaussian_kernel(sigma: float) -> list[float]:
    """Normalised 1-D Gaussian taps of radius ceil(3σ), centre first: [k_0, k_1, ..., k_r]."""
    r = max(1, math.ceil(3.0 * sigma))
    k = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(r + 1)]
    total = k[0] + 2.0 * sum(k[1:])
    return [v / total for v in k]


def _blur(vol: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 3-D Gaussian blur of (N, D, H, W) volumes with replicate padding.

    Each 1-D pass is a sum of shifted slices, k_0 x + Σ_i k_i (x[+i] + x[−i]), as ``conv3d``
    with a (2r+1, 1, 1) kernel is slow on CPU.
    """
    k = _gaussian_kernel(sigma)
    r = len(k) - 1
    x = vol
    for dim in (1, 2, 3):
        n = x.shape[dim]
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (3 - dim)] = pad[2 * (3 - dim) + 1] = r  # F.pad lists the last axis first
        xp = F.pad(x[None], pad, mode="replicate")[0]  # (N, ..., n + 2r, ...), edge voxels copied
        y = xp.narrow(dim, r, n) * k[0]
        for i in range(1, r + 1):
            y.add_(xp.narrow(dim, r + i, n) + xp.narrow(dim, r - i, n), alpha=k[i])
        x = y
    return x


def _bin_means(xs: torch.Tensor, thresholds: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Mean of ``xs`` in each bucket between ``thresholds``; ``fallback`` for an empty bucket."""
    cls = torch.bucketize(xs, thresholds)  # (n,) in [0, k)
    k = fallback.numel()
    count = torch.bincount(cls, minlength=k).to(xs.dtype)
    mean = torch.bincount(cls, weights=xs, minlength=k).to(xs.dtype) / count.clamp_min(1.0)
    return torch.where(count > 0, mean, fallback)


def _class_centres(
    xs: torch.Tensor, k: int, method: str, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted centres (k,) and inner thresholds (k-1,) of ``xs`` (healthy [0, 1] intensities).

    Quantile: equal-count bins, centres = bin means. K-means: Lloyd's iterations in 1-D (the
    nearest centre is the bucket between centre midpoints), seeded at evenly spaced values
    between the 1st and 99th percentiles: equal-count seeds would put several centres into the
    largest tissue, a fixed point Lloyd does not leave, and k-means is meant to find tissues.
    """
    qs = torch.arange(1, k, device=xs.device, dtype=xs.dtype) / k  # (k-1,) inner quantiles
    if method == "kmeans":
        lo, hi = torch.quantile(xs, torch.tensor([0.01, 0.99], device=xs.device, dtype=xs.dtype))
        centres = lo + (hi - lo) * (torch.arange(k, device=xs.device, dtype=xs.dtype) + 0.5) / k
        for _ in range(iters):
            thresholds = 0.5 * (centres[1:] + centres[:-1])  # nearest-centre boundaries
            centres = _bin_means(xs, thresholds, centres)  # an empty cluster keeps its centre
        return centres, 0.5 * (centres[1:] + centres[:-1])
    thresholds = torch.quantile(xs, qs)
    edges = torch.cat([xs.min().view(1), thresholds, xs.max().view(1)])  # (k+1,)
    # an empty bin (one constant tissue over two quantiles) is centred between its edges
    return _bin_means(xs, thresholds, 0.5 * (edges[1:] + edges[:-1])), thresholds


def _check_range(name: str, value: tuple[float, float], low: float = float("-inf")) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{name} must be (low, high) with {low} <= low <= high, got {value}")


def resynthesize_contrast(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    label: torch.Tensor | None = None,
    n_classes: tuple[int, int] = (3, 6),
    method: str = "quantile",
    kmeans_iters: int = 5,
    texture_scale: tuple[float, float] = (-0.5, 1.5),
    temperature: float = 0.5,
    boundary_sigma: float = 1.0,
    bias_field: float = 0.3,
    bias_grid: int = 4,
    blur_sigma: tuple[float, float] = (0.0, 1.0),
    gamma: float = 0.4,
    noise_std: float = 0.05,
    isointense: float = 0.0,
) -> torch.Tensor:
    """Re-synthesise every channel with a random, class-wise, non-monotonic contrast.

    Args:
        image: (C, D, H, W) float, z-scored over the brain, background exactly 0.
        generator: source of every random draw; each channel draws its own contrast.
        label: (D, H, W) integer BraTS-2021 label map (0, 1, 2, 4) or None.
        n_classes: inclusive range of K, the number of intensity classes of the healthy brain.
        method: "quantile" (equal-count bins) or "kmeans" (1-D Lloyd, evenly spaced seeds).
        kmeans_iters: Lloyd iterations for ``method="kmeans"``.
        texture_scale: range of s_k, the per-class gain of the texture x − μ_k (negative values
            invert a class's texture).
        temperature: softness of the intensity-class blend, in units of the mean spacing of
            the class centres (0: hard classes). Equal-count bins cut a large tissue at a
            noise-level threshold; hard, its halves would get unrelated intensities (salt and
            pepper); soft, nearby centres merge while distinct tissues keep mostly their own
            class.
        boundary_sigma: spatial σ (voxels) of the Gaussian-blurred tumour-class masks (0: hard).
        bias_field: largest std of the log bias field (SynthSeg: 0.7 on a bias-free synthetic
            image; BraTS scans are already bias-corrected, so milder).
        bias_grid: control points per axis of the bias field (SynthSeg: 2.5 % of the size, ~4).
        blur_sigma: range of the Gaussian blur σ in voxels (below 0.2 no blur).
        gamma: std of log γ for the gamma x^γ on [0, 1] brain intensities.
        noise_std: largest std of the additive Gaussian noise, in [0, 1] brain units.
        isointense: probability that a tumour class (1, 2, 4 of ``label``) takes the intensity
            m_k of a random healthy intensity class instead of its own draw (0: SynthSeg's
            i.i.d. draws). Its texture gain stays its own.

    Returns:
        New (C, D, H, W) tensor, z-scored over the brain per channel, background 0.
    """
    check_image(image)
    lo_k, hi_k = n_classes
    if not 1 <= lo_k <= hi_k or not all(isinstance(n, int) for n in n_classes):
        raise ValueError(
            f"n_classes must be integers (low, high) with 1 <= low <= high, got {n_classes}"
        )
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not isinstance(kmeans_iters, int) or kmeans_iters < 1:
        raise ValueError(f"kmeans_iters must be an int >= 1, got {kmeans_iters!r}")
    _check_range("texture_scale", texture_scale)
    _check_range("blur_sigma", blur_sigma, 0.0)
    if not 0.0 <= isointense <= 1.0:
        raise ValueError(f"isointense must lie in [0, 1], got {isointense}")
    for name, v in (
        ("temperature", temperature),
        ("boundary_sigma", boundary_sigma),
        ("bias_field", bias_field),
        ("gamma", gamma),
        ("noise_std", noise_std),
    ):
        if not v >= 0:  # also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {v}")
    if not isinstance(bias_grid, int) or bias_grid < 2:
        raise ValueError(f"bias_grid must be an int >= 2, got {bias_grid!r}")
    label = _check_label(label, image)

    c, dev, shape = image.shape[0], image.device, image.shape[1:]
    gdev = generator.device
    mask = brain_mask(image)  # (D, H, W)
    maskf = mask.float()
    k = int(torch.randint(lo_k, hi_k + 1, (), generator=generator, device=gdev))
    n_cls = k + len(_TUMOUR_LABELS)

    # --- classes, from the first channel's healthy brain (subsampled: stats need no 2M voxels)
    x0 = image[0].float()
    lo0, span0 = _brain_range(x0, mask)
    healthy = mask if label is None else mask & (label == 0)
    hs = _subsample(healthy)
    u0s = (_subsample(x0) - lo0) / span0  # (S,) first channel in [0, 1]
    if bool(hs.any()):
        centres, thresholds = _class_centres(u0s[hs], k, method, kmeans_iters)
    else:  # all tumour: intensity classes only shape the (empty) healthy part
        centres = (torch.arange(k, device=dev) + 0.5) / k
        thresholds = 0.5 * (centres[1:] + centres[:-1])
    cls_s = torch.bucketize(u0s, thresholds)  # (S,) hard class per sampled voxel
    if label is not None:
        to_cls = torch.tensor([-1, k, k + 1, -1, k + 2], device=dev)
        ls = _subsample(label)
        cls_s = torch.where(ls > 0, to_cls[ls.long()], cls_s)
    cls_s = torch.where(_subsample(mask), cls_s, n_cls)  # background: one more id, dropped below
    count = torch.bincount(cls_s, minlength=n_cls + 1)[:n_cls].float()  # (K+3,)
    # soft intensity membership W_k(u0): softmax of −(u0 − c_k)² / (2τ²); τ relative to spacing
    grid = torch.linspace(0.0, 1.0, _LUT_SIZE, device=dev)  # u0 at the LUT entries
    spacing = (centres[-1] - centres[0]) / max(k - 1, 1)
    tau = temperature * spacing.clamp_min(1.0 / _LUT_SIZE)
    if temperature > 0:
        w = torch.softmax(-((grid[:, None] - centres) ** 2) / (2 * tau**2), dim=1)  # (L, k)
    else:
        w = F.one_hot(torch.bucketize(grid, thresholds), k).float()  # (L, k) hard
    u0 = torch.add(x0, -float(lo0)).mul_(1.0 / float(span0))  # (D, H, W), brain in [0, 1]
    u0_11 = u0 * 2.0 - 1.0  # the same on apply_lut's [-1, 1] grid
    # tumour memberships: blurred one-hot masks inside the tumour's box (+3σ), computed once
    tumour = None
    if label is not None and bool((label > 0).any()):
        nz = (label > 0).nonzero()
        r = math.ceil(3 * boundary_sigma)
        lo_b = (nz.amin(0) - r).clamp_min(0).tolist()
        hi_b = (nz.amax(0) + r + 1).tolist()
        box = tuple(slice(a, min(b, n)) for a, b, n in zip(lo_b, hi_b, shape))
        onehot = torch.stack([(label[box] == t).float() for t in _TUMOUR_LABELS])  # (3, d, h, w)
        soft = _blur(onehot, boundary_sigma) if boundary_sigma > 0 else onehot
        tumour = (box, soft * maskf[box])  # memberships only inside the brain

    out = torch.empty(image.shape, dtype=torch.float32, device=dev)
    for ch in range(c):
        # class intensities i.i.d. U(0, 1): every order of the classes equally likely (SynthSeg
        # draws its Gaussian means i.i.d. uniform likewise)
        m = torch.rand(n_cls, generator=generator, device=gdev).to(dev)  # (K+3,)
        # texture gains: keep, damp, amplify or invert each class's own texture
        s = torch.rand(n_cls, generator=generator, device=gdev).to(dev)
        s = texture_scale[0] + (texture_scale[1] - texture_scale[0]) * s  # (K+3,)
        if isointense > 0:  # drawn only when asked: the default keeps SynthSeg's draws
            iso = torch.rand(len(_TUMOUR_LABELS), generator=generator, device=gdev) < isointense
            twin = torch.randint(k, (len(_TUMOUR_LABELS),), generator=generator, device=gdev)
            m[k:] = torch.where(iso.to(dev), m[twin.to(dev)], m[k:])  # (3,) tumour intensities
        bias_std = uniform(generator, 0.0, bias_field)
        log_bias = torch.randn((bias_grid,) * 3, generator=generator, device=gdev).to(dev)
        sigma = uniform(generator, *blur_sigma)
        log_gamma = gamma * float(torch.randn((), generator=generator, device=gdev))
        sd_noise = uniform(generator, 0.0, noise_std)

        x = image[ch].float()
        lo, span = _brain_range(x, mask)
        u = u0 if ch == 0 else torch.add(x, -float(lo)).mul_(1.0 / float(span))  # (D, H, W)
        # class means μ_k of this channel (sampled voxels) for the texture term
        us = _subsample(u)
        mu = torch.bincount(cls_s, weights=us, minlength=n_cls + 1)[:n_cls].float()
        mu = mu / count.clamp_min(1.0)  # (K+3,)
        # healthy map  h = Σ_k W_k(u0) (m_k + s_k (u − μ_k)) = A(u0) + u · S(u0): two 1-D LUTs
        lut_a = w @ (m[:k] - s[:k] * mu[:k])  # (L,)
        lut_s = w @ s[:k]  # (L,)
        if ch == 0:  # u = u0: the whole map is one LUT, A + u0 · S
            y = apply_lut(u0_11, lut_a + grid * lut_s)
        else:
            y = torch.addcmul(apply_lut(u0_11, lut_a), u, apply_lut(u0_11, lut_s))
        if tumour is not None:
            box, soft = tumour
            ub = u[box]
            t = m[k:, None, None, None] + s[k:, None, None, None] * (ub - mu[k:, None, None, None])
            # y = (1 − Σ b_j) h + Σ b_j t_j, i.e. h + Σ b_j (t_j − h)
            y[box] = y[box] + (soft * (t - y[box])).sum(0)
        y.clamp_(min=0.0)  # MR magnitudes are non-negative; keeps bias and gamma well defined
        # smooth multiplicative bias field: coarse N(0, σ_b) log-field, trilinear, exp
        field = F.interpolate(
            (bias_std * log_bias)[None, None], size=shape, mode="trilinear", align_corners=True
        )[0, 0]  # (D, H, W)
        y.mul_(field.exp_())
        # blur (scanner resolution) by normalised convolution: the zero background does not
        # darken the brain's rim
        if sigma >= 0.2:
            num_den = _blur(torch.stack([y * maskf, maskf]), sigma)  # (2, D, H, W)
            y = num_den[0] / num_den[1].clamp_min(1e-6)
        # gamma on [0, 1]-scaled brain intensities: a global monotone bend, as SynthSeg's last step
        lo_y, span_y = _brain_range(y, mask)
        y = (
            torch.add(y, -float(lo_y))
            .mul_(1.0 / float(span_y))
            .clamp_(0.0, 1.0)
            .pow_(math.exp(log_gamma))
        )
        # additive Gaussian noise (thermal noise, at a random level), then back to the z-score
        if noise_std > 0:
            noise = torch.randn(shape, generator=generator, device=gdev).to(dev)
            y.add_(noise, alpha=sd_noise)
        out[ch] = y
    return rezscore(out, mask).to(image.dtype)

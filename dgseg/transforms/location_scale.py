"""SLAug: global / local location-scale augmentation and saliency-balancing fusion, in 3D.

Su et al., "Rethinking data augmentation for single-source domain generalization in medical image
segmentation", AAAI 2023 (code: github.com/Kaiseem/SLAug). Per channel, brain intensities are
min-max scaled to [0, 1]; a random cubic Bezier curve with end points (lo, lo), (hi, hi) and inner
points ~ U(lo, hi)² is applied; then the location-scale map

    y = clip(scale · f(x) + location, 0, 1),   scale = clip(N(1, 0.1), 0.9, 1.1),
    location ~ N(0, 0.5) clipped so that the region's 20th-80th percentiles stay inside [0, 1],

and the result is z-scored again over the brain (background exactly 0).

* GLA (Sec. 3.1, global): one increasing curve over the whole brain (lo, hi = 0, 1).
* LLA (Sec. 3.1, local): one curve and one location-scale per class, each on the class's own
  range [lo_k, hi_k]. The paper's classes are the label classes. For BraTS that leaves the healthy
  brain as one class, so (a natural 3D extension, ours) the healthy brain is split into
  ``n_background_classes`` equal-count intensity classes of the first channel, blended softly in
  intensity (hard ones would cut a tissue at a noise-level threshold: salt and pepper); tumour
  labels 1, 2 and 4 are a (hard) class each.
* Saliency-balancing fusion (Sec. 3.2): s = min-max(upsample(pool(sqrt(mean_c grad²)))),
  mixed = GLA · s + LLA · (1 − s).

A cubic Bezier whose inner control values lie between its end values is monotone in t
(B'(t) ∝ (1−t)²d0 + 2t(1−t)d1 + t²d2 >= 0 whenever d0, d2 >= 0 and d1² <= d0·d2). The authors'
"inverse" curve sorts x but not y, with a Bernstein basis running backwards in t: the monotone
*decreasing* map with swapped end points, built here as hi + lo − f(x) (equal in distribution,
inner points being i.i.d. uniform). LLA is non-monotone across classes (each class gets its own
direction and location), never within a class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dgseg.transforms.bezier import apply_lut
from dgseg.transforms.intensity import brain_mask, check_image, rezscore, uniform

__all__ = [
    "global_location_scale",
    "local_location_scale",
    "location_scale",
    "saliency_map",
    "saliency_mix",
]

_LUT_SIZE = 1024  # LUT entries per curve: a cubic is smooth, linear pieces of 1/1023 suffice
_T_SAMPLES = 4096  # t samples used to invert x(t) when building a LUT
_HIST_BINS = 1024  # percentile resolution (1/1024 of a class's range) of the histogram quantiles
_SAMPLE_VOXELS = 1 << 18  # voxels sampled for percentiles (all of them in volumes up to 64³)
_TUMOUR_LABELS = (1, 2, 4)  # BraTS 2021: necrotic/non-enhancing core, edema, enhancing


def _bezier_luts(ctrl: torch.Tensor, lut_size: int = _LUT_SIZE) -> torch.Tensor:
    """LUTs of cubic Bezier curves through (0, 0), (x1, y1), (x2, y2), (1, 1) on [0, 1].

    Args:
        ctrl: (M, 4) inner control points (x1, y1, x2, y2), each in [0, 1].

    Returns:
        (M, lut_size) float32: y at x = linspace(0, 1, lut_size), non-decreasing in x.
    """
    t = torch.linspace(0.0, 1.0, _T_SAMPLES, device=ctrl.device, dtype=torch.float64)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3  # (T,) Bernstein, P0 = 0
    c = ctrl.double()
    x = c[:, 0:1] * b1 + c[:, 2:3] * b2 + b3  # (M, T), non-decreasing in t (see module doc)
    y = c[:, 1:2] * b1 + c[:, 3:4] * b2 + b3  # (M, T), non-decreasing in t
    grid = torch.linspace(0.0, 1.0, lut_size, device=ctrl.device, dtype=torch.float64)
    grid = grid.expand(x.shape[0], -1).contiguous()  # (M, L)
    # x(t) is sorted, so inverting it is a search; then interpolate y between neighbouring t
    hi = torch.searchsorted(x, grid).clamp_(1, _T_SAMPLES - 1)  # (M, L)
    lo = hi - 1
    x0, x1, y0, y1 = x.gather(1, lo), x.gather(1, hi), y.gather(1, lo), y.gather(1, hi)
    dx = x1 - x0
    w = torch.where(dx > 0, (grid - x0) / torch.where(dx > 0, dx, 1.0), 0.0).clamp_(0.0, 1.0)
    return (y0 + w * (y1 - y0)).float()


def _apply_class_luts(u: torch.Tensor, cls: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Evaluate row ``cls`` of ``table`` at ``u`` in [0, 1] by linear interpolation.

    Args:
        u: (...) float positions in [0, 1] (clamped).
        cls: (...) long row index per element, in [0, K).
        table: (K, L) LUTs on an even grid over [0, 1].
    """
    n = table.shape[1]
    # one row gather of (value, slope), as bezier.apply_lut, with a per-class row offset
    rows = torch.stack([table[:, :-1], torch.diff(table, dim=1)], dim=-1)  # (K, L-1, 2)
    rows = rows.reshape(-1, 2)  # (K·(L-1), 2): row of class k, bin i at k·(L-1) + i
    pos = u.float().clamp(0.0, 1.0).mul_(n - 1)  # fractional index in [0, L-1]
    i0 = pos.long().clamp_(max=n - 2)
    frac = pos.sub_(i0)
    r = rows[cls * (n - 1) + i0]  # (..., 2)
    return torch.addcmul(r[..., 0], frac, r[..., 1])


def _group_quantiles(
    u: torch.Tensor, group: torch.Tensor, n_groups: int, q: torch.Tensor
) -> torch.Tensor:
    """Per-group quantiles of ``u`` (values in [0, 1]) from one joint histogram.

    O(voxels) on any device, unlike a sort per group; exact to 1/_HIST_BINS. ``group`` ids equal
    to ``n_groups`` (the background) are ignored. Returns (n_groups, len(q)): the upper edge of the
    bin where each quantile falls, so ``bucketize`` puts a constant tissue wholly below it.
    """
    b = (u.clamp(0.0, 1.0) * _HIST_BINS).long().clamp_(max=_HIST_BINS - 1)
    hist = torch.bincount(group * _HIST_BINS + b, minlength=(n_groups + 1) * _HIST_BINS)
    cdf = hist[: n_groups * _HIST_BINS].view(n_groups, _HIST_BINS).cumsum(1).double()  # (G, B)
    target = q.double().view(1, -1) * cdf[:, -1:]  # (G, Q) voxel counts
    idx = torch.searchsorted(cdf, target.contiguous()).clamp_(max=_HIST_BINS - 1)
    return (idx + 1).float() / _HIST_BINS


def _subsample(t: torch.Tensor) -> torch.Tensor:
    """Flattened, evenly strided sample of <= ~2^18 voxels, enough for percentiles. The stride is
    odd so that it does not alias with power-of-two axes."""
    stride = t.numel() // _SAMPLE_VOXELS | 1  # (V // S) rounded up to odd; 1 for small volumes
    return t.flatten()[::stride]


def _brain_range(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brain min and span of a (D, H, W) channel (span 1 where the brain is constant)."""
    lo = torch.where(mask, x, float("inf")).amin()
    span = torch.where(mask, x, float("-inf")).amax() - lo
    return lo, torch.where(span > 0, span, 1.0)


def _location_scale(
    p_lo: torch.Tensor,
    p_hi: torch.Tensor,
    z: torch.Tensor,
    *,
    scale_std: float,
    scale_range: tuple[float, float],
    location_std: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and location per region from two N(0, 1) draws ``z`` (..., 2).

    ``p_lo``/``p_hi`` are the region's low/high percentiles after the curve. The location is
    clipped so that they stay inside [0, 1] after scaling (the authors clip with the unscaled
    percentiles; scaled ones make the stated guarantee hold). When the scaled span exceeds 1
    (scale > 1 on a full-range region) no location can do that; we centre the span instead.
    """
    scale = (1.0 + scale_std * z[..., 0]).clamp(*scale_range)
    loc = location_std * z[..., 1]
    lo_bound, hi_bound = -scale * p_lo, 1.0 - scale * p_hi
    clipped = torch.maximum(lo_bound, torch.minimum(loc, hi_bound))
    return scale, torch.where(lo_bound <= hi_bound, clipped, 0.5 * (lo_bound + hi_bound))


def _check_common(
    scale_std: float, scale_range: tuple[float, float], location_std: float, percentile: float
) -> None:
    if scale_std < 0:
        raise ValueError(f"scale_std must be >= 0, got {scale_std}")
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    if location_std < 0:
        raise ValueError(f"location_std must be >= 0, got {location_std}")
    if not 0 <= percentile < 0.5:
        raise ValueError(f"percentile must lie in [0, 0.5), got {percentile}")


def global_location_scale(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    scale_std: float = 0.1,
    scale_range: tuple[float, float] = (0.9, 1.1),
    location_std: float = 0.5,
    percentile: float = 0.2,
) -> torch.Tensor:
    """GLA: one increasing random Bezier curve + location-scale per channel (SLAug, Sec. 3.1).

    Args:
        image: (C, D, H, W) float, z-scored over the brain, background exactly 0.
        generator: source of every random draw (6 per channel).
        scale_std: std of the scale ~ N(1, scale_std), clipped to ``scale_range`` (paper: 0.1).
        scale_range: clip of the scale (paper: 0.9, 1.1).
        location_std: std of the location ~ N(0, location_std) (paper: 0.5).
        percentile: the location keeps the ``percentile`` and 1 - ``percentile`` brain quantiles
            of the scaled curve output inside [0, 1] (paper: 20th-80th).

    Returns:
        New (C, D, H, W) tensor: a non-decreasing map of each channel's intensities (ties only
        where the [0, 1] clip saturates), z-scored over the brain, background 0.
    """
    check_image(image)
    _check_common(scale_std, scale_range, location_std, percentile)
    c, dev = image.shape[0], image.device
    ctrl = torch.rand(c, 4, generator=generator, device=generator.device).to(dev)  # (C, 4)
    z = torch.randn(c, 2, generator=generator, device=generator.device).to(dev)  # (C, 2)
    mask = brain_mask(image)  # (D, H, W)
    luts = _bezier_luts(ctrl)  # (C, L), increasing: GLA never inverts (authors' inverse=False)
    q = torch.tensor([percentile, 1.0 - percentile], device=dev)
    group = (~_subsample(mask)).long()  # brain 0, background 1 (ignored)
    zero = torch.zeros(2, dtype=torch.long, device=dev)
    out = torch.empty(image.shape, dtype=torch.float32, device=dev)
    for ch in range(c):
        x = image[ch].float()  # (D, H, W)
        lo, span = _brain_range(x, mask)
        qu = _group_quantiles((_subsample(x) - lo) / span, group, 1, q)[0]  # (2,) in [0, 1]
        # the curve is increasing, so the output percentiles are the curve at the input's
        p = _apply_class_luts(qu, zero, luts[ch : ch + 1])  # (2,)
        scale, loc = _location_scale(
            p[0],
            p[1],
            z[ch],
            scale_std=scale_std,
            scale_range=scale_range,
            location_std=location_std,
        )
        # fold location-scale and clip into the LUT: O(L) instead of O(voxels) work
        lut = (luts[ch] * scale + loc).clamp_(0.0, 1.0)
        # brain min-max straight to apply_lut's [-1, 1] grid in one pass: 2 (x - lo) / span - 1
        a, b = 2.0 / float(span), -2.0 * float(lo) / float(span) - 1.0
        out[ch] = apply_lut(x.mul(a).add_(b), lut)
    return rezscore(out, mask).to(image.dtype)


def _check_label(label: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor | None:
    """ValueError unless ``label`` is None or an integer (D, H, W) map of values in {0,1,2,4}."""
    if label is None:
        return None
    if label.shape != image.shape[1:]:
        raise ValueError(
            f"label shape {tuple(label.shape)} != image (D, H, W) {tuple(image.shape[1:])}"
        )
    if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
        raise ValueError(f"label must be an integer tensor, got {label.dtype}")
    label = label.to(image.device)
    bad = (label < 0) | (label == 3) | (label > 4)
    if bad.any():
        raise ValueError(
            f"label values must be in {{0, 1, 2, 4}}, got {label[bad].unique().tolist()}"
        )
    return label


def _hard_classes(x: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Index of the bucket between ``thresholds`` (ascending) for every element of ``x``."""
    cls = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    for t in thresholds:  # = bucketize(x, thresholds), faster for a few classes
        cls += x > t
    return cls


def _lla_classes(
    x0: torch.Tensor, mask: torch.Tensor, label: torch.Tensor | None, n_background_classes: int
) -> tuple[torch.Tensor, list[float]]:
    """(D, H, W) long class map: 0..n-1 healthy intensity classes (equal-count quantile bins of
    the first channel ``x0``), n, n+1, n+2 for labels 1, 2, 4, and n+3 outside the brain; and
    the n-1 thresholds (in ``x0`` units) between the healthy classes."""
    n = n_background_classes
    healthy = mask if label is None else mask & (label == 0)
    lo, span = _brain_range(x0, mask)
    q = torch.arange(1, n, device=x0.device, dtype=torch.float64) / n  # (n-1,) inner quantiles
    group = (~_subsample(healthy)).long()  # healthy 0, rest 1 (ignored)
    thresholds = _group_quantiles((_subsample(x0) - lo) / span, group, 1, q)[0] * span + lo
    thresholds = thresholds.tolist()
    cls = _hard_classes(x0, thresholds)  # (D, H, W)
    if label is not None:
        lab = label.long()
        # labels 1, 2, 4 -> n, n+1, n+2 by arithmetic (4 >> 2 = 1), no gather
        cls = torch.where(lab > 0, n - 1 + lab - (lab >> 2), cls)
    return torch.where(mask, cls, n + len(_TUMOUR_LABELS)), thresholds


def local_location_scale(
    image: torch.Tensor,
    label: torch.Tensor | None,
    generator: torch.Generator,
    *,
    n_background_classes: int = 3,
    temperature: float = 0.5,
    p_invert_healthy: float = 1.0,
    p_invert_tumour: float = 0.5,
    scale_std: float = 0.1,
    scale_range: tuple[float, float] = (0.9, 1.1),
    location_std: float = 0.5,
    percentile: float = 0.2,
) -> torch.Tensor:
    """LLA: one random curve and location-scale per class (SLAug, Sec. 3.1), in 3D.

    Classes: the healthy brain split into ``n_background_classes`` equal-count intensity classes of
    the first channel (our 3D extension; the paper has one background class), and tumour labels
    1, 2, 4 as one class each (when ``label`` is given and the label occurs). Every channel draws
    its own curves; all channels share the classes. Each class's curve maps the class's own
    brain-min-max range [lo_k, hi_k] onto itself (authors: the region's min and max), before the
    class's location-scale.

    Args:
        image: (C, D, H, W) float, z-scored over the brain, background exactly 0.
        label: (D, H, W) integer BraTS-2021 label map (0, 1, 2, 4) or None (intensity classes only).
        generator: source of every random draw (7 per channel and class, present or not).
        n_background_classes: intensity classes of the healthy brain (>= 1).
        temperature: softness of the healthy classes' blend: each healthy voxel takes
            Σ_k w_k(x0) T_k(x), w = softmax_k(−(x0 − c_k)² / 2τ²) over the class centres c_k,
            τ = ``temperature`` × their mean spacing (0: hard classes). Hard intensity classes
            cut a homogeneous tissue at a noise-level threshold and give its two halves unrelated
            maps, i.e. salt-and-pepper; blended, classes close in intensity (one tissue) merge
            and the map is continuous in intensity. Tumour classes (labels) stay hard, as in the
            paper.
        p_invert_healthy: probability that a healthy class's curve is decreasing (authors: 1, their
            background curve is always the inverted one).
        p_invert_tumour: same for each tumour class (authors: 0.5).
        scale_std, scale_range, location_std, percentile: as in :func:`global_location_scale`,
            applied per class with the class's own percentiles.

    Returns:
        New (C, D, H, W) tensor, z-scored over the brain, background 0. Within a class the map is
        monotone (one curve); across classes the intensity order is random.
    """
    check_image(image)
    _check_common(scale_std, scale_range, location_std, percentile)
    n_bg = n_background_classes
    if isinstance(n_bg, bool) or not isinstance(n_bg, int) or n_bg < 1:
        raise ValueError(f"n_background_classes must be an int >= 1, got {n_bg!r}")
    for name, p in (("p_invert_healthy", p_invert_healthy), ("p_invert_tumour", p_invert_tumour)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    label = _check_label(label, image)
    c, dev = image.shape[0], image.device
    k = n_bg + len(_TUMOUR_LABELS)  # classes; id k marks the background
    # a fixed number of draws whatever the classes present: a seed means the same thing anywhere
    draws = torch.rand(c, k, 5, generator=generator, device=generator.device).to(dev)
    z = torch.randn(c, k, 2, generator=generator, device=generator.device).to(dev)
    mask = brain_mask(image)  # (D, H, W)
    x0 = image[0].float().flatten()  # (V,) the channel that defines the intensity classes
    cls, thresholds = _lla_classes(x0.view(mask.shape), mask, label, n_bg)
    cls = cls.flatten()  # (V,)
    cls_sub = _subsample(cls)
    p_inv = torch.full((k,), p_invert_tumour, device=dev)
    p_inv[:n_bg] = p_invert_healthy
    invert = draws[..., 4] < p_inv  # (C, K)
    luts = _bezier_luts(draws[..., :4].reshape(-1, 4)).view(c, k, -1)  # (C, K, L)
    luts = torch.where(invert[..., None], 1.0 - luts, luts)  # decreasing curves: see module doc
    q = torch.tensor([percentile, 1.0 - percentile], device=dev)
    kk = torch.arange(k, device=dev)[:, None].expand(-1, 2)  # (K, 2) class id per percentile

    # soft healthy membership as LUTs over the first channel's brain [0, 1] coordinate u0
    lo0, span0 = _brain_range(x0, mask.flatten())
    u0_sub = (_subsample(x0) - lo0) / span0
    n_sub = torch.bincount(cls_sub, minlength=k + 1)[:n_bg].float()
    centres = torch.bincount(cls_sub, weights=u0_sub, minlength=k + 1)[:n_bg].float()
    centres = centres / n_sub.clamp_min(1.0)  # (n_bg,) healthy class means of u0
    grid = torch.linspace(0.0, 1.0, _LUT_SIZE, device=dev)  # (L,) u0 at the LUT entries
    if temperature > 0 and n_bg > 1:
        present = n_sub > 0  # an absent class (all healthy voxels elsewhere) gets no weight
        spacing = (centres[present].amax() - centres[present].amin()) / max(
            int(present.sum()) - 1, 1
        )
        tau = temperature * spacing.clamp_min(1.0 / _LUT_SIZE)
        logits = -((grid[:, None] - centres) ** 2) / (2 * tau**2)  # (L, n_bg)
        w = torch.softmax(logits.masked_fill(~present, float("-inf")), dim=1)
    else:  # hard classes: the healthy class of each grid point, by the same thresholds
        w = F.one_hot(_hard_classes(grid * span0 + lo0, thresholds), n_bg).float()  # (L, n_bg)
    # healthy voxels read the soft blend (row 0, global coordinate), tumour classes their own
    # table row (local coordinate), the background a zero row: ids 0, 1..3, 4
    row = (cls - n_bg + 1).clamp_(min=0)  # (V,)
    healthy = cls < n_bg  # (V,)

    out = torch.empty(image.shape, dtype=torch.float32, device=dev)
    for ch in range(c):
        x = x0 if ch == 0 else image[ch].float().flatten()  # (V,)
        lo, span = _brain_range(x, mask.flatten())
        # class ranges, exact (scatter over all voxels); an absent class gets (inf, -inf)
        cmin = torch.full((k + 1,), float("inf"), device=dev).scatter_reduce(0, cls, x, "amin")
        cmax = torch.full((k + 1,), float("-inf"), device=dev).scatter_reduce(0, cls, x, "amax")
        cspan = (cmax - cmin)[:k]
        cspan = torch.where(cspan > 0, cspan, 1.0)  # (K,) a constant class sits at its lo
        clo = torch.where(cmin[:k].isfinite(), cmin[:k], lo)  # (K,)
        # each class's percentiles in its local [0, 1] coordinate (on a subsample)
        ul_sub = (_subsample(x) - clo[cls_sub.clamp(max=k - 1)]) / cspan[cls_sub.clamp(max=k - 1)]
        qu = _group_quantiles(ul_sub, cls_sub, k, q)  # (K, 2)
        # the class's output before location-scale, in brain [0, 1] units: ulo + uspan * curve
        ulo, uspan = ((clo - lo) / span)[:, None], (cspan / span)[:, None]  # (K, 1)
        pq = ulo + uspan * _apply_class_luts(qu, kk, luts[ch])  # (K, 2), monotone curve
        scale, loc = _location_scale(
            pq.amin(1),
            pq.amax(1),
            z[ch],
            scale_std=scale_std,
            scale_range=scale_range,
            location_std=location_std,
        )
        # T_k: class range, curve, location-scale and clip folded into one table per class,
        # indexed by the class's local coordinate (x - clo_k) / cspan_k
        table = ((ulo + uspan * luts[ch]) * scale[:, None] + loc[:, None]).clamp_(0.0, 1.0)
        u_grid = grid[None, :] * span + lo  # (1, L) channel values at the LUT grid
        kh = torch.arange(n_bg, device=dev)[:, None].expand(-1, _LUT_SIZE)  # (n_bg, L)
        if ch == 0:
            # u = u0: the blend Σ_k w_k(u0) T_k(u0) is one function of u0, a single LUT row
            t_grid = _apply_class_luts((u_grid - clo[:n_bg, None]) / cspan[:n_bg, None], kh, table)
            blend = (w.T * t_grid).sum(0, keepdim=True)  # (1, L)
        else:
            blend = table.new_zeros(1, _LUT_SIZE)  # healthy voxels handled below
        rows = torch.cat([blend, table[n_bg:], table.new_zeros(1, _LUT_SIZE)])  # (5, L)
        # voxel -> coordinate of its row: one gather of a (gain, offset) pair per voxel
        gain = torch.cat([(1.0 / span).view(1), 1.0 / cspan[n_bg:], cspan.new_zeros(1)])
        off = torch.cat([(-lo / span).view(1), -clo[n_bg:] / cspan[n_bg:], clo.new_zeros(1)])
        ab = torch.stack([gain, off], dim=1)[row]  # (V, 2)
        y = _apply_class_luts(torch.addcmul(ab[:, 1], x, ab[:, 0]), row, rows)  # (V,)
        if ch > 0:
            # classes come from channel 0, values from this one: Σ_k w_k(u0) T_k(x), n_bg LUTs
            u0 = (x0 - lo0) / span0
            h = torch.zeros_like(y)
            for j in range(n_bg):
                wj = _apply_class_luts(u0, torch.zeros_like(row), w[:, j][None])
                tj = _apply_class_luts((x - clo[j]) / cspan[j], torch.full_like(row, j), table)
                h.addcmul_(wj, tj)
            y = torch.where(healthy, h, y)
        out[ch] = y.view(image.shape[1:])
    return rezscore(out, mask).to(image.dtype)


def saliency_map(gradient: torch.Tensor, *, grid: int | tuple[int, int, int] = 3) -> torch.Tensor:
    """SLAug saliency s in [0, 1] from the loss gradient w.r.t. the input (Sec. 3.2).

    s = min-max(upsample(avg_pool(sqrt(mean_c grad²)))) per sample. The authors smooth the
    coarse map with a quadratic B-spline, whose kernel in 3D would have ~(3·128/grid)³ taps; here
    it is upsampled trilinearly (the linear B-spline: continuous, no overshoot).
    ``align_corners=False`` puts each pooled value at its cell's centre. A flat map (e.g. a zero
    gradient) gives s ≡ 1 (GLA kept), as the authors' eps.

    Args:
        gradient: (B, C, D, H, W) or (C, D, H, W) input gradient.
        grid: cells of the coarse saliency grid per axis (authors: 3).

    Returns:
        (B, 1, D, H, W) or (1, D, H, W) float map in [0, 1].
    """
    if gradient.ndim not in (4, 5):
        raise ValueError(
            f"gradient must be (B, C, D, H, W) or (C, D, H, W), got {tuple(gradient.shape)}"
        )
    cells = (grid,) * 3 if isinstance(grid, int) else tuple(grid)
    if len(cells) != 3 or any(not isinstance(g, int) or g < 1 for g in cells):
        raise ValueError(f"grid must be a positive int or three positive ints, got {grid!r}")
    g = gradient if gradient.ndim == 5 else gradient[None]  # (B, C, D, H, W)
    s = g.float().pow(2).mean(dim=1, keepdim=True).sqrt()  # (B, 1, D, H, W)
    s = F.adaptive_avg_pool3d(s, cells)  # (B, 1, gd, gh, gw)
    s = F.interpolate(s, size=g.shape[2:], mode="trilinear", align_corners=False)  # (B, 1, D, H, W)
    lo = s.amin(dim=(1, 2, 3, 4), keepdim=True)  # (B, 1, 1, 1, 1)
    span = s.amax(dim=(1, 2, 3, 4), keepdim=True) - lo
    s = torch.where(span > 0, (s - lo) / torch.where(span > 0, span, 1.0), 1.0).clamp_(0.0, 1.0)
    return s if gradient.ndim == 5 else s[0]


def saliency_mix(
    gla: torch.Tensor,
    lla: torch.Tensor,
    saliency: torch.Tensor,
    *,
    grid: int | tuple[int, int, int] = 3,
) -> torch.Tensor:
    """Saliency-balancing fusion: ``gla · s + lla · (1 − s)``, s = :func:`saliency_map`.

    Where the network is most sensitive to the GLA view its intensities are kept; elsewhere the
    LLA view (stronger, class-wise) takes over. Pure function: the caller provides the gradient of
    the loss on ``gla`` w.r.t. its input. Background stays 0 (both views are 0 there); the mix is
    not re-z-scored, as in the authors' code.

    Args:
        gla, lla: (B, C, D, H, W) or (C, D, H, W) views of the same sample(s), same shape.
        saliency: input gradient of the same rank and spatial size (any channel count).
        grid: see :func:`saliency_map`.
    """
    if gla.shape != lla.shape:
        raise ValueError(f"gla {tuple(gla.shape)} and lla {tuple(lla.shape)} differ in shape")
    if (
        saliency.ndim != gla.ndim
        or saliency.shape[-3:] != gla.shape[-3:]
        or saliency.shape[:-4] != gla.shape[:-4]
    ):
        raise ValueError(
            f"saliency shape {tuple(saliency.shape)} does not match images {tuple(gla.shape)}"
        )
    s = saliency_map(saliency, grid=grid).to(device=gla.device, dtype=gla.dtype)  # (B?, 1, D, H, W)
    return gla * s + lla * (1.0 - s)


def location_scale(
    image: torch.Tensor,
    label: torch.Tensor | None,
    generator: torch.Generator,
    *,
    p_local: float = 0.5,
    n_background_classes: int = 3,
) -> torch.Tensor:
    """GLA with probability 1 − ``p_local``, else LLA (paper defaults otherwise): one view.

    For training without saliency balancing: one location-scale view per sample, drawn with one
    extra U(0, 1) from ``generator`` before the chosen transform's own draws. (With saliency
    balancing, call :func:`global_location_scale` and :func:`local_location_scale` both and fuse
    with :func:`saliency_mix`; the authors' plain loop trains on GLA only, i.e. ``p_local=0``.)
    """
    if not 0.0 <= p_local <= 1.0:
        raise ValueError(f"p_local must lie in [0, 1], got {p_local}")
    if uniform(generator, 0.0, 1.0) < p_local:
        return local_location_scale(
            image, label, generator, n_background_classes=n_background_classes
        )
    return global_location_scale(image, generator)

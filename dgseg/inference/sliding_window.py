"""Whole-volume inference: sliding windows with blending, and flip test-time augmentation.

The network is trained on fixed-size patches (the write-up's 128^3) but the test volumes are
larger or differently shaped, so a volume is covered by overlapping ROI windows whose logits are
blended with an importance map: a Gaussian centred on the window (nnU-Net, Isensee et al. 2021,
Nat. Methods 18:203; MONAI's ``sliding_window_inference``) or a constant. For each voxel

    logits(x) = sum_w g_w(x) * f(window_w)(x) / sum_w g_w(x),

so the blending weights always sum to one and a predictor returning a constant gives that constant.

Test-time augmentation (optional) done the right way round: flip the *input*, predict, flip the
*prediction* back, average the probabilities. (The original code flipped the input back before
predicting, which made every TTA pass identical.)
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "gaussian_importance_map",
    "covering_roi",
    "window_starts",
    "sliding_window_inference",
    "flip_combinations",
    "predict_volume",
]

Predictor = Callable[[Tensor], Tensor]  # (N, C, *roi) -> logits (N, K, *roi)
RoiSize = Union[int, Sequence[int]]

# Gaussian sigma as a fraction of the ROI edge (nnU-Net and MONAI use 1/8).
_SIGMA_SCALE = 0.125
# Floor on the normalised Gaussian: window corners keep a small positive weight so that voxels
# covered by a single window (volume corners) are never divided by a vanishing sum.
_MIN_WEIGHT = 1e-3


def _as_triple(roi_size: RoiSize) -> tuple[int, int, int]:
    if isinstance(roi_size, int):
        roi = (roi_size,) * 3
    else:
        roi = tuple(int(r) for r in roi_size)
    if len(roi) != 3 or any(r < 1 for r in roi):
        raise ValueError(
            f"roi_size must be a positive int or three positive ints, got {roi_size!r}"
        )
    return roi  # type: ignore[return-value]


def gaussian_importance_map(
    roi_size: RoiSize, *, sigma_scale: float = _SIGMA_SCALE, device=None
) -> Tensor:
    """Separable Gaussian centred on the window, max 1, floored at ``_MIN_WEIGHT``.

    Returns:
        float32 tensor of shape ``roi_size`` (D, H, W).
    """
    roi = _as_triple(roi_size)
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    g = torch.ones(roi, dtype=torch.float32, device=device)
    for dim, r in enumerate(roi):
        x = torch.arange(r, dtype=torch.float32, device=device) - (r - 1) / 2.0
        g1 = torch.exp(-0.5 * (x / (sigma_scale * r)) ** 2)  # (r,)
        shape = [1, 1, 1]
        shape[dim] = r
        g = g * g1.view(shape)  # broadcast the 1D profile along its axis
    g = g / g.max()
    return g.clamp_min(_MIN_WEIGHT)


def covering_roi(shape: Sequence[int], multiple: int = 16) -> tuple[int, ...]:
    """One window covering ``shape``, each side rounded up to a multiple of ``multiple``.

    Encoder-decoders with n stride-2 stages need sides divisible by 2^n (16 covers four).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return tuple(-(-int(s) // multiple) * multiple for s in shape)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of windows of length ``roi`` covering ``[0, size)`` with the given overlap.

    The step is ``int(roi * (1 - overlap))`` (at least 1); the last window is shifted back so it
    ends exactly at ``size`` instead of running past the edge. ``size <= roi`` gives one window.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= roi:
        return [0]
    step = max(int(roi * (1.0 - overlap)), 1)
    n = math.ceil((size - roi) / step) + 1
    return sorted({min(i * step, size - roi) for i in range(n)})


@torch.no_grad()
def sliding_window_inference(
    predictor: Predictor,
    image: Tensor,
    roi_size: Optional[RoiSize],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    blend: str = "gaussian",
) -> Tensor:
    """Predict a whole volume with overlapping ROI windows and blend the logits.

    Args:
        predictor: callable (N, C, *roi) -> logits (N, K, *roi), e.g. a segmenter
            (``dgseg.models.segmenter_of`` a domain-adversarial model).
        image: (B, C, D, H, W). Axes shorter than the ROI are zero-padded symmetrically (zero is
            the background of z-scored images) and cropped back afterwards.
        roi_size: window size, int or (d, h, w); None: one window covering the volume
            (:func:`covering_roi`), as validation does when no window size is configured.
        overlap: fraction of the ROI shared by neighbouring windows, in [0, 1).
        sw_batch_size: windows per predictor call (each call sees sw_batch_size * B crops).
        blend: "gaussian" (centre-weighted) or "constant" (plain average of overlapping windows).

    Returns:
        float32 logits (B, K, D, H, W) on the image's device.
    """
    if image.dim() != 5:
        raise ValueError(f"image must be (B, C, D, H, W), got shape {tuple(image.shape)}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    roi = _as_triple(covering_roi(image.shape[2:]) if roi_size is None else roi_size)
    batch = image.shape[0]
    spatial = tuple(image.shape[2:])

    # Pad short axes up to the ROI; F.pad takes (last-axis-left, last-axis-right, ...).
    pads = [max(r - s, 0) for r, s in zip(roi, spatial)]
    pad_arg: list[int] = []
    for p in reversed(pads):
        pad_arg += [p // 2, p - p // 2]
    if any(pads):
        image = torch.nn.functional.pad(image, pad_arg)  # (B, C, max(D,d), max(H,h), max(W,w))
    padded = tuple(image.shape[2:])

    grids = [window_starts(s, r, overlap) for s, r in zip(padded, roi)]
    starts = list(itertools.product(*grids))
    if blend == "gaussian":
        weight = gaussian_importance_map(roi, device=image.device)
    else:
        weight = torch.ones(roi, dtype=torch.float32, device=image.device)

    out = torch.zeros(0)  # allocated once the predictor reveals its channel count
    norm = torch.zeros((1, 1) + padded, dtype=torch.float32, device=image.device)
    for i in range(0, len(starts), sw_batch_size):
        chunk = starts[i : i + sw_batch_size]
        slices = [
            (slice(a, a + roi[0]), slice(b, b + roi[1]), slice(c, c + roi[2])) for a, b, c in chunk
        ]
        crops = torch.cat([image[(..., *s)] for s in slices], dim=0)  # (n*B, C, d, h, w)
        pred = predictor(crops)
        if not isinstance(pred, Tensor):
            raise TypeError(
                f"predictor must return a logits tensor, got {type(pred).__name__} "
                "(predict with dgseg.models.segmenter_of(model))"
            )
        if pred.dim() != 5 or tuple(pred.shape[2:]) != roi or pred.shape[0] != crops.shape[0]:
            raise ValueError(
                f"predictor returned shape {tuple(pred.shape)} for input {tuple(crops.shape)}; "
                f"expected (N, K, {roi[0]}, {roi[1]}, {roi[2]})"
            )
        pred = pred.float().view(len(chunk), batch, *pred.shape[1:])  # (n, B, K, d, h, w)
        if out.numel() == 0:
            out = torch.zeros(
                (batch, pred.shape[2]) + padded, dtype=torch.float32, device=image.device
            )
        for j, s in enumerate(slices):
            out[(..., *s)] += pred[j].to(out.device) * weight
            norm[(..., *s)] += weight
    out = out / norm  # every voxel lies in at least one window, so norm > 0

    # Crop the padding back off.
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, spatial))
    return out[(..., *crop)].contiguous()  # (B, K, D, H, W)


def flip_combinations(axes: Sequence[int] = (2, 3, 4)) -> list[tuple[int, ...]]:
    """All subsets of ``axes`` (identity first): 8 flips for the three spatial axes."""
    axes = tuple(axes)
    return [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]


@torch.no_grad()
def predict_volume(
    model: Predictor,
    image: Tensor,
    *,
    roi_size: Optional[RoiSize],
    overlap: float = 0.5,
    tta: bool = False,
    sw_batch_size: int = 1,
    blend: str = "gaussian",
    tta_axes: Sequence[int] = (2, 3, 4),
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Sigmoid probabilities (B, K, D, H, W) for a whole volume, optionally with flip TTA.

    With ``tta`` every subset of ``tta_axes`` (8 for the three spatial axes, identity included)
    is used: the input is flipped, predicted by sliding windows, the probabilities are flipped
    back to the original orientation, and all passes are averaged. The model should be in
    eval mode; ``autocast_dtype`` (e.g. torch.bfloat16) runs the network under autocast while
    blending stays float32. ``roi_size`` None: one window covering the volume.
    """
    if autocast_dtype is not None:
        device_type = image.device.type

        def predictor(x: Tensor):
            with torch.autocast(device_type=device_type, dtype=autocast_dtype):
                return model(x)

    else:
        predictor = model

    if any(a not in (2, 3, 4) for a in tta_axes):
        raise ValueError(f"tta_axes must be spatial axes among (2, 3, 4), got {tuple(tta_axes)}")
    flips = flip_combinations(tta_axes) if tta else [()]
    total = torch.zeros(0)
    for dims in flips:
        x = torch.flip(image, dims) if dims else image
        logits = sliding_window_inference(
            predictor, x, roi_size, overlap=overlap, sw_batch_size=sw_batch_size, blend=blend
        )
        prob = torch.sigmoid(logits)
        if dims:
            prob = torch.flip(prob, dims)  # back to the input's orientation before averaging
        total = prob if total.numel() == 0 else total + prob
    return total / len(flips)

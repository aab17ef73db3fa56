"""How a run computes on its device: precision (``run.amp``), layout (``run.channels_last``).

``run.amp`` = "auto" | "bf16" | "none".

bf16 autocast halves the memory traffic of every convolution, but only where the hardware does
bf16 arithmetic natively: CUDA GPUs that support it, and CPUs with AMX or AVX-512-BF16. On other
CPUs oneDNN *emulates* bf16 convolutions (convert, compute in fp32, convert back), many times
slower than fp32. "auto" therefore picks bf16 only where it is native; "bf16" and "none" force
either.

Every tool resolves the request once with :func:`resolve_amp` and prints :func:`describe`'s line.

``run.channels_last`` = None ("auto") | True | False. On the CPU, channels-last (NDHWC) tensors
let oneDNN run its brgemm convolutions without reordering and make dgseg's GroupNorm + ReLU node
pay off (``dgseg.layers``) on large feature maps, while on small ones the reorders cost more than
they save. The size rule picks it on the CPU when the first-level feature map (channels x voxels)
holds at least :data:`CHANNELS_LAST_MIN_VALUES` values; on CUDA it stays off (cuDNN is faster
contiguous).
Training and validation decide "auto" on the CPU by timing both layouts instead
(``dgseg.training.layout_probe``) and fall back on this rule where the probe is off.
"""

from __future__ import annotations

import functools
import platform
from contextlib import AbstractContextManager

import torch

__all__ = [
    "AMP_CHOICES",
    "autocast",
    "CHANNELS_LAST_MIN_VALUES",
    "cpu_has_native_bf16",
    "describe",
    "resolve_amp",
    "resolve_channels_last",
]

AMP_CHOICES = ("auto", "bf16", "none")  # "none" = float32 (TF32 matmuls/convs on CUDA)
CHANNELS_LAST_MIN_VALUES = 1 << 21  # 16 x 64³ = 4.2 M: faster; 8 x 32³ = 0.26 M: slower


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 convolutions natively (AMX, AVX-512-BF16, Arm BF16).

    x86: the AMX tile or AVX-512-BF16 instructions (``torch.cpu`` probes), and oneDNN willing to
    use bf16 (``_is_mkldnn_bf16_supported``; on x86 it is also True for plain AVX-512, which
    only emulates bf16 dot products). Elsewhere (aarch64): oneDNN's own bf16 check.
    """
    try:
        mkldnn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return mkldnn
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    found = [getattr(torch.cpu, name, None) for name in probes]
    if all(f is None for f in found):  # an older torch without the probes: trust oneDNN
        return mkldnn
    return mkldnn and any(bool(f()) for f in found if f is not None)


def resolve_amp(requested: str, device: torch.device | str) -> tuple[str, str]:
    """The precision to run in ("bf16" or "none") on ``device``, and why, in a few words.

    Args:
        requested: "auto" (bf16 where native, else fp32), "bf16" or "none" (float32).
        device: the compute device (only its type matters).

    Raises:
        ValueError: ``requested`` is not one of :data:`AMP_CHOICES`.
    """
    if requested not in AMP_CHOICES:
        raise ValueError(f"amp={requested!r} is not one of {AMP_CHOICES}")
    kind = torch.device(device).type
    if requested == "none":
        return "none", "requested (amp=none)"
    if requested == "bf16":
        slow = kind == "cpu" and not cpu_has_native_bf16()
        return "bf16", "requested (amp=bf16)" + (
            "; this CPU has no native bf16: oneDNN emulates it, expect many times fp32's time"
            if slow
            else ""
        )
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: CUDA GPU with bf16"
        return "none", "auto: this CUDA GPU has no bf16"
    if kind == "cpu":
        if cpu_has_native_bf16():
            return "bf16", "auto: CPU with native bf16 (AMX or AVX-512-BF16)"
        return "none", "auto: CPU without native bf16, oneDNN would emulate it"
    return "none", f"auto: no bf16 policy for device type {kind!r}"


def describe(amp: str, reason: str) -> str:
    """The one line every tool prints, e.g. ``precision: fp32 (auto: CPU without ...)``."""
    return f"precision: {'bf16 autocast' if amp == 'bf16' else 'fp32'} ({reason})"


def resolve_channels_last(
    requested: bool | None,
    device: torch.device | str,
    *,
    channels: int,
    spatial: tuple[int, ...] | list[int] | torch.Size,
) -> tuple[bool, str]:
    """Whether to run in channels-last-3d, and why.

    Args:
        requested: True / False forces it; None ("auto") decides by device and size.
        device: the compute device (only its type matters).
        channels: width of the network's first level (SegResNet ``init_filters``).
        spatial: (D, H, W) of the network input (a training patch or a sliding window).
    """
    if requested is not None:
        return bool(requested), "requested"
    if torch.device(device).type != "cpu":
        return False, "auto: contiguous off the CPU (cuDNN is faster contiguous)"
    values = channels
    for s in spatial:
        values *= int(s)
    if values >= CHANNELS_LAST_MIN_VALUES:
        return True, f"auto: CPU, first-level maps of {values / 1e6:.1f} M values"
    return False, f"auto: CPU, first-level maps of {values / 1e6:.2f} M values are too small"


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """bf16 autocast for ``amp`` "bf16" (or "auto" where bf16 is native), disabled otherwise."""
    resolved, _ = resolve_amp(amp, device)  # the capability probe is cached
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolved == "bf16")

"""``run.channels_last`` = "auto" on the CPU: time both memory layouts, keep the faster one.

Which layout is faster depends on the CPU, the precision and the map size: channels-last-3d wins
in float32 on AVX2 CPUs at 16 x 64³ (oneDNN's brgemm kernels, dgseg's GroupNorm + ReLU node),
while in bf16 on CPUs with native bf16 contiguous can win. So instead of a fixed rule, the first
run on a machine times forward + backward of its own segmenter at its own input shape in both
layouts (interleaved rounds under the run's autocast; the median over rounds of the per-round
ratio decides, since both steps of a round see about the same load from other processes), and
caches the timings as JSON under the user's cache folder, keyed by CPU, torch version and threads,
precision, network settings and shape. Later runs read them.

``DGSEG_LAYOUT_PROBE=0`` or ``run.layout_probe=false`` fall back to the size rule of
:func:`dgseg.training.precision.resolve_channels_last`; so do CUDA devices and runs of several
processes (whose ranks must agree). ``DGSEG_CACHE_DIR`` moves the cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from dgseg.atomic import atomic_write_json
from dgseg.config import Config
from dgseg.training.precision import resolve_amp, resolve_channels_last

__all__ = [
    "CACHE_NAME",
    "LAYOUTS",
    "cache_path",
    "choose_channels_last",
    "clear_memo",
    "probe_enabled",
    "channels_last_ratio",
    "time_layouts",
]

CACHE_NAME = "layout_probe.json"
LAYOUTS = ("contiguous", "channels-last")
_ROUNDS = 5  # timed rounds per layout, after one untimed warm-up step each
_MEMO: Dict[str, Tuple[bool, str]] = {}  # key -> answer: the engine asks on every step


def clear_memo() -> None:
    """Forget this process's answers (the cache file stays)."""
    _MEMO.clear()


def probe_enabled(cfg: Config) -> bool:
    """``run.layout_probe`` and ``DGSEG_LAYOUT_PROBE`` (0 / false / no / off disable it)."""
    env = os.environ.get("DGSEG_LAYOUT_PROBE", "").strip().lower()
    return bool(getattr(cfg.run, "layout_probe", True)) and env not in ("0", "false", "no", "off")


def cache_path() -> Path:
    """``$DGSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/dgseg``, else ``~/.cache/dgseg``; the JSON."""
    root = os.environ.get("DGSEG_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "dgseg") if xdg else str(Path.home() / ".cache" / "dgseg")
    return Path(root) / CACHE_NAME


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(cfg: Config, amp: str, spatial: Sequence[int]) -> str:
    """What the answer depends on: machine, torch, threads, precision, network, input shape."""
    parts = {
        "cpu": _cpu_name(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": amp,
        "in_channels": cfg.data.in_channels,
        "model": dataclasses.asdict(cfg.model),
        "shape": [int(s) for s in spatial],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: measure again
        return {}
    return data if isinstance(data, dict) else {}


def _segmenter_step(cfg: Config, spatial: Sequence[int], amp: str, channels_last: bool):
    """One forward + backward of the run's segmenter on random data, in one layout."""
    from dgseg.models import build_model, segmenter_of

    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = segmenter_of(build_model(cfg.data.in_channels, cfg.model)).to(memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.data.in_channels, *spatial, generator=g)
    x = x.contiguous(memory_format=fmt)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = net(x)
        out.float().square().mean().backward()
        net.zero_grad(set_to_none=True)

    return step


def time_layouts(
    steps: Dict[str, Callable[[], None]],
    *,
    rounds: int = _ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, List[float]]:
    """Seconds of each step in ``rounds`` interleaved rounds (after one warm-up call each)."""
    for step in steps.values():
        step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = clock()
            step()
            times[name].append(clock() - t0)
    return times


def channels_last_ratio(times: Dict[str, List[float]]) -> float:
    """Median over rounds of channels-last / contiguous seconds (< 1: channels-last faster)."""
    pairs = zip(times["channels-last"], times["contiguous"])
    return statistics.median(cl / max(cont, 1e-12) for cl, cont in pairs)


def _measure(cfg: Config, amp: str, spatial: Sequence[int]) -> Dict[str, List[float]]:
    # Validation may ask first, under no_grad; the run's random streams stay untouched.
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        steps = {
            name: _segmenter_step(cfg, spatial, amp, channels_last=name == "channels-last")
            for name in LAYOUTS
        }
        return time_layouts(steps)


def _describe(times: Dict[str, List[float]], amp: str, spatial: Sequence[int], how: str) -> str:
    shape = "x".join(str(int(s)) for s in spatial)
    prec = "bf16" if amp == "bf16" else "fp32"
    ms = ", ".join(f"{name} {statistics.median(times[name]) * 1e3:.0f} ms" for name in LAYOUTS)
    ratio = channels_last_ratio(times)
    return f"auto: {how} {prec} fwd+bwd at {shape}: {ms} (channels-last/contiguous {ratio:.2f})"


def _valid(times: object) -> bool:
    if not isinstance(times, dict) or set(times) != set(LAYOUTS):
        return False
    runs = [times[name] for name in LAYOUTS]
    return all(
        isinstance(r, list) and r and all(isinstance(t, (int, float)) for t in r) for r in runs
    )


def _several_processes() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def choose_channels_last(
    cfg: Config, device: torch.device | str, spatial: Sequence[int]
) -> Tuple[bool, str]:
    """Whether an input of ``spatial`` size runs channels-last-3d, and why (one short phrase).

    An explicit ``run.channels_last`` is obeyed. "auto" on the CPU measures once per machine and
    setting (see the module docstring); elsewhere, or with the probe off, the size rule decides.
    """
    m = cfg.model
    width = m.init_filters if m.arch == "segresnet" else m.unet_features[0]
    requested = cfg.run.channels_last
    device = torch.device(device)
    if requested is not None or device.type != "cpu" or not probe_enabled(cfg):
        return resolve_channels_last(requested, device, channels=width, spatial=tuple(spatial))
    if _several_processes():
        chosen, why = resolve_channels_last(None, device, channels=width, spatial=tuple(spatial))
        return chosen, why + " (several processes: no probe)"
    amp = resolve_amp(cfg.run.amp, device)[0]
    key = _key(cfg, amp, spatial)
    if key in _MEMO:
        return _MEMO[key]
    path = cache_path()
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and _valid(entry.get("rounds_s")):
        times, how = entry["rounds_s"], f"cached ({path.name})"
    else:
        times, how = _measure(cfg, amp, spatial), "measured"
        data = _read_cache(path)  # again: another run may have added an entry meanwhile
        data[key] = {
            "rounds_s": times,
            "precision": amp,
            "shape": [int(s) for s in spatial],
            "cpu": _cpu_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        try:
            atomic_write_json(path, data)
        except OSError:  # a read-only home: the answer still holds for this process
            how = "measured (not cached)"
    chosen = channels_last_ratio(times) < 1.0
    answer = (chosen, _describe(times, amp, spatial, how))
    _MEMO[key] = answer
    return answer

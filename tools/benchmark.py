"""Measure dgseg's hot paths against a baseline and against the hardware.

    python tools/benchmark.py [--device cpu|cuda] [--size 64] [--json out.json] [--sections ...]

Every figure is the median of ``--repeats`` timed runs after ``--warmup`` untimed ones. Results are
printed as a table and written as JSON together with the machine (CPU model, cores, GPU, torch).
Timings are wall-clock, so run on an otherwise idle machine and compare ratios taken in one run.

Sections:
  train      training step (fwd + bwd + AdamW) of UNet3D, SegResNet F16, SegResNet F16 + VFFC + GRL;
             fp32 vs bf16 autocast, contiguous vs channels-last-3d; peak memory; FLOPs and FLOP/s
  vffc       SegResNet+VFFC+GRL step / plain SegResNet step (goal <= 1.10)
  bezier     LUT Bezier transform vs np.interp over the densely sampled curve (goal >= 5x)
  sdg        ms per one-channel 128³ training sample of every SDG intensity augmentation
             (dgseg.transforms.sdg), on a synthetic T2 case with its label, each call a fresh draw
  data       shard loader vs NIfTI.gz (goal >= 10x); preparation vs bare decompression (<= 1.5x);
             shard storage options: size, write and read times (data_prep/bench.py measures)
  inference  sliding-window prediction of one 240x240x155 volume
  scaling    DDP with 1 vs 2 CPU processes (gloo), same global batch
  lesion     lesion-wise Dice/HD95/NSD of a synthetic 240x240x155 case, 3 regions, 1 thread
             (goal <= 2 s per case and rule set), beside the per-case metrics
  adapt      seconds per case of each test-time adaptation (--adapt of tools/evaluate.py) and
             of the gradient map, CPU, 1 thread, fp32, CPU-recipe SegResNet, --adapt-size³

``--peer monai`` adds MONAI's SegResNet (same widths, GroupNorm, input; MONAI imported only here)
timed interleaved with dgseg's SegResNet: MONAI fp32, dgseg with PyTorch's plain kernels, and
dgseg's default (resolved ``amp``, the layout "auto" takes, dgseg's kernel paths and optimizer).
Where bf16 is the resolved precision (native bf16) it adds MONAI bf16, dgseg fp32 with its own
defaults, dgseg's default with MONAI's optimizer (PyTorch's AdamW) and dgseg bf16 in the other
layout. Ratios are to MONAI fp32 and to MONAI bf16, of the medians and per round.
``--sections`` may be empty (``--sections --peer monai``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from data_prep import bench as data_bench
from data_prep.loading import LoadedCase
from data_prep.preprocess import preprocess_case
from data_prep.synthetic import make_case
from dgseg.atomic import atomic_write_text
from dgseg.cli_checks import ArgumentFault, check_at_least, check_output_file
from dgseg.config import Config, OptimConfig, apply_overrides
from dgseg.evaluation.lesion_metrics import LESION_RULES, lesion_region_metrics
from dgseg.evaluation.metrics import region_metrics
from dgseg.inference.adaptation import ADAPT_METHODS, AdaptSettings, CasePredictor
from dgseg.inference.sliding_window import predict_volume, sliding_window_inference
from dgseg.layers import dann_lambda
from dgseg.layers.conv import native_conv3d
from dgseg.models import SegResNet, build_model, from_monai_state_dict
from dgseg.presets import CPU_RECIPE
from dgseg.training.engine import channels_last_choice
from dgseg.training.losses import SegLoss
from dgseg.training.optim import build_optimizer, fused_supported
from dgseg.training.precision import AMP_CHOICES, cpu_has_native_bf16, describe, resolve_amp
from dgseg.transforms.bezier import apply_lut, bezier_lut
from dgseg.transforms.gradient_map import gradient_map
from dgseg.transforms.sdg import INTENSITY_AUGS, intensity_augment

SECTIONS = ("train", "vffc", "bezier", "sdg", "data", "inference", "scaling", "lesion", "adapt")

# (label, build_model keywords): the three networks of the write-up's tables.
MODELS = {
    "unet3d": dict(arch="unet3d"),
    "segresnet": dict(arch="segresnet", init_filters=16),
    "segresnet_vffc_grl": dict(arch="segresnet", init_filters=16, vffc=True, grl=True),
}


# ----------------------------------------------------------------------------- machine & timing
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> dict:
    """Median / min / max seconds of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM).
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- training step
def make_step(
    name: str, device: torch.device, size: int, batch: int, *, amp: bool, channels_last: bool
) -> Callable[[], None]:
    """One optimizer step of the named network on random data (labels from a threshold)."""
    kwargs = MODELS[name]
    grl = kwargs.get("grl", False)
    model = build_model(1, **kwargs).to(device)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    fused = fused_supported(device)
    opt = build_optimizer(model.parameters(), OptimConfig(), fused=fused)  # training's AdamW
    loss_fn = SegLoss()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, size, generator=g).to(device)
    x = x.contiguous(memory_format=memory_format)
    y = (torch.randn(batch, 3, size, size, size, generator=g) > 0.5).float().to(device)
    dom = torch.randint(0, 3, (batch,), generator=g).to(device)
    lam = dann_lambda(0.5)

    def step() -> None:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
        with ctx:
            if grl:
                seg, dlogits = model(x, grl_lambda=lam)
            else:
                seg, dlogits = model(x), None
        loss = loss_fn(seg, y)
        if dlogits is not None:
            loss = loss + torch.nn.functional.cross_entropy(dlogits.float(), dom)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def count_step_flops(name: str, size: int, batch: int, device: torch.device) -> int | None:
    """FLOPs of one forward + backward in fp32, counted with FlopCounterMode."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    model = build_model(1, **MODELS[name]).to(device)
    x = torch.randn(batch, 1, size, size, size, device=device)
    kwargs = {"grl_lambda": 0.5} if MODELS[name].get("grl") else {}
    with FlopCounterMode(display=False) as counter:
        out = model(x, **kwargs)
        seg = out[0] if isinstance(out, tuple) else out
        loss = seg.float().mean() + (out[1].float().mean() if isinstance(out, tuple) else 0)
        loss.backward()
    return int(counter.get_total_flops())


def bench_train(args, device: torch.device) -> list[dict]:
    rows = []
    size = args.size
    # bf16 rows only where it is the chosen precision: emulated bf16 (a CPU without native
    # bf16) is many times slower than fp32 and would dominate the run for no information.
    precisions = (False, True) if args.amp == "bf16" else (False,)
    variants = [(amp, cl) for cl in (False, True) for amp in precisions]
    for name in args.models:
        flops = count_step_flops(name, size, args.batch, device) if args.flops else None
        for amp, cl in variants:
            if args.quick and cl:
                continue
            reset_peak_memory(device)
            step = make_step(name, device, size, args.batch, amp=amp, channels_last=cl)
            t = time_fn(step, device, warmup=args.warmup, repeats=args.repeats)
            row = {
                "section": "train",
                "model": name,
                "size": size,
                "batch": args.batch,
                "precision": "bf16" if amp else "fp32",
                "memory_format": "channels_last_3d" if cl else "contiguous",
                **t,
                "samples_per_s": args.batch / t["median_s"],
                "peak_mem_mib": peak_memory_mib(device),
                "flops_per_step": flops,
                "achieved_tflops": (flops / t["median_s"] / 1e12) if flops else None,
            }
            rows.append(row)
            print(
                f"  train {name:20s} {row['precision']:4s} {row['memory_format']:16s} "
                f"{t['median_s'] * 1e3:9.1f} ms  {row['samples_per_s']:7.2f} samples/s  "
                f"peak {row['peak_mem_mib'] or 0:8.0f} MiB",
                flush=True,
            )
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def bench_vffc(train_rows: list[dict]) -> list[dict]:
    """VFFC+GRL overhead from the training rows, per precision / memory format."""
    out = []
    by_key = {(r["model"], r["precision"], r["memory_format"]): r for r in train_rows}
    for (model, prec, fmt), r in by_key.items():
        if model != "segresnet_vffc_grl":
            continue
        base = by_key.get(("segresnet", prec, fmt))
        if base:
            ratio = r["median_s"] / base["median_s"]
            out.append(
                {
                    "section": "vffc",
                    "precision": prec,
                    "memory_format": fmt,
                    "overhead_ratio": ratio,
                    "goal": 1.10,
                    "goal_met": ratio <= 1.10,
                }
            )
            print(f"  vffc overhead {prec} {fmt}: {ratio:.3f} (goal <= 1.10)")
    return out


# ----------------------------------------------------------------------------- peer (MONAI)
def _peer_step(
    net: torch.nn.Module,
    device: torch.device,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    amp: bool,
    channels_last: bool,
    native: bool,
    dgseg_optimizer: bool = False,
) -> Callable[[], None]:
    """One step; MONAI and "plain" variants use ``torch.optim.AdamW`` as its users would (fused
    only on CUDA), ``dgseg_optimizer`` the training runs' (fused where supported)."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = net.to(device).to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    if dgseg_optimizer:
        opt = build_optimizer(net.parameters(), OptimConfig(), fused=fused_supported(device))
    else:
        opt = torch.optim.AdamW(
            net.parameters(), lr=1e-4, weight_decay=1e-5, fused=device.type == "cuda"
        )
    loss_fn = SegLoss()

    def step() -> None:
        with native_conv3d() if native else nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                seg = net(x)
            loss = loss_fn(seg, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step


def bench_peer(args, device: torch.device) -> list[dict]:
    """dgseg vs MONAI's SegResNet (same widths, GroupNorm, input), timed interleaved.

    Each round runs one step of every variant in turn, so that a busy machine slows all of them
    alike; the ratios are of the per-variant medians over the rounds.
    """
    try:
        from monai.networks.nets import SegResNet as MonaiSegResNet
    except ImportError:
        raise RuntimeError(
            "--peer monai needs MONAI (pip install monai); it is not a dgseg "
            "dependency and is imported only here"
        ) from None

    size, batch = args.size, args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, size, generator=g).to(device)
    y = (torch.randn(batch, 3, size, size, size, generator=g) > 0.5).float().to(device)

    def monai_net() -> torch.nn.Module:
        torch.manual_seed(0)
        return MonaiSegResNet(spatial_dims=3, init_filters=16, in_channels=1, out_channels=3)

    def dgseg_net() -> torch.nn.Module:  # MONAI's initial weights: the same function
        net = SegResNet(1, 3, init_filters=16)
        net.load_state_dict(from_monai_state_dict(monai_net().state_dict()))
        return net

    # Same network: identical outputs from identical weights (float32 rounding aside).
    with torch.no_grad():
        xs = torch.randn(1, 1, 32, 32, 32, generator=g)
        diff = (monai_net().eval()(xs) - dgseg_net().eval()(xs)).abs().max().item()
    bf16 = args.amp == "bf16"
    spatial = (size, size, size)
    layouts = {}  # precision -> (channels-last?, why): dgseg's "auto", as a training run decides
    for amp in ("none", "bf16") if bf16 else ("none",):
        cfg = apply_overrides(Config(), [f"run.amp={amp}", "model.init_filters=16"])
        layouts[amp] = channels_last_choice(cfg, device, spatial)
        print(f"  peer: dgseg {amp} layout: {layouts[amp][1]}", flush=True)
    cl32, cl = layouts["none"][0], layouts["bf16" if bf16 else "none"][0]

    ours = dict(dgseg_optimizer=True)  # dgseg's variants: training's optimizer

    def fmt(channels_last: bool) -> str:
        return "channels_last_3d" if channels_last else "contiguous"

    variants = {  # name -> (step, precision, layout)
        "monai_fp32": (
            _peer_step(monai_net(), device, x, y, amp=False, channels_last=False, native=True),
            "fp32",
            "contiguous",
        ),
        "dgseg_plain_fp32": (
            _peer_step(dgseg_net(), device, x, y, amp=False, channels_last=False, native=True),
            "fp32",
            "contiguous",
        ),
        "dgseg_default": (
            _peer_step(dgseg_net(), device, x, y, amp=bf16, channels_last=cl, native=False, **ours),
            "bf16" if bf16 else "fp32",
            fmt(cl),
        ),
    }
    if bf16:
        # The fair comparison on a CPU with native bf16: MONAI in bf16 too; and dgseg in fp32
        # (its kernel paths, its fp32 layout), with PyTorch's default AdamW (the network's share
        # of the difference) and in the bf16 layout "auto" did not take.
        variants["monai_bf16"] = (
            _peer_step(monai_net(), device, x, y, amp=True, channels_last=False, native=True),
            "bf16",
            "contiguous",
        )
        variants["dgseg_fp32"] = (
            _peer_step(
                dgseg_net(), device, x, y, amp=False, channels_last=cl32, native=False, **ours
            ),
            "fp32",
            fmt(cl32),
        )
        variants["dgseg_default_torch_adamw"] = (  # the network alone: MONAI's optimizer
            _peer_step(dgseg_net(), device, x, y, amp=True, channels_last=cl, native=False),
            "bf16",
            fmt(cl),
        )
        variants["dgseg_bf16_other_layout"] = (
            _peer_step(
                dgseg_net(), device, x, y, amp=True, channels_last=not cl, native=False, **ours
            ),
            "bf16",
            fmt(not cl),
        )
    for step, _, _ in variants.values():
        for _ in range(args.warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    for _ in range(args.repeats):
        for name, (step, _, _) in variants.items():
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["monai_fp32"])
    ref16 = statistics.median(times["monai_bf16"]) if "monai_bf16" in times else None
    rows = []
    for name, (_, precision, layout) in variants.items():
        med = statistics.median(times[name])
        # Per-round ratios: each round ran every variant back to back under the same load.
        per_round = [t / r for t, r in zip(times[name], times["monai_fp32"])]
        row = {
            "section": "peer",
            "variant": name,
            "size": size,
            "batch": batch,
            "precision": precision,
            "memory_format": layout,
            "median_s": med,
            "min_s": min(times[name]),
            "max_s": max(times[name]),
            "times_s": times[name],
            "ratio_to_monai_fp32": med / ref,
            "ratio_to_monai_fp32_median_of_rounds": statistics.median(per_round),
        }
        extra = ""
        if ref16 is not None:
            row["ratio_to_monai_bf16"] = med / ref16
            row["ratio_to_monai_bf16_median_of_rounds"] = statistics.median(
                t / r for t, r in zip(times[name], times["monai_bf16"])
            )
            extra = f", x{row['ratio_to_monai_bf16']:.2f} of MONAI bf16"
        rows.append(row)
        print(
            f"  peer {name:24s} {precision:4s} {layout:16s} {med * 1e3:9.1f} ms "
            f"(min {row['min_s'] * 1e3:.1f})  x{row['ratio_to_monai_fp32']:.2f} of MONAI fp32"
            + extra
        )
    rows.append(
        {
            "section": "peer_check",
            "max_abs_output_diff_same_weights": diff,
            "monai": __import__("monai").__version__,
            "rounds": args.repeats,
            "loadavg_before": load,
            "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "dgseg_auto_layout": {amp: why for amp, (_, why) in layouts.items()},
        }
    )
    print(
        f"  peer: same weights give outputs equal to {diff:.1e}; "
        f"load average {load} -> {rows[-1]['loadavg_after']}"
    )
    return rows


# ----------------------------------------------------------------------------- Bezier
def _bezier_lut_path(x: torch.Tensor, v: torch.Tensor, device: torch.device) -> torch.Tensor:
    return apply_lut(x, bezier_lut(v).to(device))


def bench_bezier(args, device: torch.device) -> list[dict]:

    n = 128
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, n, n, generator=g) * 2 - 1
    # The original code's way: sample the curve densely, np.interp every voxel through it.
    t = np.linspace(0.0, 1.0, 100_000)
    v = 0.3
    pts = np.array([[-1, -1], [-v, v], [v, -v], [1, 1]], dtype=np.float64)
    bern = np.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3])
    xs, ys = np.sort(bern.T @ pts[:, 0]), np.sort(bern.T @ pts[:, 1])
    xn = x.numpy()
    base = time_fn(
        lambda: np.interp(xn, xs, ys), torch.device("cpu"), warmup=1, repeats=args.repeats
    )
    rows = []
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    for dev in devices:
        # The curve is built once per sample, as in training.
        lut_path = partial(_bezier_lut_path, x.to(dev), v, dev)
        t_lut = time_fn(lut_path, dev, warmup=2, repeats=args.repeats)
        speedup = base["median_s"] / t_lut["median_s"]
        rows.append(
            {
                "section": "bezier",
                "device": str(dev),
                "voxels": n**3,
                "np_interp_s": base["median_s"],
                "lut_s": t_lut["median_s"],
                "lut_voxels_per_s": n**3 / t_lut["median_s"],
                "np_interp_voxels_per_s": n**3 / base["median_s"],
                "speedup": speedup,
                "goal": 5.0,
                "goal_met": speedup >= 5.0,
            }
        )
        print(
            f"  bezier {dev}: LUT {t_lut['median_s'] * 1e3:.1f} ms vs np.interp "
            f"{base['median_s'] * 1e3:.1f} ms -> {speedup:.1f}x (goal >= 5x)"
        )
    return rows


class _FreshDraws:
    """``intensity_augment(name, ...)`` with a new generator seed on every call."""

    def __init__(self, name: str, image: torch.Tensor, label: torch.Tensor):
        self.name, self.image, self.label, self.calls = name, image, label, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        g = torch.Generator(device=self.image.device).manual_seed(self.calls)
        return intensity_augment(self.name, self.image, self.label, g)


def _t2_sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample as the shards hold it: a synthetic case's T2 through the preprocessing (brain
    box, z-score, crop/pad to n³; the brain ~40 % of it): image (1, n, n, n), label (n, n, n)."""
    images, seg = make_case(tuple(round(n * f) for f in (1.375, 1.375, 1.125)), seed=0)
    raw = LoadedCase(
        case_id="bench",
        images=images["t2"][None],  # (1, X, Y, Z)
        label=seg,
        affine=np.eye(4),
        spacing=(1.0, 1.0, 1.0),
        source_sha256={},
        modalities=("t2",),
    )
    prepared = preprocess_case(raw, n)
    return torch.from_numpy(prepared.images), torch.from_numpy(prepared.label)


def bench_sdg(args, device: torch.device) -> list[dict]:
    # location-scale and re-synthesis read the label too
    image_cpu, label_cpu = _t2_sample(args.sdg_size)
    rows = []
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    for dev in devices:
        image, label = image_cpu.to(dev), label_cpu.to(dev)
        for name in INTENSITY_AUGS:
            if name == "none":
                continue
            t = time_fn(_FreshDraws(name, image, label), dev, warmup=1, repeats=args.repeats)
            rows.append(
                {
                    "section": "sdg",
                    "device": str(dev),
                    "threads": torch.get_num_threads(),
                    "augmentation": name,
                    "voxels": image.numel(),
                    "brain_fraction": float((image != 0).float().mean()),
                    "median_ms": t["median_s"] * 1e3,
                    "min_ms": t["min_s"] * 1e3,
                    "max_ms": t["max_s"] * 1e3,
                }
            )
            print(
                f"  sdg {dev} {name:15s} {t['median_s'] * 1e3:8.1f} ms "
                f"(min {t['min_s'] * 1e3:.1f}, max {t['max_s'] * 1e3:.1f}; "
                f"{args.repeats} draws)"
            )
    return rows


# ----------------------------------------------------------------------------- adapt
def bench_adapt(args, device: torch.device) -> list[dict]:
    """Seconds per case of each test-time adaptation (dgseg.inference.adaptation) on CPU, one
    thread, fp32: the CPU-recipe SegResNet (8 filters, one block per level, untrained) on a
    --adapt-size³ synthetic T2, whole volume in one window; the gradient map alone beside it.
    The source statistics are the case's own (the timing does not depend on their values)."""
    threads, reps = torch.get_num_threads(), min(args.repeats, 3)
    torch.set_num_threads(1)
    try:
        image, label = _t2_sample(args.adapt_size)
        x = image[None]  # (1, 1, n, n, n)
        brain = image[0] != 0
        levels = torch.linspace(0, 1, 101, dtype=torch.float64)
        stats = {
            "region_prior": [float((label[brain] > 0).double().mean())] * 3,
            "quantile_levels": levels.tolist(),
            "quantiles": [torch.quantile(image[0][brain].double(), levels).tolist()],
        }
        rows = []
        t = time_fn(lambda: gradient_map(image), torch.device("cpu"), warmup=1, repeats=reps)
        rows.append({"section": "adapt", "method": "gradient_map", "steps": 0, **_secs(t, x)})
        print(f"  adapt gradient map {t['median_s']:.2f} s")
        for repr_ in ("intensity", "gradient"):
            cfg = apply_overrides(
                Config(), [*CPU_RECIPE, f"data.input_repr={repr_}", "run.amp=none"]
            )
            net = build_model(cfg.data.in_channels, cfg.model).eval()
            predict = partial(predict_volume, roi_size=None)
            for method in ADAPT_METHODS:
                settings = AdaptSettings(method)
                case = CasePredictor(net, cfg.data, settings, stats)
                run = partial(case, x, predict)
                t = time_fn(run, torch.device("cpu"), warmup=1, repeats=reps)
                steps = settings.resolved()[0]
                rows.append(
                    {"section": "adapt", "input_repr": repr_, "method": method, "steps": steps}
                    | _secs(t, x)
                )
                print(f"  adapt {repr_:9s} {method:11s} {t['median_s']:6.2f} s per case")
        return rows
    finally:
        torch.set_num_threads(threads)


def _secs(t: dict, x: torch.Tensor) -> dict:
    return {
        "device": "cpu",
        "threads": 1,
        "voxels": x[0, 0].numel(),
        "median_s": t["median_s"],
        "min_s": t["min_s"],
        "max_s": t["max_s"],
    }


# ----------------------------------------------------------------------------- data
def bench_data(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        r = data_bench.bench_loader(Path(tmp), n_cases=args.data_cases)
        r["section"] = "data_loader"
        rows.append(r)
        print(f"  data loader: {json.dumps(r)}")
    with tempfile.TemporaryDirectory() as tmp:
        r = data_bench.bench_prepare(Path(tmp), n_cases=args.data_cases)
        r["section"] = "data_prepare"
        rows.append(r)
        print(f"  data prepare: {json.dumps(r)}")
    with tempfile.TemporaryDirectory() as tmp:
        r = data_bench.bench_storage(Path(tmp), n_cases=args.data_cases)
        r["section"] = "data_storage"
        rows.append(r)
        print(f"  data storage: {json.dumps(r)}")
    return rows


# ----------------------------------------------------------------------------- inference
def bench_inference(args, device: torch.device) -> list[dict]:
    model = build_model(1, arch="segresnet", init_filters=16).to(device).eval()
    roi = args.roi
    x = torch.randn(1, 1, 240, 240, 155, device=device)
    amp = args.amp == "bf16"

    @torch.no_grad()
    def run() -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
        with ctx:
            return sliding_window_inference(model, x, roi, overlap=0.5, sw_batch_size=2)

    t = time_fn(run, device, warmup=1, repeats=max(1, args.repeats // 2))
    row = {
        "section": "inference",
        "volume": [240, 240, 155],
        "roi": roi,
        "overlap": 0.5,
        "precision": "bf16" if amp else "fp32",
        **t,
    }
    print(f"  inference 240x240x155 roi {roi}: {t['median_s']:.2f} s")
    return [row]


# ----------------------------------------------------------------------------- scaling
def _ddp_worker(
    rank: int, world: int, size: int, global_batch: int, steps: int, port: int, queue, amp: bool
) -> None:

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = DDP(build_model(1, arch="segresnet", init_filters=16))
    opt = build_optimizer(model.parameters(), OptimConfig(weight_decay=0.0))
    loss_fn = SegLoss()
    b = global_batch // world
    x = torch.randn(b, 1, size, size, size)
    y = (torch.randn(b, 3, size, size, size) > 0.5).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            seg = model(x)
        loss = loss_fn(seg, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    if rank == 0:
        queue.put((time.perf_counter() - t0) / steps)
    dist.destroy_process_group()


def bench_scaling(args) -> list[dict]:

    rows = []
    size, global_batch, steps = min(args.size, 48), 2, max(2, args.repeats)
    per_step = {}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.start_processes(
            _ddp_worker,
            args=(world, size, global_batch, steps, port, queue, args.amp == "bf16"),
            nprocs=world,
            start_method="spawn",
        )
        per_step[world] = queue.get()
        print(
            f"  scaling: {world} process(es), global batch {global_batch}, {size}^3: "
            f"{per_step[world] * 1e3:.0f} ms/step"
        )
    rows.append(
        {
            "section": "scaling",
            "size": size,
            "global_batch": global_batch,
            "step_s_1proc": per_step[1],
            "step_s_2proc": per_step[2],
            "speedup_2proc": per_step[1] / per_step[2],
        }
    )
    return rows


# ----------------------------------------------------------------------------- main
# ----------------------------------------------------------------------------- lesion
def _lesion_case(noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(truth, pred) (3, 240, 240, 155) WT/TC/ET: a tumour with a necrotic core and two satellites;
    the prediction is shifted by (2, -3, 1) voxels, misses one satellite, adds five small false
    positives and, with ``noise`` > 0, that fraction of speckle voxels in WT."""
    z, y, x = np.ogrid[:240, :240, :155]

    def ell(c, r):
        return ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1

    wt = ell((120, 110, 70), (45, 40, 35)) | ell((60, 170, 40), (8, 7, 6))
    wt |= ell((180, 60, 100), (5, 5, 4))
    tc = ell((118, 112, 72), (25, 22, 20))
    et = tc & ~ell((118, 112, 72), (18, 16, 14))
    truth = np.stack([wt, tc, et])  # (3, 240, 240, 155)
    pred = np.roll(truth, (2, -3, 1), axis=(1, 2, 3))
    pred[0] &= ~ell((180, 60, 100), (7, 7, 6))  # the small satellite is missed
    for k in range(5):  # false-positive blobs in every region
        pred[:, 20 + 40 * k : 23 + 40 * k, 20:23, 130:133] = True
    if noise > 0:
        pred[0] |= np.random.default_rng(0).random(wt.shape) < noise
    return truth, pred


def bench_lesion(args) -> list[dict]:

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the metrics are NumPy; one thread as in one metric worker
    rows = []
    try:
        for noise in (0.0, 0.0005):
            truth, pred = _lesion_case(noise)
            t = time_fn(
                lambda p=pred, g=truth: region_metrics(p, g),
                torch.device("cpu"),
                warmup=0,
                repeats=args.repeats,
            )
            rows.append({"section": "lesion", "metrics": "case", "speckle": noise, **t})
            print(f"  {'case':10s} speckle {noise:g}: {t['median_s']:.2f} s")
            for name in LESION_RULES:
                t = time_fn(
                    lambda p=pred, g=truth, n=name: lesion_region_metrics(p, g, rules=n),
                    torch.device("cpu"),
                    warmup=0,
                    repeats=args.repeats,
                )
                rows.append(
                    {
                        "section": "lesion",
                        "metrics": "lesion",
                        "rules": name,
                        "speckle": noise,
                        "volume": [240, 240, 155],
                        "regions": 3,
                        "goal_s": 2.0,
                        "meets_goal": t["median_s"] <= 2.0,
                        **t,
                    }
                )
                print(f"  {name:10s} speckle {noise:g}: {t['median_s']:.2f} s (goal <= 2 s)")
    finally:
        torch.set_num_threads(threads)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="cube edge for the training step (default 64 on CPU, 128 on CUDA)",
    )
    p.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 2 on CUDA")
    p.add_argument("--roi", type=int, default=128, help="sliding-window ROI for inference")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: PyTorch's, one per core)",
    )
    p.add_argument("--sdg-size", type=int, default=128, help="sample side of the sdg section")
    p.add_argument("--adapt-size", type=int, default=128, help="volume side of the adapt section")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sections", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(MODELS),
        help="networks for the training-step section",
    )
    p.add_argument("--data-cases", type=int, default=4)
    p.add_argument("--no-flops", dest="flops", action="store_false")
    p.add_argument("--quick", action="store_true", help="skip channels-last variants")
    p.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="bf16 rows and bf16 inference: auto = where the device has native bf16",
    )
    p.add_argument(
        "--peer",
        choices=("monai",),
        default=None,
        help="also time MONAI's SegResNet against dgseg's, interleaved in this process "
        "(MONAI must be installed; it is not a dgseg dependency)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    try:  # before any measurement: a run is never lost to a bad option or --json path
        for name, value, low in (
            ("--threads", args.threads, 1),
            ("--size", args.size, 1),
            ("--batch", args.batch, 1),
            ("--roi", args.roi, 1),
            ("--sdg-size", args.sdg_size, 1),
            ("--repeats", args.repeats, 1),
            ("--warmup", args.warmup, 0),
            ("--data-cases", args.data_cases, 1),
        ):
            if value is not None:
                check_at_least(name, value, low)
        if args.json is not None:
            check_output_file("--json", args.json)
    except ArgumentFault as e:
        p.error(str(e))
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.size = args.size or (128 if device.type == "cuda" else 64)
    args.batch = args.batch or (2 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.amp, why = resolve_amp(args.amp, device)
    print(describe(args.amp, why))

    recorded = {k: (v.name if isinstance(v, Path) else str(v)) for k, v in vars(args).items()}
    result = {"machine": machine_info(device), "args": recorded, "results": []}
    print(f"dgseg benchmark on {result['machine']}")
    sections = set(args.sections)
    train_rows: list[dict] = []
    if "train" in sections or "vffc" in sections:
        print("[train]")
        train_rows = bench_train(args, device)
        result["results"] += train_rows
        result["results"] += bench_vffc(train_rows)
    if args.peer == "monai":
        print("[peer]")
        result["results"] += bench_peer(args, device)
    for name, fn in (
        ("bezier", lambda: bench_bezier(args, device)),
        ("sdg", lambda: bench_sdg(args, device)),
        ("data", lambda: bench_data(args)),
        ("inference", lambda: bench_inference(args, device)),
        ("scaling", lambda: bench_scaling(args)),
        ("lesion", lambda: bench_lesion(args)),
        ("adapt", lambda: bench_adapt(args, device)),
    ):
        if name in sections:
            if name == "scaling" and device.type == "cuda":
                continue  # the scaling figure is the CPU/gloo one
            print(f"[{name}]")
            try:
                result["results"] += fn()
            except Exception as exc:  # a failing section must not lose the others' numbers
                print(f"  {name} failed: {type(exc).__name__}: {exc}")
                result["results"].append({"section": name, "error": f"{type(exc).__name__}: {exc}"})
    if args.json:
        try:
            atomic_write_text(args.json, json.dumps(result, indent=2))
        except OSError as e:  # the numbers are still on the screen above
            print(f"error: --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

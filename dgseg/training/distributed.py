"""Process-group setup for data-parallel training (raw ``torch.distributed`` + DDP).

One process per device, launched by ``torchrun`` (which sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) or as a plain ``python`` process (world size 1, no process group).
The backend follows the device: NCCL for CUDA, gloo for CPU. All distributed state lives in one
frozen :class:`DistState`; only the process with ``is_main`` writes files or prints.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DEVICES",
    "DistState",
    "init_distributed",
    "cleanup",
    "all_reduce_sum",
    "all_reduce_min",
    "all_gather_objects",
    "barrier",
    "wrap_ddp",
]


DEVICES = ("auto", "cpu", "cuda")  # "auto": CUDA when available (RunConfig.device reads this)


@dataclass(frozen=True)
class DistState:
    """Where this process sits in the job."""

    rank: int  # global rank
    local_rank: int  # rank on this node (selects the GPU)
    world_size: int  # number of processes
    device: torch.device  # this process's compute device
    is_main: bool  # global rank 0: the only process that logs and writes


def launch_command(nproc: int) -> List[str]:
    """The command that starts a training script with ``nproc`` processes on this machine:
    the current Python for one, ``torchrun --standalone`` (as ``python -m torch.distributed.run``,
    so the same interpreter runs every rank) for more."""
    if nproc == 1:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistState:
    """Join the process group described by torchrun's environment, if any.

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda".
        timeout_s: collective timeout; a stuck peer fails the job after this long.

    Returns:
        The frozen :class:`DistState` of this process. Without torchrun's variables (or with
        WORLD_SIZE=1) no process group is created and collectives become no-ops.
    """
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not one of {DEVICES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch.cuda.is_available() is False")
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before NCCL init: one GPU per process
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs: dict[str, Any] = dict(backend=backend, timeout=timedelta(seconds=timeout_s))
        if use_cuda:
            kwargs["device_id"] = dev  # binds the communicator eagerly to this GPU
        tdist.init_process_group(**kwargs)
        rank, world_size = tdist.get_rank(), tdist.get_world_size()
    return DistState(rank, local_rank, world_size, dev, is_main=rank == 0)


def cleanup() -> None:
    """Destroy the process group if one was created (safe to call always)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (a new tensor; ``t`` itself when single-process)."""
    if not _active():
        return t
    out = t.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of ``t`` over all ranks."""
    if not _active():
        return t
    out = t.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.MIN)
    return out


def all_gather_objects(obj: Any) -> List[Any]:
    """Picklable ``obj`` from every rank, indexed by rank (``[obj]`` when single-process)."""
    if not _active():
        return [obj]
    out: List[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        tdist.barrier()


def wrap_ddp(model: nn.Module, state: DistState) -> nn.Module:
    """DDP-wrap ``model`` when there is more than one process, else return it unchanged.

    ``find_unused_parameters`` stays off: the training step always runs the domain head and
    weights its loss instead of skipping it, so every parameter gets a gradient every step.
    """
    if state.world_size <= 1:
        return model
    device_ids = [state.device.index] if state.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

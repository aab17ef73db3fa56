"""Atomic training checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint is a plain dict: ``model`` (state dict of the unwrapped module: no ``module.`` from
DDP, no ``_orig_mod.`` from ``torch.compile``), ``optimizer``, ``scheduler``, ``epoch`` (epochs
completed), ``step`` (optimizer steps completed), ``best_metric``, ``config`` (plain dict) and
``rng`` (one entry per rank: torch CPU, CUDA, numpy and Python ``random`` states stored as tensors,
ints and floats only, so that the safe unpickler accepts them). The file is written to a
temporary name in the same folder and moved into place with ``os.replace``, so a crash while
saving never leaves a truncated ``last.pt``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np
import torch
from torch import nn

from dgseg.atomic import atomic_path
from dgseg.config import Config
from dgseg.models import build_model, segmenter_of

__all__ = [
    "training_state",
    "check_resume",
    "save_checkpoint",
    "load_checkpoint",
    "load_segmenter",
    "unwrap_model",
    "capture_rng_state",
    "restore_rng_state",
]

PathLike = Union[str, "os.PathLike[str]"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under ``torch.compile`` and/or DDP wrappers (any nesting order)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def training_state(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: Config,
    *,
    epoch: int,
    step: int,
    best_metric: float,
    rng: List[Dict[str, Any]],
) -> Dict[str, Any]:
    """The checkpoint dict of a training run (module docstring); ``rng``: one entry per rank."""
    return {
        "model": unwrap_model(net).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "best_metric": best_metric,
        "config": cfg.to_dict(),
        "rng": rng,
        "world_size": len(rng),
    }


# Fields the saved optimizer / scheduler state already encodes: changing them on --resume would
# be silently ignored (lr) or bend the cosine and λ schedules (its length would no longer match).
_FIXED_ON_RESUME = ("name", "amsgrad", "epochs", "lr", "min_lr", "schedule", "schedule_interval")


def check_resume(ckpt: Dict[str, Any], cfg: Config, steps_per_epoch: int) -> None:
    """Refuse a resume whose LR / λ schedule would differ from the one the checkpoint follows.

    Raises:
        ValueError: a changed optimizer or schedule field, or another number of steps per epoch.
    """
    saved = Config.from_dict(ckpt["config"]).optim
    changed = [
        f"optim.{k} {getattr(saved, k)} -> {getattr(cfg.optim, k)}"
        for k in _FIXED_ON_RESUME
        if getattr(saved, k) != getattr(cfg.optim, k)
    ]
    if changed:
        raise ValueError(
            f"--resume cannot change {', '.join(changed)}: the optimizer and schedules "
            "were built for the saved values; start a new run (another run.name) instead"
        )
    epoch, step = ckpt["epoch"], ckpt["step"]
    if epoch > 0 and step != epoch * steps_per_epoch:
        raise ValueError(
            f"the checkpoint took {step // epoch} steps per epoch, this launch takes "
            f"{steps_per_epoch} (another process count x batch size, or other data): λ and the "
            "learning rate would jump; resume with the same global batch and data"
        )


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, then os.replace)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # fsync + os.replace on success
        torch.save(state, f)


def load_checkpoint(
    path: PathLike, map_location: Union[str, torch.device] = "cpu"
) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with the safe unpickler.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file: truncated or corrupt, refused by the safe unpickler
            (objects other than tensors and plain containers), or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def load_segmenter(
    path: PathLike, device: Union[str, torch.device] = "cpu"
) -> Tuple[nn.Module, Any]:
    """The segmentation network of a training checkpoint (eval mode) and its ``Config``.

    The network is rebuilt from the checkpoint's own config. A domain-adversarial model predicts
    with its segmenter; the domain head plays no part in prediction and is dropped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file: unreadable, not a dgseg checkpoint, an invalid
            config, or weights that do not fit the network of its config.
    """
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
        raise ValueError(f"{path} has no 'config' dict or no 'model' state: not a dgseg checkpoint")
    try:
        cfg = Config.from_dict(ckpt["config"])
        model = build_model(cfg.data.in_channels, cfg.model)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:  # a bad config value; missing or misshapen weights
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{path}: checkpoint does not fit its config ({first})") from e
    model = segmenter_of(model)
    return model.to(device).eval(), cfg


def capture_rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors / ints / floats (weights_only-loadable)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),  # uint8 tensor
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),  # (624,) MT19937 words
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),  # (625,) words + index
            "gauss_next": py_gauss,  # float or None
        },
    }
    if np_kind != "MT19937":
        raise ValueError(f"unexpected numpy global RNG kind {np_kind!r}")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # list of uint8 tensors
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    npd = state["numpy"]
    keys = npd["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npd["pos"], npd["has_gauss"], npd["cached_gaussian"]))
    pyd = state["python"]
    internal = tuple(int(v) for v in pyd["internal"].tolist())
    random.setstate((pyd["version"], internal, pyd["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:  # different GPU count: restore what matches
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), i)

"""Argument and path checks every command-line tool runs before its first case.

Each check raises :class:`ArgumentFault` (a ``ValueError``) whose text names the option, the
value and what is valid, e.g. ``--threshold nan: must be a finite number in (0, 1)``; the tools
print it as one ``error:`` line (argparse's ``p.error`` or :func:`exit_error`). Output checks
make sure the folder or file can be written before any work is done: a path that is a file where
a folder is needed (or the reverse), a folder on a read-only file system or without write
permission, a parent that cannot be created. A folder whose mode has no write bit at all counts
as read-only even for root, who could write it anyway: it was marked read-only on purpose.
"""

from __future__ import annotations

import math
import os
import stat
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

__all__ = [
    "ArgumentFault",
    "exit_error",
    "check_probability",
    "check_at_least",
    "check_finite_positive",
    "check_output_dir",
    "check_output_file",
    "check_input_file",
    "check_input_dir",
    "check_device",
]


class ArgumentFault(ValueError):
    """A command-line value or path that the tool cannot work with (one line of text)."""


def exit_error(message: Any, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` (one line) to stderr and exit with ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _number(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ArgumentFault(f"{name} {value!r}: not a number") from None
    if not math.isfinite(v):
        raise ArgumentFault(f"{name} {value}: must be a finite number")
    return v


def check_probability(name: str, value: Any) -> float:
    """A finite number strictly between 0 and 1 (a probability threshold)."""
    v = _number(name, value)
    if not 0.0 < v < 1.0:
        raise ArgumentFault(f"{name} {value}: must be a finite number in (0, 1)")
    return v


def check_at_least(name: str, value: Any, low: int, meaning: str = "") -> int:
    """An integer >= ``low``; ``meaning`` explains a special value (``"0 = no CIs"``)."""
    if isinstance(value, bool) or int(value) != value:
        raise ArgumentFault(f"{name} {value!r}: must be an integer >= {low}")
    if value < low:
        extra = f" ({meaning})" if meaning else ""
        raise ArgumentFault(f"{name} {value}: must be an integer >= {low}{extra}")
    return int(value)


def check_finite_positive(name: str, value: Any) -> float:
    """A finite number > 0 (a learning rate, a size in mm)."""
    v = _number(name, value)
    if not v > 0:
        raise ArgumentFault(f"{name} {value}: must be a finite number > 0")
    return v


def _read_only(folder: Path) -> Optional[str]:
    """Why ``folder`` (an existing folder) cannot be written, or None."""
    try:
        mode = folder.stat().st_mode
    except OSError as e:
        return e.strerror or str(e)
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return "read-only folder (no write permission)"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "no write permission"
    probe = folder / f".dgseg-probe-{os.getpid()}"
    try:  # the only test for a read-only file system or a full quota
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        probe.unlink()
    except FileExistsError:
        return None
    except OSError as e:
        return e.strerror or str(e)
    return None


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return Path(path.anchor or ".")


def check_output_dir(name: str, path: Path | str) -> Path:
    """``path`` is a writable folder, or can be created as one (nothing is created)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArgumentFault(f"{name} {path}: is an existing file, not a folder")
    base = _nearest_existing(path.absolute())
    if not base.is_dir():
        raise ArgumentFault(f"{name} {path}: cannot be created, {base} is a file, not a folder")
    why = _read_only(base)
    if why:
        where = "" if base == path.absolute() else f" (in {base})"
        raise ArgumentFault(f"{name} {path}: cannot be written{where}: {why}")
    return path


def check_output_file(name: str, path: Path | str) -> Path:
    """``path`` is a writable file (or can be created); its folder is checked as an output."""
    path = Path(path)
    if path.is_dir():
        raise ArgumentFault(f"{name} {path}: is an existing folder, not a file")
    base = _nearest_existing(path.absolute().parent)
    if not base.is_dir():
        raise ArgumentFault(f"{name} {path}: cannot be created, {base} is a file, not a folder")
    why = _read_only(base)
    if why:
        raise ArgumentFault(f"{name} {path}: cannot be written (in {base}): {why}")
    return path


def check_input_file(name: str, path: Path | str) -> Path:
    """``path`` exists, is a file and can be read."""
    path = Path(path)
    if not path.exists():
        raise ArgumentFault(f"{name} {path}: no such file")
    if not path.is_file():
        raise ArgumentFault(f"{name} {path}: is not a file")
    if not os.access(path, os.R_OK):
        raise ArgumentFault(f"{name} {path}: cannot be read (no read permission)")
    return path


def check_input_dir(name: str, path: Path | str) -> Path:
    """``path`` exists, is a folder and can be listed."""
    path = Path(path)
    if not path.exists():
        raise ArgumentFault(f"{name} {path}: no such folder")
    if not path.is_dir():
        raise ArgumentFault(f"{name} {path}: is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ArgumentFault(f"{name} {path}: cannot be read (no read permission)")
    return path


def check_device(name: str, device: str) -> str:
    """``cuda`` only where torch sees a CUDA device."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ArgumentFault(
                f"{name} cuda: no CUDA device is visible to torch (valid here: auto, cpu)"
            )
    return device


def check_config_values(cfg: Any) -> Any:
    """Refuse a device that is not here (``--set run.device=cuda`` without a GPU); the config
    itself refuses non-finite and out-of-range numbers."""
    run = getattr(cfg, "run", None)
    if run is not None:
        check_device("--set run.device", getattr(run, "device", "auto"))
    return cfg

"""One folder, one job: an exclusive lock file that a training, a matrix run, an evaluation or a
prediction holds on its output folder for its lifetime.

The lock is ``<folder>/run.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+
file systems) and holding JSON: the holder's host, PID, start time, command and a random token.
A second job into a live folder is refused naming the holder. A lock whose PID no longer runs on
this host is stale (a ``kill -9``, a power cut): :func:`acquire` reports it and takes it over
when asked (``--resume``), otherwise refuses. A child started by the holder (``tools/
run_experiments.py`` runs ``train.py`` and ``evaluate.py`` inside its run folder) inherits the
lock through the environment variable ``DGSEG_RUN_LOCK`` (the holder's token) and never releases
it. :func:`check_free` refuses an output folder that a live job holds, or lies inside one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

__all__ = [
    "LOCK_NAME",
    "TOKEN_ENV",
    "RunLockError",
    "RunLock",
    "acquire",
    "check_free",
    "holder_of",
    "describe_holder",
    "held",
]

LOCK_NAME = "run.lock"
TOKEN_ENV = "DGSEG_RUN_LOCK"  # tokens of the locks this process's ancestors hold, ":"-separated


class RunLockError(ValueError):
    """The folder is held by another live job, or by a stale lock that may not be taken over."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OSError:
        return False
    return True


def _process_start(pid: int) -> Optional[float]:
    """Start time of process ``pid`` in seconds since the epoch (Linux ``/proc``), else None;
    tells a live holder from an unrelated process that got its PID later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_record(path: Path) -> Optional[dict[str, Any]]:
    """The JSON record of a lock file (``{}`` when unreadable), or None when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        rec = json.loads(text)
    except ValueError:  # a holder killed between create and write: an empty file
        return {}
    return rec if isinstance(rec, dict) else {}


def holder_of(folder: Path | str) -> Optional[dict[str, Any]]:
    """The holder record of ``folder``'s lock (``{}`` when unreadable), or None without a lock."""
    return _read_record(Path(folder) / LOCK_NAME)


def _inherited_tokens() -> set[str]:
    return {t for t in os.environ.get(TOKEN_ENV, "").split(":") if t}


def _state(rec: dict[str, Any]) -> str:
    """ "inherited" (an ancestor of this process holds it), "live", or "stale"."""
    if not rec:  # empty or torn: its writer died between creating and filling it
        return "stale"
    if rec.get("token") and rec["token"] in _inherited_tokens():
        return "inherited"
    if rec.get("host") != socket.gethostname():
        return "live"  # another machine's PID cannot be checked from here: assume it runs
    try:
        pid = int(rec.get("pid", -1))
    except (TypeError, ValueError):
        pid = -1
    if not _pid_alive(pid):
        return "stale"
    start, recorded = _process_start(pid), rec.get("pid_start")
    if start is not None and isinstance(recorded, (int, float)) and abs(start - recorded) > 2:
        return "stale"  # the PID now belongs to another process
    return "live"


def describe_holder(rec: dict[str, Any]) -> str:
    """``PID 123 on host h since 2026-01-01T10:00:00 (python tools/train.py ...)``."""
    if not rec:
        return "an unreadable lock"
    text = f"PID {rec.get('pid', '?')} on host {rec.get('host', '?')}"
    if rec.get("started"):
        text += f" since {rec['started']}"
    if rec.get("command"):
        text += f" ({rec['command']})"
    return text


class RunLock:
    """A held lock on ``folder``; :meth:`release` (or leaving the ``with`` block) removes it.

    ``inherited`` locks belong to an ancestor process and are left in place.
    """

    def __init__(self, folder: Path, record: dict[str, Any], *, inherited: bool, created: bool):
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.record = record
        self.inherited = inherited
        self._created_folder = created
        self._released = False

    @property
    def token(self) -> str:
        return str(self.record.get("token", ""))

    def child_env(self, env: Optional[dict[str, str]] = None) -> dict[str, str]:
        """``env`` (default: this process's) with this lock's token, for child processes."""
        env = dict(os.environ if env is None else env)
        tokens = [t for t in env.get(TOKEN_ENV, "").split(":") if t]
        env[TOKEN_ENV] = ":".join([*tokens, self.token])
        return env

    def release(self) -> None:
        """Remove the lock if it is still ours (and the folder, when it was made for it and is
        empty now)."""
        if self._released or self.inherited:
            return
        self._released = True
        if (holder_of(self.folder) or {}).get("token") == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self._created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only succeeds when nothing was written

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock file exclusively with ``record``; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def acquire(folder: Path | str, *, what: str, take_stale: bool = False, hint: str = "") -> RunLock:
    """Hold ``folder`` (created if missing) exclusively for this process.

    Args:
        folder: the run / output folder.
        what: the option naming it in messages, e.g. ``"run folder"`` or ``"--out"``.
        take_stale: take over a lock whose process no longer runs (``--resume``); otherwise such
            a lock is refused like a live one, with ``hint`` saying how to continue.

    Raises:
        RunLockError: held by another live job (named), or stale and ``take_stale`` is False.
        OSError: the folder cannot be created or written.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(Path(a).name if k == 0 else a for k, a in enumerate(sys.argv))[:300],
        "token": secrets.token_hex(8),
    }
    for _ in range(3):  # a holder that releases (or a takeover) between our steps: try again
        if _create(path, record):
            return RunLock(folder, record, inherited=False, created=created)
        rec = holder_of(folder)
        if rec is None:
            continue
        state = _state(rec)
        if state == "inherited":
            return RunLock(folder, rec, inherited=True, created=False)
        if state == "live":
            elsewhere = rec.get("host") != socket.gethostname()
            raise RunLockError(
                f"{what} {folder} is in use by {describe_holder(rec)}: one folder holds one "
                f"job; wait for it to finish or choose another folder (lock: {path}"
                + (
                    "; a job of another host: delete the lock if it no longer runs)"
                    if elsewhere
                    else ")"
                )
            )
        if not take_stale:
            raise RunLockError(
                f"{what} {folder} holds a stale lock of {describe_holder(rec)}, which no longer "
                f"runs{'; ' + hint if hint else ''} (lock: {path})"
            )
        # Stale: move it aside under a name only we use, then create ours exclusively; two
        # processes taking over at once cannot both win the O_EXCL create.
        aside = folder / f"{LOCK_NAME}.{os.getpid()}.stale"
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            continue
        if _read_record(aside) != rec:  # another process replaced it meanwhile: give it back
            with contextlib.suppress(OSError):
                os.link(aside, path)  # fails if a third lock appeared: that one wins
            with contextlib.suppress(OSError):
                aside.unlink()
            continue
        with contextlib.suppress(OSError):
            aside.unlink()
        print(
            f"note: {what} {folder}: took over the stale lock of {describe_holder(rec)}",
            file=sys.stderr,
            flush=True,
        )
    if _create(path, record):
        return RunLock(folder, record, inherited=False, created=created)
    raise RunLockError(f"{what} {folder}: could not take its lock {path}; try again")


def check_free(folder: Path | str, *, what: str) -> None:
    """Refuse ``folder`` when a live job (not an ancestor of this process) holds it or a folder
    above it (an evaluation's ``--out`` inside a training's run folder)."""
    folder = Path(folder).absolute()
    for f in (folder, *folder.parents):
        rec = holder_of(f)
        if rec is not None and _state(rec) == "live":
            raise RunLockError(
                f"{what} {folder} is inside {f}, in use by {describe_holder(rec)}; wait for it "
                f"to finish or choose another folder"
                if f != folder
                else f"{what} {folder} is in use by {describe_holder(rec)}; wait for it to "
                f"finish or choose another folder"
            )


@contextlib.contextmanager
def held(folder: Path | str, *, what: str, take_stale: bool = False) -> Iterator[RunLock]:
    """:func:`check_free` then :func:`acquire` ``folder`` for the ``with`` block."""
    check_free(Path(folder).absolute().parent, what=what)
    lock = acquire(folder, what=what, take_stale=take_stale)
    try:
        yield lock
    finally:
        lock.release()

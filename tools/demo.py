"""One-command demo: synthetic data → shards → two trainings under torchrun → cross-modality table.

    python tools/demo.py [--out demo_out] [--quick] [--nproc 2] [--cases N] [--epochs E] [--fresh]

On a machine with no data it runs the whole pipeline of the write-up ("Cross-modality single-source
domain generalization", see docs/SPEC.md) at a size a 2-core CPU finishes in a few minutes:

1. ``data``   – N synthetic BraTS-2021-layout cases (``data_prep.synthetic.write_dataset``, seeded);
2. ``shards`` – ``tools/prepare_brats.py`` at a small cube size (train / val / test split);
3. ``train``  – ``tools/train.py`` twice, launched as ``torchrun --standalone --nproc_per_node=2``
   (gloo on the CPU): the source-only baseline ``segresnet_t2_noaug`` and the write-up's method
   ``segresnet_t2_vffc_grl`` (three Bezier domains, VFFC bottleneck, domain classifier behind a
   gradient-reversal layer with the DANN schedule λ(p) = λmax·(2/(1+e^(−10p))−1)), both with the
   same small-width, high-learning-rate overrides of the ``tiny`` preset;
4. ``eval``   – ``tools/evaluate.py`` on the test split, once per modality (T1, T1CE, T2, FLAIR);
5. ``report`` – ``<out>/report/``: README.md (what ran, wall times, headline numbers, how to read
   them), table.md / table.txt, summary.json, per_case.csv, training curves and overlay PNGs
   (with matplotlib).

Every finished stage leaves a marker in ``<out>/.demo/``: running the same command again re-uses
finished stages (an interrupted training resumes from its ``last.pt``); ``--fresh`` redoes all.
A failing stage stops the demo with its command, the tail of its output and exit status 1.
``--quick`` is a much smaller run (a few 32³ cases, two epochs) that checks the chain end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
sys.path.insert(0, str(REPO))  # run from a source checkout

from dgseg.atomic import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402
from dgseg.constants import MODALITIES  # noqa: E402

__all__ = ["DemoSettings", "FULL", "QUICK", "StageError", "Eta", "main"]

BASELINE = "segresnet_t2_noaug"
METHODS = ("segresnet_t2_vffc_grl", "segresnet_t2_bezier", "segresnet_t2_grl", "segresnet_t2_vffc")
SOURCE = "t2"  # source modality of every demo preset
TAIL_LINES = 40  # lines of a failing command's output shown on the console


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run; FULL was tuned on a 2-core CPU to finish in ~5 minutes."""

    cases: int  # synthetic cases (train / val / test = 70 / 10 / 20 %)
    shape: Tuple[int, int, int]  # raw volume (X, Y, Z) in voxels; the brain box fits in `size`³
    size: int  # stored cube edge of the shards
    patch_size: Optional[int]  # training crop (None: the whole stored cube)
    epochs: int
    init_filters: int  # SegResNet width (the `tiny` preset: 8)
    lr: float  # AdamW learning rate (the `tiny` preset: 2e-3, learns in minutes on a CPU)
    bce_weight: float  # BCE next to Dice: empties the background faster on few steps
    val_every: int
    overlays: int  # cases per overlay PNG
    bootstrap: int  # bootstrap resamples of the evaluation's CIs


# Measured here (2-core AMD EPYC, bf16 autocast, 2 ranks): the baseline reaches a validation WT
# Dice of ~0.75 after 840 steps of 32³ crops (~1.5-2 minutes); 48³ holds the whole synthetic
# brain of a 60×60×40 case. Whole demo: 4-5 minutes.
FULL = DemoSettings(
    cases=40, shape=(60, 60, 40), size=48, patch_size=32, epochs=60, init_filters=8, lr=2e-3,
    bce_weight=1.0, val_every=10, overlays=3, bootstrap=2000,
)
# Checks the chain, not the learning: 32³ volumes, two epochs, a 4-filter network.
QUICK = DemoSettings(
    cases=10, shape=(40, 40, 30), size=32, patch_size=None, epochs=2, init_filters=4, lr=2e-3,
    bce_weight=1.0, val_every=1, overlays=1, bootstrap=200,
)


class StageError(RuntimeError):
    """A stage failed: its command (if any), exit status and the tail of its output."""

    def __init__(self, stage: str, message: str, *, cmd: Optional[Sequence[str]] = None,
                 returncode: Optional[int] = None, tail: Sequence[str] = (),
                 log: Optional[Path] = None) -> None:
        super().__init__(message)
        self.stage, self.cmd, self.returncode, self.tail, self.log = (
            stage, cmd, returncode, list(tail), log)

    def report(self) -> str:
        lines = [f"demo: stage '{self.stage}' failed: {self}"]
        if self.cmd is not None:
            lines.append(f"  command: {shlex.join(str(c) for c in self.cmd)}")
        if self.returncode is not None:
            lines.append(f"  exit status: {self.returncode}")
        if self.tail:
            where = f" (full log: {self.log})" if self.log else ""
            lines.append(f"  last {len(self.tail)} lines of its output{where}:")
            lines += [f"    | {t}" for t in self.tail]
        return "\n".join(lines)


def format_clock(seconds: float) -> str:
    """``75.2`` → ``"1:15"``; ``3725`` → ``"1:02:05"``; unknown → ``"?"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Eta:
    """Overall ETA from a prior cost per stage, rescaled by how fast the finished stages ran.

    ``expected`` maps stage → seconds measured on the reference machine. After each finished
    (not re-used) stage, the remaining stages' costs are scaled by actual/expected so far; the
    current stage's remainder comes from its own progress fraction when the stage reports one.
    """

    PRIOR_S = 30.0

    def __init__(self, expected: Dict[str, float]) -> None:
        self.expected = dict(expected)
        self.done: Dict[str, Optional[float]] = {}  # stage -> actual seconds (None: re-used)

    def finish(self, stage: str, seconds: Optional[float]) -> None:
        self.done[stage] = seconds

    def speed(self) -> float:
        """actual/expected over the finished stages, shrunk towards 1 by PRIOR_S seconds of
        prior evidence (a 2-second stage must not rescale a 2-minute one), clamped."""
        run = [(self.expected[s], t) for s, t in self.done.items() if t is not None]
        exp, act = sum(e for e, _ in run), sum(t for _, t in run)
        return min(max((act + self.PRIOR_S) / (exp + self.PRIOR_S), 0.25), 8.0)

    def remaining(self, current: Optional[str] = None, elapsed: float = 0.0,
                  fraction: Optional[float] = None) -> float:
        k = self.speed()
        rest = sum(k * e for s, e in self.expected.items() if s not in self.done and s != current)
        if current is not None and current not in self.done:
            if fraction is not None and 0.05 <= fraction <= 1.0 and elapsed > 1.0:
                rest += elapsed * (1.0 - fraction) / fraction
            else:
                rest += max(k * self.expected[current] - elapsed, 0.0)
        return rest


def expected_costs(s: DemoSettings, nproc: int, method: str) -> Dict[str, float]:
    """Stage → seconds on the reference 2-core CPU (bf16, 2 ranks), for the ETA only."""
    n_train, n_test = round(0.7 * s.cases), max(round(0.2 * s.cases), 1)
    vox = (s.patch_size or s.size) ** 3 / 32**3
    steps = s.epochs * max(n_train // nproc, 1)
    step_s = 0.12 * vox * (2.0 / nproc) ** 0.5  # ranks share the cores: sub-linear gain
    train = 10.0 + steps * step_s + 2.0 * s.epochs / s.val_every
    evaluation = 8.0 + 2 * len(MODALITIES) * n_test * 0.55 * (s.size / 48) ** 3 * 2.0 / nproc
    return {
        "data": 1.0 + 0.1 * s.cases * math.prod(s.shape) / 144_000,
        "shards": 2.0 + 0.05 * s.cases,
        f"train {BASELINE}": train,
        f"train {method}": train * 1.15,  # augmentation, VFFC and the domain head
        "eval": evaluation,
        "report": 2.0,
    }


class Console:
    """Timestamped demo lines: ``[demo 1:23 | ETA 3:45] ...`` (elapsed since start)."""

    def __init__(self, eta: Eta, *, verbose: bool = False) -> None:
        self.t0 = time.monotonic()
        self.eta = eta
        self.verbose = verbose
        self.lock = threading.Lock()
        self.stage: Optional[str] = None
        self.stage_t0 = self.t0
        self.fraction: Optional[float] = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        rem = self.eta.remaining(self.stage, time.monotonic() - self.stage_t0, self.fraction)
        with self.lock:
            print(f"[demo {format_clock(self.elapsed())} | ETA {format_clock(rem)}] {msg}",
                  flush=True)

    def relay(self, line: str) -> None:
        with self.lock:
            print(f"      {line}", flush=True)


def _pythonpath_env(nproc: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"  # progress lines arrive as they are printed
    # Ranks share the cores: one OpenMP thread each on 2 cores with 2 ranks (oversubscribed
    # threads slow every rank down and gloo waits for the slowest).
    env["OMP_NUM_THREADS"] = str(min(max(1, (os.cpu_count() or 1) // nproc), 8))
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run_command(cmd: Sequence[str], *, stage: str, log_path: Path, console: Console, nproc: int,
                timeout: float, on_line: Optional[Callable[[str, str], None]] = None,
                verbose: bool = False) -> List[str]:
    """Run ``cmd``; stream its output to ``log_path`` (and ``on_line``); return its stdout lines.

    Raises StageError (command, exit status, output tail) on a non-zero exit or after
    ``timeout`` seconds (the whole process group is killed: a hung rendezvous fails, not blocks).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: List[str] = []
    stdout: List[str] = []
    lock = threading.Lock()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(str(c) for c in cmd)}\n")
        log.flush()
        # Own session: Ctrl-C and the timeout stop torchrun and all of its ranks together.
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, bufsize=1,
                                env=_pythonpath_env(nproc), start_new_session=True,
                                errors="replace")

        def pump(stream: Any, name: str) -> None:
            for raw in stream:
                line = raw.rstrip("\n")
                with lock:
                    log.write(line + "\n")
                    log.flush()
                    tail.append(line)
                    del tail[:-TAIL_LINES]
                    if name == "stdout":
                        stdout.append(line)
                if verbose:
                    console.relay(line)
                if on_line is not None:
                    on_line(name, line)

        threads = [threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True)]
        for t in threads:
            t.start()
        start = time.monotonic()
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout:
                    _kill_group(proc)
                    for t in threads:
                        t.join(timeout=5)
                    raise StageError(stage, f"no result after {timeout:.0f} s (killed)", cmd=cmd,
                                     tail=tail, log=log_path)
                time.sleep(0.2)
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
        for t in threads:
            t.join(timeout=10)
    if proc.returncode != 0:
        raise StageError(stage, "command exited with an error", cmd=cmd,
                         returncode=proc.returncode, tail=tail, log=log_path)
    return stdout


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (torchrun forwards it to the ranks), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def display_command(cmd: Sequence[Any]) -> str:
    """Shell form of ``cmd`` as a user would type it: ``python``, paths relative to the cwd."""
    cwd = Path.cwd()
    words = []
    for c in cmd:
        text = str(c)
        if text == sys.executable:
            text = "python"
        elif os.path.isabs(text):
            try:
                text = os.path.relpath(text, cwd)
            except ValueError:  # another drive (Windows)
                pass
        words.append(text)
    return shlex.join(words)


def launcher(nproc: int) -> List[str]:
    """torchrun for several ranks (gloo on the CPU), plain Python for one."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}"]


def train_overrides(s: DemoSettings, *, seed: int, device: str, amp: str,
                    extra: Sequence[str]) -> List[str]:
    """``--set`` items shared by both trainings (small width and the `tiny` preset's lr/BCE)."""
    items = [
        f"model.init_filters={s.init_filters}",
        "model.blocks_down=1,1,1,1",  # the `tiny` preset's depth: one block per stage
        f"optim.lr={s.lr:g}",
        f"optim.epochs={s.epochs}",
        f"loss.bce_weight={s.bce_weight:g}",
        f"data.patch_size={s.patch_size if s.patch_size else 'none'}",
        "data.workers=0",  # the ranks already use both cores; loader processes would compete
        f"run.val_every={s.val_every}",
        "run.log_every=50",
        f"run.seed={seed}",
        f"run.device={device}",
        f"run.amp={amp}",
    ]
    return items + list(extra)


def default_amp() -> str:
    """bf16 autocast where oneDNN has native bf16 (3× faster here); float32 elsewhere."""
    from dgseg.precision import resolve_amp

    return resolve_amp("auto", "cpu")[0]


# ------------------------------------------------------------------------------------- stages
class Demo:
    """The stages, their markers and timings for one ``--out`` folder."""

    def __init__(self, args: argparse.Namespace, settings: DemoSettings) -> None:
        self.args, self.s = args, settings
        self.out: Path = args.out
        self.raw, self.shards = self.out / "data" / "raw", self.out / "data" / "shards"
        self.runs, self.eval_dir = self.out / "runs", self.out / "eval"
        self.logs, self.markers = self.out / "logs", self.out / ".demo"
        self.presets = (BASELINE, args.method)
        self.eta = Eta(expected_costs(settings, args.nproc, args.method))
        self.console = Console(self.eta, verbose=args.verbose)
        self.timings: List[Dict[str, Any]] = []
        self.commands: Dict[str, str] = {}
        self.overrides = train_overrides(settings, seed=args.seed, device=args.device,
                                         amp=args.amp, extra=args.overrides)
        self.ran_upstream = False  # a stage ran in this invocation: redo everything after it
        self.resumable = False  # the current stage was started before with the same params

    # markers --------------------------------------------------------------------------------
    def _marker(self, stage: str) -> Path:
        return self.markers / f"{stage.replace(' ', '_')}.json"

    def _started(self, stage: str) -> Path:
        return self.markers / f"{stage.replace(' ', '_')}.started.json"

    def is_done(self, stage: str, params: Dict[str, Any]) -> bool:
        return _read_params(self._marker(stage)) == params

    def mark_done(self, stage: str, params: Dict[str, Any], seconds: float) -> None:
        self.markers.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._marker(stage), {"params": params, "seconds": seconds})

    def stage(self, stage: str, params: Dict[str, Any], body: Callable[[], None],
              outputs: Sequence[Path] = ()) -> None:
        """Run ``body`` unless a marker with the same params (and its outputs) says it is done."""
        n = len(self.eta.expected)
        k = len(self.eta.done) + 1
        if (not self.ran_upstream and self.is_done(stage, params)
                and all(p.exists() for p in outputs)):
            self.eta.finish(stage, None)
            prev = json.loads(self._marker(stage).read_text()).get("seconds")
            self.timings.append({"stage": stage, "seconds": None, "reused": True,
                                 "first_run_seconds": prev})
            self.console.say(f"stage {k}/{n} {stage}: done before, re-used (--fresh redoes it)")
            return
        self._marker(stage).unlink(missing_ok=True)
        # Interrupted earlier with the same inputs and settings: the stage may continue its work.
        self.resumable = not self.ran_upstream and _read_params(self._started(stage)) == params
        self.markers.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._started(stage), {"params": params})
        self.ran_upstream = True
        c = self.console
        c.stage, c.stage_t0, c.fraction = stage, time.monotonic(), None
        c.say(f"stage {k}/{n} {stage} ...")
        t0 = time.monotonic()
        body()
        seconds = time.monotonic() - t0
        c.stage, c.fraction = None, None
        self.eta.finish(stage, seconds)
        self.mark_done(stage, params, seconds)
        self._started(stage).unlink(missing_ok=True)
        self.timings.append({"stage": stage, "seconds": seconds, "reused": False})
        c.say(f"stage {k}/{n} {stage}: done in {format_clock(seconds)}")

    def run(self, stage: str, cmd: List[str], *, on_line: Optional[Callable[[str, str], None]]
            = None) -> List[str]:
        self.commands[stage] = display_command(cmd)
        return run_command(cmd, stage=stage, log_path=self.logs / f"{stage.replace(' ', '_')}.log",
                           console=self.console, nproc=self.args.nproc, timeout=self.args.timeout,
                           on_line=on_line, verbose=self.args.verbose)

    # parameters (a stage's params include its inputs', so a change upstream redoes it) -------
    def data_params(self) -> Dict[str, Any]:
        return {"cases": self.s.cases, "shape": list(self.s.shape), "seed": self.args.seed,
                "layout": "brats2021"}

    def shard_params(self) -> Dict[str, Any]:
        return {"data": self.data_params(), "size": self.s.size, "split": [0.7, 0.1, 0.2],
                "split_seed": self.args.seed}

    def train_params(self, preset: str) -> Dict[str, Any]:
        return {"shards": self.shard_params(), "preset": preset, "nproc": self.args.nproc,
                "overrides": self.overrides, "seed": self.args.seed}

    def eval_params(self) -> Dict[str, Any]:
        return {"train": [self.train_params(p) for p in self.presets], "nproc": self.args.nproc,
                "overlays": self.s.overlays, "bootstrap": self.s.bootstrap,
                "device": self.args.device}

    # stage bodies ---------------------------------------------------------------------------
    def make_data(self) -> None:
        from data_prep.synthetic import write_dataset

        if self.raw.exists():  # a different earlier request: start the folder afresh
            shutil.rmtree(self.raw)
        self.commands["data"] = (
            f"data_prep.synthetic.write_dataset({str(self.raw)!r}, {self.s.cases}, "
            f"shape={tuple(self.s.shape)}, seed={self.args.seed}, layout='brats2021')")
        try:
            write_dataset(self.raw, self.s.cases, shape=self.s.shape, seed=self.args.seed,
                          layout="brats2021", workers=max(1, min(2, os.cpu_count() or 1)))
        except Exception as e:  # show it as a stage failure, like the subprocess stages
            raise StageError("data", f"{type(e).__name__}: {e}") from e

    def make_shards(self) -> None:
        if self.shards.exists():
            shutil.rmtree(self.shards)
        workers = max(1, min(2, os.cpu_count() or 1))
        cmd = [sys.executable, TOOLS / "prepare_brats.py", "--input", self.raw, "--output",
               self.shards, "--size", str(self.s.size), "--seed", str(self.args.seed),
               "--split", "0.7", "0.1", "0.2", "--workers", str(workers), "--quiet", "--strict"]
        self.run("shards", cmd, on_line=self._relay_summary)
        counts = self.split_counts()
        n_train, n_test = counts.get("train", 0), counts.get("test", 0)
        if n_train < self.args.nproc or n_test < 1:
            raise StageError("shards", f"split {counts} leaves {n_train} training case(s) for "
                             f"{self.args.nproc} process(es) and {n_test} test case(s); "
                             "use more --cases")

    def split_counts(self) -> Dict[str, int]:
        manifest = json.loads((self.shards / "manifest.json").read_text())
        counts: Dict[str, int] = {}
        for c in manifest["cases"]:
            counts[c["split"]] = counts.get(c["split"], 0) + 1
        return counts

    def _relay_summary(self, stream: str, line: str) -> None:
        if line.startswith("prepared "):
            self.console.relay(line)

    def expected_config(self, preset: str) -> Dict[str, Any]:
        from dgseg.config import apply_overrides, get_preset

        items = [f"run.out={self.runs}", f"data.root={self.shards}", *self.overrides]
        return apply_overrides(get_preset(preset), items).to_dict()

    def train(self, preset: str) -> None:
        stage = f"train {preset}"
        run_dir = self.runs / preset
        mode = "--overwrite"
        if self.resumable and (run_dir / "last.pt").exists():
            try:  # same settings: an interrupted run continues where its last.pt stopped
                same = json.loads((run_dir / "config.json").read_text()) == \
                    self.expected_config(preset)
            except (OSError, ValueError):
                same = False
            if same:
                mode = "--resume"
                self.console.say(f"{stage}: continuing the interrupted run from its last.pt")
        cmd = [*launcher(self.args.nproc), TOOLS / "train.py", "--preset", preset, "--data",
               self.shards, "--out", self.runs, mode]
        for item in self.overrides:
            cmd += ["--set", item]
        epoch_re = re.compile(r"^epoch (\d+)/(\d+) done in")
        last_note = [0.0]

        def on_line(stream: str, line: str) -> None:
            m = epoch_re.match(line)
            if m:
                done, total = int(m.group(1)), int(m.group(2))
                self.console.fraction = done / total
                now = time.monotonic()
                if "| val" in line:  # one line per validation: keep the console short
                    self.console.say(f"{preset} {line}")
                    last_note[0] = now
                elif now - last_note[0] > 30.0:
                    self.console.say(f"{preset} epoch {done}/{total}")
                    last_note[0] = now
            elif line.startswith(("error", "warning", "note", "resumed", "nothing to do")):
                self.console.relay(line)

        self.run(stage, cmd, on_line=on_line)
        if not self.checkpoint(preset).exists():
            raise StageError(stage, f"finished without {run_dir}/best.pt or last.pt")

    def checkpoint(self, preset: str) -> Path:
        """best.pt (best validation mean Dice, as in the write-up), else last.pt."""
        best = self.runs / preset / "best.pt"
        return best if best.exists() else self.runs / preset / "last.pt"

    def evaluate(self) -> None:
        if self.eval_dir.exists():
            shutil.rmtree(self.eval_dir)
        cmd = [*launcher(self.args.nproc), TOOLS / "evaluate.py", "--checkpoint",
               *[self.checkpoint(p) for p in self.presets], "--data", self.shards, "--split",
               "test", "--out", self.eval_dir, "--overlays", str(self.s.overlays), "--bootstrap",
               str(self.s.bootstrap), "--seed", "0", "--device", self.args.device]
        progress_re = re.compile(r"^\[eval\] (\d+)/(\d+)")

        def on_line(stream: str, line: str) -> None:
            m = progress_re.match(line)
            if m:
                self.console.fraction = int(m.group(1)) / max(int(m.group(2)), 1)

        stdout = self.run("eval", cmd, on_line=on_line)
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.eval_dir / "table.txt", "\n".join(stdout).rstrip() + "\n")
        for name in ("summary.json", "table.md", "per_case.csv"):
            if not (self.eval_dir / name).exists():
                raise StageError("eval", f"evaluate.py wrote no {self.eval_dir / name}", cmd=cmd)

    def build_report(self) -> None:
        """Assemble ``<out>/report/`` in a temporary folder, then swap it in whole."""
        tmp, final = self.out / ".report.tmp", self.out / "report"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name in ("table.md", "table.txt", "summary.json", "per_case.csv"):
            shutil.copy2(self.eval_dir / name, tmp / name)
        if (self.eval_dir / "overlays").is_dir():
            shutil.copytree(self.eval_dir / "overlays", tmp / "overlays")
        figures = []
        for preset in self.presets:
            run_dir = self.runs / preset
            shutil.copy2(run_dir / "config.json", tmp / f"config_{preset}.json")
            if (run_dir / "log.jsonl").exists():
                shutil.copy2(run_dir / "log.jsonl", tmp / f"log_{preset}.jsonl")
            png = tmp / f"curves_{preset}.png"
            try:
                from dgseg.logging_utils import plot_curves

                made = plot_curves(run_dir / "log.jsonl", png)
            except Exception as e:  # a figure never fails the demo
                self.console.relay(f"warning: {png.name} not written: {e}")
                made = None
            if made is not None:
                figures.append(png.name)
        losses_png = plot_seg_and_domain_losses(
            [(p, self.runs / p / "log.jsonl") for p in self.presets], tmp / "losses.png")
        if losses_png is not None:
            figures.append(losses_png.name)
        text = report_readme(self, figures=figures)
        atomic_write_text(tmp / "README.md", text)
        old = self.out / ".report.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)


def _read_params(marker: Path) -> Any:
    try:
        return json.loads(marker.read_text())["params"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------ report pieces
def read_log(path: Path) -> List[Dict[str, Any]]:
    from dgseg.logging_utils import read_jsonl

    return read_jsonl(path) if path.exists() else []


def domain_loss_summary(records: Sequence[Dict[str, Any]], num_domains: int) -> Optional[str]:
    """One sentence on the domain cross-entropy of a GRL run (None when it has none)."""
    train = [r for r in records if r.get("kind") == "train" and "domain_loss" in r]
    if not train or all(r.get("lambda", 0.0) == 0.0 for r in train):
        return None
    vals = [float(r["domain_loss"]) for r in train]
    chance = math.log(num_domains)
    bad = [r["step"] for r, v in zip(train, vals) if not math.isfinite(v)]
    if bad:
        return f"the domain loss became non-finite at step {bad[0]}: the adversarial game diverged"
    finite = vals
    peak = max(finite)
    n_last = max(1, len(finite) // 4)
    late = sum(finite[-n_last:]) / n_last
    verdict = ("near chance: the classifier cannot tell the three Bezier domains apart from the "
               "reversed features" if abs(late - chance) < 0.1 * chance else
               "below chance: the classifier still separates the domains"
               if late < chance else "above chance: the minimax game is unsettled")
    unstable = peak > 3.0 * chance
    every = train[1]["step"] - train[0]["step"] if len(train) > 1 else 1
    text = (f"domain cross-entropy (logged every {every} steps) from {finite[0]:.3f} to "
            f"{finite[-1]:.3f}, max {peak:.3f}, last-quarter mean {late:.3f} vs "
            f"ln {num_domains} = {chance:.3f} (chance) — {verdict}")
    return text + ("; **its peak exceeded 3× chance: unstable**" if unstable else "")


def plot_seg_and_domain_losses(runs: Sequence[Tuple[str, Path]], png: Path) -> Optional[Path]:
    """Segmentation and domain losses of every run on one figure (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    any_domain = False
    for name, log in runs:
        train = [r for r in read_log(log) if r.get("kind") == "train"]
        if not train:
            continue
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r.get("seg_loss", r["loss"]) for r in train], label=name)
        if any(r.get("lambda", 0.0) > 0 for r in train):
            any_domain = True
            axes[1].plot(steps, [r["domain_loss"] for r in train], label=f"{name} domain CE")
            axes[1].plot(steps, [r["lambda"] for r in train], "--", label=f"{name} λ")
    axes[0].set_title("segmentation loss (Dice + BCE)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    axes[1].set_title("domain cross-entropy through the GRL, and λ")
    axes[1].set_xlabel("step")
    if any_domain:
        axes[1].axhline(math.log(3), color="grey", lw=0.8, ls=":", label="ln 3 (chance, 3 domains)")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png, fsync=False) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png


def headline(summary: Dict[str, Any]) -> List[str]:
    """In-domain (T2) vs cross-modality WT / mean Dice per model, as sentences."""
    lines = []
    for m in summary["models"]:
        cols = m["columns"]
        if SOURCE not in cols:
            continue
        wt = {c: cols[c]["dice_WT"]["mean"] for c in MODALITIES if c in cols}
        mean = {c: cols[c]["dice_mean"]["mean"] for c in MODALITIES if c in cols}
        others = [c for c in MODALITIES if c in cols and c != SOURCE]
        cross_wt = sum(wt[c] for c in others) / max(len(others), 1)
        cross_mean = sum(mean[c] for c in others) / max(len(others), 1)
        per = ", ".join(f"{c.upper()} {wt[c]:.2f}" for c in others)
        lines.append(f"- **{m['model']}**: in-domain T2 WT Dice {wt[SOURCE]:.2f} (mean of "
                     f"regions {mean[SOURCE]:.2f}); unseen modalities WT {per} — average "
                     f"{cross_wt:.2f} (mean of regions {cross_mean:.2f}).")
    return lines


def report_readme(demo: Demo, *, figures: Sequence[str]) -> str:
    import torch

    s, a = demo.s, demo.args
    summary = json.loads((demo.eval_dir / "summary.json").read_text())
    counts = demo.split_counts()
    total = sum(t["seconds"] or 0.0 for t in demo.timings)
    lines = [
        "# dgseg demo report",
        "",
        f"Written by `{display_command(['python', 'tools/demo.py', *a.argv])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} CPU core(s), "
        f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{a.nproc} process(es) per run, device {a.device}, autocast {a.amp}.",
        "",
        "The numbers below come from **synthetic** BraTS-like volumes at "
        f"{s.size}³ voxels and a {s.epochs}-epoch training of a narrow SegResNet: they show that "
        "the pipeline works and how the cross-modality gap looks, not what the method scores on "
        "BraTS 2021.",
        "",
        "## What was run",
        "",
        f"1. **data** – {s.cases} synthetic cases of {s.shape[0]}×{s.shape[1]}×{s.shape[2]} "
        f"voxels in the BraTS 2021 layout (seed {a.seed}), in `data/raw/`.",
        f"2. **shards** – `tools/prepare_brats.py --size {s.size}`: crop to the brain, z-score, "
        f"pad to {s.size}³; split train/val/test = {counts.get('train', 0)}/"
        f"{counts.get('val', 0)}/{counts.get('test', 0)} cases, in `data/shards/`.",
        f"3. **train** – `tools/train.py` for the presets `{BASELINE}` (source only, no "
        f"augmentation) and `{a.method}`, each on {a.nproc} process(es), T2 only, with these "
        "overrides of the presets (same for both):",
        "",
        "   " + " ".join(f"`{o}`" for o in demo.overrides),
        "",
        f"4. **eval** – `tools/evaluate.py` on the {counts.get('test', 0)} test cases, feeding "
        "each of T1, T1CE, T2, FLAIR in turn to the T2-trained networks (best validation "
        "checkpoint, sliding window, overlap 0.5, threshold 0.5).",
        "",
        "Commands (full outputs in `../logs/`):",
        "",
        "```",
        *[f"# {k}\n{v}" for k, v in demo.commands.items()],
        "```",
        "",
        "## Wall time per stage",
        "",
        "| stage | wall time |",
        "|---|---|",
    ]
    for t in demo.timings:
        if t["reused"]:
            first = t.get("first_run_seconds")
            cell = "re-used" + (f" (first run {format_clock(first)})" if first else "")
        else:
            cell = format_clock(t["seconds"])
        lines.append(f"| {t['stage']} | {cell} |")
    lines += [f"| **total (this invocation, without the report)** | "
              f"**{format_clock(total)}** |", "", "## Results", ""]
    lines += headline(summary)
    lines += [""]
    for preset in demo.presets:
        note = domain_loss_summary(read_log(demo.runs / preset / "log.jsonl"), 3)
        if note:
            lines.append(f"- `{preset}`: {note}.")
    lines += ["", (demo.eval_dir / "table.md").read_text().replace("# Cross-modality evaluation",
                                                                    "### Test-set table"), ""]
    lines += [
        "## How to read it",
        "",
        "- Each cell is `Mean - WT | TC | ET`: Dice (or HD95 in mm) of whole tumour, tumour core "
        "and enhancing tumour, and their mean. The **T2** column is in-domain (the training "
        "modality); T1, T1CE and FLAIR are modalities the networks never saw. 'Own inputs' "
        "repeats T2 for these single-modality models.",
        "- What to expect (the pattern of the write-up, and of this demo on its default "
        "settings): source-only training scores well on T2 and collapses on the unseen "
        "modalities, most of all on T1/T1CE, where the tumour is dark instead of bright; the "
        "Bezier-domain model gives up in-domain Dice for more on the unseen modalities, FLAIR "
        "most of all (its edema is bright, as in T2). Compare the rows column by column.",
        "- With so few test cases the differences are noisy: the bootstrap CIs are in "
        "`table.md` and `summary.json`; per-case numbers in `per_case.csv`.",
        "- Files: `table.txt` (as printed), `table.md`, `summary.json`, `per_case.csv`, "
        "`config_<run>.json` (resolved training configs), `log_<run>.jsonl` (training logs)"
        + (", " + ", ".join(f"`{f}`" for f in figures) if figures else "")
        + (", `overlays/<run>_<modality>.png` (image, truth, prediction; green edema, yellow "
           "core, red enhancing)" if (demo.eval_dir / "overlays").is_dir() else "")
        + ".",
    ]
    if not figures:
        lines.append("- No PNGs: matplotlib is not installed (`pip install matplotlib`).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Stages: data, shards, train (x2), eval, report. "
                                       "See the module docstring for details.")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder "
                   "(default demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="tiny end-to-end check (a few 32³ cases, 2 epochs; well under a minute)")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun, default 2)")
    p.add_argument("--cases", type=int, default=None, help="synthetic cases (default 40; "
                   "--quick 10)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per run (default "
                   "60; --quick 2)")
    p.add_argument("--method", choices=METHODS, default=METHODS[0],
                   help=f"second preset, next to {BASELINE} (default {METHODS[0]})")
    p.add_argument("--seed", type=int, default=0, help="data, split and training seed")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="training/evaluation device (default cpu: gloo)")
    p.add_argument("--amp", choices=("bf16", "none"), default=None,
                   help="autocast (default bf16 where the CPU has native bf16, else none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra tools/train.py override for both runs (repeatable)")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before a stage's command is killed (default 1800)")
    p.add_argument("--verbose", action="store_true", help="echo every line of the tools' output")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.cases is not None and args.cases < 5:
        p.error(f"--cases must be >= 5 (train, val and test cases), got {args.cases}")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if args.timeout <= 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    for item in args.overrides:
        if "=" not in item:
            p.error(f"--set {item!r} must look like section.field=value")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.nproc:
            p.error(f"--device cuda needs {args.nproc} GPU(s), found {torch.cuda.device_count()}")
    if args.amp is None:
        args.amp = default_amp() if args.device == "cpu" else "bf16"
    return args


def settings_for(args: argparse.Namespace) -> DemoSettings:
    s = QUICK if args.quick else FULL
    changes: Dict[str, Any] = {}
    if args.cases is not None:
        changes["cases"] = args.cases
    if args.epochs is not None:
        changes["epochs"] = args.epochs
        changes["val_every"] = min(s.val_every, args.epochs)
    return dataclasses.replace(s, **changes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    s = settings_for(args)
    demo = Demo(args, s)
    c = demo.console
    if args.fresh:
        for sub in ("data", "runs", "eval", "report", "logs", ".demo", ".report.tmp"):
            if (args.out / sub).exists():
                shutil.rmtree(args.out / sub)
    args.out.mkdir(parents=True, exist_ok=True)
    c.say(f"dgseg demo{' (quick)' if args.quick else ''} in {args.out}: {s.cases} synthetic "
          f"cases at {s.size}³, {BASELINE} vs {args.method}, {s.epochs} epochs each on "
          f"{args.nproc} process(es) ({args.device}, autocast {args.amp})")
    try:
        demo.stage("data", demo.data_params(), demo.make_data, [demo.raw])
        demo.stage("shards", demo.shard_params(), demo.make_shards,
                   [demo.shards / "manifest.json"])
        for preset in demo.presets:
            demo.stage(f"train {preset}", demo.train_params(preset),
                       lambda p=preset: demo.train(p), [demo.checkpoint(preset)])
        demo.stage("eval", demo.eval_params(), demo.evaluate,
                   [demo.eval_dir / n for n in ("summary.json", "table.md", "table.txt")])
        # Always rebuilt (cheap): it records this invocation's timings.
        t0 = time.monotonic()
        c.stage, c.stage_t0 = "report", t0
        c.say(f"stage {len(demo.eta.expected)}/{len(demo.eta.expected)} report ...")
        try:
            demo.build_report()
        except (OSError, ValueError, KeyError) as e:  # e.g. a disk full, a hand-edited file
            raise StageError("report", f"{type(e).__name__}: {e}") from e
        demo.timings.append({"stage": "report", "seconds": time.monotonic() - t0,
                             "reused": False})
        demo.eta.finish("report", time.monotonic() - t0)
        c.stage = None
    except StageError as e:
        print(e.report(), file=sys.stderr, flush=True)
        print(f"demo: stopped after {format_clock(c.elapsed())}; fix the problem and run the "
              "same command again (finished stages are re-used)", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    print()
    print((demo.eval_dir / "table.txt").read_text(), end="")
    print()
    summary = json.loads((demo.eval_dir / "summary.json").read_text())
    for line in headline(summary):
        print(line.replace("**", ""))
    report = args.out / "report"
    pngs = "PNGs" if any(report.rglob("*.png")) else "no PNGs: pip install matplotlib for figures"
    c.say(f"finished in {format_clock(c.elapsed())}; report in {report} "
          f"(README.md, table.md, summary.json, per_case.csv, {pngs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tools/demo.py: ETA arithmetic, failure reporting, and the whole chain end to end (--quick).

The end-to-end test runs ``python tools/demo.py --quick`` once (synthetic data → shards → two
2-process torchrun trainings → evaluation on the four modalities → report; ~30 s on 2 cores),
then checks the report files against each other and that a second run re-uses every stage.
"""

import csv
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "tools" / "demo.py"
PRESETS = ("segresnet_t2_noaug", "segresnet_t2_vffc_grl")
MODALITY_TITLES = ("T1", "T1CE", "T2", "FLAIR")


def _load_demo():
    spec = importlib.util.spec_from_file_location("dgseg_demo_tool", DEMO)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _run_demo(*args, timeout=240):
    cmd = [sys.executable, str(DEMO), *map(str, args)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc, time.monotonic() - t0


# ------------------------------------------------------------------------------- unit pieces
def test_format_clock():
    demo = _load_demo()
    assert demo.format_clock(75.2) == "1:15"
    assert demo.format_clock(0) == "0:00"
    assert demo.format_clock(3725) == "1:02:05"
    assert demo.format_clock(float("nan")) == "?" and demo.format_clock(-1) == "?"


def test_eta_rescales_remaining_stages_by_observed_speed():
    demo = _load_demo()
    assert demo.Eta.PRIOR_S == 30.0  # the hand-computed values below assume it
    eta = demo.Eta({"a": 10.0, "b": 20.0, "c": 30.0})
    assert eta.remaining() == 60.0  # nothing done: the prior
    assert eta.remaining("a", elapsed=4.0) == 56.0  # 6 s left of a, then b and c
    eta.finish("a", 20.0)  # twice slower than expected: speed (20 + 30) / (10 + 30)
    assert eta.speed() == 1.25
    assert eta.remaining() == 62.5  # 1.25 × (20 + 30)
    # Current stage b reports 25 % done after 10 s: 30 s left of it, then 1.25 × 30 for c.
    assert eta.remaining("b", elapsed=10.0, fraction=0.25) == 67.5
    # Without a progress fraction: its rescaled prior minus the elapsed time.
    assert eta.remaining("b", elapsed=10.0) == 1.25 * 20 - 10 + 1.25 * 30
    eta.finish("b", None)  # re-used stages carry no speed information
    assert eta.speed() == 1.25 and eta.remaining() == 37.5
    fast = demo.Eta({"a": 1000.0, "b": 100.0})
    fast.finish("a", 10.0)
    assert fast.speed() == 0.25  # clamped: one lucky stage does not promise a 100x speed-up
    small = demo.Eta({"a": 5.0, "b": 100.0})
    small.finish("a", 2.0)  # a 2-second stage barely moves the estimate of a long one
    assert small.speed() == pytest.approx(32 / 35)


def _train_records(domain_losses, lambd=0.5):
    return [{"kind": "train", "step": 10 * (i + 1), "loss": 1.0, "seg_loss": 0.5,
             "domain_loss": d, "lambda": lambd} for i, d in enumerate(domain_losses)]


def test_domain_loss_summary_classifies_the_adversarial_game():
    demo = _load_demo()
    chance = math.log(3)
    assert demo.domain_loss_summary(_train_records([1.0, 1.0], lambd=0.0), 3) is None  # no GRL
    assert demo.domain_loss_summary([{"kind": "val", "dice_WT": 0.5}], 3) is None
    near = demo.domain_loss_summary(_train_records([1.4, 1.2, chance, chance]), 3)
    assert "near chance" in near and "unstable" not in near and "logged every 10 steps" in near
    assert "from 1.400 to 1.099" in near
    low = demo.domain_loss_summary(_train_records([1.0, 0.5, 0.2, 0.1]), 3)
    assert "below chance" in low
    blown = demo.domain_loss_summary(_train_records([1.1, 9.0, 2.0, 1.5]), 3)
    assert "unstable" in blown and "max 9.000" in blown
    nan = demo.domain_loss_summary(_train_records([1.1, 1.0, float("nan"), 1.0]), 3)
    assert "non-finite at step 30" in nan


def test_failing_command_raises_with_its_exit_status_and_output_tail(tmp_path):
    demo = _load_demo()
    console = demo.Console(demo.Eta({"x": 1.0}))
    code = (
        "import sys, time\nfor i in range(100): print('line', i)\n"
        "time.sleep(0.3)\n"  # stdout and stderr are read by two threads: keep 'boom' last
        "print('boom', file=sys.stderr)\nsys.exit(3)"
    )
    cmd = [sys.executable, "-c", code]
    log = tmp_path / "x.log"
    with pytest.raises(demo.StageError) as err:
        demo.run_command(cmd, stage="x", log_path=log, console=console, nproc=1, timeout=60)
    e = err.value
    assert e.returncode == 3 and e.cmd == cmd and e.log == log
    assert len(e.tail) == demo.TAIL_LINES and "boom" in e.tail and "line 99" in e.tail
    assert "line 0" not in e.tail  # only the tail on the console ...
    text = log.read_text()
    assert "line 0\n" in text and "line 99\n" in text and "boom\n" in text  # ... all in the log
    report = e.report()
    assert "stage 'x' failed" in report and "exit status: 3" in report and "-c" in report
    ok = demo.run_command([sys.executable, "-c", "print('a'); print('b')"], stage="y",
                          log_path=tmp_path / "y.log", console=console, nproc=1, timeout=60)
    assert ok == ["a", "b"]


def test_hung_command_is_killed_after_the_timeout(tmp_path):
    demo = _load_demo()
    console = demo.Console(demo.Eta({"x": 1.0}))
    t0 = time.monotonic()
    with pytest.raises(demo.StageError, match="no result after 1 s"):
        demo.run_command([sys.executable, "-c", "import time; print('started', flush=True); "
                          "time.sleep(60)"], stage="x", log_path=tmp_path / "x.log",
                         console=console, nproc=1, timeout=1.0)
    assert time.monotonic() - t0 < 20


def test_bad_arguments_are_refused():
    demo = _load_demo()
    for bad in (["--nproc", "0"], ["--cases", "2"], ["--epochs", "0"], ["--set", "optim.lr"],
                ["--timeout", "0"]):
        with pytest.raises(SystemExit) as e:
            demo.parse_args(bad)
        assert e.value.code == 2


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc, seconds = _run_demo("--quick", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, seconds


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain(quick_demo):
    out, proc, seconds = quick_demo
    report = out / "report"
    for name in ("README.md", "table.md", "table.txt", "summary.json", "per_case.csv"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    for preset in PRESETS:
        assert (out / "runs" / preset / "last.pt").is_file()
        assert json.loads((report / f"config_{preset}.json").read_text())["data"]["modalities"] \
            == ["t2"]
    # The table has the four modality columns (and the printed one is on stdout).
    header = (report / "table.md").read_text().splitlines()[2]
    cells = [c.strip() for c in header.split(" | ")]
    for title in MODALITY_TITLES:
        assert any(c.startswith(f"{title}: Mean - WT") for c in cells), (title, header)
    assert (report / "table.txt").read_text().strip() in proc.stdout
    # summary.json rows are the two presets; every modality column covers every test case.
    manifest = json.loads((out / "data" / "shards" / "manifest.json").read_text())
    test_ids = sorted(c["id"] for c in manifest["cases"] if c["split"] == "test")
    assert test_ids
    summary = json.loads((report / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == list(PRESETS)
    with open(report / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for m in summary["models"]:
        for col in ("t1", "t1ce", "t2", "flair"):
            cell = m["columns"][col]
            assert cell["n_cases"] == len(test_ids)
            mine = [r for r in rows if r["model"] == m["model"] and r["column"] == col]
            assert sorted(r["case_id"] for r in mine) == test_ids
            assert {r["inputs"] for r in mine} == {col}  # a T2 model tested on `col` sees `col`
            # The summary's WT mean is the mean of the per-case rows.
            wt = sum(float(r["dice_WT"]) for r in mine) / len(mine)
            assert cell["dice_WT"]["mean"] == pytest.approx(wt, abs=1e-9)
    # README: what ran, a wall time per stage, the headline sentences.
    readme = (report / "README.md").read_text()
    for stage in ("data", "shards", *[f"train {p}" for p in PRESETS], "eval"):
        assert f"| {stage} |" in readme, stage
    assert "in-domain T2 WT Dice" in readme and "nproc_per_node=2" in readme
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in readme
    else:
        for png in [f"curves_{p}.png" for p in PRESETS] + ["losses.png"]:
            assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        for preset in PRESETS:
            assert (report / "overlays" / f"{preset}_t1.png").is_file()
    assert not list(out.rglob("*.tmp")) and not (out / ".report.tmp").exists()
    # Stage lines with elapsed time and ETA.
    assert "stage 3/6 train segresnet_t2_noaug ..." in proc.stdout and "ETA" in proc.stdout
    print(f"quick demo: {seconds:.1f} s")


@pytest.mark.slow
def test_second_run_reuses_every_stage_and_a_failing_stage_stops_the_demo(quick_demo):
    out, _, _ = quick_demo
    ckpt = out / "runs" / PRESETS[0] / "last.pt"
    before = ckpt.read_bytes()
    proc, seconds = _run_demo("--quick", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("re-used") == 5  # data, shards, two trainings, eval
    assert ckpt.read_bytes() == before
    assert (out / "report" / "README.md").read_text().count("| re-used") == 5
    # A bad training override: data and shards are re-used, the first training fails, the demo
    # names the command, shows its output tail and exits 1 (one process: no torchrun start-up).
    proc, _ = _run_demo("--quick", "--out", out, "--nproc", "1", "--set", "model.init_filters=0")
    assert proc.returncode == 1
    assert proc.stdout.count("re-used") == 2
    err = proc.stderr
    assert "stage 'train segresnet_t2_noaug' failed" in err
    assert "command:" in err and "tools/train.py" in err and "model.init_filters=0" in err
    assert "exit status: 2" in err and "init_filters" in err.split("lines of its output")[1]
    assert (out / "logs" / "train_segresnet_t2_noaug.log").is_file()

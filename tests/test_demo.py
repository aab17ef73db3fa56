"""tools/demo.py: argument checks, stage skipping, and the whole chain end to end (--quick).

The end-to-end test runs ``python tools/demo.py --quick`` once (synthetic data → shards → one
training per preset → evaluation on the four modalities; well under a minute on 2 cores), checks
the evaluation's outputs against each other, that a second run skips every stage, and that a
failing stage stops the demo with its command and exit status.
"""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tool_modules import load_tool

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "tools" / "demo.py"
PRESETS = ("segresnet_t2_noaug", "segresnet_t2_vffc_grl", "segresnet_t2_sdg")
MODALITY_TITLES = ("T1", "T1CE", "T2", "FLAIR")


def _load_demo():
    return load_tool("demo")


def _run_demo(*args, timeout=300):
    cmd = [sys.executable, str(DEMO), *map(str, args)]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    return proc, time.monotonic() - t0


# ------------------------------------------------------------------------------- unit pieces
def test_default_presets_are_the_baseline_the_write_ups_method_and_the_sdg_one():
    demo = _load_demo()
    assert demo.PRESETS == PRESETS
    assert demo.parse_args([]).presets == list(PRESETS)
    assert demo.parse_args(["--presets", "segresnet_t2_noaug", "x"]).presets == [PRESETS[0], "x"]


def test_bad_arguments_are_refused():
    demo = _load_demo()
    for bad in (["--nproc", "0"], ["--set", "optim.lr"]):
        with pytest.raises(SystemExit) as e:
            demo.parse_args(bad)
        assert e.value.code == 2


def test_training_done_needs_the_last_epoch_and_a_checkpoint(tmp_path):
    demo = _load_demo()
    assert not demo.training_done(tmp_path, 2)
    (tmp_path / "log.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1}) + "\n")
    (tmp_path / "last.pt").write_bytes(b"x")
    assert not demo.training_done(tmp_path, 2)  # interrupted: --resume continues it
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"kind": "epoch", "epoch": 2}) + "\n")
    assert demo.training_done(tmp_path, 2)


def test_thread_count_is_at_least_one_per_process():
    demo = _load_demo()
    for nproc in (1, 2, 64):
        n, why = demo.threads(nproc)
        assert n >= 1 and "core" in why


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
    report = out / "eval"
    for name in ("table.md", "summary.json", "per_case.csv"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    for preset in PRESETS:
        assert (out / "runs" / preset / "last.pt").is_file()
        config = json.loads((out / "runs" / preset / "config.json").read_text())
        assert config["data"]["modalities"] == ["t2"]
    # The table has the four modality columns, and is printed.
    header = next(
        line for line in (report / "table.md").read_text().splitlines() if line.startswith("| Dice")
    )
    cells = [c.strip() for c in header.split(" | ")]
    for title in MODALITY_TITLES:
        assert any(c.startswith(f"{title}: Mean - WT") for c in cells), (title, header)
    assert "Dice" in proc.stdout and "FLAIR" in proc.stdout
    # summary.json rows are the presets; every modality column covers every test case.
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
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
            wt = sum(float(r["dice_WT"]) for r in mine) / len(mine)
            assert cell["dice_WT"]["mean"] == pytest.approx(wt, abs=1e-9)
    # The tools' own precision line, the stage commands and the wall times are printed.
    assert "precision: fp32" in proc.stdout or "precision: bf16" in proc.stdout
    assert f"[demo] train {PRESETS[0]}: " in proc.stdout and "tools/train.py" in proc.stdout
    assert "[demo] wall time: data" in proc.stdout and "total" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in proc.stdout
    else:
        for preset in PRESETS:
            png = out / "runs" / preset / "curves.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
            assert (report / "overlays" / f"{preset}_t1.png").is_file()
    assert not list(out.rglob("*.tmp"))
    print(f"quick demo: {seconds:.1f} s")


@pytest.mark.slow
def test_second_run_skips_every_stage_and_a_failing_stage_stops_the_demo(quick_demo):
    out, _, _ = quick_demo
    ckpt = out / "runs" / PRESETS[0] / "last.pt"
    before = ckpt.read_bytes()
    proc, _ = _run_demo("--quick", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done before, skipped") == len(PRESETS) + 1  # trainings and eval
    assert "[demo] data:" not in proc.stdout and "[demo] shards:" not in proc.stdout
    assert ckpt.read_bytes() == before
    # A new preset with a bad override: its training fails, the demo names the command and the
    # exit status and stops with status 1.
    proc, _ = _run_demo(
        "--quick", "--out", out, "--presets", "segresnet_t2_grl", "--set", "model.init_filters=0"
    )
    assert proc.returncode == 1
    err = proc.stderr
    assert "stage 'train segresnet_t2_grl' failed with exit status 2" in err
    assert "tools/train.py" in err and "model.init_filters=0" in err
    assert "init_filters" in err.split("failed with exit status")[0]  # the tool's own error

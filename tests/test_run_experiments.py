"""tools/run_experiments.py: a 2-preset x 2-seed matrix end to end, skip on re-run, conflicts."""

import csv
import json

import pytest

from tool_modules import load_tool

PRESETS = ("segresnet_t2_noaug", "segresnet_t2_spatial")
TINY = (
    "model.init_filters=4",
    "model.blocks_down=1,1,1",
    "model.blocks_up=1,1",
    "optim.lr=2e-3",
    "data.workers=0",
    "run.amp=none",
    "run.log_every=4",
    "run.plot=false",
)


def _tool():
    return load_tool("run_experiments")


def _argv(data, out, *extra):
    argv = [
        "--data",
        str(data),
        "--out",
        str(out),
        "--presets",
        *PRESETS,
        "--seeds",
        "0",
        "1",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--bootstrap",
        "100",
    ]
    for item in TINY:
        argv += ["--set", item]
    return argv + list(extra)


def test_arguments_are_checked(tiny_shards, tmp_path, capsys):
    tool = _tool()
    with pytest.raises(SystemExit):
        tool.parse_args(["--data", str(tiny_shards), "--presets", "no_such_preset"])
    assert "unknown preset(s) ['no_such_preset']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.parse_args(["--data", str(tiny_shards), "--set", "run.seed=3"])
    assert "set per run by this tool" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # every preset is resolved with the items up front
        tool.parse_args(["--data", str(tiny_shards), "--set", "model.num_domains=5"])
    assert "makes 3 domains but model.num_domains=5" in capsys.readouterr().err
    args = tool.parse_args(
        ["--data", str(tiny_shards), "--scale", "cpu", "--epochs", "3", "--set", "optim.lr=1e-3"]
    )
    assert args.presets == list(tool.DEFAULT_PRESETS) and args.seeds == [0, 1, 2]
    assert args.items[: len(tool.CPU_SCALE)] == list(tool.CPU_SCALE)
    assert args.items[-2:] == ["optim.epochs=3", "optim.lr=1e-3"]  # user items win
    assert tool.main(["--data", str(tiny_shards), "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "27 run(s)" in out and "segresnet_t2_vffc_grl_original seed 2" in out
    assert "tools/train.py --preset segresnet_t2_noaug" in out and "--resume" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.slow
def test_matrix_runs_skips_finished_runs_and_aggregates(tiny_shards, tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "study"
    assert tool.main(_argv(tiny_shards, out)) == 0
    log = capsys.readouterr().out
    for preset in PRESETS:
        for seed in (0, 1):
            run = out / preset / f"seed{seed}"
            done = json.loads((run / "done.json").read_text())
            assert done["settings"]["seed"] == seed and (run / "eval" / "per_case.csv").exists()
            cfg = json.loads((run / "config.json").read_text())
            assert cfg["run"]["seed"] == seed and cfg["model"]["init_filters"] == 4
            assert (
                f"[run {PRESETS.index(preset) * 2 + seed + 1}/4] done    {preset} seed "
                f"{seed} in" in log
            )
    assert log.count(" start ") == 4 and "ETA" in log and "0 failed" in log

    # The aggregate: the write-up's table shape, paired comparisons, files.
    md = (out / "study" / "study.md").read_text()
    assert "| Dice | T1: Mean - WT \\| TC \\| ET | T1CE: Mean - WT \\| TC \\| ET |" in md
    assert "| segresnet_t2_noaug | " in md and "| segresnet_t2_spatial | " in md
    assert "preset − segresnet_t2_noaug" in md and "preset − segresnet_t2_spatial" in md
    assert "Scored volume ('test'): 4 of 4 case(s) whole brain box." in md
    assert "Runs: 4 of 4" in md
    data = json.loads((out / "study" / "study.json").read_text())
    assert data["seeds"] == {p: ["seed0", "seed1"] for p in PRESETS}
    comps = [c for c in data["comparisons"] if c["key"] == "dice_mean"]
    assert {(c["preset"], c["baseline"]) for c in comps} == {
        ("segresnet_t2_spatial", "segresnet_t2_noaug"),
        ("segresnet_t2_noaug", "segresnet_t2_spatial"),
    }
    assert all(c["n_cases"] == 4 and c["n_seeds"] == [2, 2] for c in comps)
    with open(out / "study" / "study_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["column"] for r in rows} >= {"t1", "t1ce", "t2", "flair"}

    # A re-run skips every finished run and aggregates again.
    (out / "study" / "study.md").unlink()
    assert tool.main(_argv(tiny_shards, out)) == 0
    log = capsys.readouterr().out
    assert log.count("(finished earlier)") == 4 and " start " not in log
    assert (out / "study" / "study.md").exists()

    # The same resolved config reached by other items (a repeated --epochs) is the same run.
    assert tool.main(_argv(tiny_shards, out, "--set", "optim.epochs=1")) == 0
    log = capsys.readouterr().out
    assert log.count("(finished earlier)") == 4 and " start " not in log

    # Other settings never reuse these folders: every run fails with a message, nothing trains.
    assert tool.main(_argv(tiny_shards, out, "--set", "optim.lr=1e-3")) == 1
    log = capsys.readouterr().out
    assert log.count("made with other settings") >= 4 and " start " not in log

"""Console output, progress lines, the JSONL log and the curves figure (dgseg/logging_utils.py)."""

import io
import json

from dgseg.logging_utils import Progress, trim_jsonl


def test_progress_line_jsonl_and_curves(tmp_path):
    from dgseg.logging_utils import (
        JsonlWriter,
        format_eta,
        format_progress,
        read_jsonl,
    )

    assert format_eta(3725) == "1:02:05" and format_eta(float("nan")) == "?"
    rec = {
        "kind": "train",
        "epoch": 2,
        "epochs": 10,
        "step": 40,
        "total_steps": 200,
        "loss": 0.51234,
        "dice": 0.4567,
        "lambda": 0.25,
        "lr": 1e-4,
        "samples_per_s": 3.21,
        "eta_s": 125.0,
    }
    line = format_progress(rec)
    for part in (
        "epoch   2/10",
        "step      40/200",
        "loss 0.5123",
        "dice 0.457",
        "λ 0.250",
        "lr 1.00e-04",
        "3.2 samples/s",
        "eta 0:02:05",
    ):
        assert part in line, part
    assert "consistency" not in line
    assert "loss 0.5123 (consistency 0.0200) dice" in format_progress(
        {**rec, "consistency_loss": 0.02}
    )
    log = tmp_path / "log.jsonl"
    writer = JsonlWriter(log)
    writer.write(rec)
    writer.write({**rec, "step": 80})
    writer.write(
        {
            "kind": "val",
            "epoch": 2,
            "step": 80,
            "dice_WT": 0.5,
            "dice_TC": 0.4,
            "dice_ET": 0.3,
            "dice_mean": 0.4,
        }
    )
    with open(log, "a") as f:
        f.write('{"kind": "train", "ste')  # a crash mid-line
    assert [r["step"] for r in read_jsonl(log)] == [40, 80, 80]
    JsonlWriter(tmp_path / "other.jsonl", enabled=False).write(rec)  # non-main ranks write nothing
    assert not (tmp_path / "other.jsonl").exists()
    from dgseg.viz import plot_curves

    png = plot_curves(log, tmp_path / "curves.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert png is None
    else:
        assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_line_counts_notes_and_eta():
    out = io.StringIO()
    bar = Progress(4, label="[x]", unit="cases", every=0.0, stream=out)
    bar.step(note="first")
    bar.step(2)
    bar.step()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[x] 1/4 cases, first  ") and "s each  ETA " in lines[0]
    assert [ln.split()[1] for ln in lines] == ["1/4", "3/4", "4/4"]
    assert lines[-1].endswith("ETA 0:00:00")
    quiet = io.StringIO()
    Progress(3, label="[q]", enabled=False, stream=quiet).step()
    assert quiet.getvalue() == ""
    slow = io.StringIO()
    bar = Progress(5, label="[s]", every=3600.0, stream=slow)
    for _ in range(5):
        bar.step()
    bar.close()
    assert slow.getvalue().count("\n") == 2  # the first update and the last, nothing between


def test_trim_jsonl_drops_records_after_the_resumed_step(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (10, 20, 30)))
    trim_jsonl(log, 20)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [10, 20]
    trim_jsonl(tmp_path / "missing.jsonl", 5)  # nothing to trim

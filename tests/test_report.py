"""Evaluation reports (dgseg/evaluation/report.py): bootstrap, aggregation over seeds, tables,
writers."""

import csv
import json
import math

import numpy as np
import pytest

from dgseg.evaluation.report import (
    bootstrap_ci,
    format_cell,
    format_table,
    summarize,
    write_csv,
    write_json,
    write_report,
)
from dgseg.evaluation.scoring import EVAL_RULE


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_two_points_hand_computed():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0], n_boot=20000, seed=3) == (0.0, 1.0)


def test_bootstrap_contains_mean_deterministic_and_narrows():
    rng = np.random.default_rng(0)
    v = rng.beta(5, 2, size=40)
    lo, hi = bootstrap_ci(v, seed=7)
    assert lo < v.mean() < hi
    assert bootstrap_ci(v, seed=7) == (lo, hi)  # seeded: identical
    assert bootstrap_ci(v, seed=8) != (lo, hi)
    # The normal-theory half-width 1.96 * sd / sqrt(n) is a close independent check.
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    lo4, hi4 = bootstrap_ci(np.tile(v, 4), seed=7)  # 4x the cases: about half the width
    assert (hi4 - lo4) == pytest.approx((hi - lo) / 2, rel=0.2)


def test_bootstrap_edge_cases():
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert bootstrap_ci([0.4] * 5) == pytest.approx((0.4, 0.4))
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0, 2.0], alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=-1)
    assert all(math.isnan(x) for x in bootstrap_ci([1.0, 2.0], n_boot=0))  # 0: no CIs


# ----------------------------------------------------------------------------- aggregation
def _rows(model, ckpt, column, dice_wt, inputs=None):
    out = []
    for i, d in enumerate(dice_wt):
        r = {
            "model": model,
            "checkpoint": ckpt,
            "column": column,
            "inputs": inputs or column,
            "case_id": f"c{i}",
        }
        for metric, base in (("dice", d), ("hd95", 10 * d)):
            for reg, v in zip(("WT", "TC", "ET"), (base, base / 2, 0.0)):
                r[f"{metric}_{reg}"] = v
            r[f"{metric}_mean"] = (base + base / 2) / 3
        out.append(r)
    return out


def test_summarize_seeds_mean_sd_and_ci():
    recs = (
        _rows("noaug", "a.pt", "t2", [0.8, 0.6, 0.7])
        + _rows("noaug", "b.pt", "t2", [0.6, 0.4, 0.5])
        + _rows("noaug", "a.pt", "t1", [0.1, 0.0, 0.2])
        + _rows("noaug", "b.pt", "t1", [0.3, 0.2, 0.1])
    )
    s = summarize(recs, n_boot=500, seed=1)
    (m,) = s["models"]
    assert m["model"] == "noaug" and m["checkpoints"] == ["a.pt", "b.pt"]
    assert list(m["columns"]) == ["t1", "t2"]  # MODALITIES order, not first-seen order
    t2 = m["columns"]["t2"]
    assert t2["n_cases"] == 3 and t2["n_checkpoints"] == 2
    assert [e["dice_WT"]["mean"] for e in t2["per_checkpoint"]] == pytest.approx([0.7, 0.5])
    assert t2["dice_WT"]["mean"] == pytest.approx(0.6)
    assert t2["dice_WT"]["sd"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.7, 0.5
    assert t2["dice_TC"]["mean"] == pytest.approx(0.3)
    lo, hi = t2["dice_WT"]["ci"]  # bootstrap of the per-case averages 0.7, 0.5, 0.6
    assert 0.5 <= lo <= 0.6 <= hi <= 0.7
    json.dumps(s)  # serialisable


def test_table_has_named_columns_values_and_x_cells():
    recs = (
        _rows("segresnet_t2", "a.pt", "t1", [0.05, 0.03])
        + _rows("segresnet_t2", "a.pt", "t2", [0.75, 0.73])
        + _rows("unet_stacked", "u.pt", "own", [0.7, 0.76], inputs="t1+t1ce+t2+flair")
    )
    s = summarize(recs, n_boot=100)
    md = format_table(s, style="markdown", footer=[EVAL_RULE])
    header = md.splitlines()[0]
    assert header == (
        "| Dice | T1: Mean - WT \\| TC \\| ET | T2: Mean - WT \\| TC \\| ET "
        "| Own inputs: Mean - WT \\| TC \\| ET |"
    )
    rows = [ln for ln in md.splitlines() if ln.startswith("| segresnet") or ln.startswith("| unet")]
    # WT 0.04, TC 0.02, ET 0, mean (0.04 + 0.02) / 3 = 0.02
    assert "| 0.02 - 0.04 \\| 0.02 \\| 0.00 |" in rows[0]
    assert rows[0].endswith("| x |")  # the T2 model has no own-input run here
    assert rows[1].split(" | ")[1:3] == ["x", "x"]  # stacked: single-modality cells 'x'
    assert "Input rule" in md
    text = format_table(s, style="text")
    lines = text.splitlines()
    assert lines[0].split() == ["Dice", "T1", "T2", "Own", "inputs"]
    assert lines[1].count("Mean - WT | TC | ET") == 3
    hd = format_table(s, metric="hd95", style="text")
    assert "0.2 - 0.4 | 0.2 | 0.0" in hd  # HD95 with one decimal
    with pytest.raises(ValueError, match="style"):
        format_table(s, style="html")


def test_cell_with_several_checkpoints_shows_sd():
    recs = _rows("m", "a.pt", "t2", [0.8]) + _rows("m", "b.pt", "t2", [0.6])
    cell = format_cell(summarize(recs, n_boot=10)["models"][0]["columns"]["t2"])
    assert cell == "0.35±0.07 - 0.70±0.14 | 0.35±0.07 | 0.00±0.00"


# ----------------------------------------------------------------------------- writers
def test_writers_are_atomic_and_readable(tmp_path):
    rows = [{"case_id": "a", "dice_WT": 0.5}, {"case_id": "b", "dice_WT": 1.0, "extra": 2}]
    write_csv(tmp_path / "x.csv", rows)
    with open(tmp_path / "x.csv") as f:
        back = list(csv.DictReader(f))
    assert back[0] == {"case_id": "a", "dice_WT": "0.5", "extra": ""}
    assert back[1]["extra"] == "2"
    write_json(tmp_path / "sub" / "s.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "sub" / "s.json").read_text()) == {"a": [1, 2]}
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_report_files_and_text(tmp_path):
    recs = _rows("m", "c0", "t2", [0.5, 0.7]) + _rows("m", "c0", "own", [0.5, 0.7], inputs="t2")
    text = write_report(recs, tmp_path, n_boot=50, settings={"note": 1}, footer=["extra line"])
    assert "Per-case Dice (BraTS 2021 rules)" in text and "extra line" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"] == {"note": 1} and summary["split"] == "test"
    assert "Mean of Per-case Dice" in (tmp_path / "table.md").read_text()
    with open(tmp_path / "per_case.csv") as f:
        assert len(list(csv.DictReader(f))) == 4

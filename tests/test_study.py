"""dgseg.evaluation.study: mean ± sd over seeds, CIs over cases, paired comparisons, writers."""

import csv
import json

import numpy as np
import pytest

from dgseg.constants import MODALITIES
from dgseg.evaluation.study import (
    aggregate,
    case_matrix,
    format_markdown,
    paired_bootstrap,
    read_records,
    write_study,
)

CASES = [f"case{i:02d}" for i in range(12)]


def _records(preset, seeds, score, columns=MODALITIES, cases=CASES):
    """Records like tools/evaluate.py's per_case.csv rows; ``score(seed, column, case_index)``
    gives (WT, TC, ET) Dice."""
    out = []
    for s in seeds:
        for col in columns:
            for i, cid in enumerate(cases):
                wt, tc, et = score(s, col, i)
                rec = {
                    "model": preset,
                    "checkpoint": f"seed{s}",
                    "column": col,
                    "inputs": col,
                    "case_id": cid,
                    "dice_WT": wt,
                    "dice_TC": tc,
                    "dice_ET": et,
                    "dice_mean": (wt + tc + et) / 3,
                }
                for r in ("WT", "TC", "ET", "mean"):
                    rec[f"hd95_{r}"] = 10.0 * (1 - rec[f"dice_{r}" if r != "mean" else "dice_mean"])
                out.append(rec)
    return out


def _noisy(base, seed_offset=0.0):
    def score(s, col, i):
        rng = np.random.default_rng([s, MODALITIES.index(col), i])  # deterministic
        v = np.clip(base + 0.15 * rng.standard_normal(3) + seed_offset * s, 0, 1)
        return tuple(float(x) for x in v)

    return score


def test_mean_sd_over_seeds_hand_computed():
    # seed 0 scores 0.2 everywhere, seed 1 scores 0.6: cell mean 0.4, sd 0.283 (n - 1)
    recs = _records("p", [0, 1], lambda s, c, i: (0.2 + 0.4 * s,) * 3)
    res = aggregate(recs, n_boot=200)
    cell = res["summary"]["models"][0]["columns"]["t2"]
    assert cell["dice_mean"]["mean"] == pytest.approx(0.4)
    assert cell["dice_mean"]["sd"] == pytest.approx(np.std([0.2, 0.6], ddof=1))
    assert cell["dice_mean"]["ci"] == pytest.approx([0.4, 0.4])  # every case averages to 0.4
    md = format_markdown(res)
    assert "T2: Mean - WT \\| TC \\| ET" in md and "0.40±0.28 - 0.40±0.28" in md


def test_identical_presets_ci_contains_zero():
    a = _records("segresnet_t2_noaug", [0, 1, 2], _noisy(0.6))
    twin = [{**r, "model": "twin"} for r in a]
    res = aggregate(a + twin, n_boot=500)
    comps = [c for c in res["comparisons"] if c["preset"] == "twin"]
    assert len(comps) == 4 * 4  # 4 columns x (mean, WT, TC, ET)
    for c in comps:
        assert c["mean_diff"] == 0.0 and c["ci"][0] <= 0.0 <= c["ci"][1]
        assert not c["excludes_zero"]
    # one seed each: the paired case bootstrap of identical scores is exactly [0, 0]
    one = aggregate([r for r in a + twin if r["checkpoint"] == "seed0"], n_boot=200)
    assert all(c["ci"] == [0.0, 0.0] for c in one["comparisons"])


def test_broken_model_ci_excludes_zero_and_is_marked():
    good = _records("segresnet_t2_noaug", [0, 1, 2], _noisy(0.6))
    broken = _records("broken", [0, 1, 2], lambda s, c, i: (0.0, 0.0, 0.0))
    res = aggregate(good + broken, n_boot=500)
    comps = [c for c in res["comparisons"] if c["key"] == "dice_mean"]
    assert {c["column"] for c in comps} == set(MODALITIES)
    for c in comps:
        assert c["excludes_zero"] and c["ci"][1] < 0 and c["mean_diff"] < -0.4
    md = format_markdown(res)
    assert "preset − segresnet_t2_noaug" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| broken |") and "*" in ln)
    assert row.count(" *") == 4


def test_pairing_matches_case_ids_not_positions():
    a = _records("segresnet_t2_noaug", [0], lambda s, c, i: (i / 20,) * 3, columns=("t2",))
    b = _records("shifted", [0], lambda s, c, i: (i / 20 + 0.01,) * 3, columns=("t2",))
    b = b[::-1] + _records(
        "shifted", [0], lambda s, c, i: (0.9,) * 3, columns=("t2",), cases=["only_here"]
    )  # reversed order and an unmatched case
    res = aggregate(a + b, columns=("t2",), n_boot=300)
    c = next(c for c in res["comparisons"] if c["key"] == "dice_mean")
    assert c["mean_diff"] == pytest.approx(0.01)  # every pair differs by exactly 0.01
    assert c["ci"] == pytest.approx([0.01, 0.01]) and c["excludes_zero"]
    assert c["n_cases"] == len(CASES) and c["n_cases_only_one"] == 1


def test_seed_resampling_widens_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(0)
    per_case = rng.uniform(0.3, 0.7, size=30)
    a = np.stack([per_case + 0.2, per_case - 0.2])  # two seeds far apart, mean = per_case
    b = per_case[None] + rng.normal(0, 0.01, size=(1, 30))
    wide = paired_bootstrap(a, b, n_boot=2000, seed=1)
    narrow = paired_bootstrap(a, b, n_boot=2000, seed=1, resample_seeds=False)
    assert wide["mean_diff"] == pytest.approx(narrow["mean_diff"])
    assert wide["ci"][1] - wide["ci"][0] > 5 * (narrow["ci"][1] - narrow["ci"][0])
    assert wide["per_seed_a"] == pytest.approx([per_case.mean() + 0.2, per_case.mean() - 0.2])
    with pytest.raises(ValueError, match="same cases"):
        paired_bootstrap(a, b[:, :3])


def test_case_matrix_keeps_cases_every_seed_scored():
    recs = _records("p", [0, 1], lambda s, c, i: (0.5,) * 3, columns=("t1",))
    recs = [r for r in recs if not (r["checkpoint"] == "seed1" and r["case_id"] == "case03")]
    seeds, cases, values = case_matrix(recs, "p", "t1")
    assert seeds == ["seed0", "seed1"] and "case03" not in cases and values.shape == (2, 11)
    assert case_matrix(recs, "p", "flair")[2].shape == (0, 0)


def test_read_records_and_writers(tmp_path):
    recs = _records("x", [0], _noisy(0.5), columns=("t1", "t2"))
    path = tmp_path / "per_case.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows({**r, "model": "run_name", "checkpoint": "/somewhere/best.pt"} for r in recs)
    back = read_records(path, preset="segresnet_t2_noaug", seed=3)
    assert back[0]["model"] == "segresnet_t2_noaug" and back[0]["checkpoint"] == "seed3"
    assert back[0]["dice_WT"] == pytest.approx(recs[0]["dice_WT"]) and back[0]["seed"] == 3
    other = _records("segresnet_t2_spatial", [0], _noisy(0.55), columns=("t1", "t2"))
    res = aggregate(back + other, columns=("t1", "t2"), n_boot=100)
    paths = write_study(res, tmp_path / "study", footer=["Scored volume: test."])
    md = paths["md"].read_text()
    assert md.startswith("# Cross-modality ablation study") and "Scored volume: test." in md
    assert "preset − segresnet_t2_noaug" in md and "preset − segresnet_t2_spatial" in md
    with open(paths["table_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {r["preset"] for r in rows} == {"segresnet_t2_noaug", "segresnet_t2_spatial"}
    assert {"mean", "sd", "ci_lo", "ci_hi", "n_seeds"} <= set(rows[0])
    with open(paths["paired_csv"]) as f:
        paired = list(csv.DictReader(f))
    assert len(paired) == 2 * 2 * 4  # both directions x 2 columns x 4 Dice keys
    data = json.loads(paths["json"].read_text())
    assert data["presets"] == ["segresnet_t2_noaug", "segresnet_t2_spatial"]
    assert data["footer"] == ["Scored volume: test."]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "png" not in paths
    else:
        assert paths["png"].stat().st_size > 0

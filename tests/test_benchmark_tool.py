"""tools/benchmark.py: a smoke run of the SDG-augmentation section, JSON out."""

from __future__ import annotations

import json

from dgseg.transforms import INTENSITY_AUGS

from tool_modules import load_tool


def test_sdg_section_times_every_augmentation(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--sections", "sdg", "--sdg-size", "24", "--repeats", "2"]
    assert load_tool("benchmark").main([*argv, "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = [r for r in result["results"] if r["section"] == "sdg"]
    assert [r["augmentation"] for r in rows] == [a for a in INTENSITY_AUGS if a != "none"]
    for r in rows:
        assert "error" not in r and r["device"] == "cpu" and r["voxels"] == 24**3
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert 0.2 < r["brain_fraction"] < 0.9


def test_adapt_section_times_every_adaptation(tmp_path):
    from dgseg.inference.adaptation import ADAPT_METHODS

    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--sections", "adapt", "--adapt-size", "24", "--repeats", "1"]
    assert load_tool("benchmark").main([*argv, "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["results"] if r["section"] == "adapt"]
    assert rows[0]["method"] == "gradient_map"
    for repr_ in ("intensity", "gradient"):
        got = [r["method"] for r in rows if r.get("input_repr") == repr_]
        assert got == list(ADAPT_METHODS)
    for r in rows:
        assert "error" not in r and r["threads"] == 1 and r["voxels"] == 24**3
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
    steps = {r["method"]: r["steps"] for r in rows if r.get("input_repr") == "gradient"}
    assert steps["none"] == steps["match"] == 0 and steps["tent"] >= 1 and steps["prior"] >= 1

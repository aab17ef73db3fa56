"""tools/benchmark.py: smoke runs of the SDG-augmentation and MONAI-peer sections, JSON out."""

from __future__ import annotations

import json

import pytest

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


def test_peer_section_times_monai_and_dgseg_interleaved(tmp_path, monkeypatch):
    pytest.importorskip("monai")
    monkeypatch.setenv("DGSEG_CACHE_DIR", str(tmp_path))
    out = tmp_path / "peer.json"
    argv = ["--device", "cpu", "--sections", "--peer", "monai", "--size", "24"]
    argv += ["--repeats", "2", "--warmup", "0", "--threads", "1", "--json", str(out)]
    assert load_tool("benchmark").main(argv) == 0
    results = json.loads(out.read_text())["results"]
    rows = {r["variant"]: r for r in results if r["section"] == "peer"}
    expected = {"monai_fp32", "dgseg_plain_fp32", "dgseg_default"}
    if result_is_bf16(results):
        expected |= {"monai_bf16", "dgseg_fp32", "dgseg_default_torch_adamw"}
        expected |= {"dgseg_bf16_other_layout"}
        assert rows["monai_bf16"]["ratio_to_monai_bf16"] == 1.0
    assert set(rows) == expected
    assert rows["monai_fp32"]["ratio_to_monai_fp32"] == 1.0
    for r in rows.values():
        assert len(r["times_s"]) == 2 and r["median_s"] > 0
    (check,) = [r for r in results if r["section"] == "peer_check"]
    assert check["max_abs_output_diff_same_weights"] < 1e-4  # same weights, same network
    assert all(why.startswith("auto: measured") for why in check["dgseg_auto_layout"].values())


def result_is_bf16(results: list) -> bool:
    return any(r.get("variant") == "dgseg_default" and r["precision"] == "bf16" for r in results)


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

"""Data-path benchmarks (data_prep/bench.py): a smoke run of each."""

from __future__ import annotations


def test_bench_functions_smoke(tmp_path):
    from data_prep.bench import bench_loader, bench_prepare, bench_storage

    r = bench_prepare(tmp_path, n_cases=1, shape=(32, 32, 24), size=16)
    assert r["prepare_s_per_case"] > 0 and r["decompress_s_per_case"] > 0 and r["ratio"] > 0
    r = bench_loader(tmp_path, n_cases=2, shape=(32, 32, 24), size=16, epochs=1)
    assert {"io", "aug", "aug_rot"} <= set(r) and r["io"]["speedup"] > 0
    r = bench_storage(
        tmp_path,
        n_cases=1,
        shape=(32, 32, 24),
        size=16,
        patch=8,
        repeats=1,
        variants=(("none/volume", "none", "volume"), ("lzf/8", "lzf", 8)),
    )
    assert set(r["variants"]) == {"none/volume", "lzf/8"}
    assert not list(tmp_path.iterdir())  # temporary files removed

"""HDF5 shards (data_prep/shards.py): every storage option stores the same arrays."""

from __future__ import annotations

import json

import h5py
import pytest

from data_prep.pipeline import prepare, verify_output


def test_storage_options_store_the_same_arrays(raw_sets, tmp_path):
    crcs = []
    for kw in (
        {},
        {"compression": "lzf"},
        {"compression": "gzip", "chunks": 8, "label_compression": "gzip"},
    ):
        out = tmp_path / str(len(crcs))
        assert prepare(raw_sets / "brats2021", out, size=16, progress=False, **kw).exit_code == 0
        assert verify_output(out) == []
        cases = json.loads((out / "manifest.json").read_text())["cases"]
        crcs.append([c["stored_crc32"] for c in cases])
        with h5py.File(out / cases[0]["shard"], "r") as f:
            ds = f[cases[0]["id"]]["t1"]
            assert (ds.compression, ds.chunks) == {
                0: (None, None),
                1: ("lzf", (16, 16, 16)),
                2: ("gzip", (8, 8, 8)),
            }[len(crcs) - 1]
    assert crcs[0] == crcs[1] == crcs[2]
    with pytest.raises(ValueError, match="contiguous"):
        prepare(raw_sets / "brats2021", tmp_path / "x", compression="lzf", chunks="contiguous")

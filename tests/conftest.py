"""Shared fixtures: a tiny prepared synthetic dataset, built once per test session."""

from pathlib import Path

import pytest
import torch

# 16 synthetic BraTS-2021-layout cases of 40x40x30 voxels (brain box <= 32 on every axis),
# prepared at 32^3: 8 train / 4 val / 4 test.
TINY_CASES = 16
TINY_SHAPE = (40, 40, 30)
TINY_SIZE = 32


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Folder with manifest.json and shards/ (the output of tools/prepare_brats.py)."""
    from data_prep.pipeline import prepare
    from data_prep.synthetic import write_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    write_dataset(root / "raw", TINY_CASES, shape=TINY_SHAPE, seed=0)
    result = prepare(
        root / "raw", root / "shards", size=TINY_SIZE, split=(0.5, 0.25, 0.25), progress=False
    )
    assert result.exit_code == 0
    return root / "shards"


@pytest.fixture
def one_thread():
    """One torch thread: on tiny tensors more threads only add contention on a small machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

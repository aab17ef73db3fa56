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


@pytest.fixture(scope="session")
def raw_sets(tmp_path_factory) -> Path:
    """The same 3 synthetic cases (same seed) written in the 2021, 2023 and MSD layouts
    (``prepared_data.SHAPE``); read-only."""
    from data_prep.synthetic import write_dataset

    from prepared_data import SHAPE

    root = tmp_path_factory.mktemp("raw")
    for layout in ("brats2021", "brats2023", "msd"):
        write_dataset(root / layout, 3, shape=SHAPE, seed=3, layout=layout)
    return root


@pytest.fixture(scope="session")
def prepared_sets(raw_sets, tmp_path_factory):
    """(folder, {layout: PrepareResult}): each layout of ``raw_sets`` prepared at
    ``prepared_data.SIZE``; read-only."""
    from data_prep.pipeline import prepare

    from prepared_data import SIZE

    out = tmp_path_factory.mktemp("prepared")
    results = {}
    for layout in ("brats2021", "brats2023", "msd"):
        results[layout] = prepare(
            raw_sets / layout, out / layout, size=SIZE, workers=1, cases_per_shard=2, progress=False
        )
    return out, results


@pytest.fixture
def one_thread():
    """One torch thread: on tiny tensors more threads only add contention on a small machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def _layout_probe_cache(tmp_path_factory):
    """Layout measurements of "auto" runs go to a session folder, not the user's cache."""
    import os

    old = os.environ.get("DGSEG_CACHE_DIR")
    os.environ["DGSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("dgseg_cache"))
    yield
    if old is None:
        os.environ.pop("DGSEG_CACHE_DIR", None)
    else:
        os.environ["DGSEG_CACHE_DIR"] = old

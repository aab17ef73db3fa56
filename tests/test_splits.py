"""User-given splits and cross-validation folds: split files into the manifest and back out
through ``split_cases`` / ``ShardDataset``, refusals naming the offending ids."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from data_prep.pipeline import prepare
from data_prep.splits import assign_folds, read_split_file, splits_from_file
from data_prep.synthetic import write_dataset
from dgseg.config import DataConfig, apply_overrides
from dgseg.data.dataset import ShardDataset
from dgseg.data.manifest import load_manifest, split_cases
from dgseg.presets import PRESETS, get_preset

REPO = Path(__file__).resolve().parents[1]
N_CASES = 8
SHAPE = (24, 24, 20)
SIZE = 16


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("raw_splits")
    ids = write_dataset(root, N_CASES, shape=SHAPE, seed=5)
    return root, sorted(ids)


def _prepare(raw_dir: Path, out: Path, **kw):
    return prepare(raw_dir, out, size=SIZE, cases_per_shard=4, progress=False, **kw)


def test_read_split_file_json_and_csv(tmp_path):
    js = tmp_path / "s.json"
    js.write_text(json.dumps({"a": "train", "b": "VAL", "c": "test", "d": 2, "e": "1"}))
    assert read_split_file(js) == {"a": "train", "b": "val", "c": "test", "d": 2, "e": 1}
    cs = tmp_path / "s.csv"
    cs.write_text("case_id,split\na,train\nb, val\nc,test\nd,0\n")
    assert read_split_file(cs) == {"a": "train", "b": "val", "c": "test", "d": 0}
    bad = {
        "x.json": '{"a": "training"}',
        "y.json": '{"a": -1}',
        "z.json": '{"a": true}',
        "w.json": '["a", "train"]',
        "v.json": '{"a": "train", "a": "test"}',
        "u.csv": "id,fold\na,1\n",
        "t.csv": "case_id,split\na,train\na,test\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="split file"):
            read_split_file(tmp_path / name)


def test_split_file_round_trips_into_the_manifest(raw, tmp_path):
    raw_dir, ids = raw
    wanted = {cid: ("test" if k < 2 else "val" if k < 3 else "train") for k, cid in enumerate(ids)}
    sf = tmp_path / "paper_split.csv"
    sf.write_text("case_id,split\n" + "".join(f"{c},{s}\n" for c, s in wanted.items()))
    res = _prepare(raw_dir, tmp_path / "out", split_file=sf)
    assert res.exit_code == 0
    m = load_manifest(tmp_path / "out")
    assert {c["id"]: c["split"] for c in m["cases"]} == wanted
    assert m["params"]["split_source"] == "file" and m["params"]["split_file"] == sf.name
    assert m["split_counts"] == {"train": 5, "val": 1, "test": 2, "unlabelled": 0}
    assert [c["id"] for c in split_cases(m, "test")] == ids[:2]
    assert all("fold" not in c for c in m["cases"])
    # fold indices in the file: folds of the development pool, test kept
    js = tmp_path / "cv.json"
    js.write_text(json.dumps({c: ("test" if k < 2 else k % 3) for k, c in enumerate(ids)}))
    assert _prepare(raw_dir, tmp_path / "out", split_file=js).exit_code == 0  # shards re-used
    m = load_manifest(tmp_path / "out")
    folds = {c["id"]: c.get("fold") for c in m["cases"]}
    assert folds == {c: (None if k < 2 else k % 3) for k, c in enumerate(ids)}
    assert m["params"]["folds"] == 3 and m["params"]["fold_counts"] == [2, 2, 2]
    assert [c["id"] for c in split_cases(m, "val", fold=1)] == [ids[4], ids[7]]
    assert len(split_cases(m, "train", fold=1)) == 4 and len(split_cases(m, "test", 1)) == 2


def test_bad_split_file_is_refused_naming_ids_before_any_work(raw, tmp_path, capsys):
    raw_dir, ids = raw
    sf = tmp_path / "bad.json"
    listed = {c: "train" for c in ids[2:]}  # ids[0], ids[1] missing
    listed["BraTS2021_99999"] = "test"  # unknown
    sf.write_text(json.dumps(listed))
    with pytest.raises(ValueError) as e:
        _prepare(raw_dir, tmp_path / "out", split_file=sf)
    msg = str(e.value)
    assert "BraTS2021_99999" in msg and ids[0] in msg and ids[1] in msg and "\n" not in msg
    assert not list((tmp_path / "out" / "shards").glob("*.h5"))  # refused before any work
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import prepare_brats
    finally:
        sys.path.pop(0)
    rc = prepare_brats.main(
        [
            "--input",
            str(raw_dir),
            "--output",
            str(tmp_path / "o2"),
            "--split-file",
            str(sf),
            "--quiet",
            "--workers",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "unknown case id" in err and "BraTS2021_99999" in err and ids[0] in err


def test_folds_are_seeded_per_patient_and_drive_training_splits(raw, tmp_path):
    raw_dir, ids = raw
    res = _prepare(raw_dir, tmp_path / "out", folds=3, split=(0.5, 0.25, 0.25), seed=1)
    assert res.exit_code == 0
    m = load_manifest(tmp_path / "out")
    test = [c for c in m["cases"] if c["split"] == "test"]
    dev = [c for c in m["cases"] if c["split"] in ("train", "val")]
    assert test and all("fold" not in c for c in test)
    assert sorted({c["fold"] for c in dev}) == [0, 1, 2]
    assert m["params"]["fold_counts"] == [2, 2, 2]  # 6 development patients, round-robin
    for i in range(3):
        val = split_cases(m, "val", fold=i)
        train = split_cases(m, "train", fold=i)
        assert {c["fold"] for c in val} == {i} and i not in {c["fold"] for c in train}
        assert len(val) + len(train) == len(dev)
    ds = ShardDataset(tmp_path / "out", split="val", fold=2)
    assert sorted(c["id"] for c in ds.cases) == sorted(c["id"] for c in dev if c["fold"] == 2)
    with pytest.raises(ValueError, match="0..2"):
        split_cases(m, "val", fold=3)
    with pytest.raises(ValueError, match="exclude"):
        _prepare(raw_dir, tmp_path / "x", folds=2, split_file=_cv_file(tmp_path, ids))
    # an old-style manifest (no folds) still loads; asking it for a fold is a clear error
    plain = _prepare(raw_dir, tmp_path / "plain")
    assert plain.exit_code == 0
    m = load_manifest(tmp_path / "plain")
    assert "folds" not in m["params"] and split_cases(m, "train")
    with pytest.raises(ValueError, match="no folds"):
        split_cases(m, "train", fold=0)


def _cv_file(tmp_path: Path, ids: list[str]) -> Path:
    p = tmp_path / "cv_ints.json"
    p.write_text(json.dumps({c: k % 2 for k, c in enumerate(ids)}))
    return p


def test_patients_and_folds_rules():
    patients = {"p1-000": "p1", "p1-001": "p1", "p2-000": "p2", "p3-000": "p3"}
    with pytest.raises(ValueError, match="p1"):  # one patient in train and test: leak
        splits_from_file(
            {"p1-000": "train", "p1-001": "test", "p2-000": "val", "p3-000": "test"}, patients
        )
    with pytest.raises(ValueError, match="missing.*p3-000"):
        splits_from_file({"p1-000": 0, "p1-001": 0, "p2-000": 1}, patients)
    with pytest.raises(ValueError, match="0..K-1"):
        splits_from_file({"p1-000": 0, "p1-001": 0, "p2-000": 2, "p3-000": 2}, patients)
    folds = assign_folds(patients, 2, seed=0)
    assert folds["p1-000"] == folds["p1-001"] and sorted(set(folds.values())) == [0, 1]
    assert folds == assign_folds(patients, 2, seed=0)  # deterministic
    with pytest.raises(ValueError, match="at least 4"):
        assign_folds(patients, 4, seed=0)


def test_data_config_fold():
    assert DataConfig().fold is None
    cfg = apply_overrides(get_preset(next(iter(PRESETS))), ["data.fold=2"])
    assert cfg.data.fold == 2
    with pytest.raises(ValueError, match="data.fold"):
        DataConfig(fold=-1)

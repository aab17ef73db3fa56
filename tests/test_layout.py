"""The package layout a reader is promised: public names at their documented places, every preset
listed by ``tools/train.py --list-presets``, run folders of the flat layout still loading, and the
style gate covering every package folder."""

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).parent / "data" / "legacy_run"

# (module, name) pairs named in README.rst and docs/ARCHITECTURE.md.
PUBLIC = [
    ("dgseg.layers", "VFFC"),
    ("dgseg.layers", "GradientReversal"),
    ("dgseg.layers", "DomainClassifier"),
    ("dgseg.models", "SegResNet"),
    ("dgseg.models", "UNet3D"),
    ("dgseg.models", "build_model"),
    ("dgseg.config", "Config"),
    ("dgseg.config", "apply_overrides"),
    ("dgseg.presets", "PRESETS"),
    ("dgseg.presets", "get_preset"),
    ("dgseg.presets", "CPU_RECIPE"),
    ("dgseg.data.dataset", "ShardDataset"),
    ("dgseg.training.fit", "main"),
    ("dgseg.training.engine", "train_one_epoch"),
    ("dgseg.training.losses", "SegLoss"),
    ("dgseg.training.checkpoint", "load_segmenter"),
    ("dgseg.inference.sliding_window", "sliding_window_inference"),
    ("dgseg.inference.predict_case", "predict_to_file"),
    ("dgseg.evaluation.metrics", "region_metrics"),
    ("dgseg.evaluation.lesion_metrics", "lesion_region_metrics"),
    ("dgseg.evaluation.cross_modality", "evaluate_cases"),
    ("dgseg.evaluation.report", "write_report"),
]


@pytest.mark.parametrize("module,name", PUBLIC)
def test_public_name_at_its_documented_place(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_package_top_level_is_stages_plus_shared_modules():
    top = sorted(p.name for p in (ROOT / "dgseg").iterdir() if not p.name.startswith("__"))
    stages = {"data", "transforms", "layers", "models", "training", "inference", "evaluation"}
    assert stages <= set(top)
    shared = [n for n in top if n.endswith(".py")]
    assert len(shared) <= 8, shared


def test_list_presets_lists_every_preset():
    from dgseg.presets import PRESETS

    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), "--list-presets"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert listed == list(PRESETS)
    assert all(len(line.split()) > 2 for line in out.splitlines())  # each has a description


def test_legacy_checkpoint_gives_the_same_logits():
    """A checkpoint written by the flat layout (tests/data/legacy_run) rebuilds the same network."""
    from dgseg.training.checkpoint import load_segmenter

    net, cfg = load_segmenter(LEGACY / "last.pt")
    ref = np.load(LEGACY / "reference_logits.npz")
    with torch.no_grad():
        out = net(torch.from_numpy(ref["input"]))
    assert cfg.model.vffc and cfg.model.grl
    np.testing.assert_allclose(out.numpy(), ref["logits"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def legacy_shards(tmp_path_factory) -> Path:
    """The data the legacy run was trained on: 8 synthetic cases, 4 train, prepared at 32³."""
    from data_prep.pipeline import prepare
    from data_prep.synthetic import write_dataset

    root = tmp_path_factory.mktemp("legacy_data")
    write_dataset(root / "raw", 8, shape=(40, 40, 30), seed=0)
    result = prepare(
        root / "raw", root / "shards", size=32, split=(0.5, 0.25, 0.25), progress=False
    )
    assert result.exit_code == 0
    return root / "shards"


def test_legacy_run_folder_resumes_and_evaluates(legacy_shards, tmp_path):
    """The legacy run folder passes --resume's checks against its saved config (its one epoch is
    done), and evaluate.py scores its checkpoint."""
    from dgseg.training import fit

    run = tmp_path / "legacy_vffc_grl"
    run.mkdir()
    for name in ("last.pt", "config.json", "log.jsonl"):
        shutil.copy(LEGACY / name, run / name)
    assert json.loads((run / "config.json").read_text())["data"]["bezier"] == "partition"
    argv = [
        "--preset",
        "segresnet_t2_vffc_grl",
        "--data",
        str(legacy_shards),
        "--out",
        str(tmp_path),
    ]
    argv += ["--set", "run.name=legacy_vffc_grl", "--resume"]
    assert fit.main(argv) == 0
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r.get("kind") == "epoch"] == [1]
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--checkpoint", str(run / "last.pt")]
        + ["--data", str(legacy_shards), "--out", str(tmp_path / "eval"), "--bootstrap", "10"]
        + ["--modalities", "t2", "--max-cases", "2", "--device", "cpu", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "eval" / "summary.json").exists() or any((tmp_path / "eval").iterdir())


def test_style_gate_covers_dgseg_data():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (the test extra pins it)")
    out = subprocess.run(
        [ruff, "check", "--show-files"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    files = {Path(line.strip()).resolve() for line in out.splitlines() if line.strip()}
    for f in (ROOT / "dgseg" / "data").glob("*.py"):
        assert f.resolve() in files, f

"""Atomic checkpoints, weights_only loading, RNG state capture (dgseg/training/checkpoint.py)."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from dgseg.config import Config
from dgseg.presets import PRESETS
from dgseg.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)


def _draws():
    return (
        torch.rand(5).tolist(),
        torch.randn(3).tolist(),
        np.random.rand(4).tolist(),
        np.random.standard_normal(3).tolist(),
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
    )


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # odd count: numpy caches the second Box-Muller value
    random.gauss(0.0, 1.0)  # Python's random caches gauss_next
    save_checkpoint(tmp_path / "rng.pt", {"rng": [capture_rng_state()]})
    expected = _draws()
    _draws()  # move every stream on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"][0])
    assert _draws() == expected


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.GroupNorm(1, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    model(torch.randn(1, 1, 5, 5, 5)).sum().backward()
    opt.step()
    sched.step()
    cfg = PRESETS["segresnet_t2_vffc_grl"]
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 3,
        "step": 30,
        "best_metric": 0.5,
        "config": cfg.to_dict(),
        "rng": [capture_rng_state()],
    }
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp left behind
    got = load_checkpoint(path)  # torch.load(weights_only=True) inside
    assert Config.from_dict(got["config"]) == cfg
    assert (got["epoch"], got["step"], got["best_metric"]) == (3, 30, 0.5)
    model2 = nn.Sequential(nn.Conv3d(1, 2, 3), nn.GroupNorm(1, 2))
    model2.load_state_dict(got["model"])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, weight_decay=1e-5)
    opt2.load_state_dict(got["optimizer"])
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    sched2.load_state_dict(got["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    moments = [o.state_dict()["state"][0]["exp_avg"] for o in (opt, opt2)]
    assert torch.equal(*moments)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1


def test_unwrap_model_strips_compile_prefix():
    net = nn.Linear(2, 2)
    compiled = torch.compile(net)  # lazy: nothing is compiled until the first call
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrap_model(compiled) is net
    assert list(unwrap_model(compiled).state_dict()) == ["weight", "bias"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")


class _NotATensor:
    pass


def test_corrupt_or_refused_checkpoints_raise_one_line_naming_the_file(tmp_path):
    from dgseg.training.checkpoint import load_segmenter

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    refused = tmp_path / "refused.pt"
    torch.save({"model": _NotATensor()}, refused)  # the safe unpickler refuses the class
    for path in (corrupt, refused):
        with pytest.raises(ValueError, match=f"{path.name}: not a readable checkpoint") as err:
            load_checkpoint(path)
        assert "\n" not in str(err.value)
    not_dgseg = tmp_path / "plain.pt"
    save_checkpoint(not_dgseg, {"epoch": 1})
    with pytest.raises(ValueError, match="not a dgseg checkpoint"):
        load_segmenter(not_dgseg)
    cfg = PRESETS["tiny"]
    save_checkpoint(
        tmp_path / "wrong.pt", {"model": {"w": torch.zeros(1)}, "config": cfg.to_dict()}
    )
    with pytest.raises(ValueError, match="wrong.pt: checkpoint does not fit its config"):
        load_segmenter(tmp_path / "wrong.pt")

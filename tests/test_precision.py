"""dgseg.training.precision: run.amp="auto" picks bf16 only where it is native, and the tools obey
it.

The capability probes are mocked for the branches this machine cannot show (a CPU with native
bf16, a CUDA GPU); one test checks the real probe against the CPU's own flags.
"""

import platform
from pathlib import Path

import pytest
import torch

from dgseg.config import Config, apply_overrides
from dgseg.models import build_model
from dgseg.presets import get_preset
from dgseg.training import fit as train_fit
from dgseg.training import precision
from dgseg.training.losses import SegLoss
from dgseg.training.precision import AMP_CHOICES, autocast, describe, resolve_amp
from dgseg.training.steps import StepContext, forward_loss

CPU = torch.device("cpu")


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_without_bf16):
    amp, why = resolve_amp("auto", CPU)
    assert amp == "none" and "without native bf16" in why
    assert describe(amp, why).startswith("precision: fp32 (auto: CPU without native bf16")


def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu_with_bf16):
    amp, why = resolve_amp("auto", "cpu")
    assert amp == "bf16" and "native bf16" in why
    assert describe(amp, why).startswith("precision: bf16 autocast")


def test_auto_on_cuda_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", torch.device("cuda", 0))[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", "cuda")[0] == "none"


def test_explicit_requests_are_obeyed_and_bad_ones_refused(cpu_without_bf16):
    amp, why = resolve_amp("bf16", CPU)  # forced: runs, with a warning in the reason
    assert amp == "bf16" and "emulates" in why
    assert resolve_amp("none", CPU) == ("none", "requested (amp=none)")
    with pytest.raises(ValueError, match="'fp16' is not one of"):
        resolve_amp("fp16", CPU)
    assert AMP_CHOICES == ("auto", "bf16", "none")


def test_cpu_probe_needs_amx_or_avx512_bf16_on_x86(monkeypatch):
    """oneDNN says "bf16 supported" on plain AVX-512 too (emulated); auto wants the instructions."""
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for amx, avx512_bf16, expect in (
        (False, False, False),
        (True, False, True),
        (False, True, True),
    ):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        precision.cpu_has_native_bf16.cache_clear()
        assert precision.cpu_has_native_bf16() is expect
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    precision.cpu_has_native_bf16.cache_clear()
    assert precision.cpu_has_native_bf16() is False  # a oneDNN that refuses bf16
    precision.cpu_has_native_bf16.cache_clear()


def test_real_probe_matches_this_cpu():
    precision.cpu_has_native_bf16.cache_clear()
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if platform.machine() != "x86_64":
        pytest.skip("x86 flags only")
    native = " avx512_bf16" in flags or " amx_bf16" in flags
    assert precision.cpu_has_native_bf16() is native
    assert resolve_amp("auto", CPU)[0] == ("bf16" if native else "none")


def test_default_config_is_auto_and_old_configs_still_load():
    assert Config().run.amp == "auto" and get_preset("segresnet_t2_noaug").run.amp == "auto"
    for old in ("bf16", "none"):  # checkpoints written before "auto" existed
        d = Config().to_dict()
        d["run"]["amp"] = old
        assert Config.from_dict(d).run.amp == old
    with pytest.raises(ValueError, match="run.amp"):
        apply_overrides(Config(), ["run.amp=fp16"])


def test_old_checkpoint_with_bf16_config_loads(tmp_path):
    from dgseg.training.checkpoint import load_segmenter, save_checkpoint

    cfg = apply_overrides(get_preset("tiny"), ["run.amp=bf16"])
    net = build_model(1, **{k: v for k, v in cfg.to_dict()["model"].items()})
    save_checkpoint(tmp_path / "old.pt", {"model": net.state_dict(), "config": cfg.to_dict()})
    model, loaded = load_segmenter(tmp_path / "old.pt")
    assert loaded.run.amp == "bf16" and not model.training


def test_engine_autocast_resolves_auto(cpu_without_bf16):
    with autocast(CPU, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu")


def test_default_config_step_computes_in_fp32(cpu_without_bf16):
    torch.manual_seed(0)
    model = build_model(1, init_filters=4, blocks_down=(1, 1), blocks_up=(1,))
    batch = {"image": torch.randn(1, 1, 8, 8, 8), "label": torch.zeros(1, 3, 8, 8, 8)}
    ctx = StepContext(CPU, amp=Config().run.amp)
    out = forward_loss(model, batch["image"], batch["label"], SegLoss(), ctx)
    assert out["logits"].dtype == torch.float32  # bf16 autocast would give bfloat16 logits


@pytest.mark.slow
def test_training_with_the_default_config_runs_in_fp32(
    tiny_shards, tmp_path, monkeypatch, capsys, cpu_without_bf16
):
    train = train_fit
    seen = []
    real = torch.autocast

    def spy(device_type, *args, **kwargs):
        seen.append((device_type, kwargs.get("enabled", True)))
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    argv = [
        "--preset",
        "tiny",
        "--data",
        str(tiny_shards),
        "--out",
        str(tmp_path),
        "--set",
        "optim.epochs=1",
        "--set",
        "run.plot=false",
        "--set",
        "data.patch_size=16",
        "--set",
        "run.val_roi=32",
        "--set",
        "model.init_filters=4",
    ]
    assert train.main(argv) == 0
    assert get_preset("tiny").run.amp == "auto"
    text = capsys.readouterr().out
    assert "precision: fp32 (auto: CPU without native bf16" in text and "amp none" in text
    assert seen and all(not enabled for _, enabled in seen)  # train steps and validation


def test_channels_last_auto_follows_device_and_map_size():
    from dgseg.training.precision import CHANNELS_LAST_MIN_VALUES, resolve_channels_last

    big, small = (64, 64, 64), (32, 32, 32)
    assert 16 * 64**3 >= CHANNELS_LAST_MIN_VALUES > 8 * 32**3
    assert resolve_channels_last(None, CPU, channels=16, spatial=big)[0] is True
    assert resolve_channels_last(None, CPU, channels=8, spatial=small)[0] is False
    assert resolve_channels_last(None, "cuda", channels=16, spatial=(128,) * 3)[0] is False
    assert resolve_channels_last(False, CPU, channels=16, spatial=big) == (False, "requested")
    assert resolve_channels_last(True, "cuda", channels=8, spatial=small) == (True, "requested")


def test_channels_last_config_default_is_auto_and_old_bools_load():
    assert Config().run.channels_last is None
    assert apply_overrides(Config(), ["run.channels_last=auto"]).run.channels_last is None
    assert apply_overrides(Config(), ["run.channels_last=true"]).run.channels_last is True
    d = Config().to_dict()
    d["run"]["channels_last"] = False  # checkpoints from before "auto"
    assert Config.from_dict(d).run.channels_last is False

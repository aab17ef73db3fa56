"""dgseg.training.layout_probe: "auto" takes the layout that measured faster, caches and prints it;
both layouts (and a compiled step) compute the same loss; the network is MONAI's SegResNet.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dgseg.config import Config, apply_overrides
from dgseg.models import SegResNet, build_model
from dgseg.training import layout_probe
from dgseg.training.engine import channels_last_choice, use_channels_last
from dgseg.training.losses import SegLoss

CPU = torch.device("cpu")
SHAPE = (16, 16, 16)


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """A fresh cache folder and memo; ``calls`` counts measurements, ``times`` sets their result."""
    monkeypatch.setenv("DGSEG_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DGSEG_LAYOUT_PROBE", raising=False)
    layout_probe.clear_memo()
    state = {"calls": 0, "times": {"contiguous": [0.2, 0.2, 0.2], "channels-last": [0.1, 0.1, 0.1]}}

    def fake_measure(cfg, amp, spatial):
        state["calls"] += 1
        return {k: list(v) for k, v in state["times"].items()}

    monkeypatch.setattr(layout_probe, "_measure", fake_measure)
    yield state
    layout_probe.clear_memo()


def _tiny_cfg(*extra: str) -> Config:
    return apply_overrides(Config(), ["model.init_filters=4", "run.amp=none", *extra])


@pytest.mark.parametrize(
    "times, expected, ratio",
    [
        ({"contiguous": [0.2, 0.4, 0.3], "channels-last": [0.1, 0.3, 0.6]}, True, "0.75"),
        ({"contiguous": [0.1, 0.1, 0.2], "channels-last": [0.3, 0.05, 0.3]}, False, "1.50"),
        # a burst of load in one round does not decide: round 2 is faster channels-last
        ({"contiguous": [0.1, 0.9, 0.1], "channels-last": [0.2, 0.2, 0.2]}, False, "2.00"),
    ],
)
def test_auto_takes_the_faster_layout_and_says_so(probe, times, expected, ratio):
    probe["times"] = times
    chosen, why = channels_last_choice(_tiny_cfg(), CPU, SHAPE)
    assert chosen is expected and probe["calls"] == 1
    med = {k: f"{sorted(v)[1] * 1e3:.0f} ms" for k, v in times.items()}  # medians of 3
    assert "measured" in why and "16x16x16" in why and "fp32" in why
    assert (
        f"contiguous {med['contiguous']}" in why and f"channels-last {med['channels-last']}" in why
    )
    assert f"(channels-last/contiguous {ratio})" in why


def test_the_answer_is_cached_on_disk_and_in_memory(probe, tmp_path):
    cfg = _tiny_cfg()
    first = channels_last_choice(cfg, CPU, SHAPE)
    for _ in range(3):  # the engine asks on every step
        assert use_channels_last(cfg, CPU, SHAPE) is first[0]
    assert probe["calls"] == 1
    layout_probe.clear_memo()  # a new process: the file answers
    chosen, why = channels_last_choice(cfg, CPU, SHAPE)
    assert probe["calls"] == 1 and chosen is first[0] and why.startswith("auto: cached")
    entry = next(iter(json.loads((tmp_path / layout_probe.CACHE_NAME).read_text()).values()))
    assert entry["rounds_s"] == probe["times"] and entry["shape"] == list(SHAPE)
    # Another shape, precision or network is another measurement.
    channels_last_choice(cfg, CPU, (24, 24, 24))
    channels_last_choice(_tiny_cfg("model.init_filters=8"), CPU, SHAPE)
    assert probe["calls"] == 3


def test_a_damaged_cache_file_is_measured_again(probe, tmp_path):
    (tmp_path / layout_probe.CACHE_NAME).write_text("{not json")
    assert channels_last_choice(_tiny_cfg(), CPU, SHAPE)[0] is True and probe["calls"] == 1
    assert json.loads((tmp_path / layout_probe.CACHE_NAME).read_text())  # rewritten whole


def test_overrides_and_the_off_switches_skip_the_probe(probe, monkeypatch):
    assert channels_last_choice(_tiny_cfg("run.channels_last=false"), CPU, SHAPE) == (
        False,
        "requested",
    )
    assert channels_last_choice(_tiny_cfg("run.channels_last=true"), CPU, SHAPE)[0] is True
    off = channels_last_choice(_tiny_cfg("run.layout_probe=false"), CPU, SHAPE)
    assert off[0] is False and "too small" in off[1]  # the size rule
    monkeypatch.setenv("DGSEG_LAYOUT_PROBE", "0")
    assert "too small" in channels_last_choice(_tiny_cfg(), CPU, SHAPE)[1]
    assert probe["calls"] == 0


def test_timing_is_interleaved_and_keeps_each_fastest_round():
    order: list[str] = []
    ticks = iter([0.0, 5.0, 5.0, 6.0, 6.0, 8.0, 8.0, 10.0, 10.0, 13.0, 13.0, 14.0])
    steps = {name: (lambda n=name: order.append(n)) for name in ("contiguous", "channels-last")}
    times = layout_probe.time_layouts(steps, rounds=3, clock=lambda: next(ticks))
    assert order == ["contiguous", "channels-last"] * 4  # a warm-up each, then 3 alternating rounds
    assert times == {"contiguous": [5.0, 2.0, 3.0], "channels-last": [1.0, 2.0, 1.0]}
    assert layout_probe.channels_last_ratio(times) == pytest.approx(1 / 3)  # of 0.2, 1, 1/3


def test_a_real_probe_times_both_layouts(monkeypatch, tmp_path):
    monkeypatch.setenv("DGSEG_CACHE_DIR", str(tmp_path))
    layout_probe.clear_memo()
    cfg = apply_overrides(
        Config(), ["model.init_filters=2", "model.blocks_down=[1,1]", "model.blocks_up=[1]"]
    )
    state = torch.random.get_rng_state()
    with torch.no_grad():  # as validation asks
        chosen, why = channels_last_choice(cfg, CPU, (8, 8, 8))
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is kept
    entry = next(iter(json.loads((tmp_path / layout_probe.CACHE_NAME).read_text()).values()))
    rounds = entry["rounds_s"]
    assert all(len(r) == 5 and min(r) > 0 for r in rounds.values())
    ratios = sorted(a / b for a, b in zip(rounds["channels-last"], rounds["contiguous"]))
    assert chosen is (ratios[2] < 1) and "measured" in why
    layout_probe.clear_memo()


# ----------------------------------------------------------------------------- same loss
def _two_losses(channels_last: bool, bf16: bool, compiled: bool = False) -> list[float]:
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = build_model(1, init_filters=4, blocks_down=(1, 1, 1), blocks_up=(1, 1))
    net = net.to(memory_format=fmt)
    model = torch.compile(net) if compiled else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 16, 16, 16, generator=g).contiguous(memory_format=fmt)
    y = (torch.randn(1, 3, 16, 16, 16, generator=g) > 0.5).float()
    losses = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            seg = model(x)
        loss = SegLoss(bce_weight=1.0)(seg, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_both_layouts_give_the_same_loss(bf16):
    contiguous = _two_losses(False, bf16)
    channels_last = _two_losses(True, bf16)
    # fp32: reduction order only; bf16: 8 mantissa bits per convolution, a few in a row.
    assert channels_last == pytest.approx(contiguous, rel=2**-6 if bf16 else 1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "gcc")),
    reason="torch.compile on the CPU needs a C++ compiler",
)
def test_compiled_contiguous_step_gives_the_eager_loss():
    torch._dynamo.reset()
    eager = _two_losses(False, bf16=False)
    compiled = _two_losses(False, bf16=False, compiled=True)
    assert compiled == pytest.approx(eager, rel=2**-8)


def test_default_network_equals_monai_segresnet_with_the_same_weights():
    monai_nets = pytest.importorskip("monai.networks.nets")
    from dgseg.models import from_monai_state_dict as to_dgseg

    torch.manual_seed(0)
    ref = monai_nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3)
    net = SegResNet(1, 3, init_filters=8)
    net.load_state_dict(to_dgseg(ref.state_dict()))
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.eval()(x)
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            got = net.eval().to(memory_format=fmt)(x.contiguous(memory_format=fmt))
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_training_prints_the_measured_choice(probe, tiny_shards, tmp_path, capsys):
    from dgseg.training import fit

    argv = ["--preset", "tiny", "--data", str(tiny_shards), "--out", str(tmp_path)]
    for item in ("optim.epochs=1", "run.plot=false", "data.patch_size=16", "run.val_roi=16"):
        argv += ["--set", item]
    argv += ["--set", "model.init_filters=4", "--set", "run.amp=none"]
    assert fit.main(argv) == 0
    text = capsys.readouterr().out
    line = next(t for t in text.splitlines() if "memory format:" in t)
    assert "channels-last (auto: measured fp32 fwd+bwd at 16x16x16" in line
    assert "contiguous 200 ms, channels-last 100 ms (channels-last/contiguous 0.50)" in line
    assert probe["calls"] == 1  # training and validation share the answer

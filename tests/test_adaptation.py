"""Per-case test-time adaptation: what each method changes, no leakage between cases, the stored
source statistics, and the tools' --adapt options."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dgseg.config import apply_overrides
from dgseg.data.dataset import ShardDataset
from dgseg.inference.adaptation import (
    AdaptSettings,
    CasePredictor,
    binary_entropy,
    match_quantiles,
    norm_affine_parameters,
    prior_adapt,
    prior_correct,
    tent_adapt,
)
from dgseg.inference.sliding_window import predict_volume
from dgseg.inference.source_stats import SOURCE_STATS_KEY, compute_source_stats
from dgseg.models import build_model
from dgseg.presets import CPU_RECIPE, get_preset
from dgseg.training.checkpoint import load_checkpoint

from tool_modules import load_tool


def _net(seed=0, repr_="intensity"):
    cfg = apply_overrides(
        get_preset("segresnet_t2_noaug"),
        [*CPU_RECIPE, "model.init_filters=4", f"data.input_repr={repr_}"],
    )
    torch.manual_seed(seed)
    return build_model(cfg.data.in_channels, cfg.model).eval(), cfg


def _case(seed, shape=(16, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 1, *shape)
    x[..., 2:-2, 2:-2, 2:-2] = torch.randn(1, 1, *(s - 4 for s in shape), generator=g)
    return x


def _predict(net, x):
    return predict_volume(net, x, roi_size=None)


STATS = {
    "region_prior": [0.05, 0.02, 0.01],
    "quantile_levels": torch.linspace(0, 1, 101).tolist(),
    "quantiles": [torch.linspace(-2, 3, 101).tolist()],
}


def test_tent_lowers_entropy_and_changes_only_norm_affine_parameters(one_thread):
    net, _ = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = _case(1)
    brain = (x[0] != 0).any(0)
    adapted = tent_adapt(net, x, brain, steps=5, lr=1e-2)

    def entropy(m):
        with torch.no_grad():
            return binary_entropy(m(x))[0][:, brain].mean()

    assert entropy(adapted) < entropy(net)
    norm_ids = {id(p) for p in norm_affine_parameters(adapted)}
    names = {n for n, p in adapted.named_parameters() if id(p) in norm_ids}
    assert names and all(n.endswith((".weight", ".bias")) for n in names)
    after = adapted.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= names  # only norm affine parameters moved
    for k, v in net.state_dict().items():  # the trained network is untouched
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("method", ["tent", "prior", "match+prior"])
def test_no_state_leaks_between_cases(method, one_thread):
    net, cfg = _net()
    a, b = _case(2), _case(3)
    settings = AdaptSettings(method, steps=2, lr=1e-2)
    shared = CasePredictor(net, cfg.data, settings, STATS)
    shared(a, _predict)
    after_a = shared(b, _predict)
    alone = CasePredictor(net, cfg.data, settings, STATS)(b, _predict)
    assert torch.equal(after_a, alone)
    unadapted = CasePredictor(net, cfg.data, AdaptSettings(), STATS)(b, _predict)
    assert not torch.equal(alone, unadapted)  # the adaptation did something


def test_none_is_exactly_the_plain_prediction():
    for repr_ in ("intensity", "gradient"):
        net, cfg = _net(repr_=repr_)
        x = _case(4)
        from dgseg.transforms.gradient_map import input_representation

        want = _predict(net, input_representation(x, repr_))
        got = CasePredictor(net, cfg.data)(x, _predict)
        assert torch.equal(got, want)


def test_prior_correction_by_hand():
    p = torch.tensor([0.3, 0.5, 0.1]).view(1, 3, 1, 1, 1)
    q = torch.tensor([0.3, 0.5, 0.2])
    out = prior_correct(p, q).flatten()
    # p = q gives 1/2; q = 1/2 leaves p; (0.1/0.2) / (0.1/0.2 + 0.9/0.8) = 0.5 / 1.625
    assert torch.allclose(out, torch.tensor([0.5, 0.5, 0.5 / 1.625]))


def test_prior_adapt_moves_the_prior_towards_the_pseudo_label_shares(one_thread):
    net, _ = _net()
    x = _case(5)
    brain = (x[0] != 0).any(0)
    _, q = prior_adapt(net, x, brain, [0.05, 0.02, 0.01], steps=1, lr=1e-3, consistency=0.0)
    q0 = 0.5 * torch.tensor([0.05, 0.02, 0.01]) + 0.25
    with torch.no_grad():
        p = torch.sigmoid(net(x))[0]
    pseudo = ((p / q0.view(3, 1, 1, 1)) > (1 - p) / (1 - q0.view(3, 1, 1, 1))) & brain
    share = pseudo.flatten(1).sum(1) / brain.sum()
    assert torch.allclose(q, 0.5 * q0 + 0.5 * (0.25 + 0.5 * share), atol=1e-6)


def test_quantile_matching_maps_onto_the_source_quantiles():
    x = _case(6)
    levels = torch.linspace(0, 1, 101, dtype=torch.float64)
    own = torch.quantile(x[x != 0].double(), levels)
    out = match_quantiles(x, [(2 * own + 1).tolist()], levels.tolist())
    brain = x != 0
    # a source whose quantiles are 2q + 1 of the test brain's: the map is 2x + 1 on the brain
    assert torch.allclose(out[brain], 2 * x[brain] + 1, atol=1e-5)
    assert torch.equal(out[~brain], x[~brain])


def test_source_stats_match_an_independent_count(tiny_shards):
    stats = compute_source_stats(tiny_shards, ("t2",))
    ds = ShardDataset(tiny_shards, "train", ("t2",))
    inside, brain_n, q = np.zeros(3), 0, []
    for i in range(len(ds)):
        img, lab = ds[i]["image"][0].numpy(), ds[i]["label"].numpy()
        brain = img != 0
        inside += lab[:, brain].sum(1)
        brain_n += brain.sum()
        q.append(np.quantile(img[brain].astype(np.float64), [0.0, 0.5, 1.0]))
    assert stats["n_cases"] == len(ds)
    np.testing.assert_allclose(stats["region_prior"], inside / brain_n, rtol=1e-9)
    np.testing.assert_allclose(
        np.asarray(stats["quantiles"][0])[[0, 50, 100]], np.mean(q, 0), rtol=1e-5
    )


@pytest.fixture(scope="module")
def tiny_run(tiny_shards, tmp_path_factory) -> Path:
    """One epoch of the tiny preset: a checkpoint written by the fit loop."""
    from dgseg.training import fit

    out = tmp_path_factory.mktemp("adapt_run")
    argv = ["--preset", "tiny", "--data", str(tiny_shards), "--out", str(out)]
    for item in ("optim.epochs=1", "run.val_every=1", "model.init_filters=4", "run.device=cpu"):
        argv += ["--set", item]
    argv += ["--set", "run.plot=false", "--set", "data.patch_size=16", "--set", "run.amp=none"]
    assert fit.main(argv) == 0
    return out / "tiny" / "last.pt"


def test_training_stores_the_prior_and_the_tool_refills_it(tiny_run, tiny_shards, tmp_path):
    stored = load_checkpoint(tiny_run)[SOURCE_STATS_KEY]
    assert stored == compute_source_stats(tiny_shards, ("t2",))  # round trip, weights_only
    old = tmp_path / "old.pt"
    state = load_checkpoint(tiny_run)
    del state[SOURCE_STATS_KEY]
    torch.save(state, old)
    tool = load_tool("add_source_stats")
    assert tool.main(["--checkpoint", str(old), "--data", str(tiny_shards)]) == 0
    assert load_checkpoint(old)[SOURCE_STATS_KEY] == stored
    assert torch.equal(
        load_checkpoint(old)["model"]["conv_init.weight"], state["model"]["conv_init.weight"]
    )


def _evaluate(ckpt, data, out, *extra):
    tool = load_tool("evaluate")
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--quiet"]
    argv += ["--bootstrap", "10", "--max-cases", "1", "--modalities", "t1", "--device", "cpu"]
    argv += ["--metric-workers", "0", *extra]
    return tool.main(argv)


def test_evaluate_adapt_none_reproduces_and_adaptations_are_named(
    tiny_run, tiny_shards, tmp_path, capsys
):
    assert _evaluate(tiny_run, tiny_shards, tmp_path / "plain") == 0
    assert _evaluate(tiny_run, tiny_shards, tmp_path / "none", "--adapt", "none") == 0
    plain = (tmp_path / "plain" / "per_case.csv").read_text()
    assert plain == (tmp_path / "none" / "per_case.csv").read_text()
    args = ["--adapt", "prior", "--adapt-steps", "1"]
    assert _evaluate(tiny_run, tiny_shards, tmp_path / "prior", *args) == 0
    table = (tmp_path / "prior" / "table.md").read_text()
    assert "tiny +prior" in table and "Test-time adaptation: prior (1 step(s)" in table
    assert json.loads((tmp_path / "prior" / "summary.json").read_text())
    capsys.readouterr()
    assert _evaluate(tiny_run, tiny_shards, tmp_path / "bad", "--adapt-steps", "0") == 1
    assert "error: --adapt-steps must be >= 1" in capsys.readouterr().err


def test_adaptation_needing_stats_names_the_tool(tiny_run, tiny_shards, tmp_path, capsys):
    state = load_checkpoint(tiny_run)
    del state[SOURCE_STATS_KEY]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    assert _evaluate(old, tiny_shards, tmp_path / "m", "--adapt", "match") == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "tools/add_source_stats.py" in err


def test_predict_path_applies_and_names_the_adaptation(tiny_run):
    from dgseg.inference.predict_case import load_predictor

    cpu = torch.device("cpu")
    plain, channels, what = load_predictor(tiny_run, cpu, modality="t1")
    assert channels == ("t1",) and what.endswith("test-time adaptation: none")
    matched, _, what = load_predictor(tiny_run, cpu, modality="t1", adapt=AdaptSettings("match"))
    assert "intensity matching" in what
    x = _case(7, (20, 20, 20)) * 3 + 1  # far from the source quantiles
    x[x == 1] = 0
    stats = load_checkpoint(tiny_run)[SOURCE_STATS_KEY]
    want = plain(match_quantiles(x, stats["quantiles"], stats["quantile_levels"]))
    assert torch.equal(matched(x), want)

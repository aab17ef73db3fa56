"""The training engine (dgseg/training/engine.py): λ schedule, objective, one epoch, validation,
guards."""

import math

import pytest
import torch

from dgseg.config import apply_overrides
from dgseg.logging_utils import JsonlWriter, read_jsonl
from dgseg.models import build_model
from dgseg.presets import PRESETS
from dgseg.training.distributed import DistState
from dgseg.training.engine import check_cpu_bf16_depths, grl_lambda, train_one_epoch, validate
from dgseg.training.losses import SegLoss, view_consistency_loss
from dgseg.training.steps import STEPS, StepContext, forward_loss
from dgseg.transforms.location_scale import saliency_mix

CPU = torch.device("cpu")
ONE = DistState(0, 0, 1, CPU, True)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dann_lambda_schedule():
    lmax = 0.8
    assert grl_lambda(0, 100, lmax) == 0.0
    for step in (1, 25, 50, 99):
        p = step / 100
        assert grl_lambda(step, 100, lmax) == pytest.approx(
            lmax * (2 / (1 + math.exp(-10 * p)) - 1)
        )
    assert grl_lambda(100, 100, lmax) == pytest.approx(lmax * 0.99990920, abs=1e-7)
    values = [grl_lambda(s, 50, 1.0) for s in range(51)]
    assert all(b > a for a, b in zip(values, values[1:]))  # strictly rising


def _grl_setup():
    torch.manual_seed(0)
    model = build_model(
        1,
        init_filters=4,
        blocks_down=(1, 1, 1),
        blocks_up=(1, 1),
        grl=True,
        num_domains=3,
        domain_hidden=8,
    )
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(2, 1, 16, 16, 16, generator=g),
        "label": (torch.rand(2, 3, 16, 16, 16, generator=g) > 0.5).float(),
        "domain": torch.tensor([1, 2]),
    }
    return model, batch


def _domain_grads(model, batch, lambd):
    ctx = StepContext(CPU, lambd=lambd, domain_weight=1.0)
    out = forward_loss(model, batch["image"], batch["label"], SegLoss(), ctx, batch["domain"])
    seg_params = list(model.segmenter.parameters())
    head_params = list(model.domain_classifier.parameters())
    grads = torch.autograd.grad(out["domain_loss"], seg_params + head_params, allow_unused=True)
    zero = [torch.zeros_like(p) for p in seg_params + head_params]
    grads = [z if g is None else g for g, z in zip(grads, zero)]
    return out, grads[: len(seg_params)], grads[len(seg_params) :]


def test_grl_reverses_a_nonzero_gradient_into_the_encoder_only_when_lambda_positive():
    model, batch = _grl_setup()
    enc_params = list(model.segmenter.parameters())
    _, enc0, head0 = _domain_grads(model, batch, 0.0)
    _, enc1, head1 = _domain_grads(model, batch, 1.0)
    _, enc_half, head_half = _domain_grads(model, batch, 0.5)
    # λ = 0: the domain loss sends nothing into the segmenter, but its head still learns.
    assert all(torch.count_nonzero(g) == 0 for g in enc0)
    assert sum(float(g.abs().sum()) for g in head0) > 0
    # λ > 0: a nonzero gradient reaches the encoder, linear in λ; the head is unaffected by λ.
    assert sum(float(g.abs().sum()) for g in enc1) > 1e-6
    for a, b in zip(enc1, enc_half):
        torch.testing.assert_close(b, 0.5 * a, rtol=1e-4, atol=1e-9)
    for a, b in zip(head0, head1):
        torch.testing.assert_close(a, b)
    # Reversed: a descent step along the encoder gradient *raises* the domain loss.
    before = _domain_grads(model, batch, 1.0)[0]["domain_loss"].item()
    with torch.no_grad():
        for p, g in zip(enc_params, enc1):
            p -= 1e-2 * g / max(float(torch.cat([x.flatten() for x in enc1]).norm()), 1e-12)
    after = _domain_grads(model, batch, 1.0)[0]["domain_loss"].item()
    assert after > before


def test_training_step_graph_includes_domain_head_at_lambda_zero():
    model, batch = _grl_setup()
    out = STEPS["adversarial"](model, batch, SegLoss(), StepContext(CPU))
    # domain_weight 0 and λ 0 still give every parameter a (possibly zero) gradient: static graph
    assert all(p.grad is not None for p in model.parameters())
    expected = out["seg_loss"] + 0.0 * out["domain_loss"]
    assert out["loss"].item() == pytest.approx(expected.item())


def test_cpu_bf16_guard_refuses_two_voxel_deep_feature_maps():
    cpu = DistState(0, 0, 1, CPU, True)
    cfg = apply_overrides(PRESETS["tiny"], ["run.amp=bf16"])  # 4 levels: 16 -> 8 -> 4 -> 2
    with pytest.raises(ValueError, match="2-voxel-deep feature map at level 3"):
        check_cpu_bf16_depths(cfg, cpu, (16, 16, 16))
    for ok_shape in ((24, 16, 16), (32, 32, 32), (128, 128, 128)):
        check_cpu_bf16_depths(cfg, cpu, ok_shape)
    check_cpu_bf16_depths(apply_overrides(cfg, ["run.amp=none"]), cpu, (16, 16, 16))


def _batches(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(1, 1, size, size, size, generator=g),
            "label": (torch.rand(1, 3, size, size, size, generator=g) > 0.6).float(),
            "domain": torch.tensor([k % 3]),
        }
        for k in range(n)
    ]


def test_train_one_epoch_logs_every_n_steps_and_the_tail(tmp_path, capsys):
    cfg = apply_overrides(
        PRESETS["segresnet_t2_vffc_grl"],
        [
            "model.init_filters=4",
            "model.blocks_down=1,1,1",
            "model.blocks_up=1,1",
            "optim.epochs=2",
            "run.log_every=2",
            "run.amp=none",
        ],
    )
    torch.manual_seed(0)
    model = build_model(1, cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = JsonlWriter(tmp_path / "log.jsonl")
    summary, step = train_one_epoch(
        model,
        _batches(3),
        opt,
        None,
        SegLoss(),
        cfg=cfg,
        dist=ONE,
        epoch=0,
        step=0,
        total_steps=6,
        writer=writer,
    )
    assert step == 3 and math.isfinite(summary["loss"]) and 0 <= summary["dice"] <= 1
    assert summary["lambda"] == pytest.approx(grl_lambda(2, 6, 1.0))  # λ of the last step
    records = read_jsonl(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == [2, 3]  # every 2 steps, then the epoch's tail
    assert all(r["kind"] == "train" and r["epochs"] == 2 for r in records)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2 and "step       2/6" in lines[0]


def _sbf_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 3, padding=1)
    )
    batch = _batches(1, size=12)[0]
    batch["image_local"] = torch.randn(
        batch["image"].shape, generator=torch.Generator().manual_seed(5)
    )
    return model, batch


def test_saliency_balanced_step_accumulates_both_passes():
    # Independent of the engine: pass 1 on the global view, its input gradient through
    # autograd.grad, the fused view from saliency_mix, pass 2; the two gradients summed.
    model, batch = _sbf_setup()
    loss_fn = SegLoss()
    x = batch["image"].clone().requires_grad_(True)
    l_g = loss_fn(model(x), batch["label"])
    grad_x, *grads_g = torch.autograd.grad(l_g, [x, *model.parameters()])
    fused = saliency_mix(x.detach(), batch["image_local"], grad_x)
    l_m = loss_fn(model(fused), batch["label"])
    grads_m = torch.autograd.grad(l_m, list(model.parameters()))
    assert not torch.equal(fused, batch["image"]) and not torch.equal(fused, batch["image_local"])

    model.zero_grad(set_to_none=True)
    out = STEPS["saliency_balanced"](model, batch, loss_fn, StepContext(CPU))
    for p, gg, gm in zip(model.parameters(), grads_g, grads_m):
        torch.testing.assert_close(p.grad, gg + gm)
    torch.testing.assert_close(out["loss"], (l_g + l_m).detach())
    assert out["logits"].shape == batch["label"].shape


def test_train_one_epoch_takes_the_saliency_balanced_step_for_pairs():
    cfg = apply_overrides(PRESETS["segresnet_t2_slaug_sbf"], ["optim.epochs=1", "run.amp=none"])
    model, batch = _sbf_setup()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    summary, step = train_one_epoch(
        model, [batch], opt, None, SegLoss(), cfg=cfg, dist=ONE, epoch=0, step=0, total_steps=1
    )
    # the logged loss is the two passes' sum: above a single pass's loss (each is >= 0)
    single = forward_loss(
        _sbf_setup()[0], batch["image"], batch["label"], SegLoss(), StepContext(CPU)
    )
    assert step == 1 and summary["loss"] > float(single["loss"].detach()) > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_consistency_objective_is_seg_loss_on_the_first_view_plus_weighted_kl():
    model, batch = _sbf_setup()
    views = torch.stack(
        [batch["image"], batch["image_local"], batch["image"].flip(-1)], dim=1
    )  # (B, 3, C, D, H, W)
    batch = {**batch, "views": views}
    loss_fn = SegLoss()
    out = STEPS["consistency"](model, batch, loss_fn, StepContext(CPU, consistency_weight=10.0))
    # independently: each view through the network on its own
    per_view = torch.stack([model(views[:, v]) for v in range(3)])  # (V, B, 3, D, H, W)
    seg = loss_fn(per_view[0], batch["label"])
    cons = view_consistency_loss(per_view)
    torch.testing.assert_close(out["seg_loss"], seg)
    torch.testing.assert_close(out["consistency_loss"], cons)
    torch.testing.assert_close(out["loss"], seg + 10.0 * cons)
    assert out["logits"].shape == batch["label"].shape and cons.item() > 0


def test_train_one_epoch_takes_the_consistency_step_for_views():
    cfg = apply_overrides(PRESETS["segresnet_t2_gin_ipa_cons"], ["optim.epochs=1", "run.amp=none"])
    model, batch = _sbf_setup()
    local = batch.pop("image_local")
    views = torch.stack([batch["image"], local], dim=1)  # (B, 2, C, D, H, W)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    summary, step = train_one_epoch(
        model,
        [{**batch, "views": views}],
        opt,
        None,
        SegLoss(),
        cfg=cfg,
        dist=ONE,
        epoch=0,
        step=0,
        total_steps=1,
    )
    assert step == 1 and summary["consistency_loss"] > 0
    assert summary["loss"] == pytest.approx(summary["seg_loss"] + 10 * summary["consistency_loss"])


def test_validate_uses_the_segmenter_and_the_configured_window():
    cfg = apply_overrides(
        PRESETS["segresnet_t2_vffc_grl"],
        ["model.init_filters=4", "model.blocks_down=1,1,1", "model.blocks_up=1,1", "run.amp=none"],
    )
    torch.manual_seed(0)
    model = build_model(1, cfg.model)  # domain-adversarial: validation reads its segmenter
    data = [{"image": b["image"][0], "label": b["label"][0]} for b in _batches(3, size=12)]
    whole = validate(model, data, cfg=cfg, dist=ONE)
    assert whole["n_cases"] == 3 and 0.0 <= whole["dice_mean"] <= 1.0
    assert whole["dice_mean"] == pytest.approx(
        (whole["dice_WT"] + whole["dice_TC"] + whole["dice_ET"]) / 3
    )
    assert model.training  # the mode is restored
    windowed = validate(model, data, cfg=apply_overrides(cfg, ["run.val_roi=8"]), dist=ONE)
    assert windowed["n_cases"] == 3
    assert validate(model, data, cfg=cfg, dist=ONE, indices=[])["n_cases"] == 0

"""Soft Dice / BCE loss against hand-computed values."""

import math

import pytest
import torch

from dgseg.training.losses import SegLoss, dice_loss, view_consistency_loss

LN3 = math.log(3.0)  # sigmoid(±ln 3) = 0.75 / 0.25


def _case():
    # one sample, one channel, 4 voxels: p = [0.75, 0.25, 0.5, 0.5], g = [1, 0, 1, 0]
    logits = torch.tensor([LN3, -LN3, 0.0, 0.0]).reshape(1, 1, 4, 1, 1)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 4, 1, 1)
    return logits, target


def test_dice_loss_hand_computed():
    logits, target = _case()
    # intersection 0.75 + 0.5 = 1.25; Σp = 2, Σg = 2 → 1 − 2.5 / (4 + 1e-5)
    assert dice_loss(logits, target).item() == pytest.approx(1 - 2.5 / (4 + 1e-5), abs=1e-6)
    # squared: Σp² = 0.5625 + 0.0625 + 0.25 + 0.25 = 1.125, Σg² = 2 → 1 − 2.5 / 3.12501
    got = dice_loss(logits, target, squared_pred=True).item()
    assert got == pytest.approx(1 - 2.5 / (3.125 + 1e-5), abs=1e-6)
    got = dice_loss(logits, target, smooth_nr=1.0, smooth_dr=1.0).item()
    assert got == pytest.approx(1 - 3.5 / 5.0, abs=1e-6)


def test_dice_loss_is_mean_over_samples_and_channels():
    target = torch.zeros(2, 3, 4, 4, 4)
    target[:, 0, :2] = 1  # channel 0: half the voxels
    logits = torch.where(target > 0, 30.0, -30.0)  # perfect prediction everywhere
    # channels 1, 2 have empty targets and ~0 prediction: Dice = 0/(~0 + 1e-5) ≈ 0 → loss 1 each,
    # channel 0 is perfect → loss 0; per-channel mean = 2/3 (a batch-global Dice would give ~0).
    assert dice_loss(logits, target).item() == pytest.approx(2 / 3, abs=1e-4)
    # a perfect prediction of non-empty targets gives ~0
    full = torch.ones(2, 3, 4, 4, 4)
    assert dice_loss(torch.full_like(full, 30.0), full).item() == pytest.approx(0.0, abs=1e-6)


def test_smoothing_is_what_the_docstring_says():
    # smooth_nr = 0, smooth_dr = 1e-5 (module docstring): an empty truth channel scores D = 0
    # whatever the prediction, so its loss is exactly 1 and it gives no Dice gradient.
    import inspect

    sig = inspect.signature(dice_loss).parameters
    assert sig["smooth_nr"].default == 0.0 and sig["smooth_dr"].default == 1e-5
    target = torch.zeros(1, 1, 4, 4, 4)
    for value in (-30.0, 0.0, 30.0):
        logits = torch.full_like(target, value).requires_grad_()
        loss = dice_loss(logits, target)
        assert loss.item() == 1.0
        loss.backward()
        assert torch.count_nonzero(logits.grad) == 0
    # MONAI's DiceLoss defaults (1e-5 both, the write-up's code) would reward the empty prediction
    got = dice_loss(torch.full_like(target, -30.0), target, smooth_nr=1e-5).item()
    assert got == pytest.approx(0.0, abs=1e-3)


def test_dice_loss_float32_under_autocast():
    logits, target = _case()
    ref = dice_loss(logits, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dice_loss(logits.bfloat16(), target)
    assert got.dtype == torch.float32
    # bf16 rounding of ±ln 3 only; the reduction itself runs in float32
    assert got.item() == pytest.approx(ref.item(), abs=2e-3)
    x = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.conv3d(x, torch.ones(3, 3, 1, 1, 1))  # bf16 under autocast
        loss = dice_loss(y, torch.ones_like(x) > 0)
    assert y.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_segloss_adds_weighted_bce():
    logits, target = _case()
    # BCE per voxel: −ln 0.75, −ln 0.75, −ln 0.5, −ln 0.5
    bce = (2 * math.log(4 / 3) + 2 * math.log(2)) / 4
    dice = 1 - 2.5 / (4 + 1e-5)
    assert SegLoss()(logits, target).item() == pytest.approx(dice, abs=1e-6)
    assert SegLoss(bce_weight=0.5)(logits, target).item() == pytest.approx(
        dice + 0.5 * bce, abs=1e-6
    )
    assert "bce_weight=0.5" in repr(SegLoss(bce_weight=0.5))


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        dice_loss(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="-1"):
        SegLoss(bce_weight=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8, generator=g)
    target = torch.rand(2, 3, 8, 8, 8, generator=g) > 0.5
    ref = SegLoss(bce_weight=1.0)(logits, target)
    with torch.autocast("cuda", dtype=torch.float16):
        got = SegLoss(bce_weight=1.0)(logits.cuda().half(), target.cuda())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), abs=2e-3)  # fp16 rounding of the logits only


def test_view_consistency_is_the_bernoulli_kl_to_the_mean_of_the_views():
    # two views, one voxel: p = 0.75 and 0.25, mean 0.5; KL(0.5 || 0.75) = KL(0.5 || 0.25)
    # = 0.5·ln(0.5/0.75) + 0.5·ln(0.5/0.25) = 0.5·ln(4/3)
    logits = torch.tensor([LN3, -LN3]).reshape(2, 1, 1, 1)
    expected = 0.5 * math.log(4.0 / 3.0)
    assert float(view_consistency_loss(logits)) == pytest.approx(expected, rel=1e-6)
    # against torch.distributions on random logits (mean over views, samples, channels, voxels)
    z = torch.randn(
        3, 2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    p = torch.sigmoid(z)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Bernoulli(probs=p.mean(0, keepdim=True).expand_as(p)),
        torch.distributions.Bernoulli(probs=p),
    ).mean()
    torch.testing.assert_close(view_consistency_loss(z), ref.float(), rtol=1e-5, atol=1e-7)
    # zero for identical views, also at saturated probabilities (0·log 0 = 0)
    same = torch.tensor([30.0, -30.0, 0.0]).reshape(1, 1, 3, 1).expand(3, 1, 3, 1)
    assert float(view_consistency_loss(same)) == pytest.approx(0.0, abs=1e-6)
    # its gradient pulls the views together (a step down it lowers the loss)
    zz = z.float().clone().requires_grad_(True)
    loss = view_consistency_loss(zz)
    loss.backward()
    assert float(view_consistency_loss(zz.detach() - 10.0 * zz.grad)) < loss.item()
    with pytest.raises(ValueError, match="V >= 2"):
        view_consistency_loss(torch.zeros(1, 1, 1, 4))

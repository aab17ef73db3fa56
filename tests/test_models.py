"""SegResNet, 3D U-Net, the domain-adversarial wrapper and build_model."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dgseg.layers import VFFC
from dgseg.models import DomainAdversarialNet, SegResNet, UNet3D, build_model

DATA = Path(__file__).parent / "data"


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Double(nn.Module):
    def forward(self, x):
        return 2 * x


# --- SegResNet -------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels, expected", [(4, 4_702_227), (1, 4_700_931)])
def test_segresnet_parameter_count(in_channels, expected):
    # published configuration (MONAI SegResNet, init_filters=16, 3 outputs, no VAE)
    assert n_params(SegResNet(in_channels, 3, init_filters=16)) == expected
    assert n_params(SegResNet(in_channels, 3, init_filters=16, dropout=0.2)) == expected


@pytest.mark.parametrize("size", [(16, 16, 16), (9, 10, 11)])
def test_segresnet_shapes_and_encode_decode(size):
    torch.manual_seed(0)
    net = SegResNet(2, 3, init_filters=4).eval()
    assert net.bottleneck_channels == 32
    x = torch.randn(1, 2, *size)
    feat, skips = net.encode(x)
    sizes = [size]
    for _ in range(3):
        sizes.append(tuple((s + 1) // 2 for s in sizes[-1]))  # stride-2 conv: ceil(n / 2)
    assert feat.shape == (1, 32, *sizes[3])
    assert [s.shape for s in skips] == [(1, 4 * 2**i, *sizes[i]) for i in range(3)]
    out = net(x)
    assert out.shape == (1, 3, *size)
    torch.testing.assert_close(out, net.decode(feat, skips), rtol=0, atol=0)


def test_segresnet_bottleneck_applied_inside_encode():
    torch.manual_seed(0)
    plain = SegResNet(1, 3, init_filters=4)
    hooked = SegResNet(1, 3, init_filters=4, bottleneck=Double())
    hooked.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    feat_plain, _ = plain.encode(x)
    feat_hooked, skips = hooked.encode(x)
    torch.testing.assert_close(feat_hooked, 2 * feat_plain, rtol=0, atol=0)
    torch.testing.assert_close(hooked(x), hooked.decode(feat_hooked, skips), rtol=0, atol=0)


def test_segresnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\(1, 1\)"):
        SegResNet(1, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1))
    with pytest.raises(ValueError, match="1.5"):
        SegResNet(1, dropout=1.5)
    with pytest.raises(ValueError, match="shape"):
        SegResNet(1).encode(torch.randn(1, 8, 8, 8))


# --- UNet3D ----------------------------------------------------------------------------------


def test_unet3d_parameter_count_by_hand():
    # features (4, 8), in 1, out 3:
    #   enc0 DoubleConv(1->4): 1*4*27 + 8 + 4*4*27 + 8 = 556
    #   enc1 DoubleConv(4->8): 4*8*27 + 16 + 8*8*27 + 16 = 2624
    #   up ConvTranspose(8->4, 2^3) + bias: 8*4*8 + 4 = 260
    #   dec DoubleConv(8->4): 8*4*27 + 8 + 4*4*27 + 8 = 1312
    #   final Conv1x1x1(4->3) + bias: 15
    assert n_params(UNet3D(1, 3, features=(4, 8))) == 556 + 2624 + 260 + 1312 + 15


@pytest.mark.parametrize("size", [(16, 16, 16), (17, 18, 21)])
def test_unet3d_shapes(size):
    torch.manual_seed(0)
    net = UNet3D(2, 3, features=(4, 8, 16))
    x = torch.randn(1, 2, *size)
    feat, skips = net.encode(x)
    assert feat.shape == (1, 16, *(s // 4 for s in size))
    assert [s.shape[1] for s in skips] == [4, 8]
    assert net(x).shape == (1, 3, *size)


def test_unet3d_rejects_too_small_input():
    with pytest.raises(ValueError, match="16"):
        UNet3D(1)(torch.randn(1, 1, 8, 32, 32))


# --- DomainAdversarialNet --------------------------------------------------------------------


def _dann(lambd: float, seed: int = 0):
    torch.manual_seed(seed)
    seg = SegResNet(
        1, 3, init_filters=4, blocks_down=(1, 1, 1), blocks_up=(1, 1), bottleneck=VFFC(16)
    )
    model = DomainAdversarialNet(seg, 3, hidden=8)
    x = torch.randn(2, 1, 8, 8, 8)
    seg_logits, dom_logits = model(x, grl_lambda=lambd)
    loss = nn.functional.cross_entropy(dom_logits, torch.tensor([0, 2]))  # domain loss alone
    loss.backward()
    return model, seg_logits, dom_logits


def test_domain_loss_reaches_encoder_reversed_when_lambda_positive():
    model, seg_logits, dom_logits = _dann(0.5)
    assert seg_logits.shape == (2, 3, 8, 8, 8) and dom_logits.shape == (2, 3)
    seg = model.segmenter
    g_enc = seg.conv_init.weight.grad
    assert g_enc is not None and g_enc.abs().sum() > 0
    assert seg.bottleneck.blocks[0].ffc1.convg2g.fu.conv.weight.grad.abs().sum() > 0
    assert model.domain_classifier.mlp[0].weight.grad.abs().sum() > 0
    # the decoder is not on the domain head's path
    assert all(p.grad is None for p in seg.final.parameters())
    # reversal: same weights with lambda = -1 (plain backprop) give -1/0.5 times the gradient
    model_plain, _, _ = _dann(-1.0)
    g_plain = model_plain.segmenter.conv_init.weight.grad
    torch.testing.assert_close(g_enc, -0.5 * g_plain, rtol=1e-4, atol=1e-7)
    # the classifier itself is trained normally (no reversal on its own parameters)
    torch.testing.assert_close(
        model.domain_classifier.mlp[0].weight.grad,
        model_plain.domain_classifier.mlp[0].weight.grad,
        rtol=0,
        atol=0,
    )


def test_domain_loss_gives_exactly_zero_encoder_gradient_when_lambda_zero():
    model, _, _ = _dann(0.0)
    seg = model.segmenter
    for p in list(seg.conv_init.parameters()) + list(seg.down_layers.parameters()):
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert model.domain_classifier.mlp[0].weight.grad.abs().sum() > 0


def test_dann_rejects_segmenter_without_encode():
    with pytest.raises(ValueError, match="encode"):
        DomainAdversarialNet(nn.Conv3d(1, 3, 1), 3)


# --- build_model -----------------------------------------------------------------------------


def test_build_model_variants():
    small = dict(init_filters=4, blocks_down=[1, 1, 1], blocks_up=[1, 1], unet_features=[4, 8, 16])
    x = torch.randn(1, 2, 8, 8, 8)
    plain = build_model(2, **small)
    assert isinstance(plain, SegResNet) and isinstance(plain.bottleneck, nn.Identity)
    assert plain(x).shape == (1, 3, 8, 8, 8)
    with_vffc = build_model(2, vffc=True, vffc_blocks=2, vffc_norm="batch", **small)
    assert isinstance(with_vffc.bottleneck, VFFC) and len(with_vffc.bottleneck.blocks) == 2
    assert with_vffc.bottleneck.channels == 16
    dann = build_model(2, vffc=True, grl=True, num_domains=2, domain_hidden=8, **small)
    assert isinstance(dann, DomainAdversarialNet)
    seg_logits, dom_logits = dann(x, grl_lambda=0.3)
    assert seg_logits.shape == (1, 3, 8, 8, 8) and dom_logits.shape == (1, 2)
    unet = build_model(2, arch="unet3d", vffc=True, grl=True, **small)
    assert isinstance(unet.segmenter, UNet3D) and unet.segmenter.bottleneck.channels == 16
    assert unet(x)[0].shape == (1, 3, 8, 8, 8)
    assert n_params(build_model(4)) == 4_702_227
    with pytest.raises(ValueError, match="resnet"):
        build_model(1, arch="resnet")


def test_segresnet_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = build_model(
        1, init_filters=4, blocks_down=(1, 1, 1), blocks_up=(1, 1), vffc=True, grl=True
    )
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        seg_logits, dom_logits = model(x, grl_lambda=1.0)
    loss = seg_logits.float().mean() + dom_logits.float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(seg_logits.float()).all() and torch.isfinite(dom_logits.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- the original network (segresnet_t2_vffc_grl_original) ----------------------------------


def _segresnet_count(c_in: int, c_out: int, f: int, down=(1, 2, 2, 4), up=(1, 1, 1)) -> int:
    """SegResNet parameters from the layer shapes (3³ convs without bias, GroupNorm 2w)."""

    def res(w):  # two GroupNorms (weight + bias) and two 3³ convolutions
        return 2 * 2 * w + 2 * 27 * w * w

    n = 27 * c_in * f  # conv_init
    for i, k in enumerate(down):
        w = f * 2**i
        n += (27 * (w // 2) * w if i else 0) + k * res(w)  # stride-2 conv, then blocks
    for j, k in enumerate(up):
        w = f * 2 ** (len(down) - 1 - j)
        n += w * (w // 2) + k * res(w // 2)  # 1³ conv halving channels, then blocks
    return n + 2 * f + f * c_out + c_out  # final GroupNorm and 1³ conv with bias


def _vffc_batchnorm_count(c: int, blocks: int) -> int:
    """VFFC blocks (ratio 0.5, LFU, BatchNorm) from the layer shapes of FFC / LaMa."""
    g = c // 2  # global channels; local = c - g
    mid = g // 2  # spectral transform hidden width
    spectral = g * mid + 2 * mid  # conv1 1³ + BN
    spectral += 2 * ((2 * mid) * (2 * mid) + 2 * 2 * mid)  # FU and LFU: 1³ conv on 2·mid + BN
    spectral += mid * g  # conv2 1³
    ffc = 27 * (c - g) * (c - g) + 2 * 27 * (c - g) * g + spectral  # l2l, l2g, g2l, g2g
    norms = 2 * 2 * c  # BN of both branches after each of the two FFCs
    return blocks * (2 * ffc + norms)


@pytest.mark.parametrize("filters", [32, 8])
def test_original_network_parameter_count(filters):
    from dgseg.config import apply_overrides
    from dgseg.presets import get_preset

    cfg = get_preset("segresnet_t2_vffc_grl_original")
    if filters != 32:  # documented: init_filters narrows the whole network, head input included
        cfg = apply_overrides(cfg, [f"model.init_filters={filters}"])
    c = 8 * filters  # bottleneck channels: 256 for the original
    head = c * 64 + 64 + 64 * 3 + 3  # Linear(c, 64) -> ReLU -> Linear(64, 3), no LayerNorm
    expected = _segresnet_count(1, 3, filters) + _vffc_batchnorm_count(c, 3) + head
    model = build_model(cfg.data.in_channels, cfg.model)
    assert n_params(model) == expected
    if filters == 32:
        assert expected == 27_077_126 and _segresnet_count(4, 3, 16) == 4_702_227
    assert isinstance(model.domain_classifier.norm, nn.Identity)
    conv = model.segmenter.bottleneck.blocks[0].ffc1.convl2l
    assert conv.padding_mode == "reflect" and len(model.segmenter.bottleneck.blocks) == 3
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.segmenter.bottleneck.modules())
    assert isinstance(model.segmenter.dropout, nn.Dropout3d) and model.segmenter.dropout.p == 0.2


def test_original_network_trains_a_step(one_thread):
    from dgseg.presets import get_preset
    from dgseg.training.losses import SegLoss
    from dgseg.training.optim import build_optimizer
    from dgseg.training.steps import StepContext, forward_loss

    cfg = get_preset("segresnet_t2_vffc_grl_original")
    torch.manual_seed(0)
    model = build_model(cfg.data.in_channels, cfg.model)
    opt = build_optimizer(model.parameters(), cfg.optim)
    assert type(opt) is torch.optim.Adam and opt.defaults["amsgrad"]
    batch = {
        "image": torch.randn(1, 1, 16, 16, 16),
        "label": (torch.rand(1, 3, 16, 16, 16) > 0.7).float(),
        "domain": torch.tensor([2]),
    }
    before = [p.detach().clone() for p in model.parameters()]
    ctx = StepContext(torch.device("cpu"), lambd=0.5, domain_weight=1.0)
    out = forward_loss(model, batch["image"], batch["label"], SegLoss(), ctx, batch["domain"])
    assert torch.isfinite(out["loss"]) and out["domain_loss"] > 0
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed == len(before)  # every parameter moved, the domain head included
    assert all("max_exp_avg_sq" in opt.state[p] for p in model.parameters())


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_every_accepted_vffc_norm_and_padding_builds_and_runs(norm, padding):
    from dgseg.config import ModelConfig
    from dgseg.layers.vffc import NORMS, PADDING_MODES

    assert norm in NORMS and padding in PADDING_MODES
    cfg = ModelConfig(vffc=True, vffc_norm=norm, vffc_padding=padding)
    model = build_model(1, cfg, init_filters=4, blocks_down=(1, 1, 1), blocks_up=(1, 1))
    assert model(torch.randn(2, 1, 8, 8, 8)).shape == (2, 3, 8, 8, 8)


def test_vffc_norm_list_matches_what_the_config_accepts():
    from dgseg.config import ModelConfig
    from dgseg.layers.vffc import NORMS

    for norm in ("group", "batch", "none", "instance", "layer"):
        try:
            ModelConfig(vffc_norm=norm)
        except ValueError:
            assert norm not in NORMS
            with pytest.raises(ValueError, match="norm must be one of"):
                VFFC(16, norm=norm)
        else:
            assert norm in NORMS
            VFFC(16, norm=norm)


def test_monai_segresnet_keys_map_onto_dgseg_parameters_one_to_one():
    """MONAI 1.6.1's SegResNet parameter names (recorded in tests/data, so MONAI is not needed)
    land on dgseg's SegResNet's, one to one, with no name left over on either side."""
    from dgseg.models import from_monai_state_dict

    recorded = json.loads((DATA / "monai_segresnet_f8_keys.json").read_text())["keys"]
    net = SegResNet(1, 3, init_filters=8)
    mapped = list(from_monai_state_dict({k: None for k in recorded}))
    assert len(set(mapped)) == len(recorded) == 83
    assert sorted(mapped) == sorted(net.state_dict())

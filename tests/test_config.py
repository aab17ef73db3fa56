"""Config dataclasses, presets and --set overrides (dgseg/config.py, tools/train.py's parser)."""

import ast
import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from dgseg.config import Config, ModelConfig, apply_overrides, valid_keys
from dgseg.presets import PRESETS, get_preset
from dgseg.training import fit as train_fit

from tool_modules import load_tool

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENTS = (
    "segresnet_t2_noaug",
    "segresnet_t2_bezier",
    "segresnet_t2_vffc_grl",
    "segresnet_t1ce_t2_bezier",
    "unet_t2_noaug",
    "unet_stacked",
    "segresnet_t2_grl",
    "segresnet_t2_vffc",
)


def _load_train():
    return train_fit


def test_write_up_hyper_parameters_are_the_defaults():
    cfg = Config()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.epochs) == (1e-4, 1e-5, 100)
    assert cfg.optim.batch_size == 1 and cfg.optim.schedule == "cosine"
    assert cfg.run.amp == "auto" and cfg.model.vffc_norm == "group"


def test_presets_name_the_experiments_of_the_write_up():
    assert set(EXPERIMENTS) <= set(PRESETS)
    for name, cfg in PRESETS.items():
        assert cfg.run.name == name  # run folder named after the preset
    p = PRESETS
    assert p["segresnet_t2_noaug"].data.modalities == ("t2",)
    assert p["segresnet_t2_noaug"].data.bezier == "none" and not p["segresnet_t2_noaug"].data.flip
    assert p["segresnet_t2_bezier"].data.bezier != "none"
    main = p["segresnet_t2_vffc_grl"]
    assert main.model.vffc and main.model.grl and main.model.num_domains == 3
    assert main.data.bezier == "partition"
    assert p["segresnet_t1ce_t2_bezier"].data.modalities == ("t1ce", "t2")
    assert p["unet_t2_noaug"].model.arch == "unet3d"
    assert p["unet_stacked"].data.modalities == ("t1", "t1ce", "t2", "flair")
    assert p["unet_stacked"].data.in_channels == 4
    assert p["segresnet_t2_grl"].model.grl and not p["segresnet_t2_grl"].model.vffc
    assert p["segresnet_t2_vffc"].model.vffc and not p["segresnet_t2_vffc"].model.grl
    with pytest.raises(ValueError, match="valid presets"):
        get_preset("nope")


def test_build_model_reads_the_model_config_and_repeats_no_default():
    from dgseg.models import UNet3D, build_model

    sig = inspect.signature(build_model)
    assert [p.default for p in sig.parameters.values()][1:] == [None, inspect.Parameter.empty]
    cfg = PRESETS["unet_stacked"]
    model = build_model(cfg.data.in_channels, cfg.model)
    assert isinstance(model, UNet3D) and model.enc[0][0].in_channels == 4
    # keyword changes replace ModelConfig fields, validated like the config itself
    small = build_model(1, cfg.model, unet_features=(4, 8))
    assert small.features == (4, 8)
    with pytest.raises(ValueError, match="model.arch"):
        build_model(1, arch="resnet")
    with pytest.raises(TypeError):
        build_model(1, no_such_field=1)


def test_every_default_has_a_comment():
    src = (ROOT / "dgseg" / "config.py").read_text(encoding="utf-8").splitlines()
    tree = ast.parse("\n".join(src))
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")]
    n_fields = 0
    for cls in classes:
        if cls.name == "Config":
            continue
        for node in cls.body:
            if isinstance(node, ast.AnnAssign):
                n_fields += 1
                assert "#" in src[node.lineno - 1], f"{cls.name}.{node.target.id} has no comment"
    assert n_fields == len(valid_keys())


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_overrides_are_coerced_from_the_field_types():
    cfg = apply_overrides(
        Config(),
        [
            "model.vffc=true",
            "data.flip=0",
            "optim.epochs=7",
            "optim.lr=3e-4",
            "model.blocks_down=1,2,2",
            "model.blocks_up=(1, 1)",
            "data.modalities=t1ce,t2",
            "data.patch_size=64",
            "optim.grad_clip=1",
            "model.dropout=none",
            "run.name=my_run",
            "optim.betas=[0.8, 0.99]",
        ],
    )
    assert cfg.model.vffc is True and cfg.data.flip is False
    assert cfg.optim.epochs == 7 and isinstance(cfg.optim.epochs, int)
    assert cfg.optim.lr == 3e-4
    assert cfg.model.blocks_down == (1, 2, 2) and cfg.model.blocks_up == (1, 1)
    assert cfg.data.modalities == ("t1ce", "t2") and cfg.data.in_channels == 2
    assert cfg.data.patch_size == 64
    assert cfg.optim.grad_clip == 1.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.model.dropout is None
    assert cfg.run.name == "my_run" and cfg.optim.betas == (0.8, 0.99)
    # later items win, untouched sections are shared
    cfg2 = apply_overrides(cfg, ["optim.epochs=3", "optim.epochs=4", "data.patch_size=None"])
    assert cfg2.optim.epochs == 4 and cfg2.data.patch_size is None
    assert cfg2.model is cfg.model


@pytest.mark.parametrize(
    "item, message",
    [
        ("optim.lrr=1", "valid keys: .*optim.lr"),
        ("nosuch.lr=1", "unknown config key 'nosuch.lr'"),
        ("lr=1", "unknown config key 'lr'"),
        ("optim.lr", "section.field=value"),
        ("optim.epochs=ten", "optim.epochs='ten' cannot be parsed as int"),
        ("model.vffc=maybe", "model.vffc='maybe' cannot be parsed as bool"),
        ("optim.epochs=0", "optim.epochs=0 must be > 0"),
        ("run.amp=fp16", "run.amp='fp16' is not one of"),
        ("data.modalities=t2,dwi", "'dwi' is not one of"),
        ("model.arch=vnet", "model.arch='vnet'"),
    ],
)
def test_bad_overrides_raise_clear_errors(item, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(Config(), [item])


def test_cross_section_consistency_is_checked():
    with pytest.raises(ValueError, match="model.grl=True needs data.bezier"):
        apply_overrides(Config(), ["model.grl=true"])
    with pytest.raises(ValueError, match="2 domains"):
        apply_overrides(Config(), ["data.bezier=pair"])
    cfg = apply_overrides(Config(), ["data.bezier=pair", "model.num_domains=2", "model.grl=1"])
    assert cfg.model.grl


def test_intensity_augs_are_checked_and_label_the_domains():
    with pytest.raises(ValueError, match="data.intensity_augs entry"):
        apply_overrides(Config(), ["data.intensity_augs=gin,curves"])
    with pytest.raises(ValueError, match="makes 2 domains but model.num_domains=3"):
        apply_overrides(Config(), ["data.intensity_augs=none,gin", "model.grl=1"])
    with pytest.raises(ValueError, match="use one of them"):
        apply_overrides(Config(), ["data.intensity_augs=gin", "data.bezier=partition"])
    for other in ("data.intensity_augs=gin", "data.bezier=random", "model.grl=1"):
        with pytest.raises(ValueError, match="data.saliency_balancing"):
            apply_overrides(Config(), ["data.saliency_balancing=true", other])
    with pytest.raises(ValueError, match="data.consistency_views > 1"):
        apply_overrides(Config(), ["data.consistency_views=3"])
    with pytest.raises(ValueError, match="data.consistency_views > 1"):
        apply_overrides(
            Config(),
            [
                "data.consistency_views=3",
                "data.intensity_augs=gin,ipa",
                "model.grl=1",
                "model.num_domains=2",
            ],
        )
    cons = PRESETS["segresnet_t2_gin_ipa_cons"]
    assert cons.data.consistency_views == 3 and cons.loss.consistency_weight == 10.0
    sbf = PRESETS["segresnet_t2_slaug_sbf"].data
    assert sbf.saliency_balancing and not sbf.intensity_augs and sbf.bezier == "none"
    cfg = apply_overrides(
        Config(), ["data.intensity_augs=none,gin", "model.grl=1", "model.num_domains=2"]
    )
    assert cfg.data.intensity_augs == ("none", "gin") and cfg.model.grl
    sdg = [p for p in PRESETS if p.startswith("segresnet_t2_")]
    sdg = [p for p in sdg if PRESETS[p].data.intensity_augs]
    # six transforms, sdg, sdg_grl, sdg_vffc, sdg_bezier(_vffc), sdg_iso, the two consistency ones,
    # sdg_gradmap
    assert len(sdg) == 15
    for name in sdg:
        preset = PRESETS[name]
        assert preset.data.intensity_augs and preset.data.modalities == ("t2",)
        assert preset.data.flip and preset.data.rotation_degrees == 10.0  # same spatial aug


def test_dict_round_trip_through_json():
    for cfg in PRESETS.values():
        d = json.loads(cfg.to_json())
        assert isinstance(d["data"]["modalities"], list)  # plain JSON types
        assert Config.from_dict(d) == cfg
    d = Config().to_dict()
    d["optim"]["bogus"] = 1
    with pytest.raises(ValueError, match="optim.bogus"):
        Config.from_dict(d)
    d = Config().to_dict()
    d["optim"]["epochs"] = "100"
    with pytest.raises(ValueError, match="must be an int"):
        Config.from_dict(d)


def test_cli_resolves_preset_data_out_and_sets(capsys):
    train = _load_train()
    args = train.parse_args(
        [
            "--preset",
            "segresnet_t2_vffc_grl",
            "--data",
            "shards",
            "--out",
            "o",
            "--set",
            "optim.epochs=3",
            "--set",
            "model.vffc_ratio=0.25",
        ]
    )
    cfg = args.config
    assert cfg.data.root == "shards" and cfg.run.out == "o"
    assert cfg.optim.epochs == 3 and cfg.model.vffc_ratio == 0.25 and cfg.model.grl
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "tiny", "--set", "optim.epoch=3"])
    err = capsys.readouterr().err
    assert "unknown config key 'optim.epoch'" in err and "optim.epochs" in err
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "no_such_preset"])


def test_optimizer_defaults_and_the_original_preset():
    assert (Config().optim.name, Config().optim.amsgrad) == ("adamw", False)
    orig = get_preset("segresnet_t2_vffc_grl_original")
    assert (orig.optim.name, orig.optim.amsgrad, orig.optim.weight_decay) == ("adam", True, 1e-5)
    m = orig.model
    assert (m.init_filters, m.dropout, m.vffc_blocks, m.vffc_norm, m.vffc_padding) == (
        32,
        0.2,
        3,
        "batch",
        "reflect",
    )
    assert (m.domain_hidden, m.domain_input_norm, m.grl, m.num_domains) == (64, False, True, 3)
    # dgseg's own defaults are unchanged
    d = ModelConfig()
    assert (d.vffc_padding, d.domain_input_norm, d.vffc_norm, d.domain_hidden) == (
        "zeros",
        True,
        "group",
        128,
    )
    with pytest.raises(ValueError, match="optim.name='sgd'"):
        apply_overrides(Config(), ["optim.name=sgd"])
    with pytest.raises(ValueError, match="model.vffc_padding='circular'"):
        apply_overrides(Config(), ["model.vffc_padding=circular"])


def test_spatial_control_has_the_augmented_presets_spatial_transforms_only():
    spatial = get_preset("segresnet_t2_spatial")
    assert spatial.data.bezier == "none" and not spatial.model.vffc and not spatial.model.grl
    for name in (
        "segresnet_t2_bezier",
        "segresnet_t2_grl",
        "segresnet_t2_vffc",
        "segresnet_t2_vffc_grl",
        "segresnet_t2_vffc_grl_original",
    ):
        d = get_preset(name).data
        assert (d.flip, d.rot90, d.rotation_degrees) == (
            spatial.data.flip,
            spatial.data.rot90,
            spatial.data.rotation_degrees,
        ), name
    noaug = get_preset("segresnet_t2_noaug").data
    assert not noaug.flip and noaug.rotation_degrees == 0 and spatial.data.flip


def test_vffc_norm_choices_have_one_owner():
    from dgseg.layers.vffc import NORMS

    for norm in NORMS:  # every value the VFFC accepts, the config accepts (and vice versa)
        assert ModelConfig(vffc_norm=norm).vffc_norm == norm
    with pytest.raises(ValueError, match="vffc_norm='instance'"):
        ModelConfig(vffc_norm="instance")


def test_choice_lists_are_the_ones_of_the_code_that_acts_on_them():
    import dgseg.config as config
    from dgseg.data.domains import BEZIER_MODES
    from dgseg.layers.vffc import PADDING_MODES
    from dgseg.training.distributed import DEVICES
    from dgseg.training.optim import OPTIMIZERS, SCHEDULE_INTERVALS, SCHEDULES

    assert config.BEZIER_MODES is BEZIER_MODES and config.DEVICES is DEVICES
    assert config.PADDING_MODES is PADDING_MODES and config.OPTIMIZERS is OPTIMIZERS
    assert (config.SCHEDULES, config.SCHEDULE_INTERVALS) == (SCHEDULES, SCHEDULE_INTERVALS)


def test_eval_roi_falls_back_from_val_roi_to_patch_size_to_the_whole_volume():
    cfg = get_preset("tiny")
    assert cfg.eval_roi is None
    assert apply_overrides(cfg, ["data.patch_size=32"]).eval_roi == 32
    assert apply_overrides(cfg, ["data.patch_size=32", "run.val_roi=48"]).eval_roi == 48


def test_partition_with_more_domains_than_curve_kinds_is_refused_by_the_config():
    with pytest.raises(ValueError, match="at most 3 domains"):
        apply_overrides(get_preset("segresnet_t2_vffc_grl"), ["model.num_domains=4"])
    with pytest.raises(ValueError, match="at most 3 domains"):  # also without the GRL
        apply_overrides(get_preset("segresnet_t2_vffc"), ["model.num_domains=5"])
    ok = apply_overrides(get_preset("segresnet_t2_vffc_grl"), ["model.num_domains=2"])
    assert ok.model.num_domains == 2


def test_one_default_data_folder():
    assert Config().data.root == load_tool("prepare_brats").DEFAULT_DATA_ROOT == "data/prepared"


def test_overwrite_is_gone_and_an_existing_run_is_never_restarted(tmp_path, capsys):
    train = _load_train()
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "tiny", "--overwrite"])
    assert "unrecognized arguments: --overwrite" in capsys.readouterr().err
    run = tmp_path / "tiny"
    run.mkdir()
    (run / "last.pt").write_bytes(b"an earlier run")
    with pytest.raises(SystemExit, match="--resume to continue it, or delete"):
        train.main(["--preset", "tiny", "--out", str(tmp_path)])
    assert (run / "last.pt").read_bytes() == b"an earlier run"  # untouched

"""Config dataclasses, presets and --set overrides (dgseg/config.py, tools/train.py's parser)."""

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from dgseg.config import Config, ModelConfig, apply_overrides, valid_keys
from dgseg.presets import PRESETS, WRITEUP_DOMAINS, get_preset
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
    noaug = p["segresnet_t2_noaug"]
    assert noaug.data.intensity_augs == () and not noaug.data.flip and noaug.loss.step == "plain"
    assert p["segresnet_t2_bezier"].data.intensity_augs == WRITEUP_DOMAINS
    assert p["segresnet_t2_bezier"].data.domain_assignment == "sample"
    main = p["segresnet_t2_vffc_grl"]
    assert main.model.vffc and main.model.grl and main.model.num_domains == 3
    assert main.data.intensity_augs == WRITEUP_DOMAINS and main.data.domain_assignment == "patient"
    assert main.loss.step == "adversarial"
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
    with pytest.raises(ValueError, match="adversarial step and the GRL domain head go together"):
        apply_overrides(Config(), ["model.grl=true"])
    with pytest.raises(ValueError, match="adversarial step and the GRL domain head go together"):
        apply_overrides(Config(), ["loss.step=adversarial"])
    pair = ["data.intensity_augs=bezier_increasing,bezier_decreasing"]
    with pytest.raises(ValueError, match="makes 2 domains but model.num_domains=3"):
        apply_overrides(Config(), [*pair, "model.grl=1", "loss.step=adversarial"])
    cfg = apply_overrides(
        Config(), [*pair, "model.num_domains=2", "model.grl=1", "loss.step=adversarial"]
    )
    assert cfg.model.grl


def test_intensity_augs_are_checked_and_label_the_domains():
    with pytest.raises(ValueError, match="data.intensity_augs entry"):
        apply_overrides(Config(), ["data.intensity_augs=gin,curves"])
    with pytest.raises(ValueError, match="data.domain_assignment='patient' deals"):
        apply_overrides(Config(), ["data.domain_assignment=patient"])
    with pytest.raises(ValueError, match="saliency-balanced step"):
        apply_overrides(Config(), ["loss.step=saliency_balanced", "data.intensity_augs=gin"])
    with pytest.raises(ValueError, match="views above 1 are for the consistency step"):
        apply_overrides(Config(), ["data.consistency_views=3", "data.intensity_augs=gin"])
    with pytest.raises(ValueError, match="views above 1 are for the consistency step"):
        apply_overrides(Config(), ["loss.step=consistency", "data.intensity_augs=gin"])
    with pytest.raises(ValueError, match="data.consistency_views=3 draws every view"):
        apply_overrides(Config(), ["data.consistency_views=3", "loss.step=consistency"])
    with pytest.raises(ValueError, match="loss.step='mixup'"):
        apply_overrides(Config(), ["loss.step=mixup"])
    cons = PRESETS["segresnet_t2_gin_ipa_cons"]
    assert cons.data.consistency_views == 3 and cons.loss.consistency_weight == 10.0
    assert cons.loss.step == "consistency"
    sbf = PRESETS["segresnet_t2_slaug_sbf"]
    assert sbf.loss.step == "saliency_balanced" and not sbf.data.intensity_augs
    cfg = apply_overrides(
        Config(),
        ["data.intensity_augs=none,gin", "model.grl=1", "model.num_domains=2"]
        + ["loss.step=adversarial"],
    )
    assert cfg.data.intensity_augs == ("none", "gin") and cfg.model.grl
    sdg = [p for p in PRESETS if p.startswith("segresnet_t2_")]
    sdg = [p for p in sdg if set(PRESETS[p].data.intensity_augs) - set(WRITEUP_DOMAINS)]
    # six transforms, sdg_intensity, sdg_grl, sdg_vffc, sdg_bezier(_vffc), sdg_iso, the two
    # consistency ones, sdg_gradmap and sdg (the recommended: sdg_gradmap's settings)
    assert len(sdg) == 16
    for name in sdg:
        preset = PRESETS[name]
        assert preset.data.intensity_augs and preset.data.modalities == ("t2",)
        assert preset.data.flip and preset.data.rotation_degrees == 10.0  # same spatial aug


def test_configs_saved_before_the_domain_pool_load_as_the_same_run():
    """Old ``data.bezier`` / ``data.saliency_balancing`` configs become the presets' pool + step."""
    cases = {
        "segresnet_t2_vffc_grl": {"bezier": "partition"},
        "segresnet_t2_vffc": {"bezier": "partition"},
        "segresnet_t2_bezier": {"bezier": "random"},
        "segresnet_t2_slaug_sbf": {"bezier": "none", "saliency_balancing": True},
        "segresnet_t2_gin_ipa_cons": {"bezier": "none", "saliency_balancing": False},
        "segresnet_t2_sdg_grl": {"bezier": "none", "saliency_balancing": False},
    }
    for name, old_keys in cases.items():
        d = PRESETS[name].to_dict()
        d["data"].pop("domain_assignment")
        d["loss"].pop("step")
        if "bezier" in old_keys and old_keys["bezier"] != "none":
            d["data"]["intensity_augs"] = []
        d["data"].update(old_keys)
        assert Config.from_dict(d) == PRESETS[name], name
    pair = PRESETS["segresnet_t2_noaug"].to_dict()
    pair["data"]["bezier"] = "pair"
    got = Config.from_dict(pair).data
    assert got.intensity_augs == WRITEUP_DOMAINS[1:] and got.domain_assignment == "patient"
    both = PRESETS["segresnet_t2_gin"].to_dict()
    both["data"]["bezier"] = "random"
    with pytest.raises(ValueError, match="no equivalent"):
        Config.from_dict(both)


def test_spatial_control_has_the_augmented_presets_spatial_transforms_only():
    spatial = get_preset("segresnet_t2_spatial")
    assert not spatial.data.intensity_augs and not spatial.model.vffc and not spatial.model.grl
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
    from dgseg.data.domains import DOMAIN_ASSIGNMENTS
    from dgseg.layers.vffc import PADDING_MODES
    from dgseg.training.distributed import DEVICES
    from dgseg.training.optim import OPTIMIZERS, SCHEDULE_INTERVALS, SCHEDULES
    from dgseg.training.steps import STEP_NAMES

    assert config.DOMAIN_ASSIGNMENTS is DOMAIN_ASSIGNMENTS and config.DEVICES is DEVICES
    assert config.STEP_NAMES is STEP_NAMES
    assert config.PADDING_MODES is PADDING_MODES and config.OPTIMIZERS is OPTIMIZERS
    assert (config.SCHEDULES, config.SCHEDULE_INTERVALS) == (SCHEDULES, SCHEDULE_INTERVALS)


def test_eval_roi_falls_back_from_val_roi_to_patch_size_to_the_whole_volume():
    cfg = get_preset("tiny")
    assert cfg.eval_roi is None
    assert apply_overrides(cfg, ["data.patch_size=32"]).eval_roi == 32
    assert apply_overrides(cfg, ["data.patch_size=32", "run.val_roi=48"]).eval_roi == 48


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

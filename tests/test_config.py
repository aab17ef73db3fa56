"""Config dataclasses, presets and --set overrides (dgseg/config.py, tools/train.py's parser)."""

import ast
import dataclasses
import importlib.util
import inspect
import json
from pathlib import Path

import pytest

from dgseg.config import (
    PRESETS,
    Config,
    ModelConfig,
    apply_overrides,
    get_preset,
    model_kwargs,
    valid_keys,
)

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
    spec = importlib.util.spec_from_file_location("dgseg_train_tool", ROOT / "tools" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


def test_model_config_fields_are_the_build_model_keywords():
    from dgseg.models import build_model

    sig = inspect.signature(build_model)
    keywords = {n for n, prm in sig.parameters.items() if prm.kind == prm.KEYWORD_ONLY}
    assert {f.name for f in dataclasses.fields(ModelConfig)} == keywords
    for field in dataclasses.fields(ModelConfig):  # same defaults as the factory
        default = sig.parameters[field.name].default
        assert field.default == default, field.name
    kw = model_kwargs(PRESETS["unet_stacked"])
    assert kw["in_channels"] == 4 and kw["arch"] == "unet3d"


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

"""Config dataclasses, files, presets and flags."""

import argparse
import dataclasses

import pytest

from fastclr.train.config import (
    RESUME_FREE_KEYS,
    SECTIONS,
    ConfigError,
    PretrainConfig,
    add_config_flags,
    config_from_args,
    list_presets,
    load_config,
    load_preset,
)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return config_from_args(parser.parse_args(argv))


def test_presets_ship_and_load():
    assert {"imagenet-r50", "cifar10-r18", "cpu-demo"} <= set(list_presets())
    for name in list_presets():
        load_preset(name).validate()


def test_presets_hold_the_published_recipes():
    inet = load_preset("imagenet-r50")
    assert (inet.model.arch, inet.optim.batch_size, inet.loss.temperature, inet.data.size) == (
        "resnet50",
        4096,
        0.1,
        224,
    )
    assert (inet.optim.lr, inet.optim.lr_scaling, inet.optim.weight_decay, inet.data.blur_p) == (
        0.3,
        "linear",
        1e-6,
        0.5,
    )
    cifar = load_preset("cifar10-r18")
    assert (cifar.model.arch, cifar.model.cifar_stem, cifar.loss.temperature) == (
        "resnet18",
        True,
        0.5,
    )
    assert (cifar.data.size, cifar.data.color_strength, cifar.data.blur_p) == (32, 0.5, 0.0)
    assert 512 <= cifar.optim.batch_size <= 1024


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="cpu-demo"):
        load_preset("no-such-preset")


@pytest.mark.parametrize("preset", ["imagenet-r50", "cifar10-r18", "cpu-demo"])
def test_toml_round_trip(tmp_path, preset):
    cfg = load_preset(preset)
    cfg.run.resume = "auto"
    cfg.data.data = '/some/where with spaces/"quoted"'
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_yaml_and_flat_files(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("model:\n  arch: resnet18\nbatch_size: 64\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.arch == "resnet18" and cfg.optim.batch_size == 64


def test_flags_override_preset_and_keep_the_rest():
    cfg = _parse(
        [
            "--preset",
            "cifar10-r18",
            "--batch-size",
            "128",
            "--no-cifar-stem",
            "--lr",
            "none",
            "--temperature",
            "0.2",
        ]
    )
    assert cfg.optim.batch_size == 128 and cfg.model.cifar_stem is False and cfg.optim.lr is None
    assert cfg.loss.temperature == 0.2
    assert cfg.model.arch == "resnet18" and cfg.data.size == 32  # from the preset, untouched


def test_flags_without_preset_start_from_defaults():
    cfg = _parse(["--arch", "cnn7", "--compile"])
    expected = PretrainConfig()
    expected.model.arch, expected.run.compile = "cnn7", True
    assert cfg == expected


def test_every_field_has_a_flag_with_help():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    text = parser.format_help()
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text
            assert f.metadata["help"]


def test_bad_files_and_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[model\narch = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "unknown.toml").write_text("[model]\ndepth = 3\n")
    with pytest.raises(ConfigError, match="model.depth"):
        load_config(tmp_path / "unknown.toml")
    (tmp_path / "type.toml").write_text('[optim]\nbatch_size = "big"\n')
    with pytest.raises(ConfigError, match="batch_size must be int"):
        load_config(tmp_path / "type.toml")


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("model", "arch", "vgg", "unknown arch 'vgg'.*resnet18"),
        ("loss", "temperature", 0.0, "temperature must be a positive"),
        ("loss", "temperature", -1.0, "temperature must be a positive"),
        ("optim", "lr", 0.0, "lr must be a positive"),
        ("optim", "lr", float("nan"), "lr must be a positive"),
        ("optim", "batch_size", 0, "batch_size must be positive"),
        ("run", "precision", "fp8", "precision must be one of"),
        ("data", "min_scale", 1.5, "min_scale"),
        ("run", "dist_timeout", 0.0, "dist_timeout must be a positive"),
        ("run", "dist_timeout", float("inf"), "dist_timeout must be a positive"),
        ("run", "dist_timeout", float("nan"), "dist_timeout must be a positive"),
    ],
)
def test_validate_rejects(section, key, value, match):
    cfg = PretrainConfig()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_batch_must_divide_world_size():
    cfg = PretrainConfig()
    cfg.optim.batch_size = 10
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        cfg.validate(world_size=3)


def test_mismatched_keys_ignore_run_control_only():
    a, b = PretrainConfig(), PretrainConfig()
    b.run.out, b.run.max_steps, b.data.data, b.run.resume = "elsewhere", 5, "/x", "auto"
    assert a.mismatched_keys(b) == []
    b.model.width, b.loss.temperature = 32, 0.1
    assert a.mismatched_keys(b) == ["loss.temperature", "model.width"]
    assert all(k.split(".")[0] in SECTIONS for k in RESUME_FREE_KEYS)


def test_data_flag_is_not_mistaken_for_the_data_section(tmp_path):
    cfg = _parse(["--data", "imgs/train", "--test-data", "imgs/test"])
    assert (cfg.data.data, cfg.data.test_data) == ("imgs/train", "imgs/test")
    (tmp_path / "flat.toml").write_text('data = "x"\n[model]\narch = "cnn7"\n')
    assert load_config(tmp_path / "flat.toml").data.data == "x"

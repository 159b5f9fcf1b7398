"""Config dataclasses, files, presets and flags."""

import argparse
import dataclasses

import pytest

from fastclr.train.config import (
    RANGES,
    RESUME_FREE_KEYS,
    SECTIONS,
    ConfigError,
    PretrainConfig,
    _field_type,
)
from fastclr.train.config_io import (
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
        (
            "optim",
            "batch_size",
            0,
            r"batch_size must be an integer in \[1, 16777216\], got 0 \(--batch-size\)",
        ),
        ("run", "precision", "fp8", "precision must be one of"),
        ("data", "min_scale", 1.5, "min_scale"),
        (
            "optim",
            "warmup_epochs",
            float("inf"),
            r"warmup_epochs must be .*got inf \(--warmup-epochs\)",
        ),
        ("optim", "momentum", float("nan"), r"momentum must be a number in \[0, 1\], got nan"),
        (
            "data",
            "size",
            10**9,
            r"size must be an integer in \[1, 8192\], got 1000000000 \(--size\)",
        ),
        ("data", "color_strength", float("nan"), r"color_strength .*got nan \(--color-strength\)"),
        ("data", "blur_p", float("nan"), r"blur_p .*\(--blur-p\)"),
        ("run", "knn_temperature", 0.0, r"knn_temperature must be a positive finite number"),
        ("run", "seed", -1, r"seed must be an integer in \[0, 4294967295\]"),
        ("model", "proj_layers", 0, r"proj_layers .*\(--proj-layers\)"),
        ("run", "dist_timeout", 0.0, r"dist_timeout must be a number in \(0, 10080\]"),
        ("run", "dist_timeout", float("inf"), r"dist_timeout must be a number in \(0, 10080\]"),
        ("run", "dist_timeout", float("nan"), r"dist_timeout must be a number in \(0, 10080\]"),
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


# Hostile configs and flags: each of these once hung, crashed with a traceback or silently did something else.


def test_every_numeric_setting_has_a_range():
    numeric = {
        f.name
        for section in SECTIONS
        for f in dataclasses.fields(SECTIONS[section])
        if _field_type(section, f.name)[0] in (int, float)
    }
    assert numeric == set(RANGES)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--warmup-epochs", "inf"], r"warmup_epochs must be .*got inf \(--warmup-epochs\)"),
        (["--size", "100000"], r"size must be an integer in \[1, 8192\], got 100000 \(--size\)"),
        (["--color-strength", "nan"], r"color_strength .*got nan \(--color-strength\)"),
        (["--lr", "nan"], r"lr must be a positive finite number, got nan \(--lr\)"),
        (["--temperature", "inf"], r"temperature must be a positive finite number, got inf"),
    ],
)
def test_non_finite_and_huge_flags_name_the_flag(flags, match):
    cfg = _parse(flags)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


@pytest.mark.parametrize("flag", ["--data", "--test-data", "--out", "--resume"])
def test_empty_path_flags_are_errors(flag):
    """--data "" used to mean "not given": it silently trained on the embedded demo data."""
    with pytest.raises(ConfigError, match=f"command line: {flag} cannot be an empty string"):
        _parse([flag, ""])
    assert _parse(["--data", "none"]).data.data is None  # the explicit way to ask for the demo


def test_empty_path_and_nul_byte_in_files(tmp_path):
    (tmp_path / "empty.toml").write_text('[data]\ndata = ""\n')
    with pytest.raises(ConfigError, match=r"empty\.toml: data cannot be an empty string"):
        load_config(tmp_path / "empty.toml")
    (tmp_path / "nul.toml").write_text('[run]\nout = "runs/a\\u0000b"\n')
    with pytest.raises(ConfigError, match=r"nul\.toml: out contains a NUL byte"):
        load_config(tmp_path / "nul.toml")
    with pytest.raises(ConfigError, match=r"--out contains a NUL byte"):
        _parse(["--out", "runs/a\x00b"])


@pytest.mark.timeout(60)
def test_billion_laughs_yaml_is_refused_quickly(tmp_path):
    """Nine levels of ten aliases: 10**9 strings once expanded. The error message once built their repr (a hang)."""
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"laughs\.yaml: more than 10000 values"):
        load_config(tmp_path / "laughs.yaml")
    # The same bomb under a known key ("data" is a section and a key).
    (tmp_path / "data.yaml").write_text("\n".join(lines) + "\ndata: *a9\n")
    with pytest.raises(ConfigError, match=r"data\.yaml: more than 10000 values"):
        load_config(tmp_path / "data.yaml")
    (tmp_path / "cycle.yaml").write_text("data: &c [*c]\n")
    with pytest.raises(ConfigError, match=r"cycle\.yaml: nested deeper than 32 levels"):
        load_config(tmp_path / "cycle.yaml")


def test_messages_show_a_bounded_value():
    big = [["x" * 10_000] * 1000] * 1000
    with pytest.raises(ConfigError) as err:
        PretrainConfig().update({"data": big})
    assert len(str(err.value)) < 1000


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.toml", "data = " + "[" * 5000 + "]" * 5000 + "\n"),
        ("deep_table.toml", "data = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n"),
        ("deep.yaml", "data: " + "[" * 5000 + "]" * 5000 + "\n"),
    ],
)
def test_deeply_nested_files_are_refused_by_name(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=rf"{name}: .*(nested too deeply|nested deeper)"):
        load_config(tmp_path / name)


@pytest.mark.parametrize("name", ["blob.toml", "blob.yaml"])
def test_binary_and_huge_config_files_are_refused_by_name(tmp_path, name):
    (tmp_path / name).write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=rf"{name}: not a text file \(byte 128 is not UTF-8\)"):
        load_config(tmp_path / name)
    (tmp_path / name).write_bytes(b"# padding\n" * 200_000)
    with pytest.raises(ConfigError, match=rf"{name}: larger than 1048576 bytes"):
        load_config(tmp_path / name)

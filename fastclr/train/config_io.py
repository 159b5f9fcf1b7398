"""Reading a pretraining configuration: TOML/YAML files, the shipped presets, and the command-line flags.

Precedence, lowest first: dataclass defaults < preset (``--preset NAME``) or file (``--config FILE``) < flags given on
the command line. Files group keys in sections named after the dataclasses (``[data]``, ``[model]``, ``[loss]``,
``[optim]``, ``[run]``); a flat file with bare keys works too, since every key name is unique across sections. Every
value is coerced and checked by :class:`~fastclr.train.config.PretrainConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from fastclr.train.config import (
    COMMAND_LINE,
    SECTIONS,
    ConfigError,
    PretrainConfig,
    _field_type,
    _key_owner,
    _show,
)

# A config file is a few dozen settings: anything far larger is refused before its values are looked at.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = (
    10_000  # tables, lists and scalars, counted after YAML aliases are expanded (billion laughs)
)
MAX_CONFIG_DEPTH = 32


# ----------------------------------------------------------------------------------------------------------------------
# Files and presets


def list_presets() -> list[str]:
    """Names of the presets shipped in ``fastclr.configs`` (``configs/*.toml``)."""
    return sorted(
        p.name[: -len(".toml")]
        for p in resources.files("fastclr.configs").iterdir()
        if p.name.endswith(".toml")
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML or (when PyYAML is installed) YAML file into a dict.

    ConfigError naming the file for anything that is not a small text file holding a table of settings: binary data,
    more than MAX_CONFIG_BYTES, nesting deeper than MAX_CONFIG_DEPTH or more than MAX_CONFIG_VALUES values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    kind = "YAML" if path.suffix in (".yaml", ".yml") else "TOML"
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text file (byte {e.start} is not UTF-8): expected {kind} settings"
        ) from None
    try:
        data = _parse_yaml(path, text) if kind == "YAML" else tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid {kind}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings, got {type(data).__name__}")
    _check_bounded(data, path)
    return data


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            f"{path}: reading YAML needs PyYAML (pip install pyyaml); TOML works without it"
        ) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_show(str(e))}") from None


def _check_bounded(data: Any, source: Path) -> None:
    """ConfigError unless ``data`` nests at most MAX_CONFIG_DEPTH deep and holds at most MAX_CONFIG_VALUES values.

    YAML aliases make a small file load as a small graph that expands to an enormous (or, with a cycle, endless) tree;
    walking the tree stops at the limits, so this costs at most MAX_CONFIG_VALUES steps whatever the file.
    """
    stack, count = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{source}: more than {MAX_CONFIG_VALUES} values (YAML aliases expanded): not a config file"
            )
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"{source}: nested deeper than {MAX_CONFIG_DEPTH} levels: not a config file"
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list | tuple | set):
            stack.extend((v, depth + 1) for v in value)


def load_config(path: str | Path) -> PretrainConfig:
    """Defaults overlaid with the settings of a TOML/YAML file."""
    cfg = PretrainConfig()
    cfg.update(read_config_file(path), source=str(path))
    return cfg


def load_preset(name: str) -> PretrainConfig:
    """Defaults overlaid with the preset ``configs/<name>.toml`` (e.g. ``cifar10-r18``)."""
    presets = list_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(presets)}")
    with resources.as_file(resources.files("fastclr.configs") / f"{name}.toml") as path:
        return load_config(path)


# ----------------------------------------------------------------------------------------------------------------------
# Command-line flags


_METAVARS = {"data": "DIR", "test_data": "DIR", "out": "DIR", "resume": "auto|CKPT"}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--preset``, ``--config`` and one flag per config field (``--batch-size``, ``--cifar-stem``, ...).

    Field flags default to ``argparse.SUPPRESS`` so that ``config_from_args`` can tell given flags from defaults.
    """
    parser.add_argument(
        "--preset", help="start from a named preset; one of: " + ", ".join(list_presets())
    )
    parser.add_argument("--config", metavar="FILE", help="start from a TOML (or YAML) config file")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings")
        for f in dataclasses.fields(cls):
            base, optional = _field_type(section, f.name)
            flag = "--" + f.name.replace("_", "-")
            shown = "none" if f.default is None else f.default
            help_text = f"{f.metadata['help']} (default: {shown})"
            kwargs: dict[str, Any] = {
                "default": argparse.SUPPRESS,
                "help": help_text,
                "dest": f.name,
            }
            if base is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
                continue
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = _METAVARS.get(f.name, base.__name__.upper())
            kwargs["type"] = _optional_parser(base) if optional else base
            group.add_argument(flag, **kwargs)


def _optional_parser(base: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else base(text)

    parse.__name__ = base.__name__
    return parse


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """Resolve defaults < ``--preset``/``--config`` < explicitly given flags."""
    if getattr(args, "preset", None) and getattr(args, "config", None):
        raise ConfigError("give either --preset or --config, not both")
    if getattr(args, "preset", None):
        cfg = load_preset(args.preset)
    elif getattr(args, "config", None):
        cfg = load_config(args.config)
    else:
        cfg = PretrainConfig()
    owner = _key_owner()
    given = {k: v for k, v in vars(args).items() if k in owner}
    cfg.update(given, source=COMMAND_LINE)
    return cfg

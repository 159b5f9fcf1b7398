"""Pretraining configuration: typed dataclasses, their checks, and how values from files and flags are coerced.

Files, presets and command-line flags are read into these dataclasses by :mod:`fastclr.train.config_io`.

Precedence, lowest first: dataclass defaults < preset (``--preset NAME``) or file (``--config FILE``) < flags given on
the command line. Files group keys in sections named after the dataclasses (``[data]``, ``[model]``, ``[loss]``,
``[optim]``, ``[run]``); a flat file with bare keys works too, since every key name is unique across sections.

>>> from fastclr.train.config_io import load_preset
>>> cfg = load_preset("cifar10-r18")
>>> cfg.model.arch, cfg.optim.batch_size
('resnet18', 512)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fastclr.device import DEVICE_CHOICES


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the key and the value."""


TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package, which is not installed: pip install 'fastclr[tensorboard]'"


COMMAND_LINE = "command line"

# Values shown in error messages are cut short: a value from a hostile file may be huge or deeply nested.
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxdict, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxset = 2, 3, 3, 3, 3
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 40, 40, 40


def _show(value: Any) -> str:
    """repr(value), bounded in length and depth whatever the value."""
    return _SHOW.repr(value)


def _flag(key: str) -> str:
    return "--" + str(key).replace("_", "-")


def _opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DataConfig:
    data: str | None = _opt(
        None,
        "training images: ImageFolder dir (root/<class>/<img>), a flat folder of unlabelled images (root/<img>; "
        "no kNN monitor then) or a file list; none = embedded shapes demo",
    )
    test_data: str | None = _opt(
        None, "held-out images for the kNN monitor (ImageFolder dir); none = no kNN monitor"
    )
    size: int = _opt(224, "side of the square crops fed to the network, in pixels")
    backend: str = _opt(
        "auto",
        "data loader: dali, torch (the torchvision twin), or auto (DALI when importable)",
        ("auto", "dali", "torch"),
    )
    pipeline_device: str = _opt(
        "auto",
        "where DALI decodes and augments: cpu, gpu, or auto (gpu when CUDA and DALI-GPU work)",
        ("auto", "cpu", "gpu"),
    )
    workers: int = _opt(4, "decoding threads (DALI) or worker processes (torchvision) per rank")
    color_strength: float = _opt(
        1.0, "colour-jitter strength s (brightness/contrast/saturation 0.8s, hue 0.2s)"
    )
    blur_p: float | None = _opt(
        None, "Gaussian-blur probability; none = 0.5 from 64 px up, 0 below (CIFAR)"
    )
    min_scale: float = _opt(0.08, "smallest area fraction of the random resized crop")
    on_corrupt: str = _opt(
        "error",
        "unreadable images: stop with an error naming the file, or skip and count them",
        ("error", "skip"),
    )


@dataclass
class ModelConfig:
    arch: str = _opt(
        "resnet50",
        "backbone architecture (resnet18, resnet34, resnet50, cnn7), or timm:<name> for any timm model, e.g. "
        "timm:vit_small_patch16_224 (pip install 'fastclr[timm]')",
    )
    width: int | None = _opt(
        None,
        "base channel width of the backbone; none = the architecture's standard (64 for ResNets, 32 for cnn7)",
    )
    cifar_stem: bool = _opt(
        False, "3x3 stride-1 first conv and no max-pool, for small (32 px) images"
    )
    proj_layers: int = _opt(
        3, "projection-head depth: 3 = SimCLR v2 head, 2 = the v1 paper's 2048-2048-128 head"
    )
    proj_hidden: int | None = _opt(
        None, "projection-head hidden width; none = the backbone feature width"
    )
    proj_dim: int = _opt(128, "projection output dimension")
    freeze_patch_embed: bool = _opt(
        False,
        "timm ViTs: a random, frozen patch projection (MoCo v3's fix for the instability of self-supervised ViTs)",
    )


@dataclass
class LossConfig:
    temperature: float = _opt(
        0.5, "NT-Xent temperature (0.5 for CIFAR; the paper's ImageNet value is 0.1)"
    )
    loss_impl: str = _opt(
        "auto",
        "loss implementation (every --loss, with or without a bank): auto (triton on CUDA, tiled torch "
        "elsewhere), triton, torch, reference",
        ("auto", "triton", "torch", "reference"),
    )
    loss: str = _opt(
        "ntxent",
        "contrastive loss: ntxent (SimCLR), dcl or dclw (decoupled, Yeh et al. 2022), supcon (supervised, "
        "Khosla et al. 2020: needs labelled --data); all but plain ntxent run on the tiled torch path",
        ("ntxent", "dcl", "dclw", "supcon"),
    )
    memory_bank_size: int = _opt(
        0,
        "ntxent: also use the last K embeddings of the second views as negatives (a memory bank); 0 = none",
    )


@dataclass
class OptimConfig:
    batch_size: int = _opt(
        256, "global batch size (images per step over all ranks; each gives two views)"
    )
    epochs: int = _opt(100, "training epochs (the cosine schedule spans all of them)")
    warmup_epochs: float = _opt(10.0, "linear learning-rate warm-up from 0, in epochs")
    lr: float | None = _opt(
        None, "base learning rate before scaling; none = 0.3 (linear) or 0.075 (sqrt)"
    )
    lr_scaling: str = _opt(
        "linear",
        "peak lr = lr*B/256 (linear), lr*sqrt(B) (sqrt) or lr as given (none)",
        ("linear", "sqrt", "none"),
    )
    weight_decay: float = _opt(
        1e-6,
        "weight decay (biases, normalisation parameters, position embeddings and class tokens excluded)",
    )
    momentum: float = _opt(0.9, "LARS momentum (AdamW: beta1)")
    optimizer: str = _opt(
        "lars",
        "lars (SimCLR; trust ratio per layer) or adamw (ViTs, as in MoCo v3; needs --lr, e.g. 1.5e-4)",
        ("lars", "adamw"),
    )


@dataclass
class RunConfig:
    out: str = _opt("runs/simclr", "run directory: checkpoints, metrics, resolved config and plots")
    seed: int = _opt(0, "random seed (offset by rank for per-process randomness)")
    device: str = _opt(
        "auto", "compute device: cuda when available (auto), cuda (or gpu) or cpu", DEVICE_CHOICES
    )
    precision: str = _opt(
        "auto",
        "autocast precision: auto = bf16 where the hardware computes it (GPUs from Ampere on, CPUs with "
        "AVX512-BF16 or AMX), fp16 on older GPUs, fp32 on other CPUs; fp16 adds a GradScaler",
        ("auto", "bf16", "fp16", "fp32"),
    )
    compile: bool = _opt(False, "torch.compile the model")
    tensorboard: bool = _opt(
        False,
        "also write the metrics as TensorBoard scalars to OUT/tensorboard (pip install fastclr[tensorboard])",
    )
    ckpt_every: int = _opt(0, "also checkpoint every N steps (0 = only at the end of each epoch)")
    keep: int = _opt(3, "number of most recent checkpoints kept")
    resume: str | None = _opt(
        None, "'auto' = continue from the newest valid checkpoint in OUT, or a checkpoint path"
    )
    knn_every: int = _opt(
        1, "kNN monitor on the held-out split every N epochs (0 = only at start and end)"
    )
    knn_k: int = _opt(200, "neighbours in the kNN monitor")
    knn_temperature: float = _opt(0.1, "temperature of the kNN monitor's weighted votes")
    knn_bank_dtype: str = _opt(
        "fp32",
        "how every rank holds the kNN monitor's gathered feature bank: fp16 halves its memory and transfer "
        "(each similarity moves by at most 2^-11, about 5e-4)",
        ("fp32", "fp16"),
    )
    max_steps: int | None = _opt(
        None,
        "stop (with a checkpoint) after this many steps in total; the schedule still spans all epochs",
    )
    skip_nonfinite: bool = _opt(
        False, "skip steps whose loss is NaN/inf and count them, instead of stopping"
    )
    progress: bool = _opt(True, "show a progress bar")
    log_every: int = _opt(
        20,
        "read the losses back from the device (a host sync), check for non-finite steps and write a "
        "metrics row every N steps (checkpoints, epoch ends and stops read too; under torchrun a "
        "stop signal is acted on at the next read)",
    )
    dist_timeout: float = _opt(
        60.0,
        "minutes a rank waits in a collective (e.g. while rank 0 alone runs the kNN monitor) before failing",
    )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


class Range(NamedTuple):
    """Allowed values of a numeric setting: finite and in [low, high] (or (low, high] with ``low_open``)."""

    low: float
    high: float
    low_open: bool = False

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return math.isfinite(value) and above and value <= self.high

    def describe(self, is_int: bool) -> str:
        if self.high == math.inf and self.low == 0:
            return f"a {'positive' if self.low_open else 'non-negative'} finite number"
        kind = "an integer" if is_int else "a number"
        return f"{kind} in {'(' if self.low_open else '['}{self.low}, {self.high}]"


_INT_MAX = 2**31 - 1
# Every int and float setting (a test checks none is missing), checked in validate(). The upper bounds are far above
# any real run; beyond them the libraries fail with messages that name none of these settings.
RANGES: dict[str, Range] = {
    "size": Range(1, 8192),
    "workers": Range(0, 1024),
    "color_strength": Range(
        0, 2.5
    ),  # the hue jitter 0.2 s stays within half a turn of the colour wheel
    "blur_p": Range(0, 1),
    "min_scale": Range(0, 1, low_open=True),
    "width": Range(1, 1 << 16),
    "proj_layers": Range(1, 64),
    "proj_hidden": Range(1, 1 << 20),
    "proj_dim": Range(1, 1 << 20),
    "temperature": Range(0, math.inf, low_open=True),
    "memory_bank_size": Range(0, 1 << 24),
    "batch_size": Range(1, 1 << 24),
    "epochs": Range(1, 10**6),
    "warmup_epochs": Range(0, 10**6),
    "lr": Range(0, math.inf, low_open=True),
    "weight_decay": Range(0, math.inf),
    "momentum": Range(0, 1),
    "seed": Range(0, 2**32 - 1),
    "ckpt_every": Range(0, _INT_MAX),
    "keep": Range(1, _INT_MAX),
    "knn_every": Range(0, _INT_MAX),
    "knn_k": Range(1, _INT_MAX),
    "knn_temperature": Range(0, math.inf, low_open=True),
    "max_steps": Range(1, 2**62),
    "log_every": Range(1, _INT_MAX),
    "dist_timeout": Range(0, 7 * 24 * 60, low_open=True),  # minutes: at most a week
}

# Keys that may change between a run and its resumption: paths and run control, not the trajectory.
RESUME_FREE_KEYS = frozenset(
    {
        "data.data",
        "data.test_data",
        "data.workers",
        "data.pipeline_device",
        "data.on_corrupt",
        "run.out",
        "run.device",
        "run.compile",
        "run.tensorboard",
        "run.ckpt_every",
        "run.keep",
        "run.resume",
        "run.knn_every",
        "run.knn_k",
        "run.knn_temperature",
        "run.knn_bank_dtype",
        "run.max_steps",
        "run.skip_nonfinite",
        "run.progress",
        "run.log_every",
        "run.dist_timeout",
    }
)


@dataclass
class PretrainConfig:
    """The full, resolved configuration of one pretraining run (saved into every checkpoint)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict ``{section: {key: value}}`` (JSON/TOML/checkpoint friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Build from a nested or flat dict; unknown sections/keys and wrongly typed values raise ConfigError."""
        cfg = cls()
        cfg.update(d)
        return cfg

    def update(self, d: dict[str, Any], source: str = "config") -> None:
        """Overlay values from a nested (``{"model": {"arch": ...}}``) or flat (``{"arch": ...}``) dict."""
        owner = _key_owner()
        for key, value in d.items():
            # "data" is both a section and a key in it: a table means the section, anything else the key.
            if key in SECTIONS and (isinstance(value, dict) or key not in owner):
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"{source}: section [{key}] must be a table, got {_show(value)}"
                    )
                for sub, v in value.items():
                    if owner.get(sub) != key:
                        raise ConfigError(
                            f"{source}: unknown key {key}.{_key_text(sub)} (known: {', '.join(f.name for f in dataclasses.fields(SECTIONS[key]))})"
                        )
                    self._set(key, sub, v, source)
            elif key in owner:
                self._set(owner[key], key, value, source)
            else:
                raise ConfigError(
                    f"{source}: unknown key {_show(key)} (sections: {', '.join(SECTIONS)})"
                )

    def _set(self, section: str, key: str, value: Any, source: str) -> None:
        setattr(getattr(self, section), key, _coerce(section, key, value, source))

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every field."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError for values no run can use (independent of the data set)."""
        self._check_arch()
        self._check_fields()
        self._check_loss()
        if self.optim.optimizer == "adamw" and self.optim.lr is None:
            raise ConfigError(
                "--optimizer adamw needs --lr: the default base lr 0.3 is LARS's (AdamW for ViTs: 1.5e-4, x B/256)"
            )
        if self.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(TENSORBOARD_MISSING)
        if self.optim.batch_size % world_size:
            raise ConfigError(
                f"batch_size {self.optim.batch_size} is not divisible by the world size {world_size}"
            )

    def _check_loss(self) -> None:
        """ConfigError for a memory bank with another loss than ntxent."""
        loss = self.loss
        if loss.memory_bank_size and loss.loss != "ntxent":
            raise ConfigError(
                f"--memory-bank-size applies to --loss ntxent (NT-Xent against a bank), not {loss.loss}"
            )

    def _check_arch(self) -> None:
        """ConfigError for an unknown arch, a timm arch without timm or with --width/--cifar-stem, and
        --freeze-patch-embed on a built-in arch."""
        from fastclr.models.resnet import ARCHS, unknown_arch
        from fastclr.models.timm_backbone import check_timm_arch, is_timm_arch

        m = self.model
        if is_timm_arch(m.arch):
            try:
                check_timm_arch(m.arch)
            except (ImportError, ValueError) as e:
                raise ConfigError(str(e)) from None
            if m.width is not None or m.cifar_stem:
                raise ConfigError(
                    f"--width and --cifar-stem apply to {', '.join(ARCHS)} only; {m.arch} is built as timm defines it"
                )
        elif m.arch not in ARCHS:
            raise ConfigError(unknown_arch(_show(m.arch)))
        elif m.freeze_patch_embed:
            raise ConfigError(
                f"--freeze-patch-embed applies to timm ViTs (e.g. --arch timm:vit_small_patch16_224), not {m.arch}"
            )

    def _check_fields(self) -> None:
        """ConfigError naming the setting and its flag unless every value is one of its choices and every numeric
        value is finite and within RANGES."""
        for section in SECTIONS:
            for f in dataclasses.fields(SECTIONS[section]):
                choices = f.metadata.get("choices")
                value = getattr(getattr(self, section), f.name)
                if choices and value not in choices:
                    raise ConfigError(
                        f"{f.name} must be one of {', '.join(choices)}, got {_show(value)}"
                    )
                if f.name in RANGES and value is not None and value not in RANGES[f.name]:
                    is_int = _field_type(section, f.name)[0] is int
                    raise ConfigError(
                        f"{f.name} must be {RANGES[f.name].describe(is_int)}, got {_show(value)} "
                        f"({_flag(f.name)})"
                    )

    def to_toml(self) -> str:
        """TOML text that ``load_config`` reads back to an equal config (None values are omitted: they are defaults)."""
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
            lines.append("")
        return "\n".join(lines)

    def mismatched_keys(self, other: PretrainConfig) -> list[str]:
        """Keys (``section.key``) that differ from ``other`` and would change the training trajectory."""
        a, b = self.flat(), other.flat()
        return sorted(k for k in a if k not in RESUME_FREE_KEYS and a[k] != b.get(k))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string literal is a valid TOML basic string


def _key_owner() -> dict[str, str]:
    return {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _field_type(section: str, key: str) -> tuple[type, bool]:
    """(base type, optional) of a field, e.g. ``int | None`` -> (int, True)."""
    hint = typing.get_type_hints(SECTIONS[section])[key]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _key_text(key: Any) -> str:
    """A key as it reads in a message: itself when a short string, else its bounded repr."""
    return key if isinstance(key, str) and len(key) <= 80 else _show(key)


def _coerce(section: str, key: str, value: Any, source: str) -> Any:
    base, optional = _field_type(section, key)
    name = _flag(key) if source == COMMAND_LINE else key
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{source}: {name} cannot be empty")
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif base is str and isinstance(value, str):
        # An empty path once meant "not given" and silently trained on the demo data (or wrote into the cwd).
        if not value:
            none = " (give none for the default)" if optional else ""
            raise ConfigError(f"{source}: {name} cannot be an empty string{none}")
        if "\x00" in value:
            raise ConfigError(
                f"{source}: {name} contains a NUL byte, which no path or name may hold"
            )
        return value
    raise ConfigError(
        f"{source}: {name} must be {base.__name__}{' or none' if optional else ''}, got {_show(value)}"
    )

"""SimCLR pretraining: configuration, checkpoints, the training loop and the embedded demo data.

Modules, each importing only those listed before it: ``config`` (typed settings and their checks), ``config_io`` (files, presets, flags), ``dist`` (process
group), ``checkpoint`` (the file format), ``build`` (precision, data, model, optimiser from a config), ``metrics`` and
``monitor`` (metric files, progress, kNN monitor), ``signals`` (SIGTERM/Ctrl-C), ``guard`` (non-finite steps undone on
the device, the queued steps' read-back), ``resume`` (which checkpoint a run continues from), ``trainer`` (the loop and
:func:`pretrain`), ``evaluate`` (kNN/linear evaluation and export of a checkpoint).

>>> from fastclr.train import load_preset, pretrain
>>> cfg = load_preset("cpu-demo")
>>> result = pretrain(cfg)  # dict with final loss, kNN top-1 before/after, checkpoint path
"""

from fastclr.train.checkpoint import (
    CheckpointError,
    find_latest_valid,
    load_checkpoint,
    save_checkpoint,
)
from fastclr.train.config import ConfigError, PretrainConfig
from fastclr.train.config_io import list_presets, load_config, load_preset

__all__ = [
    "CheckpointError",
    "ConfigError",
    "PretrainConfig",
    "find_latest_valid",
    "list_presets",
    "load_checkpoint",
    "load_config",
    "load_preset",
    "pretrain",
    "save_checkpoint",
]


def __getattr__(name):
    if (
        name == "pretrain"
    ):  # the loop pulls in the models, pipelines and plotting; load it on first use
        from fastclr.train.trainer import pretrain

        return pretrain
    raise AttributeError(f"module 'fastclr.train' has no attribute {name!r}")

"""Building a pretraining run from its config: precision, data, model, optimiser and schedule.

Each builder reads the resolved :class:`~fastclr.train.config.PretrainConfig` and where this process sits
(:class:`~fastclr.train.dist.DistInfo`); the trainer, the evaluation commands and ``bench/bench_train.py`` all build
through these functions, so a run, its evaluation and its benchmark use the same model, loader and recipe.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastclr import device as fastclr_device
from fastclr.train import dist
from fastclr.train.config import ConfigError, ModelConfig, PretrainConfig


def native_bf16(device: torch.device) -> bool:
    """Whether a CUDA device computes bf16 in hardware: Ampere (compute capability 8.0) and later.

    Older GPUs (V100, T4) emulate bf16 matmuls, far slower than their fp16 tensor cores.
    """
    return torch.cuda.get_device_capability(device) >= (8, 0)


def auto_precision(device: torch.device) -> tuple[str, str]:
    """``(precision, why)``: what ``--precision auto`` picks on ``device``, and the reason in a few words.

    bf16 autocast where the hardware computes bf16 (GPUs from Ampere on, CPUs with AVX512-BF16 or AMX), fp16 with a
    GradScaler on older GPUs, fp32 on other CPUs (where bf16 would be emulated, slower than fp32).
    """
    if device.type == "cuda":
        if native_bf16(device):
            return "bf16", "GPU of compute capability >= 8.0: native bf16"
        return "fp16", "GPU of compute capability < 8.0, where bf16 would be emulated"
    if device.type == "cpu" and fastclr_device.native_cpu_bf16():
        return "bf16", "this CPU computes bf16 natively: AVX512-BF16 or AMX"
    if device.type == "cpu":
        return (
            "fp32",
            "a CPU without native bf16 (no AVX512-BF16 or AMX), where bf16 would be emulated",
        )
    return "fp32", f"{device.type} device"


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None for fp32, use a GradScaler)``; ``auto`` as :func:`auto_precision` decides."""
    if precision == "auto":
        precision, _ = auto_precision(device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "precision fp16 needs a GPU (its GradScaler is CUDA-only); use bf16 or fp32 on CPU"
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    return dtype, precision == "fp16"


def describe_precision(precision: str, device: torch.device) -> str:
    """What ``precision`` resolves to on ``device`` and why, for logs: ``"bf16 autocast (this CPU computes bf16 ...)"``."""
    dtype, scaler = resolve_precision(precision, device)
    name = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast", None: "fp32"}[dtype]
    if scaler:
        name += " + GradScaler"
    why = auto_precision(device)[1] if precision == "auto" else "as given"
    return f"{name} ({why})"


# ----------------------------------------------------------------------------------------------------------------------
# Data


def prepare_demo_data(cfg: PretrainConfig, info: dist.DistInfo) -> None:
    """Without ``--data``: point the config at the embedded shapes data set (drawn once by rank 0)."""
    if cfg.data.data is not None:
        return
    if cfg.data.test_data is not None:
        raise ConfigError("--test-data was given without --data")
    from fastclr.train.demo_data import shapes_dataset

    if info.is_main:
        shapes_dataset(size=cfg.data.size)
    dist.barrier(info)
    train, test = shapes_dataset(size=cfg.data.size)
    cfg.data.data, cfg.data.test_data = str(train), str(test)


def check_data_dir(path: str, flag: str) -> None:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    if p.is_dir() and not any(p.iterdir()):
        raise ValueError(f"{flag} {path}: the directory is empty")


def pipeline_device(cfg: PretrainConfig, info: dist.DistInfo) -> str:
    # A CPU run keeps the data on the CPU even on a machine that has a GPU.
    return (
        "cpu"
        if cfg.data.pipeline_device == "auto" and info.device.type == "cpu"
        else cfg.data.pipeline_device
    )


def _loader_placement(cfg: PretrainConfig, info: dist.DistInfo) -> dict:
    """The loader options every loader of a run shares: where it decodes, with how many threads, what it skips."""
    d = cfg.data
    return dict(
        size=d.size,
        device=pipeline_device(cfg, info),
        device_id=info.local_rank if info.device.type == "cuda" else None,
        num_threads=d.workers,
        on_corrupt=d.on_corrupt,
    )


def build_train_loader(cfg: PretrainConfig, info: dist.DistInfo, dtype: torch.dtype):
    """This rank's shard of the two-view SimCLR loader (DALI or the torchvision twin).

    ``--data`` may be a flat folder of unlabelled images, unless ``--test-data`` asks for the kNN monitor, whose memory
    bank is ``--data`` with its labels: that combination is a :class:`ConfigError`, raised before any training.
    """
    from fastclr.pipelines import make_loader

    d = cfg.data
    loader = make_loader(
        backend=d.backend,
        eval=False,
        root=d.data,
        batch_size=cfg.optim.batch_size // info.world_size,
        seed=cfg.run.seed,
        shard_id=info.rank,
        num_shards=info.world_size,
        last_batch="drop",
        dtype=dtype,
        color_strength=d.color_strength,
        blur_p=d.blur_p,
        crop_scale=(d.min_scale, 1.0),
        **_loader_placement(cfg, info),
    )
    if d.test_data is not None and not loader.labelled:
        loader.close()
        raise ConfigError(
            f"--test-data {d.test_data} asks for the kNN monitor, whose memory bank is --data with its labels, but "
            f"{unlabelled_data_hint('--data', d.data)}; or leave out --test-data to pretrain without the monitor"
        )
    return loader


def build_eval_loader(cfg: PretrainConfig, info: dist.DistInfo, root: str):
    """Un-augmented (resize + centre crop) labelled images of ``root``, as the kNN monitor reads them."""
    from fastclr.pipelines import make_loader

    return make_loader(
        backend=cfg.data.backend,
        eval=True,
        root=root,
        batch_size=256,
        **_loader_placement(cfg, info),
    )


def unlabelled_data_hint(flag: str, root: str) -> str:
    """The shared half of every "this needs labels" error: what ``root`` is and what to pass instead."""
    return (
        f"{flag} {root} is a flat folder of unlabelled images: pass a labelled {flag}, an ImageFolder "
        "root/<class>/<img>"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Model


def simclr_model(m: ModelConfig) -> nn.Module:
    """The SimCLR model (backbone + projection head) a model config describes, freshly initialised on the CPU."""
    from fastclr.models import SimCLRModel

    return SimCLRModel(
        m.arch,
        cifar_stem=m.cifar_stem,
        width=m.width,
        proj_layers=m.proj_layers,
        proj_hidden=m.proj_hidden,
        proj_dim=m.proj_dim,
    )


def build_model(cfg: PretrainConfig, info: dist.DistInfo) -> nn.Module:
    """The SimCLR model on the device in channels-last layout, identically initialised on every rank.

    Under DDP on GPUs its BatchNorms are SyncBatchNorms: SimCLR normalises over the global batch.
    """
    # same initial weights everywhere (DDP would broadcast rank 0's anyway)
    torch.manual_seed(cfg.run.seed)
    model = simclr_model(cfg.model)
    if info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(info.device, memory_format=torch.channels_last)


COMPILE_SKIPPED = (
    "--compile skipped: the model has SyncBatchNorm layers (multi-GPU DDP), at each of which torch {torch}'s "
    "dynamo breaks the graph; it runs eagerly"
)


def compile_skip_reason(model: nn.Module) -> str | None:
    """Why ``--compile`` leaves ``model`` eager, or None when compiling it pays.

    Dynamo graph-breaks at every SyncBatchNorm, so a multi-GPU ResNet would become dozens of small graphs with a
    Python round trip between each: slower than eager, with a long compile on top.
    """
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return COMPILE_SKIPPED.format(torch=torch.__version__)
    return None


def wrap_model(model: nn.Module, cfg: PretrainConfig, info: dist.DistInfo) -> nn.Module:
    """DDP under torchrun, then ``torch.compile`` when asked and worth it (see :func:`compile_skip_reason`).

    Compiling the DDP module lets dynamo split the graph at DDP's gradient buckets.
    """
    net = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    if cfg.run.compile and compile_skip_reason(model) is None:
        net = torch.compile(net)
    return net


# ----------------------------------------------------------------------------------------------------------------------
# Optimiser


def peak_lr(cfg: PretrainConfig) -> float:
    from fastclr.optim import scaled_lr

    o = cfg.optim
    if o.lr_scaling == "none":
        return o.lr if o.lr is not None else 0.3
    return scaled_lr(o.batch_size, base_lr=o.lr, scaling=o.lr_scaling)


def build_optimizer(cfg: PretrainConfig, model: nn.Module, steps_per_epoch: int):
    """LARS over the SimCLR parameter groups and the per-step warm-up + cosine schedule."""
    from fastclr.optim import LARS, WarmupCosine, lars_param_groups

    o = cfg.optim
    lr = peak_lr(cfg)
    optimizer = LARS(
        lars_param_groups(model, o.weight_decay),
        lr=lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
    )
    total = o.epochs * steps_per_epoch
    warmup = min(total, round(o.warmup_epochs * steps_per_epoch))
    return optimizer, WarmupCosine(optimizer, total_steps=total, warmup_steps=warmup, base_lr=lr)

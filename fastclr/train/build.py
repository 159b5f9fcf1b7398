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
    from fastclr.pipelines.shards import is_shard_source, shard_paths

    if is_shard_source(path):  # tar shards: every one it names must be there
        try:
            shard_paths(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{flag} {path}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{flag} {path}: {e}") from None
        return
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
    """This rank's shard of the two-view SimCLR loader (DALI or the torchvision twin); with ``--loss supcon`` it also
    yields each batch's labels, ``(view_a, view_b, labels)``.

    ``--data`` may be a flat folder of unlabelled images, unless ``--test-data`` asks for the kNN monitor, whose memory
    bank is ``--data`` with its labels, or ``--loss supcon`` takes its positives from the labels: those combinations
    are a :class:`ConfigError`, raised before any training.
    """
    from fastclr.pipelines import UnlabelledDataError, make_loader

    d = cfg.data
    supcon = cfg.loss.loss == "supcon"
    try:
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
            labels=supcon,
            **_loader_placement(cfg, info),
        )
    except UnlabelledDataError:
        raise ConfigError(
            f"--loss supcon takes its positives from the labels, but {unlabelled_data_hint('--data', d.data)}; "
            "or pretrain with a self-supervised --loss (ntxent, dcl, dclw)"
        ) from None
    if d.test_data is not None and not loader.labelled:
        loader.close()
        raise ConfigError(
            f"--test-data {d.test_data} asks for the kNN monitor, whose memory bank is --data with its labels, but "
            f"{unlabelled_data_hint('--data', d.data)}; or leave out --test-data to pretrain without the monitor"
        )
    return loader


def build_eval_loader(cfg: PretrainConfig, info: dist.DistInfo, root: str):
    """This rank's shard (images ``rank, rank + W, ...``) of the un-augmented (resize + centre crop) labelled images
    of ``root``, as the kNN monitor reads them (:func:`fastclr.eval.knn_eval` gathers the shards)."""
    from fastclr.pipelines import make_loader

    return make_loader(
        backend=cfg.data.backend,
        eval=True,
        root=root,
        batch_size=256,
        shard_id=info.rank,
        num_shards=info.world_size,
        **_loader_placement(cfg, info),
    )


def labelled_steps(num_images: int, batch_size: int, world_size: int) -> int:
    """Batches every rank takes per epoch from :func:`build_labelled_loader`: the full batches of the shortest shard.

    The shards of ``N`` images over ``W`` ranks hold ``ceil(N / W)`` or ``floor(N / W)`` images, so a longer shard
    may have one more batch, and a rank that takes it waits forever in DDP's gradient all-reduce; BatchNorm wants
    whole batches. Every rank takes ``floor(floor(N / W) / b)`` batches of ``b = batch_size`` (per rank), as
    pretraining's ``last_batch="drop"`` does.
    """
    return num_images // world_size // batch_size


class FullBatches:
    """The first ``batches`` batches of every epoch of a loader (:func:`labelled_steps` of them in
    :func:`build_labelled_loader`); everything else (``files``, ``classes``, ``close``...) is the wrapped loader's."""

    def __init__(self, loader, batches: int) -> None:
        self.loader, self.batches, self._skip = loader, batches, 0

    def __len__(self) -> int:
        return self.batches

    def __getattr__(self, name: str):
        loader = self.__dict__.get("loader")
        if loader is None:
            raise AttributeError(name)
        return getattr(loader, name)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.loader.set_epoch(epoch, skip_batches=skip_batches)
        self._skip = skip_batches

    def __iter__(self):
        left, self._skip = self.batches - self._skip, 0
        if left <= 0:
            return
        for i, batch in enumerate(self.loader):
            yield batch
            if i + 1 == left:
                break  # the wrapped loader's iteration ends (and releases its pipeline) here

    def close(self) -> None:
        self.loader.close()


def build_labelled_loader(cfg: PretrainConfig, info: dist.DistInfo, root: str, dtype: torch.dtype):
    """This rank's shard of the labelled images of ``root`` (an ImageFolder or a ``path label`` file list) with random
    resized crop + flip only, reshuffled every epoch: the view fine-tuning and distillation train on (SimCLR v2,
    section 4). Full batches only, as many on every rank (:func:`labelled_steps`): a :class:`FullBatches`."""
    from fastclr.pipelines import make_loader

    batch = cfg.optim.batch_size // info.world_size
    loader = make_loader(
        backend=cfg.data.backend,
        eval=True,
        augment=True,
        root=root,
        batch_size=batch,
        seed=cfg.run.seed,
        shard_id=info.rank,
        num_shards=info.world_size,
        dtype=dtype,
        **_loader_placement(cfg, info),
    )
    return FullBatches(loader, labelled_steps(len(loader.files), batch, info.world_size))


def unlabelled_data_hint(flag: str, root: str) -> str:
    """The shared half of every "this needs labels" error: what ``root`` is and what to pass instead."""
    from fastclr.pipelines.shards import is_shard_source

    if is_shard_source(root):
        return (
            f"{flag} {root} holds tar shards without .cls members (unlabelled images): pass a labelled {flag}, "
            "shards with <key>.cls labels or an ImageFolder root/<class>/<img>"
        )
    return (
        f"{flag} {root} is a flat folder of unlabelled images: pass a labelled {flag}, an ImageFolder "
        "root/<class>/<img>"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Model


def simclr_model(m: ModelConfig) -> nn.Module:
    """The SimCLR model (backbone + projection head) a model config describes, freshly initialised on the CPU."""
    from fastclr.models import SimCLRModel

    model = SimCLRModel(
        m.arch,
        cifar_stem=m.cifar_stem,
        width=m.width,
        proj_layers=m.proj_layers,
        proj_hidden=m.proj_hidden,
        proj_dim=m.proj_dim,
    )
    if m.freeze_patch_embed:
        from fastclr.models.timm_backbone import freeze_patch_embed

        freeze_patch_embed(model.backbone)
    return model


def memory_format(model: nn.Module) -> torch.memory_format:
    """channels-last for convolutional backbones, the default layout for token models such as ViTs
    (:func:`fastclr.models.resnet.channels_last_helps`)."""
    from fastclr.models.resnet import channels_last_helps

    return torch.channels_last if channels_last_helps(model.backbone) else torch.contiguous_format


def build_model(cfg: PretrainConfig, info: dist.DistInfo) -> nn.Module:
    """The SimCLR model on the device in channels-last layout (ViTs: the default one, see :func:`memory_format`),
    identically initialised on every rank.

    Under DDP on GPUs its BatchNorms are SyncBatchNorms: SimCLR normalises over the global batch. A timm model that
    takes one input size only is refused here, before any step, when ``--size`` is another.
    """
    # same initial weights everywhere (DDP would broadcast rank 0's anyway)
    torch.manual_seed(cfg.run.seed)
    model = simclr_model(cfg.model)
    from fastclr.models.timm_backbone import input_size_error, is_timm_arch

    if is_timm_arch(cfg.model.arch) and (why := input_size_error(model.backbone, cfg.data.size)):
        raise ConfigError(f"--arch {cfg.model.arch}: {why}")
    return place_model(model, info)


def place_model(model: nn.Module, info: dist.DistInfo) -> nn.Module:
    """``model`` on this rank's device in its memory format; under DDP on GPUs with SyncBatchNorms (global BN)."""
    if info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(info.device, memory_format=memory_format(model))


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


def settle_buckets(net: nn.Module, model: nn.Module, size: int, device: torch.device) -> None:
    """One backward of zero gradients through the new DDP module ``net`` (``model`` in eval mode, a ``(2, 3, size,
    size)`` zero batch), so that every run all-reduces its gradients in one bucket layout from its first step on.

    DDP lays out its gradient buckets from the parameter order, then once, at the forward after the first backward,
    again in the order the gradients became ready. A run resumed mid-way would take its first step in the first layout
    where the uninterrupted run is in the second; with 3 or more ranks a ring all-reduce adds up an element's ranks in
    an order set by its place in the bucket, so the resumed run would drift from the uninterrupted one in the last
    bits. After this backward both take every step in the rebuilt layout. Eval mode leaves BatchNorm's statistics
    alone; the zero gradients are dropped.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        x = torch.zeros(2, 3, size, size, device=device).contiguous(
            memory_format=memory_format(model)
        )
        out = net(x)
        outputs = out if isinstance(out, tuple | list) else (out,)
        (sum(o.float().sum() for o in outputs) * 0).backward()
    finally:
        for m, training in modes.items():
            m.training = training
        for p in model.parameters():
            p.grad = None


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
        settle_buckets(net, model, cfg.data.size, info.device)
    if cfg.run.compile and compile_skip_reason(model) is None:
        net = torch.compile(net)
    return net


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def build_loss(cfg: PretrainConfig, info: dist.DistInfo) -> nn.Module:
    """The contrastive loss of ``--loss`` on this rank's device, gathering every rank's embeddings under DDP."""
    import fastclr

    c, gather = cfg.loss, info.distributed
    if c.loss == "ntxent":
        bank = (c.memory_bank_size, cfg.model.proj_dim) if c.memory_bank_size else 0
        loss = fastclr.NTXentLoss(c.temperature, bank, gather_distributed=gather, impl=c.loss_impl)
    else:
        family = {"dcl": fastclr.DCLLoss, "dclw": fastclr.DCLWLoss, "supcon": fastclr.SupConLoss}
        loss = family[c.loss](c.temperature, gather_distributed=gather, impl=c.loss_impl)
    return loss.to(info.device)  # a memory bank lives where the embeddings are


# ----------------------------------------------------------------------------------------------------------------------
# Optimiser


def peak_lr(cfg: PretrainConfig) -> float:
    from fastclr.optim import scaled_lr

    o = cfg.optim
    if o.lr_scaling == "none":
        return o.lr if o.lr is not None else 0.3
    return scaled_lr(o.batch_size, base_lr=o.lr, scaling=o.lr_scaling)


def build_optimizer(cfg: PretrainConfig, model: nn.Module, steps_per_epoch: int):
    """LARS (or AdamW, ``--optimizer adamw``) over the SimCLR parameter groups and the per-step warm-up + cosine
    schedule. Both leave biases, normalisation parameters, position embeddings and class tokens undecayed
    (:func:`fastclr.optim.lars.lars_exclusions`)."""
    from fastclr.optim import LARS, WarmupCosine, lars_param_groups

    o = cfg.optim
    lr = peak_lr(cfg)
    groups = lars_param_groups(model, o.weight_decay)
    if o.optimizer == "adamw":
        # MoCo v3's ViT optimiser: beta2 0.999 as there. capturable keeps the step counts on the GPU, beside the
        # moments, so saving, undoing and checking the optimiser state never mixes devices.
        optimizer = torch.optim.AdamW(
            groups,
            lr=lr,
            betas=(o.momentum, 0.999),
            weight_decay=o.weight_decay,
            capturable=next(model.parameters()).is_cuda,
        )
    else:
        optimizer = LARS(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    total = o.epochs * steps_per_epoch
    warmup = min(total, round(o.warmup_epochs * steps_per_epoch))
    return optimizer, WarmupCosine(optimizer, total_steps=total, warmup_steps=warmup, base_lr=lr)

"""The SimCLR pretraining loop: data -> two views -> encoder + head -> NT-Xent -> LARS, with checkpoints and monitors.

Run it:

    # one process, CPU or one GPU; without --data it trains on the embedded digits demo in a few minutes
    fastclr pretrain
    python -m fastclr pretrain --preset cifar10-r18 --data cifar10/train --test-data cifar10/test

    # 8 GPUs on one node (the same flags; batch_size stays the global batch)
    torchrun --nproc_per_node=8 -m fastclr pretrain --preset imagenet-r50 --data /data/imagenet/train \
        --test-data /data/imagenet/val

    # several nodes: run on each node
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        -m fastclr pretrain --preset imagenet-r50 --data /data/imagenet/train --test-data /data/imagenet/val

    # after a crash or pre-emption (SIGTERM saves a checkpoint and exits 0): same command plus
    ... --resume auto

Under torchrun each rank trains on its own shard of every epoch, the loss gathers the negatives of all ranks,
gradients are averaged by DDP, and only rank 0 logs, evaluates and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from fastclr.train import dist
from fastclr.train.checkpoint import (
    CheckpointError,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastclr.train.config import ConfigError, PretrainConfig
from fastclr.train.metrics import MetricsLog, plot_curves


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message names the step and the last good checkpoint."""


def say(message: str) -> None:
    """Print a line on stdout without breaking the progress bar (callers print on the main rank only)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None for fp32, use a GradScaler)``; auto = bf16 on GPUs, fp32 on CPUs."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "precision fp16 needs a GPU (its GradScaler is CUDA-only); use bf16 or fp32 on CPU"
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    return dtype, precision == "fp16"


def prepare_demo_data(cfg: PretrainConfig, info: dist.DistInfo) -> None:
    """Without ``--data``: point the config at the embedded digits data set (written once by rank 0)."""
    if cfg.data.data is not None:
        return
    if cfg.data.test_data is not None:
        raise ConfigError("--test-data was given without --data")
    from fastclr.train.demo_data import digits_dataset

    if info.is_main:
        digits_dataset(size=cfg.data.size)
    dist.barrier(info)
    train, test = digits_dataset(size=cfg.data.size)
    cfg.data.data, cfg.data.test_data = str(train), str(test)


def check_data_dir(path: str, flag: str) -> None:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    if p.is_dir() and not any(p.iterdir()):
        raise ValueError(f"{flag} {path}: the directory is empty")


def build_model(cfg: PretrainConfig, info: dist.DistInfo) -> nn.Module:
    """The SimCLR model on the device in channels-last layout, identically initialised on every rank."""
    from fastclr.models import SimCLRModel

    m = cfg.model
    # same initial weights everywhere (DDP would broadcast rank 0's anyway)
    torch.manual_seed(cfg.run.seed)
    model = SimCLRModel(
        m.arch,
        cifar_stem=m.cifar_stem,
        width=m.width,
        proj_layers=m.proj_layers,
        proj_hidden=m.proj_hidden,
        proj_dim=m.proj_dim,
    )
    if info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(info.device, memory_format=torch.channels_last)


def wrap_model(model: nn.Module, cfg: PretrainConfig, info: dist.DistInfo) -> nn.Module:
    """DDP under torchrun, then ``torch.compile`` when asked (compiling the DDP module lets dynamo split at buckets)."""
    net = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    if cfg.run.compile:
        net = torch.compile(net)
    return net


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


def pipeline_device(cfg: PretrainConfig, info: dist.DistInfo) -> str:
    # A CPU run keeps the data on the CPU even on a machine that has a GPU.
    return (
        "cpu"
        if cfg.data.pipeline_device == "auto" and info.device.type == "cpu"
        else cfg.data.pipeline_device
    )


def build_train_loader(cfg: PretrainConfig, info: dist.DistInfo, dtype: torch.dtype):
    """This rank's shard of the two-view SimCLR loader (DALI or the torchvision twin)."""
    from fastclr.pipelines import make_loader

    d = cfg.data
    return make_loader(
        backend=d.backend,
        eval=False,
        root=d.data,
        batch_size=cfg.optim.batch_size // info.world_size,
        size=d.size,
        device=pipeline_device(cfg, info),
        device_id=info.local_rank if info.device.type == "cuda" else None,
        num_threads=d.workers,
        seed=cfg.run.seed,
        shard_id=info.rank,
        num_shards=info.world_size,
        last_batch="drop",
        dtype=dtype,
        color_strength=d.color_strength,
        blur_p=d.blur_p,
        crop_scale=(d.min_scale, 1.0),
        on_corrupt=d.on_corrupt,
    )


class KnnMonitor:
    """kNN top-1 of the backbone on the held-out split, with the (unaugmented) training set as memory bank."""

    def __init__(
        self,
        cfg: PretrainConfig,
        info: dist.DistInfo,
        train_classes,
        autocast_dtype: torch.dtype | None,
    ):
        self.cfg, self.info, self.autocast_dtype = cfg, info, autocast_dtype
        self.enabled = cfg.data.test_data is not None
        self.train_classes = list(train_classes)
        self._loaders = None

    def _build(self):
        from fastclr.pipelines import make_loader

        d = self.cfg.data
        common = dict(
            batch_size=256,
            size=d.size,
            device=pipeline_device(self.cfg, self.info),
            device_id=self.info.local_rank if self.info.device.type == "cuda" else None,
            num_threads=d.workers,
            on_corrupt=d.on_corrupt,
        )
        bank = make_loader(backend=d.backend, eval=True, root=d.data, **common)
        test = make_loader(backend=d.backend, eval=True, root=d.test_data, **common)
        if list(test.classes) != self.train_classes:
            raise ValueError(
                f"--test-data {d.test_data}: its classes {list(test.classes)[:10]} differ from the training classes "
                f"{self.train_classes[:10]}; the kNN monitor needs the same class folders"
            )
        return bank, test

    def prepare(self) -> None:
        """Open the evaluation loaders (listing and validating their images) if not done yet."""
        if self._loaders is None:
            self._loaders = self._build()

    def __call__(self, backbone: nn.Module) -> float:
        from fastclr.eval import extract_features, knn_accuracy

        self.prepare()
        bank, test = self._loaders
        dev = self.info.device
        bank_f, bank_y = extract_features(backbone, bank, dev, autocast_dtype=self.autocast_dtype)
        test_f, test_y = extract_features(backbone, test, dev, autocast_dtype=self.autocast_dtype)
        r = self.cfg.run
        return knn_accuracy(
            bank_f,
            bank_y,
            test_f,
            test_y,
            k=r.knn_k,
            temperature=r.knn_temperature,
            num_classes=len(self.train_classes),
        )

    def close(self) -> None:
        for loader in self._loaders or ():
            loader.close()


class GracefulStop:
    """Turns SIGTERM/SIGINT into a request to stop after the current step (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class RunState:
    step: int = 0  # optimiser steps taken
    epoch: int = 0  # data position: the next batch is batch `batch` of epoch `epoch`
    batch: int = 0
    knn_init: float | None = None
    knn_history: list[tuple[int, float]] = field(default_factory=list)
    nonfinite_skipped: int = 0


class Trainer:
    """One pretraining run; build with :meth:`setup`, then :meth:`fit`. Most callers use :func:`pretrain`."""

    def __init__(self, cfg: PretrainConfig, info: dist.DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.run.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.state = RunState()
        self.last_ckpt: Path | None = None
        self.losses: list[float] = []

    # -- set-up ------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        from fastclr import NTXentLoss

        self.autocast_dtype, use_scaler = resolve_precision(cfg.run.precision, info.device)
        loader_dtype = torch.float16 if self.autocast_dtype == torch.float16 else torch.float32
        try:
            self.loader = build_train_loader(cfg, info, loader_dtype)
        except ValueError as e:  # e.g. fewer images than one batch, a corrupt file: say which settings met which data
            raise ValueError(
                f"--data {cfg.data.data}, --batch-size {cfg.optim.batch_size}: {e}"
            ) from None
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {cfg.optim.batch_size} is larger than the data set ({len(self.loader.files)} "
                f"images in {cfg.data.data} over {info.world_size} rank(s)); lower --batch-size"
            )
        self.model = build_model(cfg, info)
        self.net = wrap_model(self.model, cfg, info)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.loss_fn = NTXentLoss(
            cfg.loss.temperature, impl=cfg.loss.loss_impl, gather_distributed=info.distributed
        )
        self.knn = KnnMonitor(cfg, info, self.loader.classes, self.autocast_dtype)
        if self.knn.enabled:
            # Rank 0 evaluates; open (and so validate) its data now, so a bad --test-data stops every rank at once.
            dist.run_on_main(self.knn.prepare, info)
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        # Per-process randomness differs by rank; the data order/augmentation is seeded by the loader itself.
        torch.manual_seed(cfg.run.seed + info.rank)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def resume_path(self) -> Path | None:
        """The checkpoint to resume from (rank 0 decides, every rank gets the same path), or None to start fresh."""
        return dist.run_on_main(self._pick_checkpoint, self.info)

    def _pick_checkpoint(self) -> Path | None:
        resume = self.cfg.run.resume
        if resume == "auto":
            path = find_latest_valid(self.ckpt_dir)
            if path is None:
                say(f"--resume auto: no checkpoint in {self.ckpt_dir}; starting from scratch")
            return path
        if resume is not None:
            if not Path(resume).is_file():
                raise FileNotFoundError(f"--resume {resume}: checkpoint not found")
            return Path(resume)
        if list_checkpoints(self.ckpt_dir):
            newest = list_checkpoints(self.ckpt_dir)[-1].name
            raise ValueError(
                f"{self.ckpt_dir} already holds checkpoints of an earlier run (newest {newest}); "
                "continue it with --resume auto, or pick another --out"
            )
        return None

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.info.device)
        saved = PretrainConfig.from_dict(ckpt["config"])
        mismatched = saved.mismatched_keys(self.cfg)
        if mismatched:
            flat_saved, flat_now = saved.flat(), self.cfg.flat()
            detail = ", ".join(
                f"{k} (checkpoint {flat_saved[k]!r}, now {flat_now[k]!r})" for k in mismatched
            )
            raise CheckpointError(f"{path} was written with a different config: {detail}")
        if ckpt.get("world_size", 1) != self.info.world_size and ckpt["batch"] != 0:
            raise CheckpointError(
                f"{path} stopped mid-epoch with {ckpt.get('world_size', 1)} process(es); resume it with the same number "
                f"(now {self.info.world_size})"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0])
        extra = ckpt.get("extra", {})
        self.state = RunState(
            step=ckpt["step"],
            epoch=ckpt["epoch"],
            batch=ckpt["batch"],
            knn_init=extra.get("knn_init"),
            knn_history=[tuple(x) for x in extra.get("knn_history", [])],
            nonfinite_skipped=extra.get("nonfinite_skipped", 0),
        )
        self.last_ckpt = path
        if self.info.is_main:
            say(
                f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, batch {self.state.batch})"
            )

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoint the current step (every rank contributes its RNG state; rank 0 writes)."""
        if self.last_ckpt is not None and self.last_ckpt.name == f"ckpt-{self.state.step:09d}.pt":
            return  # this step is saved already (e.g. an epoch end that is also a --ckpt-every step)
        rngs = [rng_state()]
        if self.info.distributed:
            rngs = [None] * self.info.world_size
            torch_dist.all_gather_object(rngs, rng_state())
        if self.info.is_main:
            s = self.state
            self.last_ckpt = save_checkpoint(
                {
                    "step": s.step,
                    "epoch": s.epoch,
                    "batch": s.batch,
                    "world_size": self.info.world_size,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "rng": rngs,
                    "config": self.cfg.to_dict(),
                    "extra": {
                        "knn_init": s.knn_init,
                        "knn_history": s.knn_history,
                        "nonfinite_skipped": s.nonfinite_skipped,
                    },
                },
                self.ckpt_dir,
                keep=self.cfg.run.keep,
            )
        else:
            self.last_ckpt = self.ckpt_dir / f"ckpt-{self.state.step:09d}.pt"

    # -- evaluation --------------------------------------------------------------------------------------------------

    def evaluate_knn(self, log: MetricsLog) -> float | None:
        """kNN top-1 on rank 0 (the others wait at a barrier)."""
        top1 = None
        if self.knn.enabled and self.info.is_main:
            top1 = self.knn(self.model.backbone)
            self.state.knn_history.append((self.state.step, top1))
            log.log("knn", {"step": self.state.step, "epoch": self.state.epoch, "knn_top1": top1})
            say(f"kNN top-1 (k={self.cfg.run.knn_k}) at step {self.state.step}: {100 * top1:.2f}%")
        dist.barrier(self.info)
        return top1

    # -- training ----------------------------------------------------------------------------------------------------

    def train_step(
        self, view_a: torch.Tensor, view_b: torch.Tensor, stop_requested: bool
    ) -> tuple[float, float | None, bool]:
        """One optimisation step on a batch of view pairs; returns (loss averaged over ranks, contrastive top-1, stop)."""
        from fastclr.eval import contrastive_top1

        dev = self.info.device
        # A skipped step must leave the model as it was, but the forward folds the batch's
        # (non-finite) statistics into the BatchNorm running buffers: keep a copy to put back.
        saved_buffers = None
        if self.cfg.run.skip_nonfinite:
            saved_buffers = [b.detach().clone() for b in self.model.buffers()]
        x = (
            torch.cat([view_a, view_b])
            .to(dev, non_blocking=True)
            .contiguous(memory_format=torch.channels_last)
        )
        with self.autocast():
            # one forward over both views: BN statistics over all 2N images, as in SimCLR
            _, z = self.net(x)
        z_a, z_b = z.float().chunk(2)
        loss = self.loss_fn(z_a, z_b)
        # The one host-device sync of a step: the loss value (for logging and the non-finite check) and the stop
        # flag, summed over ranks so that every rank takes the same decision.
        flags = torch.stack([loss.detach(), torch.tensor(float(stop_requested), device=dev)])
        loss_value, stop_votes = dist.all_reduce_sum(flags, self.info).tolist()
        loss_value /= self.info.world_size
        top1 = (
            contrastive_top1(z_a.detach(), z_b.detach())
            if self.state.step % self.cfg.run.log_every == 0
            else None
        )

        self.optimizer.zero_grad(set_to_none=True)
        if math.isfinite(loss_value):
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
        elif self.cfg.run.skip_nonfinite:
            self.state.nonfinite_skipped += 1
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), saved_buffers, strict=True):
                    buffer.copy_(saved)
        else:
            where = self.last_ckpt if self.last_ckpt is not None else "none yet"
            raise TrainingError(
                f"non-finite loss ({loss_value}) at step {self.state.step} (epoch {self.state.epoch}, batch {self.state.batch}); "
                f"last good checkpoint: {where}. Lower --lr, try --precision fp32, or pass --skip-nonfinite"
            )
        self.scheduler.step()
        return loss_value, top1, stop_votes > 0

    def fit(self) -> dict[str, Any]:
        """Train from the current state to the end (or ``max_steps``, or a signal); returns the run summary."""
        cfg, s = self.cfg, self.state
        log = MetricsLog(self.out, enabled=self.info.is_main)
        limit = min(self.total_steps, cfg.run.max_steps or self.total_steps)
        start_step, t_start = s.step, time.perf_counter()
        if s.step == 0 and self.knn.enabled:
            s.knn_init = self.evaluate_knn(log)
        with GracefulStop() as stop:
            status = self.run_steps(limit, stop, log, t_start)
        if status == "completed" and s.step < self.total_steps:
            status = "max_steps"
        self.save()
        if status == "stopped" and self.info.is_main:
            say(
                f"stopped by {stop.signal_name or 'a signal on another rank'} at step {s.step}; "
                f"checkpoint {self.last_ckpt}; continue with --resume auto"
            )
        knn_final = None
        if status != "stopped" and self.knn.enabled:
            done = s.knn_history and s.knn_history[-1][0] == s.step
            knn_final = s.knn_history[-1][1] if done else self.evaluate_knn(log)
        self.check_ranks_in_sync()
        log.close()
        self.knn.close()
        plot = plot_curves(self.out) if self.info.is_main else None
        elapsed = time.perf_counter() - t_start
        result = {
            "status": status,
            "step": s.step,
            "epoch": s.epoch,
            "losses": self.losses,
            "knn_init": s.knn_init,
            "knn_final": knn_final,
            "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "nonfinite_skipped": s.nonfinite_skipped,
            "images_per_s": (s.step - start_step) * cfg.optim.batch_size / elapsed
            if s.step > start_step
            else None,
            "out": str(self.out),
            "plot": str(plot) if plot else None,
        }
        if self.info.is_main:
            self.summarise(result)
        return result

    def run_steps(self, limit: int, stop: GracefulStop, log: MetricsLog, t_start: float) -> str:
        """The epoch/batch loop up to step ``limit``; returns "completed" or "stopped" (by a signal)."""
        from tqdm import tqdm

        cfg, s = self.cfg, self.state
        show = self.info.is_main and cfg.run.progress
        # disable=None: a live bar on terminals only; logs get the one-line epoch summaries below instead
        bar = tqdm(
            total=limit,
            initial=s.step,
            disable=None if show else True,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
        )
        ips_avg = None
        try:
            while s.step < limit:
                self.loader.set_epoch(s.epoch, skip_batches=s.batch)
                epoch_losses, t_epoch = [], time.perf_counter()
                t_data = time.perf_counter()
                for view_a, view_b in self.loader:
                    data_s = time.perf_counter() - t_data
                    lr = self.optimizer.param_groups[0]["lr"]
                    loss, top1, stop_now = self.train_step(
                        view_a, view_b, stop.signal_name is not None
                    )
                    self.losses.append(loss)
                    epoch_losses.append(loss)
                    s.step, s.batch = s.step + 1, s.batch + 1
                    step_s = time.perf_counter() - t_data
                    ips = cfg.optim.batch_size / step_s
                    ips_avg = ips if ips_avg is None else 0.9 * ips_avg + 0.1 * ips
                    if top1 is not None:
                        row = dict(
                            loss=loss,
                            lr=lr,
                            contrastive_top1=top1,
                            images_per_s=ips,
                            data_s=data_s,
                            step_s=step_s,
                        )
                        log.log(
                            "train",
                            {
                                "step": s.step,
                                "epoch": s.epoch,
                                **row,
                                "elapsed_s": time.perf_counter() - t_start,
                            },
                        )
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{ips_avg:.0f}", refresh=False
                    )
                    if s.batch == self.steps_per_epoch:
                        s.epoch, s.batch = s.epoch + 1, 0
                        if self.info.is_main:
                            elapsed = time.perf_counter() - t_epoch
                            say(
                                f"epoch {s.epoch}/{cfg.optim.epochs}: loss {sum(epoch_losses) / len(epoch_losses):.4f}, "
                                f"lr {lr:.3g}, {len(epoch_losses) * cfg.optim.batch_size / elapsed:.0f} images/s"
                            )
                    if stop_now:
                        return "stopped"
                    if s.step >= limit:
                        return "completed"
                    if cfg.run.ckpt_every and s.step % cfg.run.ckpt_every == 0:
                        self.save()
                    if s.batch == 0:  # an epoch just ended
                        self.save()
                        if cfg.run.knn_every and s.epoch % cfg.run.knn_every == 0:
                            self.evaluate_knn(log)
                    t_data = time.perf_counter()
        finally:
            bar.close()
        return "completed"

    def check_ranks_in_sync(self) -> None:
        """Compare every parameter with rank 0's copy, bit for bit; raise if DDP let any rank drift."""
        if not self.info.distributed:
            return
        differing = torch.zeros((), device=self.info.device)
        for p in self.model.parameters():
            ref = p.detach().clone()
            torch_dist.broadcast(ref, src=0)
            differing += (ref != p.detach()).any().float()
        dist.all_reduce_sum(differing, self.info)
        if differing.item():
            raise TrainingError(f"parameters differ between ranks after step {self.state.step}")
        if self.info.is_main:
            say(f"parameters identical on all {self.info.world_size} ranks")

    def summarise(self, r: dict[str, Any]) -> None:
        ips = f", {r['images_per_s']:.0f} images/s" if r["images_per_s"] else ""
        say(
            f"{r['status']} at step {r['step']} (epoch {r['epoch']}){ips}; final loss {self.losses[-1]:.4f}"
            if self.losses
            else f"{r['status']} at step {r['step']}"
        )
        if r["nonfinite_skipped"]:
            say(f"skipped {r['nonfinite_skipped']} step(s) with a non-finite loss")
        if self.loader.num_skipped:
            path, reason = self.loader.skipped[0]
            say(
                f"skipped {self.loader.num_skipped} bad image file(s) (--on-corrupt skip), e.g. {path} {reason}"
            )
        if r["knn_init"] is not None and r["knn_final"] is not None:
            say(
                f"kNN top-1 (k={self.cfg.run.knn_k}): random init {100 * r['knn_init']:.2f}% -> trained {100 * r['knn_final']:.2f}% "
                f"({100 * (r['knn_final'] - r['knn_init']):+.2f} points)"
            )
        say(f"checkpoint: {r['checkpoint']}; metrics: {self.out}/metrics.csv; curves: {r['plot']}")


def describe(cfg: PretrainConfig, info: dist.DistInfo, trainer: Trainer) -> str:
    """The resolved run, printed at start: devices, data, schedule and the full config."""
    from fastclr.losses.nt_xent import resolve_impl

    lines = [
        f"fastclr pretrain: {info.world_size} process(es) on {info.device.type}, loss impl {resolve_impl(cfg.loss.loss_impl, info.device)}, "
        f"precision {cfg.run.precision} -> {trainer.autocast_dtype or torch.float32}",
        f"data {cfg.data.data}: {trainer.loader.num_samples} images/rank, {trainer.steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs "
        f"= {trainer.total_steps} steps, loader {type(trainer.loader).__name__}",
        f"peak lr {peak_lr(cfg):.4g} ({cfg.optim.lr_scaling} scaling, global batch {cfg.optim.batch_size})",
        "resolved config:",
        cfg.to_toml().rstrip(),
    ]
    return "\n".join(lines)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) SimCLR pretraining as configured; returns a summary dict (losses, kNN, checkpoint path).

    Works in one process or under torchrun (reads RANK/WORLD_SIZE/LOCAL_RANK from the environment).
    """
    # before joining the group: a bad config fails fast on every rank
    cfg.validate(world_size=dist.env_world_size())
    info = dist.init_distributed(cfg.run.device)
    try:
        prepare_demo_data(cfg, info)
        check_data_dir(cfg.data.data, "--data")
        if cfg.data.test_data is not None:
            check_data_dir(cfg.data.test_data, "--test-data")
        trainer = Trainer(cfg, info)
        trainer.setup()
        path = trainer.resume_path()
        if path is not None:
            trainer.restore(path)
        if info.is_main:
            say(describe(cfg, info, trainer))
            trainer.out.mkdir(parents=True, exist_ok=True)
            (trainer.out / "config.toml").write_text(cfg.to_toml())
        try:
            return trainer.fit()
        finally:
            trainer.loader.close()
    finally:
        dist.cleanup_distributed()


__all__ = ["Trainer", "TrainingError", "pretrain"]

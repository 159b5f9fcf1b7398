"""Watching a run without changing it: console lines, the progress bar, per-step metric rows and the kNN monitor.

Everything here runs or prints on the main rank only (callers check ``info.is_main``, or pass ``enabled``); nothing here
synchronises with the device except the kNN evaluation itself: the losses it shows were read back by the trainer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from fastclr.train import dist
from fastclr.train.build import (
    build_eval_loader,
    compile_skip_reason,
    describe_precision,
    peak_lr,
)
from fastclr.train.checkpoint import RunState
from fastclr.train.config import PretrainConfig
from fastclr.train.metrics import MetricsLog


def say(message: str) -> None:
    """Print a line on stdout without breaking the progress bar (callers print on the main rank only)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def describe(cfg: PretrainConfig, info: dist.DistInfo, loader, model: nn.Module) -> str:
    """The resolved run, printed at start: devices, data, schedule, a skipped --compile, and the full config."""
    from fastclr.losses.nt_xent import resolve_impl

    steps_per_epoch = len(loader)
    lines = [
        f"fastclr pretrain: {info.world_size} process(es) on {info.device.type}, loss impl {resolve_impl(cfg.loss.loss_impl, info.device)}, "
        f"precision {cfg.run.precision} -> {describe_precision(cfg.run.precision, info.device)}",
        f"data {cfg.data.data}: {loader.num_samples} images/rank, {steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs "
        f"= {steps_per_epoch * cfg.optim.epochs} steps, loader {type(loader).__name__}",
        f"peak lr {peak_lr(cfg):.4g} ({cfg.optim.lr_scaling} scaling, global batch {cfg.optim.batch_size})",
    ]
    if cfg.run.compile and (skipped := compile_skip_reason(model)):
        lines.append(skipped)
    lines += ["resolved config:", cfg.to_toml().rstrip()]
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """``seconds`` as a person reads it: "12.3 s", "1 min 32 s", "2 h 05 min"."""
    if seconds < 59.95:  # what would print as "60.0 s" reads "1 min 0 s"
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# What a newcomer can run after a run; ``{ckpt}`` is the run's last checkpoint (the README's "Pretraining" section).
NEXT_STEPS = """\
what to run next:
  # the accuracy of a linear classifier on the frozen encoder, the standard SimCLR measure
  fastclr linear --ckpt {ckpt}
  # the encoder alone, as a plain torchvision state_dict
  fastclr export --ckpt {ckpt} --out backbone.pt
  # pretrain on CIFAR-10 (one GPU), or on ImageNet (8 GPUs), as in the README's "Pretraining" section
  fastclr pretrain --preset cifar10-r18 --data cifar10/train --test-data cifar10/test
  torchrun --nproc_per_node=8 -m fastclr pretrain --preset imagenet-r50 --data /data/imagenet/train \\
      --test-data /data/imagenet/val"""


def explain_knn(gain: float) -> str:
    """One plain sentence on a kNN top-1 gain (trained minus random init, as a fraction)."""
    what = "the encoder, trained without labels,"
    if gain >= 0.03:  # 3 points: the embedded demo's gain
        verdict = f"{what} now sorts the held-out images by class much better than at random init"
    elif gain > 0.005:
        verdict = (
            f"{what} now sorts the held-out images by class a little better than at random init"
        )
    elif gain >= -0.005:
        verdict = (
            f"{what} sorts the held-out images by class about as well as at random init: "
            "train longer (more --epochs) before reading anything into it"
        )
    else:
        verdict = (
            f"{what} sorts the held-out images by class worse than at random init: the run may be too short, "
            "or --lr / --temperature may need tuning"
        )
    return (
        f"In words: {verdict} (kNN top-1 is how often a held-out image's nearest training images, "
        "by the encoder's features, share its class)."
    )


def say_summary(r: dict[str, Any], loader, knn_k: int) -> None:
    """The end-of-run lines: where it stopped, what it skipped, the kNN gain in numbers and in words, how long it
    took, where its files are, and what to run next."""
    ips = f", {r['images_per_s']:.0f} images/s" if r["images_per_s"] else ""
    say(
        f"{r['status']} at step {r['step']} (epoch {r['epoch']}){ips}; final loss {r['losses'][-1]:.4f}"
        if r["losses"]
        else f"{r['status']} at step {r['step']}"
    )
    if r["nonfinite_skipped"]:
        say(f"skipped {r['nonfinite_skipped']} step(s) with a non-finite loss, gradient or update")
    if loader.num_skipped:
        path, reason = loader.skipped[0]
        say(
            f"skipped {loader.num_skipped} bad image file(s) (--on-corrupt skip), e.g. {path} {reason}"
        )
    if r["knn_init"] is not None and r["knn_final"] is not None:
        gain = r["knn_final"] - r["knn_init"]
        say(
            f"kNN top-1 (k={knn_k}): random init {100 * r['knn_init']:.2f}% -> trained {100 * r['knn_final']:.2f}% "
            f"({100 * gain:+.2f} points)"
        )
        say(explain_knn(gain))
    elif r["status"] != "stopped":
        say(
            "no kNN check: pass --test-data to measure how well the encoder sorts held-out images by class"
        )
    say(f"total time {format_duration(r['total_s'])} (training {format_duration(r['train_s'])})")
    say(f"checkpoint: {r['checkpoint']}; metrics: {r['out']}/metrics.csv; curves: {r['plot']}")
    if r["checkpoint"] and r["status"] != "stopped":
        say(NEXT_STEPS.format(ckpt=r["checkpoint"]))


class StepMeter:
    """Per-step reporting of the training loop: the progress bar, a metrics row per logged step, epoch summaries.

    Use as a context manager (it closes the bar) and iterate the loader through :meth:`timed`, which measures the wait
    for each batch (``data_s``). Steps are queued on the device and read back only now and then, so speed is measured
    between reads (:meth:`read_done`), where the host has waited for the device: a step's own wall time would
    count only its kernel launches.
    """

    def __init__(
        self, cfg: PretrainConfig, log: MetricsLog, *, start: int, limit: int, t_start: float
    ) -> None:
        from tqdm import tqdm

        self.cfg, self.log, self.t_start = cfg, log, t_start
        show = log.enabled and cfg.run.progress
        # disable=None: a live bar on terminals only; logs get the one-line epoch summaries instead
        self.bar = tqdm(
            total=limit,
            initial=start,
            disable=None if show else True,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self.epoch_losses: list[float] = []
        self.t_epoch = self.t_data = self.data_s = 0.0
        self.t_read = time.perf_counter()

    def __enter__(self) -> StepMeter:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def timed(self, loader: Iterable) -> Iterator:
        """The batches of one epoch of ``loader``; a step's clock starts when the loop asks for its batch."""
        self.epoch_losses, self.t_epoch = [], time.perf_counter()
        batches = iter(loader)
        while True:
            self.t_data = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.data_s = time.perf_counter() - self.t_data
            yield batch

    def step_done(self) -> None:
        """A step is queued: advance the bar."""
        self.bar.update(1)

    def read_done(self, s: RunState, losses: list[float], lr: float, top1: float | None) -> None:
        """The losses of the steps up to ``s.step`` were read back: the bar's numbers, and a metrics row when the
        step computed its top-1 (a logged step)."""
        now = time.perf_counter()
        step_s = (now - self.t_read) / len(losses)  # the mean over the steps since the last read
        ips = self.cfg.optim.batch_size / step_s
        self.t_read = now
        self.epoch_losses += losses
        if top1 is not None:
            row = {
                "step": s.step,
                "epoch": s.epoch,
                "loss": losses[-1],
                "lr": lr,
                "contrastive_top1": top1,
                "images_per_s": ips,
                "data_s": self.data_s,
                "step_s": step_s,
                "elapsed_s": now - self.t_start,
            }
            self.log.log("train", row)
        self.bar.set_postfix(
            loss=f"{losses[-1]:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}", refresh=False
        )

    def epoch_done(self, epoch: int, lr: float) -> None:
        """One summary line for the epoch that just ended (``epoch`` epochs are now complete; its losses are read)."""
        if not self.log.enabled:
            return
        n, elapsed = len(self.epoch_losses), time.perf_counter() - self.t_epoch
        say(
            f"epoch {epoch}/{self.cfg.optim.epochs}: loss {sum(self.epoch_losses) / n:.4f}, "
            f"lr {lr:.3g}, {n * self.cfg.optim.batch_size / elapsed:.0f} images/s"
        )


class KnnMonitor:
    """kNN top-1/top-5 of the backbone on the held-out split, with the (unaugmented) training set as memory bank.

    Collective under torchrun: every rank opens its shard of both sets and is called at once (:func:`knn_eval`).
    """

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
        d = self.cfg.data
        bank = build_eval_loader(self.cfg, self.info, d.data)
        test = build_eval_loader(self.cfg, self.info, d.test_data)
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

    def __call__(self, backbone: nn.Module):
        """The :class:`~fastclr.eval.knn.KnnResult` (the same on every rank)."""
        from fastclr.eval.knn import BANK_DTYPES, knn_eval

        self.prepare()
        bank, test = self._loaders
        dist.broadcast_buffers(backbone, self.info)  # every shard scored by the model rank 0 saves
        r = self.cfg.run
        return knn_eval(
            backbone,
            bank,
            test,
            self.info.device,
            num_classes=len(self.train_classes),
            k=r.knn_k,
            temperature=r.knn_temperature,
            autocast_dtype=self.autocast_dtype,
            bank_dtype=BANK_DTYPES[r.knn_bank_dtype],
        )

    def close(self) -> None:
        for loader in self._loaders or ():
            loader.close()

"""What fine-tuning and distillation share: a classifier trained by the pretraining loop.

SimCLR v2's second and third stages (Chen et al. 2020b, "Big Self-Supervised Models are Strong Semi-Supervised
Learners", arXiv:2006.10029) train a classifier: :mod:`fastclr.train.finetune` from the pretrained network on a few
labels, :mod:`fastclr.train.distill` from a fine-tuned teacher on the unlabelled images. Both run through
:class:`~fastclr.train.trainer.Trainer` (:func:`~fastclr.train.trainer.run_training`), so checkpoints,
``--resume auto``, SIGTERM, the progress bar, ``metrics.csv``, the curves and DDP under torchrun are pretraining's;
:class:`StageTrainer` swaps in

* the config, :class:`StageConfig`: the pretraining sections (``model`` is the classifier's network) plus the stage's
  own (``[finetune]`` or ``[distill]``), saved in every checkpoint;
* the data: labelled random-resized-crop + flip views (v2 section 4: "only random crop and horizontal flips" for
  fine-tuning and distillation), whole batches only and the same number on every rank
  (:func:`~fastclr.train.build.build_labelled_loader`);
* the model: a :class:`~fastclr.models.SimCLRClassifier`, in train mode, every parameter updated;
* the optimiser: pretraining's (LARS and the warm-up + cosine schedule), with the zero-initialised classifier kept
  out of LARS's trust ratio and weight decay, as google-research/simclr ``tf2/model.py`` keeps ``head_supervised``
  out of both (a trust ratio of ``eta * ||w|| / ||g||`` would hold a layer that starts at zero near zero);
* the monitor: top-1 of the classifier on ``--test-data`` every ``--eval-every`` epochs (:class:`Top1Monitor`).

A stage checkpoint exports as a plain classifier (:func:`fastclr.train.evaluate.export_classifier`, ``fastclr export``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from fastclr.train import dist
from fastclr.train.build import (
    build_eval_loader,
    build_optimizer,
    memory_format,
)
from fastclr.train.checkpoint import load_checkpoint
from fastclr.train.config import ConfigError, PretrainConfig
from fastclr.train.metrics import MetricNames
from fastclr.train.monitor import format_duration, say
from fastclr.train.trainer import Trainer

# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class StageConfig(PretrainConfig):
    """A fine-tuning or distillation run: the pretraining sections and the stage's own, the field named ``section``.

    Read back from a checkpoint with :meth:`from_dict`; ``to_dict`` / ``to_toml`` include the stage's section.
    """

    section: ClassVar[str] = ""

    @property
    def settings(self) -> Any:
        return getattr(self, self.section)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageConfig:
        d = dict(d)
        own = d.pop(cls.section, None)
        if not isinstance(own, dict):
            raise ConfigError(f"not a {cls.section} config: it has no [{cls.section}] table")
        cfg = cls()
        cfg.update(d)
        names = {f.name for f in dataclasses.fields(cfg.settings)}
        for key, value in own.items():
            if key not in names:
                raise ConfigError(
                    f"unknown key {cls.section}.{key} (known: {', '.join(sorted(names))})"
                )
            setattr(cfg.settings, key, value)
        return cfg

    @property
    def head_layers(self) -> int:
        """Projection-head layers the classifier keeps."""
        raise NotImplementedError

    @property
    def classes(self) -> list[str]:
        """Class names, in the classifier's order (those of the labelled ``--data``)."""
        return json.loads(self.settings.classes)


def stage_config_type(config: dict[str, Any]) -> type[StageConfig] | None:
    """The config class of a checkpoint's config dict: fine-tuning, distillation, or None (pretraining)."""
    from fastclr.train.distill import DistillConfig
    from fastclr.train.finetune import FinetuneConfig

    for kind in (FinetuneConfig, DistillConfig):
        if kind.section in config:
            return kind
    return None


def is_stage_checkpoint(path: str | Path) -> bool:
    """Does the checkpoint hold a fine-tuned or distilled classifier? (Reads its config; maps the tensors.)"""
    return stage_config_type(load_checkpoint(path, mmap=True)["config"]) is not None


def classifier(cfg: StageConfig):
    """The :class:`~fastclr.models.SimCLRClassifier` a stage config describes, freshly initialised on the CPU."""
    from fastclr.models import SimCLRClassifier

    m = cfg.model
    return SimCLRClassifier(
        m.arch,
        len(cfg.classes),
        cifar_stem=m.cifar_stem,
        width=m.width,
        head_layers=cfg.head_layers,
        proj_layers=m.proj_layers,
        proj_hidden=m.proj_hidden,
        proj_dim=m.proj_dim,
    )


def load_classifier(path: str | Path, device: torch.device | str = "cpu"):
    """``(SimCLRClassifier with the weights of a fine-tuning or distillation checkpoint, in eval mode, its config)``.

    Raises:
        ConfigError: ``path`` is a pretraining checkpoint (it has no classifier).
    """
    raw = load_checkpoint(path)
    kind = stage_config_type(raw["config"])
    if kind is None:
        raise ConfigError(
            f"{path} is a pretraining checkpoint, without a classifier: fine-tune it first (fastclr finetune --ckpt "
            f"{path} ...)"
        )
    cfg = kind.from_dict(raw["config"])
    model = classifier(cfg)
    model.load_state_dict(raw["model"])
    return model.to(device, memory_format=memory_format(model)).eval(), cfg


# ----------------------------------------------------------------------------------------------------------------------
# Data


@torch.no_grad()
def classifier_top1(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    info: dist.DistInfo | None = None,
) -> float:
    """Top-1 accuracy of ``model`` (eval mode, restored after) over ``loader``'s ``(images, labels)``.

    With ``info`` under torchrun every rank reads its shard and the counts are summed: the same result on every rank.
    """
    was_training = model.training
    model.eval()
    fmt = memory_format(model)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, seen
    try:
        for images, labels in loader:
            x = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with autocast:
                logits = model(x)
            y = torch.as_tensor(labels).to(device, dtype=torch.long).reshape(-1)
            counts[0] += (logits.argmax(dim=1) == y).sum()
            counts[1] += len(y)
    finally:
        model.train(was_training)
    if info is not None:
        counts = dist.all_reduce_sum(counts, info)
    correct, seen = counts.tolist()  # the host sync
    if seen == 0:
        raise ValueError("classifier_top1: the loader yielded no images")
    return correct / seen


class Top1Monitor:
    """Top-1 of the classifier on ``--test-data`` (resize + centre crop), each rank its shard: a collective call."""

    def __init__(
        self, cfg: PretrainConfig, info: dist.DistInfo, classes: list[str], autocast_dtype
    ):
        self.cfg, self.info, self.classes, self.autocast_dtype = (
            cfg,
            info,
            list(classes),
            autocast_dtype,
        )
        self.enabled = cfg.data.test_data is not None
        self._loader = None

    def prepare(self) -> None:
        """Open (and so check) this rank's shard of ``--test-data`` if not done yet."""
        if self._loader is not None:
            return
        loader = build_eval_loader(self.cfg, self.info, self.cfg.data.test_data)
        if list(loader.classes) != self.classes:
            loader.close()
            raise ValueError(
                f"--test-data {self.cfg.data.test_data}: its classes {list(loader.classes)[:10]} differ from the "
                f"classifier's {self.classes[:10]}; the test images need the same class folders"
            )
        self._loader = loader

    def __call__(self, model: torch.nn.Module) -> float:
        self.prepare()
        dist.broadcast_buffers(model, self.info)  # every shard scored by the model rank 0 saves
        return classifier_top1(
            model, self._loader, self.info.device, self.autocast_dtype, self.info
        )

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()


# ----------------------------------------------------------------------------------------------------------------------
# The trainer


class StageTrainer(Trainer):
    """The pretraining loop training a :class:`~fastclr.models.SimCLRClassifier` (see the module docstring).

    Subclasses build the loader (:meth:`make_loader`) and the model (:meth:`make_model`), define the loss
    (:meth:`compute_loss`) and name the stage (``command``).
    """

    cfg: StageConfig
    command: ClassVar[str] = ""
    # metrics.csv's train_top1 (the logged batches' top-1), test.csv's test_top1 (the classifier on --test-data)
    metric_names = MetricNames(
        batch_top1="train_top1",
        held_out="test",
        held_out_top1="test_top1",
        loss_title="cross-entropy",
        held_out_title="top-1 on --test-data",
    )

    def make_optimizer(self):
        """Pretraining's optimiser and schedule, the classifier in a group of its own: no trust ratio, no decay."""
        optimizer, scheduler = build_optimizer(self.cfg, self.model, self.steps_per_epoch)
        fc = list(self.model.fc.parameters())
        ids = {id(p) for p in fc}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        lr = optimizer.param_groups[0]["lr"]
        optimizer.add_param_group(
            {"params": fc, "weight_decay": 0.0, "lars_exclude": True, "lr": lr, "initial_lr": lr}
        )
        return optimizer, scheduler

    def make_monitor(self) -> Top1Monitor:
        return Top1Monitor(self.cfg, self.info, self.cfg.classes, self.autocast_dtype)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 3, H, W)`` on any device -> the trained network's logits ``(B, C)`` (float32)."""
        x = images.to(self.info.device, non_blocking=True).contiguous(
            memory_format=memory_format(self.model)
        )
        self.on_phase("data")
        with self.autocast():
            logits = self.net(x)
        self.on_phase("forward")
        return logits.float()

    def evaluate_knn(self, log) -> float | None:
        """Top-1 on ``--test-data``, each rank its shard (rank 0 logs it; every rank gets it)."""
        if not self.knn.enabled:
            return None
        s = self.state
        top1 = self.knn(self.model)
        s.knn_history.append((s.step, top1))
        if self.info.is_main:
            # the held-out rows, written to test.csv as test_top1 (metric_names)
            log.log("knn", {"step": s.step, "epoch": s.epoch, "knn_top1": top1})
            say(f"test top-1 at step {s.step} (epoch {s.epoch}): {100 * top1:.2f}%")
        return top1

    def describe(self) -> str:
        from fastclr.train.build import describe_precision, peak_lr

        cfg, info = self.cfg, self.info
        o, m = cfg.optim, cfg.model
        return "\n".join(
            [
                f"fastclr {self.command}: {info.world_size} process(es) on {info.device.type}, precision "
                f"{cfg.run.precision} -> {describe_precision(cfg.run.precision, info.device)}",
                f"model {m.arch} (width {m.width or 'standard'}) + {cfg.head_layers} projection-head layer(s) + a "
                f"linear classifier over {len(cfg.classes)} classes; every parameter trained, BN in train mode",
                f"data: {self.steps_per_epoch} steps/epoch x {o.epochs} epochs of {o.batch_size} crop+flip views",
                f"peak lr {peak_lr(cfg):.4g} ({o.lr_scaling} scaling, global batch {o.batch_size}), weight decay "
                f"{o.weight_decay:g}, warm-up {o.warmup_epochs:g} epochs, cosine decay",
                "resolved config:",
                cfg.to_toml().rstrip(),
            ]
        )

    def summarize(self, r: dict[str, Any]) -> None:
        say(f"{r['status']} at step {r['step']} (epoch {r['epoch']})")
        if r["nonfinite_skipped"]:
            say(
                f"skipped {r['nonfinite_skipped']} step(s) with a non-finite loss, gradient or update"
            )
        if r["knn_init"] is not None and r["knn_final"] is not None:
            say(
                f"test top-1: {100 * r['knn_init']:.2f}% at the start -> {100 * r['knn_final']:.2f}% "
                f"({100 * (r['knn_final'] - r['knn_init']):+.2f} points)"
            )
        say(
            f"total time {format_duration(r['total_s'])} (training {format_duration(r['train_s'])})"
        )
        say(f"checkpoint: {r['checkpoint']}; metrics: {r['out']}/metrics.csv; curves: {r['plot']}")
        if r["checkpoint"] and r["status"] != "stopped":
            say(
                "what to run next:\n"
                f"  fastclr distill --teacher {r['checkpoint']} --data DIR --test-data DIR   # a student from it\n"
                f"  fastclr export --ckpt {r['checkpoint']} --out classifier.pt   # a plain PyTorch classifier"
            )

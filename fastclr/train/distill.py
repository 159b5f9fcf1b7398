"""SimCLR v2 distillation: a student trained on the unlabelled images to match a fine-tuned teacher.

Run it:

    # self-distillation (the teacher's architecture), over every image of --data, labels unused
    fastclr distill --teacher runs/ft-1pct/checkpoints/ckpt-000000600.pt --data imagenet/train \
        --test-data imagenet/val --out runs/distill

    # big-to-small: a half-width student; plus the cross-entropy on the labelled subset with weight 0.5
    fastclr distill --teacher CKPT --data imagenet/train --student-arch resnet18 --student-width 32 \
        --labels-file runs/ft-1pct/labels.txt --label-weight 0.5

    # under torchrun as every fastclr run; --resume auto after a crash or SIGTERM
    torchrun --nproc_per_node=8 -m fastclr distill --teacher CKPT --data imagenet/train ...

The loss (Chen et al. 2020b, section 2, eq. 2), over a batch of B unlabelled images x_i seen by both networks:

    P(y | x; tau) = softmax(logits(x) / tau)_y
    L_distill     = -1/B sum_i sum_y P_T(y | x_i; tau) log P_S(y | x_i; tau)

with the teacher T in eval mode and without gradient, and optionally (eq. 3) ``+ alpha * L_CE`` over a batch of the
labelled subset (``--labels-file``, ``--label-weight alpha``). The student is a backbone with a linear classifier
(v2: the teacher's architecture "excluding the projection head", or a smaller one), randomly initialised, in train
mode; both networks see the same random crop + flip views. Defaults (v2, section 4): temperature 1 (v2 uses 0.1 for
self-distillation, 1 for big-to-small, and finds the difference small), pretraining's optimiser, schedule, weight
decay and batch size, 400 epochs, with its 10 warm-up epochs (2.5% of them; a shorter run warms up for that share).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fastclr.train import dist
from fastclr.train.build import build_labelled_loader, check_data_dir, memory_format, place_model
from fastclr.train.config import COMMAND_LINE, ConfigError
from fastclr.train.labels import LabelSubset, read_subset, write_file_list, write_subset
from fastclr.train.stage import (
    StageConfig,
    StageTrainer,
    classifier,
    load_classifier,
)
from fastclr.train.stage_flags import DEFAULT_EPOCHS, WARMUP_SHARE, run_flags
from fastclr.train.trainer import run_training


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``-1/B sum_i sum_y softmax(t_i / tau)_y log softmax(s_i / tau)_y``: the student's cross-entropy against the
    teacher's tempered distribution (no gradient into the teacher).

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``.
        temperature: tau > 0, applied to both.

    Returns:
        The mean over the batch, a 0-d tensor.

    Example:
        >>> distill_loss(torch.zeros(2, 4), torch.zeros(2, 4))  # uniform against uniform: log 4
        tensor(1.3863)
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must "
            "both be (batch, classes) of the same shape"
        )
    p_teacher = torch.softmax(teacher_logits.detach() / temperature, dim=1)
    log_p_student = torch.log_softmax(student_logits / temperature, dim=1)
    return -(p_teacher * log_p_student).sum(dim=1).mean()


@dataclasses.dataclass
class DistillSettings:
    """The ``[distill]`` section: the teacher, the loss and the optional labels."""

    teacher: str = ""  # the fine-tuned (or distilled) checkpoint, resolved path
    temperature: float = 1.0
    label_weight: float = 0.0
    labels_file: str | None = None  # resolved path
    classes: str = "[]"  # the teacher's class names, a JSON list


@dataclasses.dataclass
class DistillConfig(StageConfig):
    """A distillation run: pretraining's sections (``model``: the student's network) + ``[distill]``."""

    section: ClassVar[str] = "distill"
    distill: DistillSettings = dataclasses.field(default_factory=DistillSettings)

    @property
    def head_layers(self) -> int:
        return 0  # v2's students have no projection head


class WithLabelled:
    """The batches of ``main`` (``images, labels``), each followed by the next batch of ``labelled``, which is
    cycled through its own epochs: ``images, labels, labelled_images, labelled_labels``.

    Its position follows from ``main``'s alone (step ``s`` pairs with labelled batch ``s``), so ``set_epoch`` resumes
    both streams exactly.
    """

    def __init__(self, main, labelled) -> None:
        self.main, self.labelled, self._step = main, labelled, 0

    def __len__(self) -> int:
        return len(self.main)

    def __getattr__(self, name: str):
        main = self.__dict__.get("main")
        if main is None:
            raise AttributeError(name)
        return getattr(main, name)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.main.set_epoch(epoch, skip_batches=skip_batches)
        self._step = epoch * len(self.main) + skip_batches

    def __iter__(self) -> Iterator:
        n, it = len(self.labelled), None
        for batch in self.main:
            epoch, b = divmod(self._step, n)
            if it is None or b == 0:
                self.labelled.set_epoch(epoch, skip_batches=b)
                it = iter(self.labelled)
            self._step += 1
            yield (*batch, *next(it))

    def close(self) -> None:
        self.main.close()
        self.labelled.close()


class DistillTrainer(StageTrainer):
    """Distillation of ``teacher`` (a :class:`~fastclr.models.SimCLRClassifier` on the CPU) into the configured
    student; ``subset`` the labelled images for ``--label-weight``, ``flat_files`` the images of an unlabelled
    ``--data`` (None when it is an ImageFolder)."""

    command = "distill"
    # a logged batch's top-1 is the student's agreement with the teacher's prediction
    metric_names = dataclasses.replace(
        StageTrainer.metric_names, batch_top1="teacher_agreement", loss_title="distillation loss"
    )

    def __init__(
        self,
        cfg: DistillConfig,
        info: dist.DistInfo,
        teacher: torch.nn.Module,
        subset: LabelSubset | None = None,
        flat_files: list[str] | None = None,
    ) -> None:
        super().__init__(cfg, info)
        self.teacher, self.subset, self.flat_files = teacher, subset, flat_files

    def make_loader(self, dtype: torch.dtype):
        """Every image of --data (a flat folder through ``OUT/unlabelled.list``), with the labelled subset alongside
        when --label-weight asks for it (``OUT/labels.txt``, ``OUT/labels.list``)."""
        cfg, info = self.cfg, self.info
        root = cfg.data.data
        if self.flat_files is not None:
            root = str(self.out / "unlabelled.list")
            flat = LabelSubset(
                self.flat_files, [0] * len(self.flat_files), ["0"], len(self.flat_files)
            )
            dist.run_on_main(lambda: write_file_list(flat, root), info)
        loader = build_labelled_loader(cfg, info, root, dtype)
        if self.subset is None:
            return loader
        listing = self.out / "labels.list"

        def write() -> None:
            write_subset(self.subset, cfg.data.data, self.out / "labels.txt")
            write_file_list(self.subset, listing)

        dist.run_on_main(write, info)
        labelled = build_labelled_loader(cfg, info, str(listing), dtype)
        if len(labelled) == 0:
            loader.close()
            labelled.close()
            raise ConfigError(
                f"--labels-file {cfg.distill.labels_file}: {len(self.subset.files)} labelled images make no batch of "
                f"{cfg.optim.batch_size} over {info.world_size} rank(s); lower --batch-size"
            )
        return WithLabelled(loader, labelled)

    def make_model(self) -> torch.nn.Module:
        """The randomly initialised student (identical on every rank); the teacher goes to the device, frozen."""
        torch.manual_seed(self.cfg.run.seed)
        student = place_model(classifier(self.cfg), self.info)
        self.teacher = self.teacher.to(self.info.device, memory_format=memory_format(self.teacher))
        self.teacher.eval().requires_grad_(False)
        return student

    def compute_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *labelled: torch.Tensor,
        with_top1: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The distillation loss on ``images`` (+ alpha x cross-entropy on the labelled batch); its top-1 is the
        student's agreement with the teacher's prediction."""
        d, n = self.cfg.distill, len(images)
        x = torch.cat([images, labelled[0]]) if labelled else images
        x = x.to(self.info.device, non_blocking=True).contiguous(
            memory_format=memory_format(self.model)
        )
        with torch.no_grad(), self.autocast():
            teacher_logits = self.teacher(x[:n]).float()
        logits = self.classify(x)  # one student forward: BN statistics over both batches
        loss = distill_loss(logits[:n], teacher_logits, d.temperature)
        if labelled:
            y = labelled[1].to(self.info.device, non_blocking=True).long()
            loss = loss + d.label_weight * F.cross_entropy(logits[n:], y)
        top1 = None
        if with_top1:
            top1 = (
                (logits[:n].detach().argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean()
            )
        self.on_phase("loss")
        return loss, top1


def configure(
    teacher: str | Path,
    data: str,
    *,
    student_arch: str | None = None,
    student_width: int | None = None,
    temperature: float = 1.0,
    labels_file: str | Path | None = None,
    label_weight: float | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[DistillConfig, torch.nn.Module, LabelSubset | None, list[str] | None]:
    """``(config, teacher, labelled subset or None, files of a flat --data or None)``; every bad input raises here.

    ``label_weight`` None is 1 with a ``labels_file``, else 0. ``overrides``: flat pretraining settings
    (``{"epochs": 5}``) over the defaults (pretraining's, :data:`DEFAULT_EPOCHS` epochs).
    """
    from fastclr.pipelines.data import scan_images

    if not Path(teacher).is_file():
        raise FileNotFoundError(f"--teacher {teacher}: checkpoint not found")
    teacher_model, tcfg = load_classifier(teacher)
    classes = tcfg.classes
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        raise ConfigError(f"--temperature must be a positive finite number, got {temperature!r}")
    if label_weight is None:
        label_weight = 1.0 if labels_file is not None else 0.0
    if not (
        isinstance(label_weight, int | float) and math.isfinite(label_weight) and label_weight >= 0
    ):
        raise ConfigError(
            f"--label-weight must be a non-negative finite number, got {label_weight!r}"
        )
    if label_weight > 0 and labels_file is None:
        raise ConfigError(
            f"--label-weight {label_weight:g} needs the labelled images: give --labels-file"
        )
    if labels_file is not None and label_weight == 0:
        raise ConfigError(
            "--labels-file with --label-weight 0 has no effect; give a positive --label-weight"
        )

    cfg = DistillConfig()
    m = cfg.model = dataclasses.replace(tcfg.model)
    if student_arch is not None and student_arch != m.arch:
        m.arch, m.width = (
            student_arch,
            None,
        )  # another architecture starts from its own standard width
    if student_width is not None:
        m.width = student_width
    cfg.data.data, cfg.data.size, cfg.data.backend = str(data), tcfg.data.size, tcfg.data.backend
    cfg.optim.epochs = DEFAULT_EPOCHS
    cfg.run.out = "runs/distill"
    overrides = dict(overrides or {})
    cfg.update(overrides, source=COMMAND_LINE)
    if "warmup_epochs" not in overrides:
        cfg.optim.warmup_epochs = min(cfg.optim.warmup_epochs, WARMUP_SHARE * cfg.optim.epochs)
    if cfg.data.size != tcfg.data.size:
        raise ConfigError(
            f"--size {cfg.data.size}: the teacher {teacher} was trained on {tcfg.data.size} px crops and sees the "
            f"student's input; give --size {tcfg.data.size} (or leave it out)"
        )

    root = cfg.data.data
    check_data_dir(root, "--data")
    images = scan_images(root, on_corrupt=cfg.data.on_corrupt)
    if images.labelled and images.classes != classes:
        raise ConfigError(
            f"--data {root} has {len(images.classes)} class folders ({', '.join(images.classes[:5])}...), but the "
            f"teacher {teacher} classifies {len(classes)} classes ({', '.join(classes[:5])}...): give the images it "
            "was fine-tuned for, or a flat folder of unlabelled images"
        )
    subset = None
    if labels_file is not None:
        if not images.labelled:
            raise ConfigError(
                f"--labels-file needs a labelled --data (an ImageFolder root/<class>/<img>), but {root} is flat"
            )
        subset = read_subset(labels_file, root, images.files, images.labels, images.classes)
    cfg.distill = DistillSettings(
        teacher=str(Path(teacher).resolve()),
        temperature=float(temperature),
        label_weight=float(label_weight),
        labels_file=None if labels_file is None else str(Path(labels_file).resolve()),
        classes=json.dumps(classes),
    )
    return cfg, teacher_model, subset, None if images.labelled else images.files


def distill(
    cfg: DistillConfig,
    teacher: torch.nn.Module,
    subset: LabelSubset | None = None,
    flat_files: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) distillation as :func:`configure` resolved it; returns the run summary."""
    return run_training(cfg, lambda c, info: DistillTrainer(c, info, teacher, subset, flat_files))


def main(args: argparse.Namespace) -> int:
    """``fastclr distill``: configure from the flags, then train; the exit status."""
    if args.data is None:
        raise ConfigError(
            "fastclr distill needs --data (the images to distil on; labels, if any, are unused)"
        )
    cfg, teacher, subset, flat = configure(
        args.teacher,
        args.data,
        student_arch=args.student_arch,
        student_width=args.student_width,
        temperature=args.temperature,
        labels_file=args.labels_file,
        label_weight=args.label_weight,
        overrides=run_flags(args),
    )
    result = distill(cfg, teacher, subset, flat)
    return 0 if result["status"] in ("completed", "stopped", "max_steps") else 1

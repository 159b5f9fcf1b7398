"""SimCLR v2 fine-tuning: the whole pretrained network plus a linear classifier, trained on a few labels.

Run it:

    # 1% of the labels of an ImageFolder, drawn class-balanced with seed 0 and written to OUT/labels.txt
    fastclr finetune --ckpt runs/simclr/checkpoints/ckpt-000100000.pt --data imagenet/train \
        --test-data imagenet/val --label-fraction 0.01 --out runs/ft-1pct

    # the official subsets of google-research/simclr (imagenet_subsets/1percent.txt), matched by file name
    fastclr finetune --ckpt CKPT --data imagenet/train --test-data imagenet/val --labels-file 1percent.txt

    # 8 GPUs (global BN: SyncBatchNorm), the same flags; after a crash or SIGTERM: the same command + --resume auto
    torchrun --nproc_per_node=8 -m fastclr finetune --ckpt CKPT --data ... --labels-file 10percent.txt

The classifier sits on the output of the first ``K`` projection-head layers (``--from-head-layer K``): ``K = 0`` on
the backbone (SimCLR v1), ``K = 1`` after the first ``Linear -> BN -> ReLU`` of the head (v2's default for 1% and
10% of the labels; Chen et al. 2020b, section 2 and table 2), up to the head's depth. Every parameter is trained with
the model in train mode: the loss is the cross-entropy of the logits ``l = W g_K(f(x)) + b`` on the labelled images,

    L = -1/B sum_i log softmax(l_i)[y_i]

Defaults, v2's recipe (section 4, and the full-network fine-tuning command of google-research/simclr's README, whose
tf2 ``run.py`` flags they are): LARS with momentum 0.9, learning rate ``0.005 * sqrt(B)`` (0.16 at B = 1024), no
weight decay, no warm-up, cosine decay; batch 1024 (fewer when the subset is smaller); 60 epochs below 5% of the
labels (v2: 1%), 30 from there on (10% and 100%); random crop + flip only; BN over the global batch (SyncBatchNorm
under torchrun on GPUs); the classifier zero-initialised (``--zero_init_logits_layer``) and outside LARS's trust ratio
and weight decay (:mod:`fastclr.train.stage`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fastclr.train import dist
from fastclr.train.build import build_labelled_loader, check_data_dir, place_model, simclr_model
from fastclr.train.checkpoint import TrainCheckpoint, load_checkpoint
from fastclr.train.config import COMMAND_LINE, ConfigError, PretrainConfig
from fastclr.train.labels import (
    LabelSubset,
    check_fraction,
    label_subset,
    write_file_list,
    write_subset,
)
from fastclr.train.stage import StageConfig, StageTrainer, stage_config_type
from fastclr.train.stage_flags import (  # noqa: F401 (EPOCHS_MANY: part of this module's recipe)
    DEFAULT_BATCH,
    DEFAULT_LR,
    DEFAULT_SCALING,
    EPOCHS_FEW,
    EPOCHS_MANY,
    FEW_LABELS,
    run_flags,
)
from fastclr.train.trainer import run_training


@dataclasses.dataclass
class FinetuneSettings:
    """The ``[finetune]`` section: where the run starts and which labels it sees."""

    pretrained: str = ""  # the pretraining checkpoint (resolved path)
    from_head_layer: int = 1
    label_fraction: float | None = None
    label_seed: int = 0
    labels_file: str | None = None  # resolved path
    classes: str = (
        "[]"  # the class names of --data, a JSON list (filled in as the run is configured)
    )


@dataclasses.dataclass
class FinetuneConfig(StageConfig):
    """A fine-tuning run: pretraining's sections (``model`` copied from the pretraining checkpoint) + ``[finetune]``."""

    section: ClassVar[str] = "finetune"
    finetune: FinetuneSettings = dataclasses.field(default_factory=FinetuneSettings)

    @property
    def head_layers(self) -> int:
        return self.finetune.from_head_layer


class FinetuneTrainer(StageTrainer):
    """Fine-tuning on the label subset ``subset`` (:func:`fastclr.train.labels.label_subset`)."""

    command = "finetune"

    def __init__(self, cfg: FinetuneConfig, info: dist.DistInfo, subset: LabelSubset) -> None:
        super().__init__(cfg, info)
        self.subset = subset

    def make_loader(self, dtype: torch.dtype):
        """Writes ``OUT/labels.txt`` (the subset, for --labels-file) and ``OUT/labels.list`` (the loaders' list)."""
        listing = self.out / "labels.list"

        def write() -> None:
            write_subset(self.subset, self.cfg.data.data, self.out / "labels.txt")
            write_file_list(self.subset, listing)

        dist.run_on_main(write, self.info)
        return build_labelled_loader(self.cfg, self.info, str(listing), dtype)

    def make_model(self) -> torch.nn.Module:
        """The pretrained backbone and first K head layers, plus a zero-initialised classifier."""
        from fastclr.models import SimCLRClassifier

        torch.manual_seed(self.cfg.run.seed)
        pretrained = TrainCheckpoint.load(self.cfg.finetune.pretrained)
        simclr = simclr_model(self.cfg.model)
        simclr.load_state_dict(pretrained.model)
        model = SimCLRClassifier.from_pretrained(
            simclr, self.cfg.head_layers, len(self.cfg.classes)
        )
        return place_model(model, self.info)

    def compute_loss(
        self, images: torch.Tensor, labels: torch.Tensor, with_top1: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-entropy of the labelled batch; its top-1 on logged steps."""
        logits = self.classify(images)
        y = labels.to(self.info.device, non_blocking=True).long()
        loss = F.cross_entropy(logits, y)
        top1 = (logits.detach().argmax(dim=1) == y).float().mean() if with_top1 else None
        self.on_phase("loss")
        return loss, top1


def configure(
    pretrained: str | Path,
    data: str,
    *,
    label_fraction: float | None = None,
    labels_file: str | Path | None = None,
    label_seed: int = 0,
    from_head_layer: int = 1,
    overrides: dict[str, Any] | None = None,
) -> tuple[FinetuneConfig, LabelSubset]:
    """The resolved fine-tuning config and its label subset; every bad input raises here, before any training.

    ``overrides``: flat pretraining settings (``{"epochs": 5, "test_data": ...}``) over the v2 defaults; ``epochs``
    and ``batch_size`` left out follow the subset (see the module docstring).
    """
    if (label_fraction is None) == (labels_file is None):
        raise ConfigError("give exactly one of --label-fraction and --labels-file")
    if label_fraction is not None:
        check_fraction(label_fraction)
    if (
        isinstance(label_seed, bool)
        or not isinstance(label_seed, int)
        or not 0 <= label_seed < 2**32
    ):
        raise ConfigError(f"--label-seed must be an integer in [0, 2^32), got {label_seed!r}")
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"--ckpt {pretrained}: checkpoint not found")
    raw = load_checkpoint(
        pretrained, mmap=True
    )  # the config; the weights are read as the model is built
    if (kind := stage_config_type(raw["config"])) is not None:
        raise ConfigError(
            f"--ckpt {pretrained} is a {kind.section} checkpoint; fine-tune from a pretraining one (fastclr pretrain), "
            "or continue this run with --resume"
        )
    pre = PretrainConfig.from_dict(raw["config"])
    depth = pre.model.proj_layers
    if (
        isinstance(from_head_layer, bool)
        or not isinstance(from_head_layer, int)
        or not 0 <= from_head_layer <= depth
    ):
        raise ConfigError(
            f"--from-head-layer must be an integer in [0, {depth}] (the depth of {pretrained}'s projection head), "
            f"got {from_head_layer!r}"
        )
    cfg = FinetuneConfig()
    cfg.model = dataclasses.replace(pre.model)
    d = cfg.data
    d.data, d.size, d.backend = str(data), pre.data.size, pre.data.backend
    o = cfg.optim
    o.lr, o.lr_scaling, o.weight_decay, o.warmup_epochs = DEFAULT_LR, DEFAULT_SCALING, 0.0, 0.0
    cfg.run.out = "runs/finetune"
    overrides = dict(overrides or {})
    cfg.update(
        {k: v for k, v in overrides.items() if k not in ("epochs", "batch_size")},
        source=COMMAND_LINE,
    )
    check_data_dir(cfg.data.data, "--data")
    subset = label_subset(
        cfg.data.data,
        fraction=label_fraction,
        seed=label_seed,
        labels_file=labels_file,
        on_corrupt=cfg.data.on_corrupt,
    )
    world = dist.env_world_size()
    batch = overrides.get("batch_size")
    if batch is None:
        batch = max(world, min(DEFAULT_BATCH, len(subset.files) // world * world))
    epochs = overrides.get("epochs")
    if epochs is None:
        epochs = EPOCHS_FEW if subset.fraction < FEW_LABELS else EPOCHS_MANY
    cfg.update({"batch_size": batch, "epochs": epochs}, source=COMMAND_LINE)
    cfg.finetune = FinetuneSettings(
        pretrained=str(Path(pretrained).resolve()),
        from_head_layer=from_head_layer,
        label_fraction=None if label_fraction is None else float(label_fraction),
        label_seed=label_seed,
        labels_file=None if labels_file is None else str(Path(labels_file).resolve()),
        classes=json.dumps(subset.classes),
    )
    return cfg, subset


def finetune(cfg: FinetuneConfig, subset: LabelSubset) -> dict[str, Any]:
    """Run (or resume) fine-tuning as :func:`configure` resolved it; returns the run summary (as pretraining's)."""
    return run_training(cfg, lambda c, info: FinetuneTrainer(c, info, subset))


def main(args: argparse.Namespace) -> int:
    """``fastclr finetune``: configure from the flags, then train; the exit status."""
    if args.data is None:
        raise ConfigError("fastclr finetune needs --data (the labelled images, an ImageFolder)")
    cfg, subset = configure(
        args.ckpt,
        args.data,
        label_fraction=args.label_fraction,
        labels_file=args.labels_file,
        label_seed=args.label_seed,
        from_head_layer=args.from_head_layer,
        overrides=run_flags(args),
    )
    result = finetune(cfg, subset)
    return 0 if result["status"] in ("completed", "stopped", "max_steps") else 1

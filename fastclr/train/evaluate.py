"""Evaluating and exporting trained encoders: kNN and linear evaluation of a checkpoint, backbone export.

    fastclr knn --ckpt runs/cpu-demo/checkpoints/ckpt-000000090.pt
    fastclr linear --ckpt CKPT --data cifar10/train --test-data cifar10/test --epochs 10
    torchrun --nproc_per_node=8 -m fastclr knn --ckpt CKPT --bank-dtype fp16   # each GPU its shard (also linear)
    fastclr export --ckpt CKPT --out resnet50-simclr.pt   # prints (and writes to resnet50-simclr.pt.json) how to load it
    fastclr export --ckpt CKPT --out resnet50-simclr.safetensors

``--data``/``--test-data`` default to the folders the checkpoint was trained and monitored on.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastclr.train import dist
from fastclr.train.build import memory_format, simclr_model, unlabelled_data_hint
from fastclr.train.checkpoint import TrainCheckpoint, atomic_save, load_checkpoint
from fastclr.train.config import ConfigError, PretrainConfig
from fastclr.train.stage import (
    classifier,
    is_stage_checkpoint,
    load_classifier,
    stage_config_type,
)


def load_model(path: str | Path, device: torch.device | str = "cpu"):
    """``(model with the checkpoint's weights, in eval mode, its config)``: the SimCLRModel and PretrainConfig of a
    pretraining checkpoint, the :class:`~fastclr.models.SimCLRClassifier` and fine-tuning or distillation config
    (:mod:`fastclr.train.stage`) of a stage checkpoint. Either model's ``backbone`` is the encoder to evaluate."""
    # a probe of the config: the tensors are mapped, not read
    kind = stage_config_type(load_checkpoint(path, mmap=True)["config"])
    ckpt = TrainCheckpoint.load(path, config_type=kind or PretrainConfig)
    model = simclr_model(ckpt.config.model) if kind is None else classifier(ckpt.config)
    # SyncBatchNorm (multi-GPU runs) and BatchNorm share parameter and buffer names, so either checkpoint loads.
    model.load_state_dict(ckpt.model)
    return model.to(device, memory_format=memory_format(model)).eval(), ckpt.config


def check_shards_not_empty(flag: str, source: str, num_images: int, world_size: int) -> None:
    """Refuse ``num_images`` images over ``world_size`` ranks if a rank's shard (images ``rank, rank + W, ...``)
    would be empty: that rank alone would fail to build its loader while the others wait in a collective.

    Every rank knows both numbers before any collective, so every rank raises alike.
    """
    if num_images < world_size:
        raise ValueError(
            f"{flag} {source}: {num_images} image(s) for {world_size} ranks; every rank needs at least one image "
            f"of its shard (run on at most {num_images} ranks, or give more images)"
        )


def _data_paths(
    cfg: PretrainConfig,
    data: str | None,
    test_data: str | None,
    evaluation: str,
    world_size: int = 1,
) -> tuple[str, str]:
    """The labelled ``(--data, --test-data)`` folders to evaluate on; a clear error for a missing or flat one, or for
    one with fewer images than the ``world_size`` ranks that shard it (:func:`check_shards_not_empty`)."""
    from fastclr.pipelines.data import scan_images
    from fastclr.pipelines.shards import is_shard_source

    train = data or cfg.data.data
    test = test_data or cfg.data.test_data
    if train is None or test is None:
        raise ValueError(
            "no data: give --data and --test-data (the checkpoint does not name its folders)"
        )
    for flag, p, given in (("--data", train, data), ("--test-data", test, test_data)):
        if not is_shard_source(p) and not Path(p).exists():
            raise FileNotFoundError(f"{flag} {p}: no such file or directory")
        # A run may pretrain on a flat folder; evaluation needs its labels (a listing with header checks, no decoding).
        listing = scan_images(p, on_corrupt="skip")
        if not listing.labelled:
            default = "" if given else " (the checkpoint's; it was pretrained on unlabelled images)"
            raise ConfigError(
                f"{evaluation} evaluation needs labelled images, but {unlabelled_data_hint(flag, p)}{default}"
            )
        check_shards_not_empty(flag, p, len(listing.files), world_size)
    return train, test


def _eval_loader(
    root: str,
    cfg: PretrainConfig,
    device: torch.device,
    *,
    batch_size: int,
    size: int | None,
    workers: int,
    backend: str,
    augment: bool = False,
    info: dist.DistInfo | None = None,
):
    """The evaluation loader of ``root``: under torchrun (``info``) this rank's shard, images ``rank, rank + W, ...``."""
    from fastclr.pipelines import make_loader

    return make_loader(
        backend=backend,
        eval=True,
        root=root,
        batch_size=batch_size,
        size=size or cfg.data.size,
        device="gpu" if device.type == "cuda" else "cpu",
        device_id=device.index if device.type == "cuda" else None,
        num_threads=workers,
        augment=augment,
        seed=cfg.run.seed,
        shard_id=info.rank if info else 0,
        num_shards=info.world_size if info else 1,
    )


@contextlib.contextmanager
def _process_group(device: str, dist_timeout: float) -> Iterator[dist.DistInfo]:
    """Where this process sits; under torchrun, in a process group whose collectives give up after ``dist_timeout``
    minutes, left when the block ends (a group that was there before is kept)."""
    if not 0 < dist_timeout <= 7 * 24 * 60:  # as pretrain's --dist-timeout: at most a week
        raise ValueError(f"dist_timeout must be in (0, 10080] minutes, got {dist_timeout!r}")
    joined = not torch.distributed.is_initialized()
    info = dist.init_distributed(device, timeout=datetime.timedelta(minutes=dist_timeout))
    try:
        yield info
    finally:
        if joined:
            dist.cleanup_distributed()


def run_knn(
    ckpt: str | Path,
    data: str | None = None,
    test_data: str | None = None,
    *,
    k: int = 200,
    temperature: float = 0.1,
    batch_size: int = 256,
    size: int | None = None,
    workers: int = 2,
    backend: str = "auto",
    device: str = "auto",
    bank_dtype: str = "fp32",
    dist_timeout: float = dist.DEFAULT_TIMEOUT_MIN,
) -> dict[str, Any]:
    """kNN top-1 and top-5 of a checkpoint's backbone: training images as the memory bank, test images as queries.

    Under torchrun every rank extracts its shard of both sets and classifies its share of the queries
    (:func:`fastclr.eval.knn_eval`): the result, the same on every rank, is one process's. ``bank_dtype``
    ``"fp16"`` halves the bank each rank holds; ``dist_timeout`` (minutes) bounds every collective.
    """
    from fastclr.eval.knn import BANK_DTYPES, knn_eval

    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"bank_dtype must be one of {tuple(BANK_DTYPES)}, got {bank_dtype!r}")
    with _process_group(device, dist_timeout) as info:
        dev = info.device
        model, cfg = dist.run_on_every_rank(lambda: load_model(ckpt, dev), info)
        train, test = dist.run_on_every_rank(
            lambda: _data_paths(cfg, data, test_data, "kNN", info.world_size), info
        )
        opts = dict(batch_size=batch_size, size=size, workers=workers, backend=backend, info=info)
        with (
            _eval_loader(train, cfg, dev, **opts) as bank,
            _eval_loader(test, cfg, dev, **opts) as queries,
        ):
            if list(bank.classes) != list(queries.classes):
                raise ValueError(f"{train} and {test} have different class folders")
            r = knn_eval(
                model.backbone,
                bank,
                queries,
                dev,
                num_classes=len(bank.classes),
                k=k,
                temperature=temperature,
                bank_dtype=BANK_DTYPES[bank_dtype],
            )
            train_images, test_images = len(bank.files), len(queries.files)
    return {
        "knn_top1": r.top1,
        "knn_top5": r.top5,
        "k": k,
        "train": train,
        "test": test,
        "train_images": train_images,
        "test_images": test_images,
        "rank": info.rank,
        "world_size": info.world_size,
    }


def run_linear(
    ckpt: str | Path,
    data: str | None = None,
    test_data: str | None = None,
    *,
    epochs: int = 10,
    lr: float = 0.1,
    batch_size: int = 256,
    size: int | None = None,
    workers: int = 2,
    backend: str = "auto",
    device: str = "auto",
    progress: bool = True,
    dist_timeout: float = dist.DEFAULT_TIMEOUT_MIN,
) -> dict[str, Any]:
    """Linear evaluation (frozen backbone, crop+flip only) of a checkpoint; returns top-1/top-5 on the test images.

    Under torchrun each rank reads its shard with ``batch_size // W`` images per batch (``batch_size`` stays the
    global batch) and the classifier trains data-parallel (see :func:`fastclr.eval.linear_eval`); ``dist_timeout``
    (minutes) bounds every collective.
    """
    from fastclr.eval import linear_eval

    if epochs <= 0 or not lr > 0:
        raise ValueError(f"epochs and lr must be positive, got epochs={epochs}, lr={lr}")
    with _process_group(device, dist_timeout) as info:
        if batch_size < info.world_size:
            raise ValueError(
                f"--batch-size {batch_size} is smaller than the {info.world_size} ranks"
            )
        dev = info.device
        model, cfg = dist.run_on_every_rank(lambda: load_model(ckpt, dev), info)
        train, test = dist.run_on_every_rank(
            lambda: _data_paths(cfg, data, test_data, "linear", info.world_size), info
        )
        opts = dict(
            batch_size=batch_size // info.world_size,
            size=size,
            workers=workers,
            backend=backend,
            info=info,
        )
        with (
            _eval_loader(train, cfg, dev, augment=True, **opts) as train_loader,
            _eval_loader(test, cfg, dev, **opts) as test_loader,
        ):
            result = linear_eval(
                model.backbone,
                train_loader,
                test_loader,
                num_classes=len(train_loader.classes),
                epochs=epochs,
                lr=lr,
                device=dev,
                progress=progress and info.is_main,
            )
    return {**result, "train": train, "test": test, "rank": info.rank}


EXPORT_FORMATS = ("pt", "safetensors")


def export_format(out: str | Path, format: str | None = None) -> str:
    """``format``, or the one ``out``'s suffix names (``.safetensors``; anything else is a ``torch.save`` file)."""
    if format is None:
        return "safetensors" if Path(out).suffix == ".safetensors" else "pt"
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    return format


def _read_expression(path: Path, format: str) -> tuple[str, str]:
    """``(import statement, expression)`` that read an exported ``state_dict`` file of ``format`` in plain PyTorch."""
    if format == "safetensors":
        return "import safetensors.torch", f"safetensors.torch.load_file({str(path)!r})"
    return "import torch", f"torch.load({str(path)!r}, weights_only=True)"


def load_line(
    path: Path, format: str, arch: str, cifar_stem: bool, width: int | None, backbone=None
) -> str:
    """One line of Python that rebuilds the backbone and loads an exported file into it, strictly.

    A ``timm:`` backbone is rebuilt by ``timm.create_model`` as :func:`fastclr.models.timm_backbone.timm_create_call`
    writes it for the trained ``backbone``.
    """
    imports, read = _read_expression(path, format)
    from fastclr.models.timm_backbone import is_timm_arch, timm_create_call

    if is_timm_arch(arch):
        return f"{imports}, timm; backbone = {timm_create_call(arch, backbone)}; backbone.load_state_dict({read})"
    return (
        f"{imports}; from fastclr.models import build_backbone; "
        f"backbone, feat_dim = build_backbone({arch!r}, cifar_stem={cifar_stem}, width={width}); "
        f"backbone.load_state_dict({read})"
    )


def export_backbone(
    ckpt: str | Path, out: str | Path, format: str | None = None, with_head: int | None = None
) -> dict[str, Any]:
    """Write the backbone of a checkpoint as a plain ``state_dict`` and, beside it, ``<out>.json`` saying how to load it.

    ``with_head`` K >= 1 also keeps the first K projection-head layers; a fine-tuned or distilled checkpoint always
    exports its whole classifier (backbone + its head layers + linear): both through
    :func:`export_classifier`.

    The tensors keep torchvision's key names (contiguous, no ``fc``). ``format`` is ``"pt"`` (``torch.save``) or
    ``"safetensors"``; None picks by the suffix of ``out``. A standard-width ResNet without the CIFAR stem also loads
    into torchvision's model with ``strict=False``, which forgives only the missing ``fc`` keys: a CIFAR stem, another
    width or cnn7 has other shapes, which no ``load_state_dict`` forgives, so ``load`` (also in the JSON) rebuilds the
    backbone with :func:`fastclr.models.build_backbone` first. A ``timm:<name>`` backbone keeps timm's key names and
    loads strictly into ``timm.create_model(name, num_classes=0)`` (the JSON's ``timm``).
    """
    import json

    from fastclr.models import standard_width
    from fastclr.models.timm_backbone import TIMM_PREFIX, is_timm_arch

    if with_head or is_stage_checkpoint(ckpt):
        return export_classifier(ckpt, out, format, with_head)
    format = export_format(out, format)
    model, cfg = load_model(ckpt)
    m = cfg.model
    width = None if is_timm_arch(m.arch) else m.width or standard_width(m.arch)
    state = {k: v.detach().contiguous() for k, v in model.backbone.state_dict().items()}
    meta = {"arch": m.arch, "width": width, "cifar_stem": m.cifar_stem, "feat_dim": model.feat_dim}
    if format == "safetensors":
        import safetensors.torch

        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(state, path, metadata={k: str(v) for k, v in meta.items()})
    else:
        path = atomic_save(state, out)
    path = path.resolve()
    meta["format"] = format
    meta["load"] = load_line(path, format, m.arch, m.cifar_stem, width, model.backbone)
    if is_timm_arch(m.arch):
        name = m.arch[len(TIMM_PREFIX) :]
        meta["timm"] = f"timm.create_model({name!r}, num_classes=0).load_state_dict(...)"
    elif m.arch != "cnn7" and not m.cifar_stem and width == standard_width(m.arch):
        meta["torchvision"] = f"torchvision.models.{m.arch}().load_state_dict(..., strict=False)"
    info = Path(f"{path}.json")
    info.write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "out": str(path), "info": str(info), "tensors": len(state)}


def _classifier_load_line(path: Path, format: str, kwargs: dict[str, Any]) -> str:
    """One line of Python that rebuilds the exported classifier and loads the file into it, strictly."""
    imports, read = _read_expression(path, format)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (
        f"{imports}; from fastclr.models import SimCLRClassifier; model = SimCLRClassifier({args}); "
        f"model.load_state_dict({read})"
    )


def export_classifier(
    ckpt: str | Path, out: str | Path, format: str | None = None, with_head: int | None = None
) -> dict[str, Any]:
    """Write ``backbone + head[:K] (+ classifier)`` of a checkpoint as a plain ``state_dict``, and ``<out>.json``.

    A fine-tuning or distillation checkpoint exports its whole classifier (``with_head`` None, or the number of
    head layers it keeps); a pretraining checkpoint exports its backbone and first ``with_head`` head layers, an
    encoder without classifier. The JSON's ``load`` line rebuilds the module with
    :class:`~fastclr.models.SimCLRClassifier` and loads the file strictly.
    """
    import json

    from fastclr.models import SimCLRClassifier

    format = export_format(out, format)
    raw = load_checkpoint(ckpt)
    kind = stage_config_type(raw["config"])
    if kind is not None:
        model, cfg = load_classifier(ckpt)
        if with_head is not None and with_head != cfg.head_layers:
            raise ValueError(
                f"--with-head {with_head}: {ckpt} is a {kind.section} checkpoint whose classifier sits on "
                f"{cfg.head_layers} projection-head layer(s); leave out --with-head (or give {cfg.head_layers})"
            )
        m, k, num_classes, classes = cfg.model, cfg.head_layers, len(cfg.classes), cfg.classes
    else:
        cfg = PretrainConfig.from_dict(raw["config"])
        simclr = simclr_model(cfg.model)
        simclr.load_state_dict(raw["model"])
        m, k, num_classes, classes = cfg.model, with_head, None, None
        model = SimCLRClassifier.from_pretrained(simclr, k, None)  # checks 0 <= k <= depth
    kwargs = dict(
        arch=m.arch,
        num_classes=num_classes,
        cifar_stem=m.cifar_stem,
        width=m.width,
        head_layers=k,
        proj_layers=m.proj_layers,
        proj_hidden=m.proj_hidden,
        proj_dim=m.proj_dim,
    )
    state = {key: v.detach().contiguous() for key, v in model.state_dict().items()}
    meta: dict[str, Any] = {**kwargs, "feat_dim": model.feat_dim, "classes": classes}
    if format == "safetensors":
        import safetensors.torch

        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(
            state, path, metadata={key: json.dumps(v) for key, v in meta.items()}
        )
    else:
        path = atomic_save(state, out)
    path = path.resolve()
    meta["format"] = format
    meta["load"] = _classifier_load_line(path, format, kwargs)
    info = Path(f"{path}.json")
    info.write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "out": str(path), "info": str(info), "tensors": len(state)}

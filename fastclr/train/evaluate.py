"""Evaluating and exporting trained encoders: kNN and linear evaluation of a checkpoint, backbone export.

    fastclr knn --ckpt runs/cpu-demo/checkpoints/ckpt-000000090.pt
    fastclr linear --ckpt CKPT --data cifar10/train --test-data cifar10/test --epochs 10
    fastclr export --ckpt CKPT --out resnet50-simclr.pt   # prints (and writes to resnet50-simclr.pt.json) how to load it
    fastclr export --ckpt CKPT --out resnet50-simclr.safetensors

``--data``/``--test-data`` default to the folders the checkpoint was trained and monitored on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastclr.device import resolve_device
from fastclr.train.build import simclr_model, unlabelled_data_hint
from fastclr.train.checkpoint import TrainCheckpoint, atomic_save
from fastclr.train.config import ConfigError, PretrainConfig


def load_model(path: str | Path, device: torch.device | str = "cpu"):
    """``(SimCLRModel with the checkpoint's weights, in eval mode, its PretrainConfig)``."""
    ckpt = TrainCheckpoint.load(path)
    model = simclr_model(ckpt.config.model)
    # SyncBatchNorm (multi-GPU runs) and BatchNorm share parameter and buffer names, so either checkpoint loads.
    model.load_state_dict(ckpt.model)
    return model.to(device, memory_format=torch.channels_last).eval(), ckpt.config


def _data_paths(
    cfg: PretrainConfig, data: str | None, test_data: str | None, evaluation: str
) -> tuple[str, str]:
    """The labelled ``(--data, --test-data)`` folders to evaluate on; a clear error for a missing or flat one."""
    from fastclr.pipelines.data import scan_images

    train = data or cfg.data.data
    test = test_data or cfg.data.test_data
    if train is None or test is None:
        raise ValueError(
            "no data: give --data and --test-data (the checkpoint does not name its folders)"
        )
    for flag, p, given in (("--data", train, data), ("--test-data", test, test_data)):
        if not Path(p).exists():
            raise FileNotFoundError(f"{flag} {p}: no such file or directory")
        # A run may pretrain on a flat folder; evaluation needs its labels (a listing with header checks, no decoding).
        if not scan_images(p, on_corrupt="skip").labelled:
            default = "" if given else " (the checkpoint's; it was pretrained on unlabelled images)"
            raise ConfigError(
                f"{evaluation} evaluation needs labelled images, but {unlabelled_data_hint(flag, p)}{default}"
            )
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
):
    from fastclr.pipelines import make_loader

    return make_loader(
        backend=backend,
        eval=True,
        root=root,
        batch_size=batch_size,
        size=size or cfg.data.size,
        device="gpu" if device.type == "cuda" else "cpu",
        num_threads=workers,
        augment=augment,
        seed=cfg.run.seed,
    )


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
) -> dict[str, Any]:
    """kNN top-1 of a checkpoint's backbone: training images as the memory bank, test images as queries."""
    from fastclr.eval import extract_features, knn_accuracy

    dev = resolve_device(device)
    model, cfg = load_model(ckpt, dev)
    train, test = _data_paths(cfg, data, test_data, "kNN")
    opts = dict(batch_size=batch_size, size=size, workers=workers, backend=backend)
    with (
        _eval_loader(train, cfg, dev, **opts) as bank,
        _eval_loader(test, cfg, dev, **opts) as queries,
    ):
        if list(bank.classes) != list(queries.classes):
            raise ValueError(f"{train} and {test} have different class folders")
        bank_f, bank_y = extract_features(model.backbone, bank, dev)
        test_f, test_y = extract_features(model.backbone, queries, dev)
        top1 = knn_accuracy(
            bank_f,
            bank_y,
            test_f,
            test_y,
            k=k,
            temperature=temperature,
            num_classes=len(bank.classes),
        )
    return {
        "knn_top1": top1,
        "k": k,
        "train": train,
        "test": test,
        "train_images": len(bank_y),
        "test_images": len(test_y),
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
) -> dict[str, Any]:
    """Linear evaluation (frozen backbone, crop+flip only) of a checkpoint; returns top-1/top-5 on the test images."""
    from fastclr.eval import linear_eval

    if epochs <= 0 or not lr > 0:
        raise ValueError(f"epochs and lr must be positive, got epochs={epochs}, lr={lr}")
    dev = resolve_device(device)
    model, cfg = load_model(ckpt, dev)
    train, test = _data_paths(cfg, data, test_data, "linear")
    opts = dict(batch_size=batch_size, size=size, workers=workers, backend=backend)
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
            progress=progress,
        )
    return {**result, "train": train, "test": test}


EXPORT_FORMATS = ("pt", "safetensors")


def export_format(out: str | Path, format: str | None = None) -> str:
    """``format``, or the one ``out``'s suffix names (``.safetensors``; anything else is a ``torch.save`` file)."""
    if format is None:
        return "safetensors" if Path(out).suffix == ".safetensors" else "pt"
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    return format


def load_line(path: Path, format: str, arch: str, cifar_stem: bool, width: int) -> str:
    """One line of Python that rebuilds the backbone and loads an exported file into it, strictly."""
    read = (
        f"safetensors.torch.load_file({str(path)!r})"
        if format == "safetensors"
        else f"torch.load({str(path)!r}, weights_only=True)"
    )
    imports = "import safetensors.torch" if format == "safetensors" else "import torch"
    return (
        f"{imports}; from fastclr.models import build_backbone; "
        f"backbone, feat_dim = build_backbone({arch!r}, cifar_stem={cifar_stem}, width={width}); "
        f"backbone.load_state_dict({read})"
    )


def export_backbone(ckpt: str | Path, out: str | Path, format: str | None = None) -> dict[str, Any]:
    """Write the backbone of a checkpoint as a plain ``state_dict`` and, beside it, ``<out>.json`` saying how to load it.

    The tensors keep torchvision's key names (contiguous, no ``fc``). ``format`` is ``"pt"`` (``torch.save``) or
    ``"safetensors"``; None picks by the suffix of ``out``. A standard-width ResNet without the CIFAR stem also loads
    into torchvision's model with ``strict=False``, which forgives only the missing ``fc`` keys: a CIFAR stem, another
    width or cnn7 has other shapes, which no ``load_state_dict`` forgives, so ``load`` (also in the JSON) rebuilds the
    backbone with :func:`fastclr.models.build_backbone` first.
    """
    import json

    from fastclr.models import standard_width

    format = export_format(out, format)
    model, cfg = load_model(ckpt)
    m = cfg.model
    width = m.width or standard_width(m.arch)
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
    meta["load"] = load_line(path, format, m.arch, m.cifar_stem, width)
    if m.arch != "cnn7" and not m.cifar_stem and width == standard_width(m.arch):
        meta["torchvision"] = f"torchvision.models.{m.arch}().load_state_dict(..., strict=False)"
    info = Path(f"{path}.json")
    info.write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "out": str(path), "info": str(info), "tensors": len(state)}

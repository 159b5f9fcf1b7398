"""Evaluating and exporting trained encoders: kNN and linear evaluation of a checkpoint, backbone export.

    fastclr knn --ckpt runs/cpu-demo/checkpoints/ckpt-000000090.pt
    fastclr linear --ckpt CKPT --data cifar10/train --test-data cifar10/test --epochs 10
    fastclr export --ckpt CKPT --out resnet50-simclr.pt   # torchvision.models.resnet50().load_state_dict(..., strict=False)

``--data``/``--test-data`` default to the folders the checkpoint was trained and monitored on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastclr.device import resolve_device
from fastclr.train.build import simclr_model
from fastclr.train.checkpoint import TrainCheckpoint, atomic_save
from fastclr.train.config import PretrainConfig


def load_model(path: str | Path, device: torch.device | str = "cpu"):
    """``(SimCLRModel with the checkpoint's weights, in eval mode, its PretrainConfig)``."""
    ckpt = TrainCheckpoint.load(path)
    model = simclr_model(ckpt.config.model)
    # SyncBatchNorm (multi-GPU runs) and BatchNorm share parameter and buffer names, so either checkpoint loads.
    model.load_state_dict(ckpt.model)
    return model.to(device, memory_format=torch.channels_last).eval(), ckpt.config


def _data_paths(cfg: PretrainConfig, data: str | None, test_data: str | None) -> tuple[str, str]:
    train = data or cfg.data.data
    test = test_data or cfg.data.test_data
    if train is None or test is None:
        raise ValueError(
            "no data: give --data and --test-data (the checkpoint does not name its folders)"
        )
    for flag, p in (("--data", train), ("--test-data", test)):
        if not Path(p).exists():
            raise FileNotFoundError(f"{flag} {p}: no such file or directory")
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
    train, test = _data_paths(cfg, data, test_data)
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
    train, test = _data_paths(cfg, data, test_data)
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


def export_backbone(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the backbone of a checkpoint as a plain ``state_dict`` (torchvision key names, contiguous tensors)."""
    model, cfg = load_model(ckpt)
    state = {k: v.detach().contiguous() for k, v in model.backbone.state_dict().items()}
    path = atomic_save(state, out)
    return {
        "out": str(path),
        "arch": cfg.model.arch,
        "tensors": len(state),
        "feat_dim": model.feat_dim,
    }

"""fastclr.pipelines: SimCLR input pipelines (NVIDIA DALI) and their torchvision twins.

>>> from fastclr.pipelines import make_loader
>>> loader = make_loader(root="data/train", batch_size=256, size=224, device="auto")
>>> for view_a, view_b in loader:  # (256, 3, 224, 224) each, channels_last
...     ...

``root`` may name tar shards (``data/train-{000000..000127}.tar``, or a folder written by
:func:`write_shards` / ``fastclr shards``): see ``shards.py``.

Both backends take one augmentation spec (:class:`SimCLRAugment`, ``augment.py``) and one
:class:`LoaderOptions` (``options.py``), read the same files in the same order (``data.py``) and
share the epoch, shard and resume logic (``base.py``); they differ only where the backend does:
``dali/`` (:class:`SimCLRLoader`, :class:`EvalLoader`) and ``torchvision/``
(:class:`TorchSimCLRLoader`, :class:`TorchEvalLoader`).

DALI is imported only when a DALI pipeline is built, so this package imports without it.
"""

from __future__ import annotations

from fastclr.pipelines.augment import SimCLRAugment
from fastclr.pipelines.dali import EvalLoader, SimCLRLoader, dali_available
from fastclr.pipelines.data import IMAGENET_MEAN, IMAGENET_STD, list_images
from fastclr.pipelines.images import CorruptImageError, UnlabelledDataError
from fastclr.pipelines.options import LoaderOptions
from fastclr.pipelines.shard_writer import write_shards
from fastclr.pipelines.torchvision import (
    EvalTransform,
    SimCLRTransform,
    TorchEvalLoader,
    TorchSimCLRLoader,
)

BACKENDS = ("auto", "dali", "torch")

__all__ = [
    "BACKENDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptImageError",
    "EvalLoader",
    "EvalTransform",
    "LoaderOptions",
    "SimCLRAugment",
    "SimCLRLoader",
    "SimCLRTransform",
    "TorchEvalLoader",
    "TorchSimCLRLoader",
    "UnlabelledDataError",
    "dali_available",
    "list_images",
    "make_loader",
    "write_shards",
]


def make_loader(backend: str = "auto", eval: bool = False, **kwargs):
    """Build a SimCLR (or, with ``eval=True``, an evaluation) loader.

    Args:
        backend: ``"dali"``, ``"torch"`` (the torchvision twin) or ``"auto"`` (DALI when it can be
            imported, else torchvision).
        eval: build :class:`EvalLoader` / :class:`TorchEvalLoader` instead of the SimCLR loader.
        **kwargs: the loader's arguments (``root``, ``batch_size``, ``size``, ...).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    elif backend == "dali" and not dali_available():
        raise ImportError("backend='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130)")
    if backend == "dali":
        return EvalLoader(**kwargs) if eval else SimCLRLoader(**kwargs)
    return TorchEvalLoader(**kwargs) if eval else TorchSimCLRLoader(**kwargs)

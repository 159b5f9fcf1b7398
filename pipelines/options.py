"""The loader options: one dataclass both backends take, validated once from the loaders' keywords.

Every loader is built as ``Loader(root, batch_size, size=224, **options)``. ``options`` are the
fields of :class:`LoaderOptions` and, for the SimCLR loaders, those of
:class:`~fastclr.pipelines.augment.SimCLRAugment` (the evaluation loaders take ``augment: bool``
instead and always keep the last batch). :func:`simclr_options` and :func:`eval_options` split
them into the two objects; a keyword that is neither is a ``TypeError`` naming the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from fastclr.pipelines.augment import SimCLRAugment, eval_augment
from fastclr.pipelines.data import IMAGENET_MEAN, IMAGENET_STD

OUTPUT_DTYPES = (torch.float32, torch.float16)


def check_output(dtype, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validate the output dtype and normalisation constants (3 channels each)."""
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float16, got {dtype!r}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


@dataclass(frozen=True)
class LoaderOptions:
    """Where and how a loader reads its shard, decodes and emits batches (DALI and torchvision alike).

    Attributes:
        device: ``"cpu"`` (no GPU needed), ``"gpu"`` (DALI decodes with nvJPEG and augments on the
            GPU; batches on CUDA) or ``"auto"`` (gpu when CUDA is available); resolved by
            :func:`fastclr.device.resolve_device`, so ``"cuda"`` and a ``torch.device`` work too.
        device_id: CUDA device for ``"gpu"`` (default: the current one); ignored on CPU.
        num_threads: DALI CPU worker threads (>= 1), or the twins' DataLoader worker processes
            (0 = the main process).
        seed: base seed; shuffle and augmentation depend only on ``(seed, epoch, shard_id)``.
        shard_id, num_shards: this rank's slice of every epoch (DDP).
        last_batch: ``"drop"`` (default), ``"pad"`` or ``"keep"``; see :mod:`fastclr.pipelines.data`.
            The evaluation loaders always keep it.
        dtype: ``torch.float32`` or ``torch.float16``.
        normalize: ``(x - mean) / std`` if True, else values in [0, 1].
        mean, std: per-channel (RGB) constants of the normalisation.
        on_corrupt: ``"error"`` raises :class:`~fastclr.pipelines.images.CorruptImageError` naming
            the file, at construction for files failing the up-front check and during iteration
            for a file only the decoder rejects. ``"skip"`` leaves the former out and skips the
            latter from its first failure on (a warning; the next file is read in its slot, so
            ``len()`` is unchanged); both are counted in the loader's ``num_skipped``.
    """

    device: str | torch.device = "cpu"
    device_id: int | None = None
    num_threads: int = 2
    seed: int = 0
    shard_id: int = 0
    num_shards: int = 1
    last_batch: str = "drop"
    dtype: torch.dtype = torch.float32
    normalize: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    on_corrupt: str = "error"

    def __post_init__(self):
        mean, std = check_output(self.dtype, self.mean, self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "seed", int(self.seed))


OPTION_NAMES = tuple(f.name for f in fields(LoaderOptions))
AUGMENT_NAMES = tuple(f.name for f in fields(SimCLRAugment) if f.name != "size")
# The evaluation loaders read every image of the shard once: the last batch is always kept.
EVAL_OPTION_NAMES = tuple(name for name in OPTION_NAMES if name != "last_batch")


def _pick(owner: str, options: dict, *groups: tuple[str, ...]) -> list[dict]:
    """``options`` split by name into one dict per group; a name in no group is a TypeError."""
    unknown = set(options).difference(*groups)
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {min(unknown)!r}")
    return [{name: options[name] for name in group if name in options} for group in groups]


def simclr_options(owner: str, size: int, options: dict) -> tuple[SimCLRAugment, LoaderOptions]:
    """A SimCLR loader's keyword arguments -> its augmentation spec and loader options."""
    augment, loader = _pick(owner, options, AUGMENT_NAMES, OPTION_NAMES)
    return SimCLRAugment(size, **augment), LoaderOptions(**loader)


def eval_options(
    owner: str, size: int, augment: bool, options: dict
) -> tuple[SimCLRAugment | None, LoaderOptions]:
    """An evaluation loader's keyword arguments -> its view's spec (None: centre crop) and options."""
    (loader,) = _pick(owner, options, EVAL_OPTION_NAMES)
    return eval_augment(size, augment), LoaderOptions(**loader, last_batch="keep")

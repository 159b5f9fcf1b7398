"""torchvision twins of the DALI loaders: same signatures, augmentation semantics and outputs.

Used where DALI is absent and as the baseline of ``bench/bench_pipeline.py``. Images are decoded
with PIL and augmented with ``torchvision.transforms`` in ``num_threads`` DataLoader worker
processes (0 = in the main process).

Determinism: each sample's transform runs under a torch seed drawn from
``(seed, epoch, shard_id)`` and the sample's position in the epoch, so results do not depend on
the number of workers and ``set_epoch(e, skip_batches=k)`` replays the tail of epoch ``e`` exactly
without decoding the skipped batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from fastclr.pipelines.augment import (
    SOLARIZE_THRESHOLD,
    SimCLRAugment,
    check_output,
    check_size,
    eval_resize_size,
)
from fastclr.pipelines.base import EpochLoader, next_decodable
from fastclr.pipelines.data import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError
from fastclr.pipelines.eval import EVAL_CROP_RATIO, EVAL_CROP_SCALE


def _maybe(p: float, transform) -> list:
    """``transform`` applied with probability ``p``; nothing at all when ``p == 0``."""
    if p <= 0:
        return []
    return [transform if p >= 1 else T.RandomApply([transform], p=p)]


def _to_tensor(normalize: bool, mean, std) -> list:
    tail = [T.ToTensor()]
    return [*tail, T.Normalize(mean, std)] if normalize else tail


class SimCLRTransform:
    """Map a PIL image to two independently augmented SimCLR views.

    Args:
        size: output side in pixels.
        crop_scale, crop_ratio, flip_p, color_strength, color_p, gray_p, blur_p, blur_sigma,
            solarize_p: see :class:`~fastclr.pipelines.augment.SimCLRAugment`.
        normalize, mean, std: ``(x - mean) / std`` if ``normalize``, else values in [0, 1].

    Returns (on call):
        ``(view_a, view_b)``, float32 tensors of shape ``(3, size, size)``.
    """

    def __init__(
        self,
        size: int = 224,
        *,
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        flip_p: float = 0.5,
        color_strength: float = 1.0,
        color_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float | None = None,
        blur_sigma=(0.1, 2.0),
        solarize_p: float = 0.0,
        normalize: bool = True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        aug = self.augment = SimCLRAugment(
            size,
            crop_scale=crop_scale,
            crop_ratio=crop_ratio,
            flip_p=flip_p,
            color_strength=color_strength,
            color_p=color_p,
            gray_p=gray_p,
            blur_p=blur_p,
            blur_sigma=blur_sigma,
            solarize_p=solarize_p,
        )
        mean, std = check_output(torch.float32, mean, std)
        # ColorJitter draws its four factors and a random order of the four ops per call.
        jitter = T.ColorJitter(*aug.jitter) if aug.color_active else None
        self.view = T.Compose(
            [
                T.RandomResizedCrop(size, scale=aug.crop_scale, ratio=aug.crop_ratio),
                *_maybe(aug.flip_p, T.RandomHorizontalFlip(p=1.0)),
                *(_maybe(aug.color_p, jitter) if jitter else []),
                *_maybe(aug.gray_p, T.Grayscale(num_output_channels=3)),
                *_maybe(aug.blur_p, T.GaussianBlur(aug.blur_kernel, sigma=aug.blur_sigma)),
                *_maybe(aug.solarize_p, T.RandomSolarize(SOLARIZE_THRESHOLD, p=1.0)),
                *_to_tensor(normalize, mean, std),
            ]
        )

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(image), self.view(image)


class EvalTransform:
    """Evaluation view of a PIL image: resize + centre crop, or crop + flip with ``augment``."""

    def __init__(
        self,
        size: int = 224,
        *,
        augment: bool = False,
        normalize: bool = True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        check_size(size)
        mean, std = check_output(torch.float32, mean, std)
        if augment:
            head = [
                T.RandomResizedCrop(size, scale=EVAL_CROP_SCALE, ratio=EVAL_CROP_RATIO),
                T.RandomHorizontalFlip(),
            ]
        else:
            head = [T.Resize(eval_resize_size(size)), T.CenterCrop(size)]
        self.view = T.Compose([*head, *_to_tensor(normalize, mean, std)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.view(image)


def load_rgb(path: str) -> Image.Image:
    """Decode an image file to RGB; a decoding failure raises CorruptImageError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"cannot decode image {path}: {e}", path=path, reason=str(e)) from e


class _EpochDataset(Dataset):
    """Samples of one epoch, in order; sample ``i`` is transformed under ``seeds[i]``.

    A sample is ``(payload, failed)``: ``failed`` lists the ``(index, reason)`` of files that failed to decode on
    the way (only with ``skip``, where the next file not in ``bad`` is read in their place).
    """

    def __init__(
        self, files, labels, indices, seeds, transform, with_labels: bool, skip: bool, bad
    ):
        self.files, self.labels = files, labels
        self.indices, self.seeds = indices, seeds
        self.transform, self.with_labels = transform, with_labels
        self.skip, self.bad = skip, set(bad)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index, failed = int(self.indices[i]), []
        while True:
            try:
                image = load_rgb(self.files[index])
                break
            except CorruptImageError as e:
                if not self.skip:
                    raise
                failed.append((index, e.reason))
                self.bad.add(index)
                index = next_decodable(index, self.bad, len(self.files), "the data set")
        # fork_rng keeps the caller's global RNG intact when running in the main process;
        # seeding only the CPU generator skips torch.manual_seed's ~0.2 ms accelerator checks.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(self.seeds[i]))
            out = self.transform(image)
        return ((out, self.labels[index]) if self.with_labels else out), failed


def _stack(images, dtype: torch.dtype) -> torch.Tensor:
    """(3, H, W) tensors -> one (B, 3, H, W) channels_last tensor of ``dtype``."""
    out = torch.empty((len(images), *images[0].shape), dtype=dtype)
    out = out.contiguous(memory_format=torch.channels_last)
    for dst, src in zip(out, images, strict=True):
        dst.copy_(src)
    return out


class _TorchLoader(EpochLoader):
    """Base of the twins; subclasses set ``transform`` and ``_with_labels``, define ``_collate``."""

    _with_labels = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, min_threads=0, **kwargs)

    def _collate(self, samples):
        raise NotImplementedError

    def _collate_noting_failures(self, samples):
        """(batch, the (index, reason) of every file that failed to decode on the way to it)."""
        return self._collate([payload for payload, _ in samples]), [
            f for _, fs in samples for f in fs
        ]

    def _batches(self, epoch: int, indices: np.ndarray, skip: int, real: int) -> Iterator:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.shard_id]))
        seeds = rng.integers(0, 2**63 - 1, size=len(indices), dtype=np.int64)
        start = skip * self.batch_size
        data = _EpochDataset(
            self.files,
            self.labels,
            self._stand_ins(indices[start:real]),
            seeds[start:real],
            self.transform,
            with_labels=self._with_labels,
            skip=self.on_corrupt == "skip",
            bad=self._undecodable,
        )
        loader = DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_threads,
            collate_fn=self._collate_noting_failures,
            pin_memory=self.device == "gpu",
        )
        for batch, failed in loader:
            for index, reason in failed:
                self._skip_undecodable(index, reason)
            if self.device == "gpu":
                batch = tuple(t.to(f"cuda:{self.device_id}", non_blocking=True) for t in batch)
            yield batch


class TorchSimCLRLoader(_TorchLoader):
    """torchvision twin of :class:`~fastclr.pipelines.simclr.SimCLRLoader` (same arguments;
    ``num_threads`` is the number of DataLoader worker processes, 0 = main process)."""

    def __init__(
        self,
        root,
        batch_size: int,
        size: int = 224,
        *,
        device: str = "cpu",
        device_id: int | None = None,
        num_threads: int = 2,
        seed: int = 0,
        shard_id: int = 0,
        num_shards: int = 1,
        last_batch: str = "drop",
        dtype: torch.dtype = torch.float32,
        normalize: bool = True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        flip_p: float = 0.5,
        color_strength: float = 1.0,
        color_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float | None = None,
        blur_sigma=(0.1, 2.0),
        solarize_p: float = 0.0,
        on_corrupt: str = "error",
    ):
        self.transform = SimCLRTransform(
            size,
            crop_scale=crop_scale,
            crop_ratio=crop_ratio,
            flip_p=flip_p,
            color_strength=color_strength,
            color_p=color_p,
            gray_p=gray_p,
            blur_p=blur_p,
            blur_sigma=blur_sigma,
            solarize_p=solarize_p,
            normalize=normalize,
            mean=mean,
            std=std,
        )
        self.augment = self.transform.augment
        super().__init__(
            root,
            batch_size,
            size,
            device=device,
            device_id=device_id,
            num_threads=num_threads,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            last_batch=last_batch,
            dtype=dtype,
            normalize=normalize,
            mean=mean,
            std=std,
            on_corrupt=on_corrupt,
            shuffle=True,
        )

    def _collate(self, samples):
        views_a, views_b = zip(*samples, strict=True)
        return _stack(views_a, self.dtype), _stack(views_b, self.dtype)


class TorchEvalLoader(_TorchLoader):
    """torchvision twin of :class:`~fastclr.pipelines.eval.EvalLoader` (same arguments)."""

    _with_labels = True

    def __init__(
        self,
        root,
        batch_size: int,
        size: int = 224,
        *,
        device: str = "cpu",
        device_id: int | None = None,
        num_threads: int = 2,
        shard_id: int = 0,
        num_shards: int = 1,
        dtype: torch.dtype = torch.float32,
        normalize: bool = True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment: bool = False,
        seed: int = 0,
        on_corrupt: str = "error",
    ):
        self.augment = bool(augment)
        self.transform = EvalTransform(
            size, augment=self.augment, normalize=normalize, mean=mean, std=std
        )
        super().__init__(
            root,
            batch_size,
            size,
            device=device,
            device_id=device_id,
            num_threads=num_threads,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            last_batch="keep",
            dtype=dtype,
            normalize=normalize,
            mean=mean,
            std=std,
            on_corrupt=on_corrupt,
            shuffle=self.augment,
        )

    def _collate(self, samples):
        images, labels = zip(*samples, strict=True)
        return _stack(images, self.dtype), torch.tensor(labels, dtype=torch.int64)

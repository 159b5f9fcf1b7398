"""The torchvision backend: twins of the DALI loaders with the same arguments, augmentation
semantics and outputs.

Used where DALI is absent and as the baseline of ``bench/bench_pipeline.py``. Images are decoded
with PIL and augmented with ``torchvision.transforms``
(:func:`~fastclr.pipelines.torchvision.transforms.view_transform`) in ``num_threads``
DataLoader worker processes (0 = in the main process). Samples in tar shards are read at their
offsets (:class:`~fastclr.pipelines.shards.ShardIndex`) and decoded from memory.

Determinism: each sample's transform runs under a torch seed drawn from
``(seed, epoch, shard_id)`` and the sample's position in the epoch, so results do not depend on
the number of workers and ``set_epoch(e, skip_batches=k)`` replays the tail of epoch ``e`` exactly
without decoding the skipped batches.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastclr.pipelines.base import EpochLoader, next_decodable
from fastclr.pipelines.images import CorruptImageError
from fastclr.pipelines.options import eval_options, simclr_options
from fastclr.pipelines.torchvision.transforms import TwoViews, view_transform


def load_rgb(path: str, data: bytes | None = None) -> Image.Image:
    """Decode an image file, or the encoded bytes ``data`` of the sample named ``path``, to RGB; a decoding failure
    raises CorruptImageError naming it."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"cannot decode image {path}: {e}", path=path, reason=str(e)) from e


class _EpochDataset(Dataset):
    """Samples of one epoch, in order; sample ``i`` is transformed under ``seeds[i]``.

    A sample is ``(payload, failed)``: ``failed`` lists the ``(index, reason)`` of files that failed to decode on
    the way (only with ``skip``, where the next file not in ``bad`` is read in their place).
    """

    def __init__(
        self, files, labels, indices, seeds, transform, with_labels: bool, skip: bool, bad, shards
    ):
        self.files, self.labels, self.shards = files, labels, shards
        self.indices, self.seeds = indices, seeds
        self.transform, self.with_labels = transform, with_labels
        self.skip, self.bad = skip, set(bad)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index, failed = int(self.indices[i]), []
        while True:
            try:
                path = self.files[index]
                image = load_rgb(path, None if self.shards is None else self.shards.read(index))
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


class TorchLoader(EpochLoader):
    """Base of the twins; subclasses set ``transform`` (and ``yields_labels``), define ``_collate``."""

    min_threads = 0  # the DataLoader can decode in the main process

    def _view(self):
        """The transform of one view: :func:`view_transform` of this loader's spec and options."""
        return view_transform(self.augment, self.size, self.options)

    def _collate(self, samples):
        raise NotImplementedError

    def _collate_noting_failures(self, samples):
        """(batch, the (index, reason) of every file that failed to decode on the way to it)."""
        return self._collate([payload for payload, _ in samples]), [
            f for _, fs in samples for f in fs
        ]

    def _batches(self, epoch: int, indices: np.ndarray, skip: int, real: int) -> Iterator:
        o = self.options
        rng = np.random.default_rng(np.random.SeedSequence([o.seed, epoch, o.shard_id]))
        seeds = rng.integers(0, 2**63 - 1, size=len(indices), dtype=np.int64)
        start = skip * self.batch_size
        data = _EpochDataset(
            self.files,
            self.labels,
            self._stand_ins(indices[start:real]),
            seeds[start:real],
            self.transform,
            with_labels=self.yields_labels,
            skip=o.on_corrupt == "skip",
            bad=self._undecodable,
            shards=self.shards,
        )
        loader = DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=o.num_threads,
            collate_fn=self._collate_noting_failures,
            pin_memory=self.device.type == "cuda",
        )
        for batch, failed in loader:
            for index, reason in failed:
                self._skip_undecodable(index, reason)
            if self.device.type == "cuda":
                batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
            yield batch


class TorchSimCLRLoader(TorchLoader):
    """torchvision twin of :class:`~fastclr.pipelines.dali.SimCLRLoader`: the same arguments (``labels`` too) but
    ``augment_impl`` (``num_threads`` is the number of DataLoader worker processes, 0 = main process)."""

    def __init__(self, root, batch_size: int, size: int = 224, *, labels: bool = False, **options):
        if not isinstance(labels, bool):
            raise ValueError(f"labels must be a bool, got {labels!r}")
        augment, opts = simclr_options(type(self).__name__, size, options)
        if labels:  # before the base checks the data: a flat folder of images is then refused
            self.yields_labels, self.labels_for = True, "labelled pairs (labels=True)"
        super().__init__(root, batch_size, size, opts, augment)
        self.transform = TwoViews(self._view())

    def _collate(self, samples):
        if self.yields_labels:
            pairs, labels = zip(*samples, strict=True)
        else:
            pairs = samples
        views_a, views_b = zip(*pairs, strict=True)
        views = _stack(views_a, self.options.dtype), _stack(views_b, self.options.dtype)
        if not self.yields_labels:
            return views
        return *views, torch.tensor(labels, dtype=torch.int64)


class TorchEvalLoader(TorchLoader):
    """torchvision twin of :class:`~fastclr.pipelines.dali.EvalLoader` (the same arguments)."""

    yields_labels = True

    def __init__(self, root, batch_size: int, size: int = 224, *, augment=False, **options):
        augment, opts = eval_options(type(self).__name__, size, augment, options)
        super().__init__(root, batch_size, size, opts, augment)
        self.transform = self._view()

    def _collate(self, samples):
        images, labels = zip(*samples, strict=True)
        return _stack(images, self.options.dtype), torch.tensor(labels, dtype=torch.int64)

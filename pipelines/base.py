"""Loader behaviour shared by the DALI loaders and their torchvision twins.

A loader lists and validates its data set once, then serves epochs: the order of epoch ``e`` is
:func:`~fastclr.pipelines.data.epoch_indices` and its augmentation randomness depends only on
``(seed, e, shard_id)``, so an epoch can be replayed, or resumed at any batch, exactly.
Iterating runs epoch ``self.epoch`` and, when it completes, advances ``self.epoch`` by one;
:meth:`EpochLoader.set_epoch` chooses the epoch (and leading batches to skip) explicitly. An
iteration abandoned part-way leaves ``self.epoch`` unchanged.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator

import numpy as np

from fastclr.device import resolve_device
from fastclr.pipelines.augment import SimCLRAugment, check_size
from fastclr.pipelines.data import (
    check_sharding,
    epoch_indices,
    num_batches,
    scan_images,
    shard_size,
)
from fastclr.pipelines.images import CorruptImageError, UnlabelledDataError, decode_error
from fastclr.pipelines.options import OPTION_NAMES, LoaderOptions


def next_decodable(index: int, bad, count: int, root) -> int:
    """The first index after ``index`` (cyclically, among ``count`` files) not in ``bad``: the stand-in of a file
    the decoder rejected."""
    for step in range(1, count + 1):
        candidate = (index + step) % count
        if candidate not in bad:
            return candidate
    raise ValueError(f"no decodable images in {root}: all {count} files failed to decode")


class EpochLoader:
    """Base of all loaders; subclasses implement ``_batches(epoch, indices, skip, real)``.

    ``options`` (a :class:`~fastclr.pipelines.options.LoaderOptions`) are also readable as attributes
    (``loader.seed``, ``loader.dtype``, ...); ``device`` is the resolved ``torch.device`` and
    ``augment`` the view's :class:`~fastclr.pipelines.augment.SimCLRAugment` (None: the evaluation
    loaders' resize + centre crop). ``labelled`` is False for a flat folder of unlabelled images
    (labels all 0, ``classes`` empty), which the loaders that yield labels refuse. ``root`` may also
    name tar shards (:mod:`~fastclr.pipelines.shards`): ``files`` then name the samples
    (``<shard>.tar:<member>``) and ``shards`` locates their bytes; everything else is the same.
    """

    min_threads = 1  # the fewest worker threads (or processes) the backend runs with
    yields_labels = False  # True: batches carry labels, so a flat folder of images is refused
    labels_for = "kNN and linear evaluation"  # who needs the labels, for that refusal

    def __init__(
        self,
        root,
        batch_size: int,
        size: int,
        options: LoaderOptions,
        augment: SimCLRAugment | None,
    ):
        self.size = check_size(size)
        self.options, self.augment = options, augment
        # Augmented views are read in a new order every epoch, the evaluation centre crop in a fixed one.
        self.shuffle = augment is not None
        num_threads = options.num_threads
        if not isinstance(num_threads, int) or num_threads < self.min_threads:
            raise ValueError(
                f"num_threads must be an int >= {self.min_threads}, got {num_threads!r}"
            )
        self.device = resolve_device(options.device, options.device_id)
        images = scan_images(root, options.on_corrupt)
        if self.yields_labels and not images.labelled:
            raise UnlabelledDataError(
                f"{type(self).__name__}: {root} is a flat folder of unlabelled images, but "
                f"{self.labels_for} need labelled data: an ImageFolder root/<class>/<image>"
            )
        check_sharding(
            len(images.files), batch_size, options.shard_id, options.num_shards, options.last_batch
        )
        self.root, self.batch_size = root, batch_size
        self.files, self.labels, self.classes = images.files, images.labels, images.classes
        self.labelled = images.labelled
        # None: the samples are image files; else they live in tar shards and are read from there (shards.py).
        self.shards = images.shards
        self.skipped = list(images.skipped)
        # Files that passed the up-front check but not the decoder (on_corrupt="skip"). The next file not in the set
        # is read in each one's slot, so that epoch lengths, shards and the positions of all other files stay put.
        self._undecodable: set[int] = set()
        self.epoch, self._skip = 0, 0

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: the options read as the loader's own attributes.
        options = self.__dict__.get("options")
        if options is not None and name in OPTION_NAMES:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def num_samples(self) -> int:
        """Images this shard reads per epoch (before dropping or padding to whole batches)."""
        o = self.options
        return shard_size(len(self.files), o.num_shards, o.shard_id, o.last_batch)

    @property
    def num_skipped(self) -> int:
        """Files left out by ``on_corrupt="skip"``; their paths and reasons are in ``skipped``.

        It counts the files the up-front check rejected and, as iteration finds them, those that only the decoder
        rejects (each one is skipped from its first failure on, with a warning; the next file in the list is read in
        its slot).
        """
        return len(self.skipped)

    def _skip_undecodable(self, index: int, reason: str) -> None:
        """Skip file ``index`` from now on (``on_corrupt="skip"``): it failed in the decoder for ``reason``."""
        if index in self._undecodable:
            return
        path = self.files[index]
        self._undecodable.add(index)
        self.skipped.append((path, f"cannot be decoded ({reason})"))
        warnings.warn(
            f"skipping undecodable image {path} ({reason}); {self.num_skipped} file(s) skipped so far",
            stacklevel=2,
        )

    def _decode_error(self, index: int) -> str | None:
        """Why PIL cannot decode sample ``index`` (slow: for diagnosing a decoder failure), or None."""
        if self.shards is None:
            return decode_error(self.files[index])
        try:
            return decode_error(io.BytesIO(self.shards.read(index)))
        except CorruptImageError as e:
            return e.reason

    def _stand_ins(self, indices: np.ndarray) -> np.ndarray:
        """``indices`` with every known undecodable file replaced by the file read in its slot."""
        out = indices.copy() if self._undecodable else indices
        for bad in self._undecodable:
            out[indices == bad] = next_decodable(bad, self._undecodable, len(self.files), self.root)
        return out

    def __len__(self) -> int:
        o = self.options
        return num_batches(len(self.files), self.batch_size, o.num_shards, o.shard_id, o.last_batch)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch the next iteration runs and how many of its first batches to skip.

        The same ``(seed, epoch, shard_id)`` always gives the same order and augmentations, so
        ``set_epoch(e, skip_batches=k)`` yields exactly batches ``k, k+1, ...`` of epoch ``e``
        (``len(loader)`` stays the full epoch's length). The DALI loaders reach batch ``k`` by
        running and discarding the first ``k`` batches; the twins skip them without decoding.
        """
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not isinstance(skip_batches, int) or not 0 <= skip_batches <= len(self):
            raise ValueError(f"skip_batches must be in [0, {len(self)}], got {skip_batches!r}")
        self.epoch, self._skip = epoch, skip_batches

    def epoch_files(self, epoch: int) -> list[str]:
        """Files in the order this shard reads them in ``epoch`` (without wrap-around padding)."""
        return [self.files[i] for i in self._indices(epoch)[: self._real_count()]]

    def _real_count(self) -> int:
        """Samples actually emitted per epoch: the "keep" tail is cut from the last batch."""
        keep = self.options.last_batch == "keep"
        return self.num_samples if keep else len(self) * self.batch_size

    def _indices(self, epoch: int) -> np.ndarray:
        return epoch_indices(
            len(self.files),
            self.batch_size,
            epoch=epoch,
            seed=self.options.seed,
            shard_id=self.options.shard_id,
            num_shards=self.options.num_shards,
            last_batch=self.options.last_batch,
            shuffle=self.shuffle,
        )

    def _batches(self, epoch: int, indices: np.ndarray, skip: int, real: int) -> Iterator:
        raise NotImplementedError

    def __iter__(self) -> Iterator:
        epoch, skip = self.epoch, self._skip
        self._skip = 0
        yield from self._batches(epoch, self._indices(epoch), skip, self._real_count())
        self.epoch = epoch + 1

    def close(self) -> None:
        """Release worker threads/processes and buffers; a later iteration starts afresh."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

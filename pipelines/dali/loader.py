"""The DALI backend's loaders: one pipeline per epoch, output conversion, decoder errors.

DALI is imported lazily (inside functions) so that importing ``fastclr.pipelines`` never needs it.

Determinism: every epoch builds a fresh pipeline that reads the files in the order of
:func:`~fastclr.pipelines.data.epoch_indices` and is seeded with
:func:`~fastclr.pipelines.data.augment_seed` ``(seed, epoch, shard_id)``. DALI draws per-sample
random numbers from generators tied to the sample's slot in the batch, so a rebuilt pipeline
replays an epoch exactly; resuming at batch ``k`` runs and discards the first ``k`` batches (the
augmentation random state after ``k`` batches cannot be reached any other way).

Image files are read by DALI's file reader; samples in tar shards by ``fn.external_source`` calling
:class:`ShardBatches`, which reads each batch's bytes at their offsets (why not DALI's webdataset
reader: :mod:`~fastclr.pipelines.shards`). The rest of the graph is the same.

Example:
    >>> with SimCLRLoader("data/train", batch_size=256, size=224, device="gpu") as loader:
    ...     for epoch in range(epochs):
    ...         loader.set_epoch(epoch)
    ...         for view_a, view_b in loader:  # each (256, 3, 224, 224), channels_last
    ...             ...
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch

from fastclr.pipelines.base import EpochLoader
from fastclr.pipelines.dali.graph import center_crop_view, normalize_args, simclr_view
from fastclr.pipelines.data import augment_seed
from fastclr.pipelines.images import CorruptImageError
from fastclr.pipelines.options import eval_options, simclr_options

# DALI's decoder errors name the file ("Failed to decode sample #3 : /path/x.jpg") or, when the
# stream cannot even be parsed, name none ("nvImageCodec failure: '#3'"; that number is not the
# sample's slot in the batch).
_DECODE_ERROR = re.compile(r"Failed to decode sample #\d+ : (.+?)\s*$", re.MULTILINE)
PREFETCH_DEPTH = 2
# Batches that may be in flight when run() fails: this one, the pipeline's prefetched ones and
# the one the file reader has read ahead.
_IN_FLIGHT = PREFETCH_DEPTH + 2


def dali_available() -> bool:
    """True when ``nvidia.dali`` can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


AUGMENT_IMPLS = ("auto", "numba", "dali")


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_augment_impl(impl: str, device: str | torch.device) -> str:
    """``"auto" | "numba" | "dali"`` and the pipeline's device -> the ops that run the view."""
    on_cpu = getattr(device, "type", device) == "cpu"  # a torch.device or a device word
    if impl == "auto":
        return "numba" if on_cpu and numba_available() else "dali"
    if impl == "numba" and not on_cpu:
        raise ValueError("augment_impl='numba' runs on the CPU only; use 'dali' on the GPU")
    if impl == "numba" and not numba_available():
        raise ImportError("augment_impl='numba' needs numba (pip install numba)")
    return impl


class ShardBatches:
    """``fn.external_source`` callbacks for samples in tar shards: iteration ``b`` is samples
    ``indices[bB:(b+1)B]`` (wrapping around past the end, as DALI's file reader does); :meth:`images` gives their
    encoded bytes as uint8 arrays, :meth:`labels_of` their labels as int32 arrays of shape (1,). Stateless, as DALI
    asks of such callbacks: prefetching calls them ahead. Two named sources rather than one with two outputs, so that
    the SimCLR graph, which reads no labels, has no unused output.

    A module-level class, so that DALI's conditionals (AutoGraph) leave its methods unconverted.
    """

    def __init__(self, shards, labels, indices: np.ndarray, batch_size: int):
        self.shards, self.indices, self.batch_size = shards, indices, batch_size
        self.labels = np.asarray(labels, dtype=np.int32)
        self.num_batches = len(indices) // batch_size

    def _batch(self, iteration: int) -> np.ndarray:
        b = iteration % self.num_batches
        return self.indices[b * self.batch_size : (b + 1) * self.batch_size]

    def images(self, iteration: int) -> list[np.ndarray]:
        return [
            np.frombuffer(self.shards.read(int(i)), dtype=np.uint8) for i in self._batch(iteration)
        ]

    def labels_of(self, iteration: int) -> list[np.ndarray]:
        return [self.labels[i : i + 1] for i in self._batch(iteration)]


class DaliLoader(EpochLoader):
    """Base of the DALI loaders; subclasses define ``_graph(jpegs, labels) -> tuple of nodes``
    and ``_emit(outputs, keep) -> batch``."""

    _pipe = None  # the pipeline of the epoch in progress

    def _graph(self, jpegs, labels) -> tuple:
        raise NotImplementedError

    def _output_args(self) -> dict:
        """The view graphs' placement and output keywords (``device``, ``dtype``, ``mean``, ``std``)."""
        o = self.options
        mean, std = normalize_args(o.normalize, o.mean, o.std)
        return dict(device=self.device, dtype=o.dtype, mean=mean, std=std)

    def _emit(self, outputs, keep: int):
        raise NotImplementedError

    def _build(self, epoch: int, indices: np.ndarray, start: int = 0):
        """The pipeline reading ``indices`` (epoch ``epoch`` from its batch ``start`` on)."""
        from nvidia.dali import pipeline_def

        @pipeline_def(enable_conditionals=True)
        def pipeline():
            return self._graph(*self._source(indices))

        pipe = pipeline(
            batch_size=self.batch_size,
            num_threads=self.options.num_threads,
            device_id=self.device.index,  # None on the CPU: DALI then needs no GPU
            # A rebuild part-way (after a file failed in the decoder) draws from its own stream.
            seed=augment_seed(
                self.options.seed, epoch, self.options.shard_id, *([start] if start else [])
            ),
            prefetch_queue_depth=PREFETCH_DEPTH,
        )
        pipe.build()
        return pipe

    def _source(self, indices: np.ndarray) -> tuple:
        """The graph's input nodes: encoded images and int32 labels of ``indices``, in order, batch by batch (and
        around again past the end). Image files go through DALI's file reader; samples in tar shards through
        ``fn.external_source`` fed by :class:`ShardBatches`."""
        from nvidia.dali import fn, types

        if self.shards is None:
            return fn.readers.file(
                files=[self.files[i] for i in indices],
                labels=[self.labels[i] for i in indices],
                random_shuffle=False,  # the order is ours: see epoch_indices
                name="reader",
            )
        batches = ShardBatches(self.shards, self.labels, indices, self.batch_size)
        jpegs = fn.external_source(
            source=batches.images, batch=True, dtype=types.UINT8, name="reader"
        )
        if not self.yields_labels:
            return jpegs, None
        labels = fn.external_source(
            source=batches.labels_of, batch=True, dtype=types.INT32, name="reader_labels"
        )
        return jpegs, labels

    def _run(self, pipe, batch: int, indices: np.ndarray):
        try:
            return pipe.run()
        except RuntimeError as e:
            # Only DALI's file reader tells the decoder a file name; shards' samples are found by decoding.
            match = _DECODE_ERROR.search(str(e)) if self.shards is None else None
            if match:
                path = match.group(1)
                raise CorruptImageError(
                    f"cannot decode image {path}", path=path, reason="DALI's decoder failed"
                ) from e
            culprit = self._find_undecodable(batch, indices)
            if culprit:
                path, reason = culprit
                raise CorruptImageError(
                    f"cannot decode image {path} ({reason})", path=path, reason=reason
                ) from e
            raise RuntimeError(f"DALI pipeline over {self.root} failed: {e}") from e

    def _find_undecodable(self, batch: int, indices: np.ndarray):
        """(path, reason) of a file in the batches in flight that PIL cannot decode either."""
        nb, size = len(indices) // self.batch_size, self.batch_size
        # Past the end of the epoch, the reader wraps around to its start.
        in_flight = sorted({b % nb for b in range(batch, batch + _IN_FLIGHT)})
        for b in in_flight:
            for i in indices[b * size : (b + 1) * size]:
                reason = self._decode_error(i)
                if reason:
                    return self.files[i], reason
        return None

    def _to_torch(self, out) -> torch.Tensor:
        """Copy one DALI output batch into a torch tensor (DALI reuses its buffers)."""
        tensor = out.as_tensor()
        if self.device.type == "cpu":
            return torch.from_numpy(np.array(tensor))
        from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray, to_torch_type

        result = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=self.device)
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device))
        return result

    def _image(self, out, keep: int) -> torch.Tensor:
        """(B, H, W, 3) DALI batch -> (keep, 3, H, W) tensor in channels_last memory format."""
        return self._to_torch(out)[:keep].permute(0, 3, 1, 2)

    def _batches(self, epoch: int, indices: np.ndarray, skip: int, real: int) -> Iterator:
        self.close()
        size, start, b = self.batch_size, 0, 0
        try:
            while b < len(self):
                if self._pipe is None:
                    # Built at batch 0, or rebuilt at the batch a file failed on in the decoder.
                    part = self._stand_ins(indices[start * size :])
                    self._pipe = self._build(epoch, part, start)
                try:
                    outputs = self._run(self._pipe, b - start, part)
                except CorruptImageError as e:
                    if self.options.on_corrupt != "skip" or e.path not in self.files:
                        raise
                    self._skip_undecodable(self.files.index(e.path), e.reason)
                    self.close()
                    start = b
                    continue
                if b >= skip:
                    yield self._emit(outputs, min(size, real - b * size))
                b += 1
        finally:  # also on errors and on iteration abandoned part-way
            self.close()

    def close(self) -> None:
        """Release the DALI pipeline (its threads and buffers); a later iteration rebuilds it."""
        self._pipe = None


class SimCLRLoader(DaliLoader):
    """Pairs of SimCLR views from an image folder or file list, decoded and augmented by DALI.

    On ``device="gpu"`` DALI decodes with nvJPEG and runs every op on the GPU; on ``"cpu"`` the same
    graph runs on CPU threads (see :mod:`~fastclr.pipelines.dali.graph`).

    Args:
        root: ImageFolder directory ``root/<class>/<image>``, a flat folder of unlabelled images,
            a file list or tar shards, e.g. ``data/train-{000000..000127}.tar`` (see
            :func:`~fastclr.pipelines.data.list_images` and :mod:`~fastclr.pipelines.shards`).
        batch_size: images per batch (per shard).
        size: output side in pixels.
        labels: also yield each image's int64 label (supervised contrastive pretraining); ``root``
            must then be labelled (a flat folder of images is a ValueError naming it).
        augment_impl: how the CPU pipeline runs colour jitter, grayscale, blur and solarize:
            ``"numba"`` as one compiled op per view (:mod:`~fastclr.pipelines.dali.cpu_augment`,
            several times faster, CPU only), ``"dali"`` with DALI's own ops (the graph the GPU
            runs), ``"auto"`` numba on the CPU when numba is installed, else dali.
        **options: the fields of :class:`~fastclr.pipelines.options.LoaderOptions` (device,
            device_id, num_threads, seed, shard_id, num_shards, last_batch, dtype, normalize,
            mean, std, on_corrupt) and of :class:`~fastclr.pipelines.augment.SimCLRAugment`
            (crop_scale, crop_ratio, flip_p, color_strength, color_p, gray_p, blur_p, blur_sigma,
            solarize_p).

    Yields:
        ``(view_a, view_b)``, each ``(B, 3, size, size)`` in ``torch.channels_last`` memory
        format and ``dtype``, on the CPU or on the CUDA device; with ``labels=True``
        ``(view_a, view_b, labels)``, ``labels`` int64 ``(B,)`` on the views' device (the views
        are the same as without labels).
    """

    def __init__(
        self,
        root,
        batch_size: int,
        size: int = 224,
        *,
        labels: bool = False,
        augment_impl="auto",
        **options,
    ):
        if augment_impl not in AUGMENT_IMPLS:
            raise ValueError(f"augment_impl must be one of {AUGMENT_IMPLS}, got {augment_impl!r}")
        if not isinstance(labels, bool):
            raise ValueError(f"labels must be a bool, got {labels!r}")
        augment, opts = simclr_options(type(self).__name__, size, options)
        if labels:  # before the base checks the data: a flat folder of images is then refused
            self.yields_labels, self.labels_for = True, "labelled pairs (labels=True)"
        super().__init__(root, batch_size, size, opts, augment)
        self.augment_impl = resolve_augment_impl(augment_impl, self.device)

    def _graph(self, jpegs, labels) -> tuple:
        kw = dict(self._output_args(), impl=self.augment_impl)
        views = simclr_view(jpegs, self.augment, **kw), simclr_view(jpegs, self.augment, **kw)
        if not self.yields_labels:
            return views
        return *views, labels.gpu() if self.device.type == "cuda" else labels

    def _emit(self, outputs, keep: int):
        views = self._image(outputs[0], keep), self._image(outputs[1], keep)
        if not self.yields_labels:
            return views
        return *views, self._to_torch(outputs[2])[:keep].reshape(-1).long()


class EvalLoader(DaliLoader):
    """Labelled single views for evaluation (kNN / linear probe), decoded by DALI.

    Args:
        root, batch_size, size: as for :class:`SimCLRLoader`, but ``root`` must be labelled: a
            flat folder of images is a ValueError naming it.
        augment: False: shorter side resized to ``size * 8/7`` (at least ``size``), centre crop,
            fixed order. True: the linear-evaluation training protocol, random resized crop +
            horizontal flip (:func:`~fastclr.pipelines.augment.eval_augment`), shuffled per epoch.
            Either way every image of the shard is read once per epoch (the last batch may be
            short).
        **options: the fields of :class:`~fastclr.pipelines.options.LoaderOptions` but
            ``last_batch``.

    Yields:
        ``(images, labels)``: ``(B, 3, size, size)`` channels_last ``dtype`` and int64 ``(B,)``,
        on the CPU or on the CUDA device.
    """

    yields_labels = True

    def __init__(self, root, batch_size: int, size: int = 224, *, augment=False, **options):
        augment, opts = eval_options(type(self).__name__, size, augment, options)
        super().__init__(root, batch_size, size, opts, augment)

    def _graph(self, jpegs, labels) -> tuple:
        kw = self._output_args()
        if self.augment is None:
            images = center_crop_view(jpegs, self.size, **kw)
        else:
            images = simclr_view(jpegs, self.augment, **kw)
        if self.device.type == "cuda":
            labels = labels.gpu()
        return images, labels

    def _emit(self, outputs, keep: int):
        images, labels = outputs
        return self._image(images, keep), self._to_torch(labels)[:keep].reshape(-1).long()

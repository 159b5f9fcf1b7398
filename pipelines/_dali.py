"""DALI-specific machinery of the loaders: one pipeline per epoch, output conversion, errors.

DALI is imported lazily (inside functions) so that importing ``fastclr.pipelines`` never needs it.

Determinism: every epoch builds a fresh pipeline that reads the files in the order of
:func:`~fastclr.pipelines.data.epoch_indices` and is seeded with
:func:`~fastclr.pipelines.data.augment_seed` ``(seed, epoch, shard_id)``. DALI draws per-sample
random numbers from generators tied to the sample's slot in the batch, so a rebuilt pipeline
replays an epoch exactly; resuming at batch ``k`` runs and discards the first ``k`` batches (the
augmentation random state after ``k`` batches cannot be reached any other way).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import torch

from fastclr.pipelines.base import EpochLoader
from fastclr.pipelines.data import CorruptImageError, augment_seed, decode_error

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


def dali_dtype(dtype: torch.dtype):
    from nvidia.dali import types

    return types.FLOAT16 if dtype == torch.float16 else types.FLOAT


def normalize_args(normalize: bool, mean, std) -> tuple[list[float], list[float]]:
    """crop_mirror_normalize constants in uint8 units: (x/255 - mean)/std, or x/255 without."""
    if not normalize:
        return [0.0, 0.0, 0.0], [255.0, 255.0, 255.0]
    return [255.0 * m for m in mean], [255.0 * s for s in std]


def decoder_device(device: str) -> str:
    """Where the decoder runs: nvJPEG ("mixed": CPU input, GPU output) or libjpeg-turbo."""
    return "mixed" if device == "gpu" else "cpu"


class DaliLoader(EpochLoader):
    """Base of the DALI loaders; subclasses define ``_graph(jpegs, labels) -> tuple of nodes``
    and ``_emit(outputs, keep) -> batch``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pipe = None

    def _graph(self, jpegs, labels) -> tuple:
        raise NotImplementedError

    def _emit(self, outputs, keep: int):
        raise NotImplementedError

    def _build(self, epoch: int, indices: np.ndarray, start: int = 0):
        """The pipeline reading ``indices`` (epoch ``epoch`` from its batch ``start`` on)."""
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(enable_conditionals=True)
        def pipeline():
            jpegs, labels = fn.readers.file(
                files=[self.files[i] for i in indices],
                labels=[self.labels[i] for i in indices],
                random_shuffle=False,  # the order is ours: see epoch_indices
                name="reader",
            )
            return self._graph(jpegs, labels)

        pipe = pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            # A rebuild part-way (after a file failed in the decoder) draws from its own stream.
            seed=augment_seed(self.seed, epoch, self.shard_id, *([start] if start else [])),
            prefetch_queue_depth=PREFETCH_DEPTH,
        )
        pipe.build()
        return pipe

    def _run(self, pipe, batch: int, indices: np.ndarray):
        try:
            return pipe.run()
        except RuntimeError as e:
            match = _DECODE_ERROR.search(str(e))
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
                reason = decode_error(self.files[i])
                if reason:
                    return self.files[i], reason
        return None

    def _to_torch(self, out) -> torch.Tensor:
        """Copy one DALI output batch into a torch tensor (DALI reuses its buffers)."""
        tensor = out.as_tensor()
        if self.device == "cpu":
            return torch.from_numpy(np.array(tensor))
        from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray, to_torch_type

        result = torch.empty(
            tensor.shape(), dtype=to_torch_type[tensor.dtype], device=f"cuda:{self.device_id}"
        )
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device_id))
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
                    if self.on_corrupt != "skip" or e.path not in self.files:
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

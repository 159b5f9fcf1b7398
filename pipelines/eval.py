"""Evaluation input (kNN / linear probe) with DALI: labelled images, one view each.

``augment=False``: shorter side resized to ``size * 8/7`` (at least ``size``), centre crop, fixed
order, every image of the shard exactly once (the last batch may be short).
``augment=True``: the linear-evaluation training protocol, random resized crop + horizontal flip,
shuffled per epoch (partial last batch kept).
"""

from __future__ import annotations

import torch

from fastclr.pipelines._dali import DaliLoader, dali_dtype, decoder_device, normalize_args
from fastclr.pipelines.augment import eval_resize_size
from fastclr.pipelines.data import IMAGENET_MEAN, IMAGENET_STD

EVAL_CROP_SCALE = (0.08, 1.0)
EVAL_CROP_RATIO = (3 / 4, 4 / 3)


def eval_view(jpegs, size: int, *, augment: bool, device: str, dtype: torch.dtype, mean, std):
    """DALI graph: encoded images -> (B, size, size, 3) float, HWC."""
    from nvidia.dali import fn, types

    if augment:
        img = fn.decoders.image_random_crop(
            jpegs,
            device=decoder_device(device),
            output_type=types.RGB,
            random_area=list(EVAL_CROP_SCALE),
            random_aspect_ratio=list(EVAL_CROP_RATIO),
            num_attempts=10,
        )
        img = fn.resize(img, size=[size, size], interp_type=types.INTERP_LINEAR)
        crop, mirror = None, fn.random.coin_flip(probability=0.5)
    else:
        img = fn.decoders.image(jpegs, device=decoder_device(device), output_type=types.RGB)
        img = fn.resize(img, resize_shorter=eval_resize_size(size), interp_type=types.INTERP_LINEAR)
        crop, mirror = [size, size], 0
    return fn.crop_mirror_normalize(
        img,
        dtype=dali_dtype(dtype),
        output_layout="HWC",
        crop=crop,
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        mean=mean,
        std=std,
        mirror=mirror,
    )


class EvalLoader(DaliLoader):
    """Labelled single views for evaluation, decoded by DALI.

    Args are those of :class:`~fastclr.pipelines.simclr.SimCLRLoader` (without augmentation
    parameters), plus ``augment`` (see the module docstring).

    Yields:
        ``(images, labels)``: ``(B, 3, size, size)`` channels_last ``dtype`` and int64 ``(B,)``,
        on CPU or on ``cuda:device_id``.
    """

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

    def _graph(self, jpegs, labels) -> tuple:
        mean, std = normalize_args(self.normalize, self.mean, self.std)
        images = eval_view(
            jpegs,
            self.size,
            augment=self.augment,
            device=self.device,
            dtype=self.dtype,
            mean=mean,
            std=std,
        )
        if self.device == "gpu":
            labels = labels.gpu()
        return images, labels

    def _emit(self, outputs, keep: int):
        images, labels = outputs
        return self._image(images, keep), self._to_torch(labels)[:keep].reshape(-1).long()

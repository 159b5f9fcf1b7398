"""SimCLR pretraining input: two independently augmented views per image, built with NVIDIA DALI.

One graph, placed by ``device``: on ``"gpu"`` the decoder is nvJPEG (``device="mixed"``) and every
later op runs on the GPU; on ``"cpu"`` the same ops run on CPU threads (``device_id=None``, no
GPU needed). The random resized crop is fused into the decoder (``decoders.image_random_crop``),
which decodes only the crop window, once per view.

Per view (see :class:`~fastclr.pipelines.augment.SimCLRAugment`): crop -> resize -> [colour
jitter, p] -> [grayscale, p] -> [blur, p] -> [solarize, p] -> flip + normalise + layout. Each
bracketed op runs only on the samples whose coin came up (DALI conditionals), never as an op of
strength 0. The flip is fused into the final ``crop_mirror_normalize``; doing it last instead of
after the crop changes nothing because every later op is pointwise or mirror-symmetric.

Colour jitter follows torchvision's ``ColorJitter``: brightness factor ``b``, contrast ``c``
(blend with the mean luma, ``c x + (1 - c) mean``), saturation ``s`` (blend with the luma) and hue
``h`` (a rotation of the chroma plane in YIQ, DALI's approximation of torchvision's HSV shift), in
a random order per image. Saturation and hue are applied together as one YIQ colour matrix (one
``fn.hsv``): a scaling and a rotation of the chroma plane commute exactly, so fusing them only
skips the rounding and clipping to uint8 between them, and saves a second pass of ``fn.hsv``, by
far the costliest colour op on the CPU. The random order is therefore drawn over three steps
(brightness, contrast, saturation+hue): one of the 6 orders per sample, three steps that each
dispatch (conditionals) to the op that order puts there. Every step rounds and clips to uint8, as
PIL does between ops; in this linear colour model the four ops would commute without clipping,
so the order matters only through that clipping.

On the CPU, colour jitter, grayscale, blur and solarize run by default as one numba-compiled op
per view (``augment_impl="numba"``, :mod:`~fastclr.pipelines.cpu_augment`) with the same math and
rounding as the DALI ops below, which the GPU runs and ``augment_impl="dali"`` runs on the CPU:
DALI's CPU ops take several passes over the image and cost more than decoding it.

Gaussian blur uses the SimCLR kernel (~10% of the side, 23 taps at 224 px) capped per sample at
``2 ceil(3 sigma) + 1`` taps: the taps dropped hold < 0.3% of the kernel's mass.

Example:
    >>> with SimCLRLoader("data/train", batch_size=256, size=224, device="gpu") as loader:
    ...     for epoch in range(epochs):
    ...         loader.set_epoch(epoch)
    ...         for view_a, view_b in loader:  # each (256, 3, 224, 224), channels_last
    ...             ...
"""

from __future__ import annotations

from itertools import permutations

import torch

from fastclr.pipelines._dali import (
    DaliLoader,
    dali_dtype,
    decoder_device,
    normalize_args,
)
from fastclr.pipelines.augment import SOLARIZE_THRESHOLD, SimCLRAugment
from fastclr.pipelines.data import IMAGENET_MEAN, IMAGENET_STD

AUGMENT_IMPLS = ("auto", "numba", "dali")


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_augment_impl(impl: str, device: str) -> str:
    """``"auto" | "numba" | "dali"`` and the pipeline's device -> the ops that run the view."""
    if impl == "auto":
        return "numba" if device == "cpu" and numba_available() else "dali"
    if impl == "numba" and device != "cpu":
        raise ValueError("augment_impl='numba' runs on the CPU only; use 'dali' on the GPU")
    if impl == "numba" and not numba_available():
        raise ImportError("augment_impl='numba' needs numba (pip install numba)")
    return impl


# 0 brightness, 1 contrast, 2 saturation + hue (one YIQ colour matrix): 6 orders.
JITTER_ORDERS = tuple(permutations(range(3)))


def _with_probability(p: float, op, img, *args):
    """Apply ``op`` to the samples whose coin (probability ``p``) came up."""
    from nvidia.dali import fn, types

    apply = True if p >= 1 else fn.random.coin_flip(probability=p, dtype=types.BOOL)
    if apply:
        img = op(img, *args)
    return img


def _contrast(img, factor):
    """torchvision/PIL contrast: blend with the image's mean luma, ``c x + (1 - c) mean``."""
    from nvidia.dali import fn, types

    luma = fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)
    # contrast_center is a per-sample argument, which DALI keeps on the CPU: on the GPU path
    # this is a (tiny) device-to-host copy of one float per image.
    mean = fn.reductions.mean(luma).cpu()
    return fn.contrast(img, contrast=factor, contrast_center=mean)


def _jitter_step(img, op, brightness, contrast, saturation, hue):
    from nvidia.dali import fn

    if op == 0:
        img = fn.brightness(img, brightness=brightness)
    elif op == 1:
        img = _contrast(img, contrast)
    else:
        img = fn.hsv(img, saturation=saturation, hue=hue)
    return img


def _color_jitter(img, aug: SimCLRAugment):
    from nvidia.dali import types

    strengths = _jitter_strengths(aug)
    for op in _drawn_order(types.INT32):
        img = _jitter_step(img, op, *strengths)
    return img


def _jitter_strengths(aug: SimCLRAugment) -> list:
    """Per-sample brightness, contrast and saturation factors and hue shift (in degrees)."""
    from nvidia.dali import fn

    b, c, s, h = aug.jitter
    factors = [fn.random.uniform(range=[max(0.0, 1 - a), 1 + a]) for a in (b, c, s)]
    return [*factors, fn.random.uniform(range=[-360.0 * h, 360.0 * h])]


def _drawn_order(dtype):
    """One of the 6 orders of the 3 colour steps per sample: the op each step runs, in order."""
    from nvidia.dali import fn, types

    order = fn.random.uniform(values=list(range(len(JITTER_ORDERS))), dtype=types.INT32)
    return [
        fn.lookup_table(
            order,
            keys=list(range(len(JITTER_ORDERS))),
            values=[o[step] for o in JITTER_ORDERS],
            dtype=dtype,
        )
        for step in range(len(JITTER_ORDERS[0]))
    ]


def _grayscale(img):
    from nvidia.dali import fn, types

    luma = fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(luma, luma, luma, axis=2)


def _blur(img, aug: SimCLRAugment):
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    sigma = fn.random.uniform(range=list(aug.blur_sigma))
    # Taps beyond 3 sigma hold < 0.3% of the kernel's mass: cap the window there instead of always
    # convolving with the full SimCLR kernel (23 taps at 224 px), which costs 2-3x more.
    window = dmath.min(2.0 * dmath.ceil(3.0 * sigma) + 1.0, float(aug.blur_kernel))
    return fn.gaussian_blur(img, window_size=fn.cast(window, dtype=types.INT32), sigma=sigma)


def _solarize(img):
    from nvidia.dali import fn, types

    levels = list(range(256))
    inverted = [v if v < SOLARIZE_THRESHOLD else 255 - v for v in levels]
    return fn.lookup_table(img, keys=levels, values=inverted, dtype=types.UINT8)


def _coin(p: float):
    from nvidia.dali import fn, types

    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def fused_params(aug: SimCLRAugment):
    """Per-sample float vector of coins and strengths, laid out as cpu_augment's ``P_*``."""
    from nvidia.dali import fn, types

    from fastclr.pipelines import cpu_augment as ca

    brightness, contrast, saturation, hue = _jitter_strengths(aug)
    steps = _drawn_order(types.FLOAT)
    params = {
        ca.P_COLOR: _coin(aug.color_p if aug.color_active else 0.0),
        **{ca.P_STEPS + k: step for k, step in enumerate(steps)},
        ca.P_BRIGHTNESS: brightness,
        ca.P_CONTRAST: contrast,
        ca.P_SATURATION: saturation,
        ca.P_HUE: hue,
        ca.P_GRAY: _coin(aug.gray_p),
        ca.P_BLUR: _coin(aug.blur_p),
        ca.P_SIGMA: fn.random.uniform(range=list(aug.blur_sigma)),
        ca.P_WINDOW: fn.constant(fdata=float(aug.blur_kernel), shape=[]),
        ca.P_SOLARIZE: _coin(aug.solarize_p),
    }
    assert sorted(params) == list(range(ca.NUM_PARAMS))
    return fn.stack(*(params[k] for k in range(ca.NUM_PARAMS)))


def simclr_view(
    jpegs, aug: SimCLRAugment, *, device: str, dtype: torch.dtype, mean, std, impl: str = "dali"
):
    """DALI graph of one augmented view: encoded images -> (B, size, size, 3) float, HWC.

    ``impl="numba"`` (CPU only) runs colour jitter, grayscale, blur and solarize as one
    numba-compiled op (:mod:`~fastclr.pipelines.cpu_augment`); ``"dali"`` uses DALI's own ops.
    """
    from nvidia.dali import fn, types

    img = fn.decoders.image_random_crop(
        jpegs,
        device=decoder_device(device),
        output_type=types.RGB,
        random_area=list(aug.crop_scale),
        random_aspect_ratio=list(aug.crop_ratio),
        num_attempts=10,
    )
    img = fn.resize(img, size=[aug.size, aug.size], interp_type=types.INTERP_LINEAR)
    if impl == "numba":
        if aug.color_active or max(aug.gray_p, aug.blur_p, aug.solarize_p) > 0:
            from fastclr.pipelines.cpu_augment import augment_op

            img = augment_op()(img, fused_params(aug))
    else:
        if aug.color_active:
            img = _with_probability(aug.color_p, _color_jitter, img, aug)
        if aug.gray_p > 0:
            img = _with_probability(aug.gray_p, _grayscale, img)
        if aug.blur_p > 0:
            img = _with_probability(aug.blur_p, _blur, img, aug)
        if aug.solarize_p > 0:
            img = _with_probability(aug.solarize_p, _solarize, img)
    mirror = fn.random.coin_flip(probability=aug.flip_p) if aug.flip_p > 0 else 0
    return fn.crop_mirror_normalize(
        img, dtype=dali_dtype(dtype), output_layout="HWC", mean=mean, std=std, mirror=mirror
    )


class SimCLRLoader(DaliLoader):
    """Pairs of SimCLR views from an image folder or file list, decoded and augmented by DALI.

    Args:
        root: ImageFolder directory ``root/<class>/<image>`` or a file list
            (see :func:`~fastclr.pipelines.data.list_images`).
        batch_size: images per batch (per shard).
        size: output side in pixels.
        device: ``"cpu"`` (no GPU needed), ``"gpu"`` (nvJPEG decode, outputs on CUDA) or
            ``"auto"`` (gpu when CUDA is available).
        device_id: CUDA device for ``"gpu"`` (default: the current one); ignored on CPU.
        num_threads: DALI CPU worker threads.
        seed: base seed; shuffle and augmentation depend only on ``(seed, epoch, shard_id)``.
        shard_id, num_shards: this rank's slice of every epoch (DDP).
        last_batch: ``"drop"`` (default), ``"pad"`` or ``"keep"``; see :mod:`fastclr.pipelines.data`.
        dtype: ``torch.float32`` or ``torch.float16``.
        normalize: ``(x - mean) / std`` if True, else values in [0, 1].
        crop_scale, crop_ratio, flip_p, color_strength, color_p, gray_p, blur_p, blur_sigma,
            solarize_p: augmentation, see :class:`~fastclr.pipelines.augment.SimCLRAugment`.
        on_corrupt: ``"error"`` raises :class:`~fastclr.pipelines.data.CorruptImageError` naming
            the file, at construction for files failing the up-front check and during iteration
            for a file only the decoder rejects. ``"skip"`` leaves the former out and skips the
            latter from its first failure on (a warning; the next file is read in its slot, so
            ``len()`` is unchanged); both are counted in :attr:`num_skipped`.
        augment_impl: how the CPU pipeline runs colour jitter, grayscale, blur and solarize:
            ``"numba"`` as one compiled op per view (:mod:`~fastclr.pipelines.cpu_augment`,
            several times faster, CPU only), ``"dali"`` with DALI's own ops (the graph the GPU
            runs), ``"auto"`` numba on the CPU when numba is installed, else dali.

    Yields:
        ``(view_a, view_b)``, each ``(B, 3, size, size)`` in ``torch.channels_last`` memory
        format and ``dtype``, on CPU or on ``cuda:device_id``.
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
        augment_impl: str = "auto",
    ):
        if augment_impl not in AUGMENT_IMPLS:
            raise ValueError(f"augment_impl must be one of {AUGMENT_IMPLS}, got {augment_impl!r}")
        self.augment = SimCLRAugment(
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
        self.augment_impl = resolve_augment_impl(augment_impl, self.device)

    def _graph(self, jpegs, labels) -> tuple:
        mean, std = normalize_args(self.normalize, self.mean, self.std)
        kw = dict(device=self.device, dtype=self.dtype, mean=mean, std=std, impl=self.augment_impl)
        return simclr_view(jpegs, self.augment, **kw), simclr_view(jpegs, self.augment, **kw)

    def _emit(self, outputs, keep: int):
        view_a, view_b = outputs
        return self._image(view_a, keep), self._image(view_b, keep)

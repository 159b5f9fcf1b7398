"""The DALI graphs of one view: a SimCLR view (the augmentation spec run as DALI ops) and the
evaluation centre crop.

One graph, placed by ``device``: on CUDA the decoder is nvJPEG (DALI's ``device="mixed"``) and
every later op runs on the GPU; on the CPU the same ops run on CPU threads (no GPU needed). The
random resized crop is fused into the decoder (``decoders.image_random_crop``), which decodes
only the crop window, once per view.

Per SimCLR view (see :class:`~fastclr.pipelines.augment.SimCLRAugment`): crop -> resize -> [colour
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

Nothing leaves the GPU once the decoder has put an image there (tests/test_pipeline_graph.py):
contrast, whose mean luma DALI's ``fn.contrast`` would read from the host, is DALI arithmetic on
the GPU (:func:`contrast_arithmetic`; tests/test_cpu_augment.py runs both on the CPU and finds
them equal value for value).

On the CPU, colour jitter, grayscale, blur and solarize run by default as one numba-compiled op
per view (``augment_impl="numba"``, :mod:`~fastclr.pipelines.dali.cpu_augment`) with the same
math and rounding as the DALI ops below, which the GPU runs and ``augment_impl="dali"`` runs on
the CPU: DALI's CPU ops take several passes over the image and cost more than decoding it.

Gaussian blur uses the SimCLR kernel (~10% of the side, 23 taps at 224 px) capped per sample at
``2 ceil(3 sigma) + 1`` taps: the taps dropped hold < 0.3% of the kernel's mass.

The evaluation view without augmentation resizes the shorter side to ``size * 8/7`` and crops the
centre; with augmentation it is :func:`simclr_view` with crop and flip only
(:func:`~fastclr.pipelines.augment.eval_augment`).
"""

from __future__ import annotations

from itertools import permutations

import torch

from fastclr.pipelines.augment import SOLARIZE_THRESHOLD, SimCLRAugment, eval_resize_size


def dali_dtype(dtype: torch.dtype):
    from nvidia.dali import types

    return types.FLOAT16 if dtype == torch.float16 else types.FLOAT


def normalize_args(normalize: bool, mean, std) -> tuple[list[float], list[float]]:
    """crop_mirror_normalize constants in uint8 units: (x/255 - mean)/std, or x/255 without."""
    if not normalize:
        return [0.0, 0.0, 0.0], [255.0, 255.0, 255.0]
    return [255.0 * m for m in mean], [255.0 * s for s in std]


def decoder_device(device: torch.device) -> str:
    """Where the decoder runs, in DALI's words: nvJPEG ("mixed": CPU input, GPU output) or the CPU."""
    return "mixed" if device.type == "cuda" else "cpu"


# 0 brightness, 1 contrast, 2 saturation + hue (one YIQ colour matrix): 6 orders.
JITTER_ORDERS = tuple(permutations(range(3)))


def _with_probability(p: float, op, img, *args):
    """Apply ``op`` to the samples whose coin (probability ``p``) came up."""
    from nvidia.dali import fn, types

    apply = True if p >= 1 else fn.random.coin_flip(probability=p, dtype=types.BOOL)
    if apply:
        img = op(img, *args)
    return img


def mean_luma(img):
    """Per-sample mean of the image's uint8 luma (DALI's RGB -> GRAY), on the image's device."""
    from nvidia.dali import fn, types

    luma = fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)
    return fn.reductions.mean(luma)


def contrast_arithmetic(img, factor, mean):
    """``fn.contrast(img, contrast=factor, contrast_center=mean)`` with DALI's arithmetic operators.

    The float32 arithmetic of fn.contrast's kernel, ``x c + (m - c m)`` (its multiplier and
    addend), then DALI's saturating cast to uint8, which rounds as that kernel does on the same
    device (ties to even on the GPU, away from zero on the CPU). Every input stays on the device it
    is on; the per-sample scalars broadcast over their image. tests/test_cpu_augment.py checks it
    against fn.contrast value for value.
    """
    from nvidia.dali import fn, types

    return fn.cast(img * factor + (mean - factor * mean), dtype=types.UINT8)


def _contrast(img, factor):
    """torchvision/PIL contrast: blend with the image's mean luma, ``c x + (1 - c) mean``."""
    from nvidia.dali import fn

    mean = mean_luma(img)
    if img.device == "gpu":
        # fn.contrast takes the mean as a named argument, which DALI reads from the CPU: a
        # device-to-host copy, and a sync, in every batch. The arithmetic keeps it on the GPU.
        return contrast_arithmetic(img, factor, mean)
    # On the CPU the mean is already on the host, and fn.contrast's one uint8 pass costs several
    # times less than the arithmetic's three over float32 values; the two agree value for value.
    return fn.contrast(img, contrast=factor, contrast_center=mean)


def jitter_step(img, op, brightness, contrast, saturation, hue):
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
        img = jitter_step(img, op, *strengths)
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


def grayscale(img):
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


def solarize(img):
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

    from fastclr.pipelines.dali import cpu_augment as ca

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


def simclr_view(jpegs, aug: SimCLRAugment, *, device: torch.device, dtype, mean, std, impl="dali"):
    """DALI graph of one augmented view: encoded images -> (B, size, size, 3) float, HWC.

    ``impl="numba"`` (CPU only) runs colour jitter, grayscale, blur and solarize as one
    numba-compiled op (:mod:`~fastclr.pipelines.dali.cpu_augment`); ``"dali"`` uses DALI's own ops.
    ``mean`` and ``std`` are in uint8 units (:func:`normalize_args`).
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
        if aug.pixel_ops_active:
            from fastclr.pipelines.dali.cpu_augment import augment_op

            img = augment_op()(img, fused_params(aug))
    else:
        if aug.color_active:
            img = _with_probability(aug.color_p, _color_jitter, img, aug)
        if aug.gray_p > 0:
            img = _with_probability(aug.gray_p, grayscale, img)
        if aug.blur_p > 0:
            img = _with_probability(aug.blur_p, _blur, img, aug)
        if aug.solarize_p > 0:
            img = _with_probability(aug.solarize_p, solarize, img)
    mirror = fn.random.coin_flip(probability=aug.flip_p) if aug.flip_p > 0 else 0
    return fn.crop_mirror_normalize(
        img, dtype=dali_dtype(dtype), output_layout="HWC", mean=mean, std=std, mirror=mirror
    )


def center_crop_view(jpegs, size: int, *, device: torch.device, dtype, mean, std):
    """DALI graph of the evaluation view: encoded images -> resize + centre crop, (B, size, size, 3) HWC."""
    from nvidia.dali import fn, types

    img = fn.decoders.image(jpegs, device=decoder_device(device), output_type=types.RGB)
    img = fn.resize(img, resize_shorter=eval_resize_size(size), interp_type=types.INTERP_LINEAR)
    return fn.crop_mirror_normalize(
        img,
        dtype=dali_dtype(dtype),
        output_layout="HWC",
        crop=[size, size],
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        mean=mean,
        std=std,
    )

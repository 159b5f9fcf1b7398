"""The torchvision backend's transforms: the augmentation spec as ``torchvision.transforms``.

:func:`view_transform` is the one place a spec becomes a transform; :class:`SimCLRTransform` and
:class:`EvalTransform` are its keyword front-ends for use outside the loaders (a torchvision
``Dataset``, say).
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T

from fastclr.pipelines.augment import (
    SOLARIZE_THRESHOLD,
    SimCLRAugment,
    eval_augment,
    eval_resize_size,
)
from fastclr.pipelines.data import IMAGENET_MEAN, IMAGENET_STD
from fastclr.pipelines.options import LoaderOptions


def _maybe(p: float, transform) -> list:
    """``transform`` applied with probability ``p``; nothing at all when ``p == 0``."""
    if p <= 0:
        return []
    return [transform if p >= 1 else T.RandomApply([transform], p=p)]


def view_transform(aug: SimCLRAugment | None, size: int, options: LoaderOptions):
    """PIL image -> one ``(3, size, size)`` float32 view: the spec ``aug``, or without one
    (None) the evaluation view, shorter side resized to ``size * 8/7`` and the centre cropped.

    ``(x - mean) / std`` with the ``options``' ``mean`` and ``std`` if they ``normalize``, else
    values in [0, 1].
    """
    if aug is None:
        head = [T.Resize(eval_resize_size(size)), T.CenterCrop(size)]
    else:
        # ColorJitter draws its four factors and a random order of the four ops per call.
        jitter = T.ColorJitter(*aug.jitter) if aug.color_active else None
        head = [
            T.RandomResizedCrop(aug.size, scale=aug.crop_scale, ratio=aug.crop_ratio),
            *_maybe(aug.flip_p, T.RandomHorizontalFlip(p=1.0)),
            *(_maybe(aug.color_p, jitter) if jitter else []),
            *_maybe(aug.gray_p, T.Grayscale(num_output_channels=3)),
            *_maybe(aug.blur_p, T.GaussianBlur(aug.blur_kernel, sigma=aug.blur_sigma)),
            *_maybe(aug.solarize_p, T.RandomSolarize(SOLARIZE_THRESHOLD, p=1.0)),
        ]
    normalize = [T.Normalize(options.mean, options.std)] if options.normalize else []
    tail = [T.ToTensor(), *normalize]
    return T.Compose([*head, *tail])


class TwoViews:
    """Two independent draws of ``view`` per image: a SimCLR pair."""

    def __init__(self, view):
        self.view = view

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(image), self.view(image)


class SimCLRTransform(TwoViews):
    """Map a PIL image to two independently augmented SimCLR views.

    Args:
        size: output side in pixels.
        normalize, mean, std: ``(x - mean) / std`` if ``normalize``, else values in [0, 1].
        **augment: the fields of :class:`~fastclr.pipelines.augment.SimCLRAugment` (crop_scale,
            crop_ratio, flip_p, color_strength, color_p, gray_p, blur_p, blur_sigma, solarize_p).

    Returns (on call):
        ``(view_a, view_b)``, float32 tensors of shape ``(3, size, size)``.
    """

    def __init__(
        self,
        size: int = 224,
        *,
        normalize: bool = True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        **augment,
    ):
        self.augment = SimCLRAugment(size, **augment)
        options = LoaderOptions(normalize=normalize, mean=mean, std=std)
        super().__init__(view_transform(self.augment, size, options))


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
        self.augment = eval_augment(size, augment)
        options = LoaderOptions(normalize=normalize, mean=mean, std=std)
        self.view = view_transform(self.augment, size, options)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.view(image)

"""The augmentation spec: what each view goes through, validated once and run by both backends.

Defaults follow SimCLR (Chen et al., 2020, appendix A): random resized crop (area 0.08-1,
aspect 3/4-4/3), horizontal flip p=0.5, colour jitter of strength s (brightness, contrast and
saturation 0.8s, hue 0.2s, the four in a random order) with p=0.8, grayscale p=0.2, Gaussian blur
p=0.5 with a kernel of ~10% of the side and sigma in [0.1, 2.0] (off for CIFAR-size images).
Solarize (BYOL) is available and off by default.

The evaluation loaders use the same spec: :func:`eval_augment` is the linear-evaluation training
augmentation (crop + flip only), and ``None`` the deterministic resize + centre crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Images at least this large get blur by default; SimCLR turns blur off for CIFAR (32 px).
BLUR_MIN_SIZE = 64
SOLARIZE_THRESHOLD = 128  # in uint8 levels: pixels >= threshold are inverted


def _check_prob(name: str, p: float) -> float:
    if not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_range(name: str, r, low: float, high: float | None = None) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in r)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair, got {r!r}") from None
    if not (low <= a <= b and (b <= high if high is not None else math.isfinite(b))):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must satisfy min <= max within {bound}, got {r!r}")
    return a, b


def check_size(size) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int (output side in pixels), got {size!r}")
    return size


def eval_resize_size(size: int) -> int:
    """Shorter side before the centre crop: size * 8/7 (256 for 224), at least ``size``."""
    return max(size, round(size * 8 / 7))


@dataclass(frozen=True)
class SimCLRAugment:
    """Per-view SimCLR augmentation; probabilities are per sample and per view.

    Attributes:
        size: output side in pixels.
        crop_scale, crop_ratio: area fraction and aspect-ratio ranges of the random resized crop.
        flip_p: probability of a horizontal flip.
        color_strength: colour-jitter strength s in [0, 2.5] (see :attr:`jitter`).
        color_p: probability of colour jitter.
        gray_p: probability of grayscale.
        blur_p: probability of Gaussian blur; None: 0.5 from ``BLUR_MIN_SIZE`` px up, else 0.
        blur_sigma: range of the blur's sigma, in pixels.
        solarize_p: probability of solarize (pixels >= ``SOLARIZE_THRESHOLD`` inverted).
    """

    size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    color_strength: float = 1.0
    color_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float | None = None
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self):
        check_size(self.size)
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("crop_scale", _check_range("crop_scale", self.crop_scale, 1e-6, 1.0))
        set_("crop_ratio", _check_range("crop_ratio", self.crop_ratio, 1e-6))
        set_("blur_sigma", _check_range("blur_sigma", self.blur_sigma, 1e-6))
        # hue = 0.2 s must stay within half a turn of the colour wheel; the comparison also refuses NaN.
        if not isinstance(self.color_strength, int | float) or not 0 <= self.color_strength <= 2.5:
            raise ValueError(f"color_strength must be in [0, 2.5], got {self.color_strength!r}")
        if self.blur_p is None:
            set_("blur_p", 0.5 if self.size >= BLUR_MIN_SIZE else 0.0)
        for name in ("flip_p", "color_p", "gray_p", "blur_p", "solarize_p"):
            set_(name, _check_prob(name, getattr(self, name)))

    @property
    def jitter(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue) jitter amplitudes for strength s."""
        s = self.color_strength
        return 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s

    @property
    def color_active(self) -> bool:
        return self.color_p > 0 and self.color_strength > 0

    @property
    def pixel_ops_active(self) -> bool:
        """Whether any op after the crop and flip (colour, grayscale, blur, solarize) can run."""
        return self.color_active or max(self.gray_p, self.blur_p, self.solarize_p) > 0

    @property
    def blur_kernel(self) -> int:
        """Odd kernel side of ~10% of the output side (23 for 224), at least 3."""
        k = max(3, int(0.1 * self.size))
        return k if k % 2 else k + 1


def eval_augment(size: int, augment: bool) -> SimCLRAugment | None:
    """The evaluation loaders' view: with ``augment``, the linear-evaluation training protocol
    (SimCLR's random resized crop and flip, nothing else); without, None: resize the shorter side
    to :func:`eval_resize_size` and crop the centre."""
    check_size(size)
    return SimCLRAugment(size, color_p=0.0, gray_p=0.0, blur_p=0.0) if augment else None

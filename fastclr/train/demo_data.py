"""The embedded demo data set: ten procedurally drawn shapes whose colours, position and size are nuisances.

Each image is one shape (circle, square, triangle, diamond, plus, cross, ring, star, hexagon, hourglass) in a random
colour on a random background of another hue and brightness, at a random position and size. The class is the shape
alone. A randomly initialised CNN mostly encodes colour and brightness, so its kNN accuracy is low (about 25-40%);
SimCLR's colour jitter, grayscale and random crops make colour and position useless for telling two views apart, so
the encoder learns shape, and kNN accuracy rises far above that. The set is drawn on the fly (PIL, anti-aliased by
drawing at 4x and downsampling; no download, nothing stored in the repository) and cached as an ImageFolder of JPEGs::

    $XDG_CACHE_HOME/fastclr/shapes-<size>px-v1/{train,test}/<shape>/<index>.jpg   (~/.cache/fastclr when unset)

The folder is built in a temporary sibling and renamed into place, so a half-written copy is never used. The
images depend only on ``(size, per-class counts, seed)``: every machine draws the same data set.
"""

from __future__ import annotations

import colorsys
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

DONE_MARKER = ".complete"
SHAPES = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "plus",
    "cross",
    "ring",
    "star",
    "hexagon",
    "hourglass",
)
_SUPERSAMPLE = 4

# Vertices on the unit square [-1, 1]^2 (y down), scaled by the shape's radius when drawn.
_POLYGONS = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)],
    "diamond": [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)],
    "hexagon": [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)],
    "star": [
        (
            (1.0 if k % 2 == 0 else 0.42) * math.sin(k * math.pi / 5),
            -(1.0 if k % 2 == 0 else 0.42) * math.cos(k * math.pi / 5),
        )
        for k in range(10)
    ],
    "hourglass": [(-0.8, -1.0), (0.8, -1.0), (0.0, 0.0), (0.8, 1.0), (-0.8, 1.0), (0.0, 0.0)],
}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/fastclr`` (``~/.cache/fastclr`` when unset); ``$FASTCLR_CACHE`` overrides both."""
    if os.environ.get("FASTCLR_CACHE"):
        return Path(os.environ["FASTCLR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastclr"


def _colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A foreground and a background colour: hues at least a quarter turn apart, one light and one dark."""
    hue = rng.random()
    bg_hue = (hue + rng.uniform(0.25, 0.75)) % 1.0
    light, dark = rng.uniform(0.75, 1.0), rng.uniform(0.1, 0.45)
    fg_value, bg_value = (light, dark) if rng.random() < 0.5 else (dark, light)
    fg = colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 1.0), fg_value)
    bg = colorsys.hsv_to_rgb(bg_hue, rng.uniform(0.3, 1.0), bg_value)
    return tuple(round(255 * c) for c in fg), tuple(round(255 * c) for c in bg)


def draw_shape(shape: str, size: int, rng: np.random.Generator):
    """One ``size`` x ``size`` RGB PIL image of ``shape`` with random colours, position and radius."""
    from PIL import Image, ImageDraw

    side = size * _SUPERSAMPLE
    fg, bg = _colours(rng)
    image = Image.new("RGB", (side, side), bg)
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.22, 0.38) * side
    cx, cy = rng.uniform(r, side - r), rng.uniform(r, side - r)
    stroke = max(2, int(0.28 * r))
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "ring":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=stroke)
    elif shape == "plus":
        half = stroke / 1.4
        pen.rectangle([cx - r, cy - half, cx + r, cy + half], fill=fg)
        pen.rectangle([cx - half, cy - r, cx + half, cy + r], fill=fg)
    elif shape == "cross":
        k, width = 0.8 * r, int(1.3 * stroke)
        pen.line([cx - k, cy - k, cx + k, cy + k], fill=fg, width=width)
        pen.line([cx - k, cy + k, cx + k, cy - k], fill=fg, width=width)
    else:
        pen.polygon([(cx + x * r, cy + y * r) for x, y in _POLYGONS[shape]], fill=fg)
    return image.resize((size, size), Image.LANCZOS)


def shapes_dataset(
    size: int = 32,
    root: str | Path | None = None,
    train_per_class: int = 300,
    test_per_class: int = 100,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write (once) and return ``(train_dir, test_dir)`` of the shapes data set as ``size`` px JPEGs.

    ``train_per_class`` and ``test_per_class`` images of each of the 10 :data:`SHAPES`; the test images are drawn
    from their own random stream, so they are never copies of training images.
    """
    if size < 16:
        raise ValueError(
            f"size must be at least 16 px for the shapes to stay recognisable, got {size}"
        )
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(
            f"train_per_class and test_per_class must be >= 1, got {train_per_class} and {test_per_class}"
        )
    name = f"shapes-{size}px-{train_per_class}-{test_per_class}-seed{seed}-v1"
    target = Path(root) if root is not None else cache_root() / name
    if (target / DONE_MARKER).is_file():
        return target / "train", target / "test"

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for split, per_class, stream in (
            ("train", train_per_class, 0),
            ("test", test_per_class, 1),
        ):
            rng = np.random.default_rng([seed, stream])
            for shape in SHAPES:
                folder = tmp / split / shape
                folder.mkdir(parents=True)
                for i in range(per_class):
                    draw_shape(shape, size, rng).save(folder / f"{i:05d}.jpg", quality=95)
        (tmp / DONE_MARKER).write_text(
            f"fastclr shapes v1, {size}px, {train_per_class}/{test_per_class} per class, seed={seed}\n"
        )
        if target.exists() and not (target / DONE_MARKER).is_file():  # left by an interrupted build
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / DONE_MARKER).is_file():
                raise
            shutil.rmtree(
                tmp
            )  # another process finished the same build first; its copy is identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target / "train", target / "test"

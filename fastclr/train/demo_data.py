"""The embedded demo data set: scikit-learn's handwritten digits written out as an ImageFolder of JPEGs.

The 1,797 8x8 grey-level digits ship inside scikit-learn (no download). They are upscaled (bicubic) to ``size`` px
RGB JPEGs (dark ink on white paper) and split per class into train/test (80/20, fixed seed) under a cache folder::

    $XDG_CACHE_HOME/fastclr/digits-<size>px/{train,test}/<digit>/<index>.jpg   (~/.cache/fastclr when unset)

The folder is built in a temporary sibling and renamed into place, so a half-written copy is never used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

DONE_MARKER = ".complete"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/fastclr`` (``~/.cache/fastclr`` when unset); ``$FASTCLR_CACHE`` overrides both."""
    if os.environ.get("FASTCLR_CACHE"):
        return Path(os.environ["FASTCLR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastclr"


def digits_dataset(
    size: int = 32, root: str | Path | None = None, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Path, Path]:
    """Write (once) and return ``(train_dir, test_dir)`` of the digits data set as ``size`` px JPEGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"size must be at least 8 px (the digits are 8x8), got {size}")
    target = Path(root) if root is not None else cache_root() / f"digits-{size}px"
    if (target / DONE_MARKER).is_file():
        return target / "train", target / "test"

    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) floats in [0, 16], (1797,) ints
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_test[idx[: round(len(idx) * test_fraction)]] = True

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            split = "test" if is_test[i] else "train"
            folder = tmp / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            grey = (255 - img * (255 / 16)).astype(np.uint8)  # dark ink on white paper, like a scan
            pil = Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB")
            pil.save(folder / f"{i:04d}.jpg", quality=95)
        (tmp / DONE_MARKER).write_text(
            f"sklearn digits, {size}px, test_fraction={test_fraction}, seed={seed}\n"
        )
        if (
            target.exists() and not (target / DONE_MARKER).is_file()
        ):  # left by an interrupted earlier build
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / DONE_MARKER).is_file():
                raise
            # another process finished the same build first; its copy is identical
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target / "train", target / "test"

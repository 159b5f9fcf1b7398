"""Label subsets for semi-supervised fine-tuning: drawn class-balanced and seeded, or read from a list file.

SimCLR v2 fine-tunes on 1% or 10% of ImageNet's labels (Chen et al. 2020b, section 4), the subsets google-research/simclr
ships as ``imagenet_subsets/1percent.txt`` and ``10percent.txt``: one file name per line (``n01440764_10026.JPEG``).

* ``--label-fraction F --label-seed S``: from every class of ``--data`` take ``round(F * n_c)`` of its ``n_c`` images,
  chosen with a generator seeded by ``S`` (the class's images in listing order, indices drawn without replacement), so
  each class keeps its share of the labels and the same flags always draw the same subset.
* ``--labels-file FILE``: one image per line, either a path (relative to ``--data``, or absolute) or a bare file name,
  which is matched against the file names under ``--data`` (the official files). Blank lines and ``#`` comments are
  skipped.

A run writes its subset to ``OUT/labels.txt``, paths relative to ``--data`` one per line, which ``--labels-file``
reads back: the same labels on another machine or in another run. Every problem (an unknown name, a name two
images share, an image listed twice, a class left without a label, an empty subset, a fraction outside (0, 1]) is a
:class:`LabelError` naming it, raised before any training.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fastclr.train.checkpoint import atomic_write
from fastclr.train.config import ConfigError

# A label list is one short line per image: ImageNet's 10% file is 128k lines, ~2.6 MB. Far larger is not one.
MAX_LABELS_FILE_BYTES = 256 << 20
_SHOWN = 3  # offending names quoted in an error


class LabelError(ConfigError):
    """A label subset cannot be drawn or read; the message names the flag, the file or line, and the problem."""


class LabelSubset(NamedTuple):
    """The labelled images: paths as ``--data`` lists them, their class indices, the class names of ``--data`` and
    how many images ``--data`` holds in all."""

    files: list[str]
    labels: list[int]
    classes: list[str]
    total: int

    @property
    def fraction(self) -> float:
        """Share of the images of ``--data`` that carry a label here."""
        return len(self.files) / self.total


def _by_class(labels: list[int], num_classes: int) -> list[list[int]]:
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for i, label in enumerate(labels):
        members[label].append(i)
    return members


def check_fraction(fraction: float) -> float:
    """``fraction`` if it is a number in (0, 1], else a :class:`LabelError` naming ``--label-fraction``."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not (0 < fraction <= 1)  # also refuses NaN
    ):
        raise LabelError(f"--label-fraction must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def draw_subset(
    files: list[str], labels: list[int], classes: list[str], fraction: float, seed: int
) -> LabelSubset:
    """A class-balanced subset: ``round(fraction * n_c)`` images of every class ``c`` (``n_c`` images), seeded.

    Class ``c``'s images are drawn with ``numpy.random.default_rng([seed, c])``, so one class's draw does not depend
    on the others' sizes. The subset lists classes in order, each class's images in listing order.

    Raises:
        LabelError: ``fraction`` outside (0, 1], or a class whose share rounds to no image (naming it and the
            smallest fraction that gives it one).
    """
    fraction = check_fraction(fraction)
    chosen: list[int] = []
    for c, members in enumerate(_by_class(labels, len(classes))):
        take = math.floor(fraction * len(members) + 0.5)
        if take == 0:
            need = 0.5 / len(members) if members else math.nan
            raise LabelError(
                f"--label-fraction {fraction:g} leaves class {classes[c]!r} ({len(members)} images) without a label; "
                f"give at least {need:.3g}, or a --labels-file"
            )
        picked = np.random.default_rng([seed, c]).choice(len(members), size=take, replace=False)
        chosen += [members[i] for i in sorted(picked.tolist())]
    return LabelSubset(
        [files[i] for i in chosen], [labels[i] for i in chosen], list(classes), len(files)
    )


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of the non-blank, non-comment lines of a small text file."""
    if not path.exists():
        raise FileNotFoundError(f"--labels-file {path}: no such file")
    if not path.is_file():
        raise LabelError(f"--labels-file {path} is not a regular file")
    with open(path, "rb") as f:
        raw = f.read(MAX_LABELS_FILE_BYTES + 1)
    if len(raw) > MAX_LABELS_FILE_BYTES:
        raise LabelError(
            f"--labels-file {path}: larger than {MAX_LABELS_FILE_BYTES} bytes: not a label list"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LabelError(
            f"--labels-file {path}: not a text file (byte {e.start} is not UTF-8); expected one image per line"
        ) from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    return [(n, line) for n, line in lines if line and not line.startswith("#")]


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


def _stem(name: str) -> str:
    """A file name without its extension, lower-cased: the key a bare name falls back to."""
    return os.path.splitext(name)[0].lower()


def read_subset(
    path: str | os.PathLike,
    root: str | os.PathLike,
    files: list[str],
    labels: list[int],
    classes: list[str],
) -> LabelSubset:
    """The images of ``--data`` (``root``: its ``files``, ``labels``, ``classes``) that the list ``path`` names.

    A line holding a path separator is a path, relative to ``root`` unless absolute (for tar shards, a sample's
    absolute name ``<shard>.tar:<member>``); a bare name is matched by file name, which must then be unique under
    ``root``, or failing that by file name without its extension, case aside: ``n01440764_10026.JPEG`` of the official
    lists finds ``n01440764_10026.jpeg``, as ``fastclr shards`` writes it. The subset keeps the order of ``files``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        LabelError: the file is not a small text file, names no image, names an image ``root`` lacks or one two
            images share, names one image twice, or leaves a class without a label.
    """
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise LabelError(f"--labels-file {path} names no image (an empty subset)")
    base = Path(root).resolve()
    index = {os.path.normpath(Path(f).resolve()): i for i, f in enumerate(files)}
    by_name: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        name = os.path.basename(f)
        by_name.setdefault(name, []).append(i)
        by_stem.setdefault(_stem(name), []).append(i)

    chosen: dict[int, int] = {}  # image index -> first line naming it
    unknown, ambiguous, twice = [], [], []
    for lineno, line in lines:
        if "/" in line or os.sep in line:
            i = index.get(os.path.normpath(base / line))  # an absolute line replaces base
            matches = [] if i is None else [i]
        else:
            matches = by_name.get(line) or by_stem.get(_stem(line), [])
        if not matches:
            unknown.append(line)
        elif len(matches) > 1:
            ambiguous.append(f"{line} ({len(matches)} images)")
        elif matches[0] in chosen:
            twice.append(f"{line} (lines {chosen[matches[0]]} and {lineno})")
        else:
            chosen[matches[0]] = lineno
    where = f"--labels-file {path}"
    if unknown:
        raise LabelError(
            f"{where}: {len(unknown)} of {len(lines)} names are not images under --data {root}: {_shown(unknown)}"
        )
    if ambiguous:
        raise LabelError(
            f"{where}: file names shared by several images under --data {root}: {_shown(ambiguous)}; "
            "give their paths relative to --data instead"
        )
    if twice:
        raise LabelError(f"{where}: images listed more than once: {_shown(twice)}")
    picked = sorted(chosen)
    present = {labels[i] for i in picked}
    missing = [name for c, name in enumerate(classes) if c not in present]
    if missing:
        raise LabelError(
            f"{where} leaves {len(missing)} of the {len(classes)} classes of --data {root} without a label: "
            f"{_shown(missing)}; every class needs at least one labelled image"
        )
    return LabelSubset(
        [files[i] for i in picked], [labels[i] for i in picked], list(classes), len(files)
    )


def write_subset(subset: LabelSubset, root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the subset as ``--labels-file`` reads it: one path per line, relative to ``root`` (atomically).

    Samples of tar shards are written as their absolute names, ``/data/train-000003.tar:n01440764/x.jpeg``.
    """
    from fastclr.pipelines.shards import is_shard_source

    if is_shard_source(root):
        lines = [str(Path(f).resolve()) for f in subset.files]
    else:
        base = Path(root).resolve()
        lines = [os.path.relpath(Path(f).resolve(), base) for f in subset.files]
    text = "".join(line + "\n" for line in lines)
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_file_list(subset: LabelSubset, path: str | os.PathLike) -> Path:
    """Write the subset as the loaders' file list: ``<absolute path> <class index>`` per line (atomically).

    The loaders number classes 0..K-1 from such a list, which are ``--data``'s indices: every class has a label.
    """
    text = "".join(
        f"{Path(f).resolve()} {y}\n" for f, y in zip(subset.files, subset.labels, strict=True)
    )
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def label_subset(
    root: str | os.PathLike,
    *,
    fraction: float | None = None,
    seed: int = 0,
    labels_file: str | os.PathLike | None = None,
    on_corrupt: str = "error",
) -> LabelSubset:
    """The labelled subset of the ImageFolder ``root``: drawn (``fraction``, ``seed``) or read (``labels_file``).

    Exactly one of ``fraction`` and ``labels_file`` is given. ``root`` must be labelled (class folders).
    """
    from fastclr.pipelines.data import scan_images

    if (fraction is None) == (labels_file is None):
        raise LabelError("give exactly one of --label-fraction and --labels-file")
    if fraction is not None:
        check_fraction(fraction)  # before listing a large data set
    images = scan_images(root, on_corrupt=on_corrupt)
    if not images.labelled:
        from fastclr.train.build import unlabelled_data_hint

        raise LabelError(
            f"fine-tuning needs labels, but {unlabelled_data_hint('--data', str(root))}"
        )
    if len(images.classes) < 2:
        raise LabelError(
            f"--data {root} has {len(images.classes)} class folder(s); a classifier needs at least 2"
        )
    if fraction is not None:
        return draw_subset(images.files, images.labels, images.classes, fraction, seed)
    return read_subset(labels_file, root, images.files, images.labels, images.classes)

"""Data set listing (folders, file lists and tar shards, validated by :mod:`fastclr.pipelines.images`), sharding and
per-epoch ordering.

Shared by the DALI loaders and their torchvision twins so that both read the same files in the
same order: the permutation of an epoch depends only on ``(seed, epoch)`` (so every shard sees the
same permutation and the shards partition it) and the augmentation seed only on
``(seed, epoch, shard_id)``.

Sharding (``num_shards`` ranks, ``N`` images, batch size ``B``, ``last_batch`` policy):

- ``"drop"``: every shard takes ``N // num_shards`` images (strided slice of the permutation) and
  drops the incomplete last batch, so all shards yield ``(N // num_shards) // B`` full batches.
- ``"pad"``: the permutation is wrapped around to a multiple of ``num_shards`` and each shard's
  part again to a multiple of ``B``: every image is seen, a few twice; all batches are full and
  all shards have the same length.
- ``"keep"``: every image exactly once; the last batch of a shard may be short and shard lengths
  may differ by one batch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from fastclr.pipelines.images import (
    IMAGE_EXTENSIONS,
    ON_CORRUPT_POLICIES,
    CorruptImageError,
    ImageList,
    check_image,
    not_regular_file,
)
from fastclr.pipelines.shards import (
    is_shard_source,
    scan_shards,
    select_samples,
    split_sample_name,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAST_BATCH_POLICIES = ("drop", "pad", "keep")
_LAYOUTS = "an ImageFolder root/<class>/<image> or a flat folder of images root/<image>"


def _check_policy(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _dir_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _first_visit(path: Path, seen: set[tuple[int, int]]) -> bool:
    """True (and remember it) the first time the real folder behind ``path`` comes up; False after, or if it is gone."""
    try:
        key = _dir_key(path)
    except OSError:
        return False
    if key in seen:
        return False
    seen.add(key)
    return True


def _scan_folder(root: Path) -> ImageList:
    """An ImageFolder (class = sub-folder, images found recursively) or a flat folder of images."""
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    classes = sorted(e.name for e in entries if e.is_dir())
    loose = sorted(e.name for e in entries if not e.is_dir() and _is_image_name(e.name))
    if classes and loose:
        raise ValueError(
            f"{root} holds both images ({len(loose)}, e.g. {loose[0]}) and class folders "
            f"({len(classes)}, e.g. {classes[0]}/): expected {_LAYOUTS}, not both"
        )
    if loose:
        return ImageList(
            [os.path.join(root, n) for n in loose], [0] * len(loose), [], labelled=False
        )
    if not classes:
        raise ValueError(f"no images and no class folders in {root}: expected {_LAYOUTS}")
    files, labels = [], []
    # Symlinked folders are followed, but every real folder is listed once: a link back to an ancestor (a loop) or to
    # another class would otherwise list the same images again, or without end.
    seen = {_dir_key(root)} | {_dir_key(root / name) for name in classes}
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in sorted(dirnames) if _first_visit(Path(dirpath, d), seen)]
            for fname in sorted(filenames):
                if _is_image_name(fname):
                    files.append(os.path.join(dirpath, fname))
                    labels.append(label)
    if not files:
        raise ValueError(
            f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)} "
            f"files in {len(classes)} class folders)"
        )
    return ImageList(files, labels, classes)


def _read_file_list(list_file: Path) -> list[tuple[str, int | None]]:
    """The ``(path, label or None)`` of the ``path`` or ``path label`` lines; relative paths are relative to the
    list file."""
    if reason := not_regular_file(list_file):
        raise ValueError(f"data set {list_file} {reason}: expected a folder or a file list")
    base = list_file.parent
    entries: list[tuple[str, int | None]] = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            path, label = line, None
            parts = line.rsplit(maxsplit=1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                path, label = parts[0], int(parts[1])
                if label < 0:
                    raise ValueError(f"{list_file}:{lineno}: negative label {label}")
            entries.append((str(base / path), label))
    if not entries:
        raise ValueError(f"file list {list_file} names no images")
    return entries


def _scan_file_list(list_file: Path, entries: list[tuple[str, int | None]]) -> ImageList:
    """The images of a file list's ``entries`` (:func:`_read_file_list`), labelled by the list or by folder."""
    with_label = sum(label is not None for _, label in entries)
    if with_label == len(entries):
        num_classes = max(label for _, label in entries) + 1
        classes = [str(i) for i in range(num_classes)]
        return ImageList([p for p, _ in entries], [int(lbl) for _, lbl in entries], classes)
    if with_label:
        raise ValueError(
            f"file list {list_file}: {with_label} of {len(entries)} lines have a label; "
            "give a label on every line or on none (then the parent folder is the class)"
        )
    classes = sorted({Path(p).parent.name for p, _ in entries})
    index = {c: i for i, c in enumerate(classes)}
    return ImageList(
        [p for p, _ in entries], [index[Path(p).parent.name] for p, _ in entries], classes
    )


def scan_images(source: str | os.PathLike, on_corrupt: str = "error") -> ImageList:
    """List and validate a data set (see :func:`list_images`), keeping the skipped files."""
    _check_policy("on_corrupt", on_corrupt, ON_CORRUPT_POLICIES)
    if is_shard_source(source):
        return scan_shards(source, on_corrupt)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"data set not found: {source}")
    if source.is_dir():
        listing = _scan_folder(source)
    else:
        entries = _read_file_list(source)
        # samples of tar shards (a label subset of them)
        if split_sample_name(entries[0][0]) is not None:
            return select_samples(entries, str(source), on_corrupt)
        listing = _scan_file_list(source, entries)
    kept_files, kept_labels, skipped = [], [], []
    for path, label in zip(listing.files, listing.labels, strict=True):
        reason = check_image(path)
        if reason is None:
            kept_files.append(path)
            kept_labels.append(label)
        elif on_corrupt == "error":
            raise CorruptImageError(f"image {path} {reason}")
        else:
            skipped.append((path, reason))
    if not kept_files:
        raise ValueError(
            f"no readable images in {source}: all {len(listing.files)} files were skipped"
        )
    return ImageList(kept_files, kept_labels, listing.classes, skipped, listing.labelled)


def list_images(
    source: str | os.PathLike, on_corrupt: str = "error"
) -> tuple[list[str], list[int], list[str]]:
    """List the images of a data set with their labels.

    Args:
        source: an ImageFolder directory ``root/<class>/<image>`` (class = sub-folder, sorted
            alphabetically; images found recursively, by extension), a flat folder of unlabelled
            images ``root/<image>`` (for pretraining: every label 0, no classes; see
            :class:`ImageList`), a text file with one ``path`` or ``path label`` per line
            (relative paths are relative to the list file; without labels the parent folder name
            is the class), or tar shards in the webdataset layout: a pattern such as
            ``data/train-{000000..000127}.tar``, one ``.tar`` file, or a folder written by
            ``fastclr shards`` (see :mod:`~fastclr.pipelines.shards`; files are then named
            ``<shard>.tar:<member>``). A folder holding both images and sub-folders is an error.
        on_corrupt: ``"error"`` raises :class:`CorruptImageError` (a ValueError) naming the first
            bad file; ``"skip"`` leaves bad files out.

    Returns:
        ``(files, labels, classes)``: paths, integer labels (indices into ``classes``), class names.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no images, images beside class folders, or a bad file with
            ``on_corrupt="error"``.
    """
    images = scan_images(source, on_corrupt)
    return images.files, images.labels, images.classes


def shard_size(num_samples: int, num_shards: int, shard_id: int, last_batch: str) -> int:
    """Number of samples shard ``shard_id`` reads per epoch, before batching."""
    if last_batch == "drop":
        return num_samples // num_shards
    if last_batch == "pad":
        return math.ceil(num_samples / num_shards)
    return len(range(shard_id, num_samples, num_shards))


def num_batches(num_samples: int, batch_size: int, num_shards: int, shard_id: int, last_batch: str):
    """Batches per epoch for one shard under a ``last_batch`` policy."""
    n = shard_size(num_samples, num_shards, shard_id, last_batch)
    return n // batch_size if last_batch == "drop" else math.ceil(n / batch_size)


def check_sharding(
    num_samples: int, batch_size: int, shard_id: int, num_shards: int, last_batch: str
) -> None:
    """Validate batch/shard arguments against the data set size; raise ValueError naming them."""
    _check_policy("last_batch", last_batch, LAST_BATCH_POLICIES)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id!r}")
    if num_batches(num_samples, batch_size, num_shards, shard_id, last_batch) == 0:
        raise ValueError(
            f"shard {shard_id}/{num_shards} of {num_samples} images yields no batch of "
            f"{batch_size} with last_batch={last_batch!r}"
        )


def epoch_indices(
    num_samples: int,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    shard_id: int = 0,
    num_shards: int = 1,
    last_batch: str = "drop",
    shuffle: bool = True,
) -> np.ndarray:
    """Sample indices one shard reads in one epoch, in order.

    Returns:
        int64 array of length ``num_batches * batch_size``; with ``last_batch="keep"`` the tail
        of the last batch is filled by wrapping around and must be cut off by the caller
        (the first ``shard_size(...)`` entries are the real ones).
    """
    check_sharding(num_samples, batch_size, shard_id, num_shards, last_batch)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    else:
        order = np.arange(num_samples)
    if last_batch == "drop":
        per_shard = num_samples // num_shards
        mine = order[shard_id : per_shard * num_shards : num_shards]
    elif last_batch == "pad":
        total = math.ceil(num_samples / num_shards) * num_shards
        mine = np.resize(order, total)[shard_id::num_shards]
    else:
        mine = order[shard_id::num_shards]
    nb = num_batches(num_samples, batch_size, num_shards, shard_id, last_batch)
    return np.resize(mine, nb * batch_size).astype(np.int64)


def augment_seed(seed: int, epoch: int, shard_id: int, *more: int) -> int:
    """A 31-bit seed for the augmentation randomness of one (seed, epoch, shard[, more...])."""
    entropy = [seed, epoch, shard_id, *more]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)

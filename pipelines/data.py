"""Data set listing, cheap up-front validation, sharding and per-epoch ordering.

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
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:
    from fastclr.pipelines.shards import ShardIndex

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LAST_BATCH_POLICIES = ("drop", "pad", "keep")
ON_CORRUPT_POLICIES = ("error", "skip")
_LAYOUTS = "an ImageFolder root/<class>/<image> or a flat folder of images root/<image>"

# Bytes read from each end of a file by the validity check: enough for the magic numbers and the PNG header (bit
# depth at byte 24) at the front, and for an end-of-image marker followed by a little padding at the back.
_HEAD_BYTES = 32
_TAIL_BYTES = 1024
# A TIFF's first directory is read entry by entry up to this many entries (its sample tags come early: sorted by tag).
_TIFF_MAX_ENTRIES = 256
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT, _TIFF_FLOAT = 258, 339, 3
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


class CorruptImageError(ValueError):
    """An image file is unreadable, empty, truncated or not an image; the message names the path.

    ``path`` and ``reason`` (what is wrong with it) are set where the raiser knows them (None otherwise).
    """

    def __init__(self, message: str, path: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.path, self.reason = path, reason

    def __reduce__(self):  # keep the attributes when crossing DataLoader worker processes
        return type(self), (str(self), self.path, self.reason)


class UnlabelledDataError(ValueError):
    """A loader that yields labels was given a flat folder of unlabelled images; the message names the folder."""


@dataclass(frozen=True)
class ImageList:
    """Result of scanning a data set: files with integer labels, class names and skipped files.

    ``labelled`` is False for a flat folder of images (no class folders) or shards without ``.cls``
    members: its labels are all 0 and mean nothing, and ``classes`` is empty. Pretraining reads it;
    evaluation refuses it.

    ``shards`` is None for image files on disk (``files`` are their paths); for a data set in tar
    shards it locates every sample's bytes and ``files`` are names ``<shard>.tar:<member>``
    (:mod:`~fastclr.pipelines.shards`).
    """

    files: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    labelled: bool = True
    shards: ShardIndex | None = None


def not_regular_file(path: str | os.PathLike) -> str | None:
    """None if ``path`` (after symlinks) is a regular file, else why not: reading a device such as /dev/zero or a FIFO
    could block or never end. OSError if it cannot be stat'ed."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return f"is not a regular file (it is {kind}); only regular files are read"


def check_image(path: str | os.PathLike) -> str | None:
    """Cheap validity check of one image file (reads at most ~4 KiB, whatever the file).

    Catches missing/unreadable files, files that are not regular files (devices, FIFOs: reading them may never end),
    and everything :func:`check_encoded` catches in the bytes.

    Returns:
        None if the file looks valid, else a short reason.
    """
    try:
        if reason := not_regular_file(path):
            return reason
        # O_NONBLOCK: should the path become a FIFO after the stat, the open returns at once instead of waiting.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if reason := not_regular_file(f.fileno()):
                return reason
            return check_encoded(f, os.fstat(f.fileno()).st_size)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


def check_encoded(f, size: int) -> str | None:
    """Cheap validity check of one encoded image of ``size`` bytes in the seekable binary file ``f`` (a file on
    disk, or a member of a tar shard): reads at most ~4 KiB.

    Catches empty images, non-image content, truncated JPEG/PNG images (no end-of-image marker / IEND chunk) and
    PNG/TIFF images with more than 8 bits or floating-point samples (the DALI and torchvision decoders convert those
    differently). Corruption inside the compressed data is only found by decoding; the loaders report such an image
    by name when the decoder fails on it. OSError propagates.

    Returns:
        None if the image looks valid, else a short reason.
    """
    head = f.read(_HEAD_BYTES)
    f.seek(max(0, size - _TAIL_BYTES))
    tail = f.read(_TAIL_BYTES)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_depth_reason(f, head, size)
    if size == 0:
        return "is empty (0 bytes)"
    if head.startswith(b"\xff\xd8\xff"):
        # EOI marker; inside entropy-coded data 0xFF is always stuffed, so it cannot occur by chance.
        return None if b"\xff\xd9" in tail else "is truncated (no JPEG end-of-image marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if head[12:16] == b"IHDR" and head[24] > 8:
            return _deep_samples_reason(head[24], floating=False, kind="PNG")
        return None if b"IEND" in tail else "is truncated (no PNG IEND chunk)"
    if head.startswith(b"BM") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "is not a supported image (unrecognised header; expected JPEG, PNG, BMP, WebP or TIFF)"


def _deep_samples_reason(bits: int, floating: bool, kind: str) -> str:
    sample = f"{bits}-bit {'floating-point' if floating else 'integer'}"
    return (
        f"has {sample} samples ({kind}): DALI and torchvision decode such images differently, so only 8-bit "
        "images are read; convert it to 8 bits per channel"
    )


def _tiff_depth_reason(f, head: bytes, size: int) -> str | None:
    """Why a TIFF's first image cannot be read (samples wider than 8 bits or floating point, a directory outside the
    file), or None. Reads the directory with bounded reads: at most _TIFF_MAX_ENTRIES entries."""
    if len(head) < 8:
        return "is truncated (incomplete TIFF header)"
    order = "<" if head[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", head[4:8])
    f.seek(ifd)
    count = f.read(2)
    if ifd < 8 or len(count) < 2:
        return f"is not a valid TIFF (its first directory, at byte {ifd}, is outside the {size}-byte file)"
    n = min(struct.unpack(order + "H", count)[0], _TIFF_MAX_ENTRIES)
    entries = f.read(12 * n)
    bits, floating = 1, False  # the TIFF defaults
    for i in range(len(entries) // 12):
        tag, typ, n_values, value = struct.unpack(order + "HHI4s", entries[12 * i : 12 * i + 12])
        if tag in (_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT) and typ == 3:  # SHORT values
            # The first sample's value: inline in the entry, or at the offset it holds when the values take > 4 bytes.
            (first,) = struct.unpack(order + "H", value[:2])
            if n_values > 2:
                f.seek(struct.unpack(order + "I", value)[0])
                raw = f.read(2)
                first = struct.unpack(order + "H", raw)[0] if len(raw) == 2 else 0
            if tag == _TIFF_BITS_PER_SAMPLE:
                bits = first
            else:
                floating = first == _TIFF_FLOAT
    if bits > 8 or floating:
        return _deep_samples_reason(bits, floating, "TIFF")
    return None


def decode_error(path: str | os.PathLike | BinaryIO) -> str | None:
    """Fully decode an image (a path or a binary file object) with PIL (slow: for diagnosing a decoder failure);
    None if it decodes."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:  # PIL raises many types for bad data; each one means "bad file"
        return f"{type(e).__name__}: {e}"
    return None


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
    # Imported here: the shard reader builds on this module (its checks and ImageList), not the other way round.
    from fastclr.pipelines.shards import (
        is_shard_source,
        scan_shards,
        select_samples,
        split_sample_name,
    )

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

"""Image files and their cheap up-front checks: what a data set's samples are (:class:`ImageList`), whether a file
(or the bytes of a tar member) holds a readable image (:func:`check_image`, :func:`check_encoded`), and the error
that names a bad one (:class:`CorruptImageError`).

The checks read a few bytes from each end of a file (magic number, PNG bit depth, TIFF sample format, end-of-image
marker), never decode: a data set of a million images is checked in the time it takes to list it. Listing data sets
(:mod:`fastclr.pipelines.data`) and reading tar shards (:mod:`fastclr.pipelines.shards`) both build on this module.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from fastclr.pipelines.shards import ShardIndex

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
ON_CORRUPT_POLICIES = ("error", "skip")

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

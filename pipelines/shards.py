"""Data sets in tar shards (the webdataset layout): reading them as the loaders' samples, and writing them.

Layout: each tar shard holds samples as consecutive members sharing a key, ``<key>.<ext>``, the key being the member
name up to the first dot of its file name: one image (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``, ``.tif``,
``.tiff``) and, for labelled data, ``<key>.cls`` holding the class index as decimal text. Other members are ignored.
``--data`` (and every loader's ``root``) names shards as

- a pattern with brace ranges or lists, ``/data/imagenet-train-{000000..001023}.tar`` (zero-padded as written),
  ``/data/{train,extra}-{0..9}.tar``, or one ``.tar`` file;
- a folder written by :func:`~fastclr.pipelines.shard_writer.write_shards` (``fastclr shards DIR OUT``): the shards its ``manifest.json`` lists.

Class names come from that manifest where there is one beside the shards (``fastclr shards`` records the
ImageFolder's), else they are the class indices, ``"0" ... "C-1"``.

How the loaders read shards: the shards are indexed once into a flat list of samples. A shard written by
:func:`~fastclr.pipelines.shard_writer.write_shards` has its index beside it, ``<shard>.tar.index.json`` (each sample's member name, byte offset, size
and label, and the shard's size), so start-up reads one small file per shard; a shard without a valid index (another
tool's, or one whose size no longer matches) is scanned: its member headers, the small ``.cls`` members and ~1 KiB of
each image for the up-front check (:func:`~fastclr.pipelines.images.check_encoded`). The list holds the samples in
pattern order and, within a shard, in tar order; sample ``i`` is then ``(shard, byte offset, size)``
(:class:`ShardIndex`), read with one ``pread`` from a file descriptor kept open. From there on
shards are just another source of the same samples: :func:`~fastclr.pipelines.data.epoch_indices` orders them,
ranks take their strided slices, augmentation seeds depend on ``(seed, epoch, rank)``, undecodable samples get the
same stand-ins, and ``set_epoch(e, skip_batches=k)`` resumes exactly, as for a folder. A folder and its shards give
the same samples in the same batches; the torchvision twin also gives the same augmentations, while DALI draws its
per-op random streams differently behind ``fn.external_source`` than behind its file reader, so the DALI views of
shards are other (equally distributed, equally reproducible) draws. The DALI loaders feed the bytes through
``fn.external_source`` into the same decoder and view graph; the torchvision twin decodes them with PIL.

Why not DALI's ``fn.readers.webdataset``: it gives each rank a contiguous range of the samples, shuffles within a
buffer filled as it reads (``initial_fill``), in an order the torchvision twin cannot reproduce, and continues
mid-epoch only from a checkpoint of its own pipeline's state, not at batch ``k`` of ``(seed, epoch)``; so neither
per-rank partitions equal to the folder's nor ``skip_batches`` resume would hold, and a bad member would stop the
reader rather than follow ``on_corrupt``. Reading at known offsets removes what makes millions of small files slow
(listing folders, one open per image); what it gives up is strictly sequential reading, which matters on object
stores but little on local disks or network file systems, where the page cache and read-ahead serve ``pread``.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import resource
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fastclr.pipelines.images import (
    IMAGE_EXTENSIONS,
    ON_CORRUPT_POLICIES,
    CorruptImageError,
    ImageList,
    check_encoded,
    not_regular_file,
)

MANIFEST_NAME = "manifest.json"
INDEX_SUFFIX = ".index.json"  # beside each shard fastclr writes: its samples' members, offsets, sizes and labels
INDEX_FORMAT = "fastclr-shard-index"
INDEX_VERSION = 1
MANIFEST_FORMAT = "fastclr-shards"
MANIFEST_VERSION = 1
LABEL_EXTENSION = "cls"
IMAGE_MEMBER_EXTENSIONS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
# A pattern may name at most this many shards (a typo such as {0..99999999} must not exhaust memory).
MAX_SHARDS = 1_000_000
_MAX_MANIFEST_BYTES = 256 * 2**20
MAX_LABEL_BYTES = 32
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
TAR_BLOCK = 512


# ----------------------------------------------------------------------------------------------------------------------
# Naming shards


def expand_pattern(pattern: str) -> list[str]:
    """Brace expansion of a shard pattern: ``a-{0..2}.tar`` -> ``a-0.tar a-1.tar a-2.tar``; ``{00..10}`` keeps the
    zero padding; ``{x,y}`` lists alternatives; several braces expand left to right (a product)."""
    out = [""]
    rest = pattern
    while match := _BRACE.search(rest):
        body = match.group(1)
        if span := _RANGE.fullmatch(body):
            first, last = span.groups()
            if int(first) > int(last):
                raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
            padded = (len(first) > 1 and first[0] == "0") or (len(last) > 1 and last[0] == "0")
            width = max(len(first), len(last)) if padded else 0
            choices = range(int(first), int(last) + 1)
            if len(out) * len(choices) > MAX_SHARDS:
                raise ValueError(f"shard pattern {pattern!r} names more than {MAX_SHARDS} shards")
            choices = [str(i).zfill(width) for i in choices]
        elif "," in body:
            choices = body.split(",")
        else:
            raise ValueError(
                f"shard pattern {pattern!r}: {{{body}}} is neither a range {{first..last}} nor a list {{a,b}}"
            )
        if len(out) * len(choices) > MAX_SHARDS:
            raise ValueError(f"shard pattern {pattern!r} names more than {MAX_SHARDS} shards")
        out = [head + rest[: match.start()] + choice for head in out for choice in choices]
        rest = rest[match.end() :]
    if "{" in rest or "}" in rest:
        raise ValueError(f"shard pattern {pattern!r} has an unmatched or nested brace")
    return [head + rest for head in out]


def is_shard_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` names tar shards: a ``.tar`` path or pattern, or a folder holding a shard manifest."""
    text = os.fspath(source)
    return text.endswith(".tar") or os.path.isfile(os.path.join(text, MANIFEST_NAME))


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest :func:`~fastclr.pipelines.shard_writer.write_shards` keeps in ``folder``; ValueError naming the file if it is not one."""
    path = Path(folder) / MANIFEST_NAME
    if reason := not_regular_file(path):
        raise ValueError(f"shard manifest {path} {reason}")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise ValueError(f"shard manifest {path} is larger than {_MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"shard manifest {path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f'{path} is not a fastclr shard manifest (no "format": "{MANIFEST_FORMAT}")'
        )
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"shard manifest {path} has version {manifest.get('version')!r}; this fastclr reads {MANIFEST_VERSION}"
        )
    return manifest


def shard_paths(source: str | os.PathLike) -> tuple[list[str], dict | None]:
    """The shard files ``source`` names, checked to be regular files, and the manifest beside them (or None).

    Raises:
        FileNotFoundError: a shard (the first missing one named, with how many are missing) or the folder is missing.
        ValueError: a bad pattern, a shard named twice or not a regular file, an unfinished conversion.
    """
    text = os.fspath(source)
    manifest = None
    if not text.endswith(".tar"):
        manifest = read_manifest(text)
        if not manifest.get("complete"):
            done, total = len(manifest.get("shards", [])), manifest.get("num_shards", "?")
            raise ValueError(
                f"{text} holds an unfinished conversion ({done} of {total} shards): run fastclr shards again to "
                "finish it"
            )
        names = [str(entry.get("name")) for entry in manifest.get("shards", [])]
        for name in names:
            if os.path.basename(name) != name or not name.endswith(".tar"):
                raise ValueError(
                    f"shard manifest in {text} lists {name!r}, not a .tar file beside it"
                )
        paths = [os.path.join(text, name) for name in names]
    else:
        paths = expand_pattern(text)
        seen: set[str] = set()
        for p in paths:
            if p in seen:
                raise ValueError(f"shard pattern {text!r} names {p} more than once")
            seen.add(p)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"shard not found: {missing[0]} ({len(missing)} of the {len(paths)} shards {text} names are missing)"
        )
    for p in paths:
        if reason := not_regular_file(p):
            raise ValueError(f"shard {p} {reason}")
    if manifest is None:
        folders = {os.path.dirname(p) for p in paths}
        if len(folders) == 1 and os.path.isfile(os.path.join(folders.pop(), MANIFEST_NAME)):
            try:
                beside = read_manifest(os.path.dirname(paths[0]))
            except ValueError:  # another tool's manifest.json: the shards are read without one
                beside = {}
            names = {str(entry.get("name")) for entry in beside.get("shards", [])}
            manifest = beside if all(os.path.basename(p) in names for p in paths) else None
    return paths, manifest


def member_key(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a tar member name, as webdataset splits it: at the first dot of the file name."""
    folder, base = posixpath.split(name)
    dot = base.find(".")
    if dot <= 0:
        return "", ""
    key = base[:dot]
    return (f"{folder}/{key}" if folder else key), base[dot + 1 :].lower()


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def _max_open_files() -> int:
    """How many shard files one process keeps open: half its file-descriptor limit, between 8 and 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(8, min(4096, soft // 2))


class _MemberFile:
    """A read-only, seekable view of ``size`` bytes at ``offset`` of an open file: what the up-front check reads."""

    def __init__(self, fd: int, offset: int, size: int):
        self.fd, self.offset, self.size, self.pos = fd, offset, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        data = os.pread(self.fd, max(n, 0), self.offset + self.pos)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.size + pos)
        return self.pos


class ShardIndex:
    """Where every sample's encoded image lies: ``paths[shard[i]]``, bytes ``offset[i] : offset[i] + size[i]``.

    ``names[i]`` (``<shard path>:<member>``) names sample ``i`` in messages. Reading keeps up to
    :func:`_max_open_files` shards open per process (least recently used closed first); ``pread`` needs no shared
    file position, so DataLoader worker processes may inherit the descriptors. Pickling drops them.
    """

    def __init__(self, paths, names, shard, offset, size):
        self.paths, self.names = list(paths), names
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._max_open = _max_open_files()

    def __len__(self) -> int:
        return len(self.size)

    def __getstate__(self):
        return {**self.__dict__, "_fds": OrderedDict()}

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            if len(self._fds) >= self._max_open:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[k] = os.open(self.paths[k], os.O_RDONLY)
        else:
            self._fds.move_to_end(k)
        return fd

    def read(self, i: int) -> bytes:
        """The encoded image of sample ``i``; CorruptImageError naming it if it cannot be read whole."""
        name, size = self.names[i], int(self.size[i])
        try:
            data = os.pread(self._fd(int(self.shard[i])), size, int(self.offset[i]))
        except OSError as e:
            reason = f"cannot be read ({e.strerror or e})"
            raise CorruptImageError(f"image {name} {reason}", path=name, reason=reason) from e
        if len(data) != size:
            reason = f"is truncated (the shard ends {size - len(data)} bytes into it)"
            raise CorruptImageError(f"image {name} {reason}", path=name, reason=reason)
        return data

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        with contextlib.suppress(OSError):
            self.close()


class ShardSample:
    """What one shard holds under one key, as its members are read."""

    __slots__ = ("name", "offset", "size", "label", "reason")

    def __init__(self, name: str):
        self.name, self.offset, self.size, self.label, self.reason = name, -1, 0, None, None


def _read_label(fd: int, info: tarfile.TarInfo) -> tuple[int | None, str | None]:
    """``(class index, None)`` from a ``.cls`` member, or ``(None, why not)``."""
    if info.size > MAX_LABEL_BYTES:
        return None, f"has a {info.size}-byte .cls member (expected a class index)"
    text = os.pread(fd, info.size, info.offset_data).strip()
    if not text.isdigit():
        return None, f"has a .cls member that is not a class index ({text[:16]!r})"
    return int(text), None


def scan_shard(path: str, skipped: list, on_corrupt: str) -> list[ShardSample]:
    """The samples of one shard, checked; bad ones raise (``on_corrupt="error"``) or go to ``skipped``."""
    samples: dict[str, ShardSample] = {}
    with open(path, "rb") as raw:
        fd, end = raw.fileno(), os.fstat(raw.fileno()).st_size
        try:
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                for info in tar:
                    key, ext = member_key(info.name)
                    if not key or (ext != LABEL_EXTENSION and ext not in IMAGE_MEMBER_EXTENSIONS):
                        continue
                    sample = samples.setdefault(key, ShardSample(f"{path}:{key}"))
                    if not info.isfile():
                        sample.reason = (
                            sample.reason or f"has a .{ext} member that is not a regular file"
                        )
                    elif info.offset_data + info.size > end:
                        sample.reason = f"is truncated (the shard ends at byte {end})"
                        break
                    elif ext == LABEL_EXTENSION:
                        sample.label, reason = _read_label(fd, info)
                        sample.reason = sample.reason or reason
                    elif sample.offset >= 0:
                        sample.reason = sample.reason or "has more than one image member"
                    else:
                        sample.name = f"{path}:{info.name}"
                        sample.offset, sample.size = info.offset_data, info.size
                if end - tar.offset < 2 * TAR_BLOCK and samples:
                    # no end-of-archive marker (two zero blocks): the shard was cut after a whole member, maybe
                    # between a sample's image and its label
                    last = next(reversed(samples.values()))
                    last.reason = last.reason or f"is cut off: the shard ends at byte {end}"
        except tarfile.TarError as e:
            reason = f"is damaged after {len(samples)} samples ({e})"
            if on_corrupt == "error":
                raise CorruptImageError(
                    f"tar shard {path} {reason}", path=path, reason=reason
                ) from e
            skipped.append((path, reason))
        kept = []
        for sample in samples.values():
            if sample.reason is None and sample.offset < 0:
                extensions = ", ".join(f".{e}" for e in IMAGE_MEMBER_EXTENSIONS)
                sample.reason = f"has no image member (expected one of {extensions})"
            if sample.reason is None:
                sample.reason = check_encoded(
                    _MemberFile(fd, sample.offset, sample.size), sample.size
                )
            if sample.reason is None:
                kept.append(sample)
            elif on_corrupt == "error":
                raise CorruptImageError(
                    f"image {sample.name} {sample.reason}", sample.name, sample.reason
                )
            else:
                skipped.append((sample.name, sample.reason))
    return kept


def _indexed_samples(path: str) -> list[ShardSample] | None:
    """The samples of the shard ``path`` from its ``.index.json`` (no tar header or image read), or None when there is
    none or it does not describe this file (another size, a malformed entry): then the shard is scanned.

    The index is written by ``fastclr shards`` after the images passed their checks, so the up-front check is skipped;
    an image that fails to decode later still meets the loaders' ``on_corrupt`` policy.
    """
    index_path = path + INDEX_SUFFIX
    try:
        if os.stat(index_path).st_size > _MAX_MANIFEST_BYTES or not_regular_file(index_path):
            return None
        index = json.loads(Path(index_path).read_text(encoding="utf-8"))
        end = os.stat(path).st_size
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (
        not isinstance(index, dict)
        or index.get("format") != INDEX_FORMAT
        or index.get("version") != INDEX_VERSION
        or index.get("bytes") != end
        or not isinstance(index.get("samples"), list)
    ):
        return None
    samples = []
    for entry in index["samples"]:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)):
            return None
        member, offset, size, label = entry
        numbers = (offset, size) if label is None else (offset, size, label)
        if not all(type(v) is int and v >= 0 for v in numbers) or offset + size > end:
            return None
        sample = ShardSample(f"{path}:{member}")
        sample.offset, sample.size, sample.label = offset, size, label
        samples.append(sample)
    return samples


def _shard_samples(path: str, skipped: list, on_corrupt: str) -> list[ShardSample]:
    """The samples of one shard: from its index where it has a valid one, else scanned (:func:`scan_shard`)."""
    indexed = _indexed_samples(path)
    return indexed if indexed is not None else scan_shard(path, skipped, on_corrupt)


# The last few scans, keyed by the shards' identities and the policy: a run's loaders and its evaluation scan the
# same shards more than once.
_SCANS: OrderedDict[tuple, ImageList] = OrderedDict()
_MAX_SCANS = 4


def scan_shards(source: str | os.PathLike, on_corrupt: str = "error") -> ImageList:
    """List and check the samples of tar shards (see the module docstring); the loaders' :class:`ImageList`.

    Raises:
        FileNotFoundError: a shard is missing.
        CorruptImageError: (``on_corrupt="error"``) a bad sample or a damaged shard, named.
        ValueError: a bad pattern, no samples, labels on some samples only, a label beyond the manifest's classes.
    """
    if on_corrupt not in ON_CORRUPT_POLICIES:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT_POLICIES}, got {on_corrupt!r}")
    paths, manifest = shard_paths(source)
    stats = [os.stat(p) for p in paths]
    key = (
        tuple((p, s.st_ino, s.st_size, s.st_mtime_ns) for p, s in zip(paths, stats, strict=True)),
        on_corrupt,
    )
    if key in _SCANS:
        _SCANS.move_to_end(key)
        return _SCANS[key]
    skipped: list[tuple[str, str]] = []
    names, labels, shard, offset, size = [], [], [], [], []
    for k, path in enumerate(paths):
        for s in _shard_samples(path, skipped, on_corrupt):
            names.append(s.name)
            labels.append(s.label)
            shard.append(k)
            offset.append(s.offset)
            size.append(s.size)
    if not names:
        if skipped:
            raise ValueError(
                f"no readable images in {source}: all {len(skipped)} samples were skipped"
            )
        raise ValueError(
            f"no samples in the tar shards {source}: expected webdataset members <key>.jpg (or another image "
            "extension), with <key>.cls for the label"
        )
    with_label = sum(label is not None for label in labels)
    if with_label == 0:
        labels, classes, labelled = [0] * len(names), [], False
    elif with_label < len(names):
        first = names[labels.index(None)]
        raise ValueError(
            f"tar shards {source}: {with_label} of {len(names)} samples have a .cls label but {first} has none; "
            "give every sample a label or none"
        )
    else:
        labelled = True
        if manifest is not None and manifest.get("classes"):
            classes = list(manifest["classes"])
            if max(labels) >= len(classes):
                worst = names[labels.index(max(labels))]
                raise ValueError(
                    f"{worst} has label {max(labels)}, beyond the {len(classes)} classes of the manifest beside it"
                )
        else:
            classes = [str(i) for i in range(max(labels) + 1)]
    images = ImageList(
        names, labels, classes, skipped, labelled, ShardIndex(paths, names, shard, offset, size)
    )
    _SCANS[key] = images
    if len(_SCANS) > _MAX_SCANS:
        _SCANS.popitem(last=False)
    return images


def split_sample_name(name: str) -> tuple[str, str] | None:
    """``(shard path, member)`` of a sample name ``<shard>.tar:<member>`` whose shard is a file; None otherwise."""
    at = name.find(".tar:")
    if at < 0:
        return None
    shard = name[: at + 4]
    return (shard, name[at + 5 :]) if os.path.isfile(shard) else None


def select_samples(
    entries: list[tuple[str, int | None]], where: str, on_corrupt: str = "error"
) -> ImageList:
    """The samples a file list names as ``<shard>.tar:<member>`` (its ``(name, label)`` lines), in its order.

    This is how a subset of a data set in shards (the labelled images of ``fastclr finetune``) reaches the loaders:
    each named shard is indexed once, as :func:`scan_shards` does, and the list's labels replace the ``.cls`` ones.
    ``where`` names the list in errors. A listed sample that ``on_corrupt`` skips is left out and recorded.

    Raises:
        ValueError: a line that names no sample of its shard, or labels on some lines only.
        CorruptImageError: (``on_corrupt="error"``) a bad sample or a damaged shard, named.
    """
    parts = [split_sample_name(name) for name, _ in entries]
    if None in parts:
        bad = entries[parts.index(None)][0]
        raise ValueError(
            f"file list {where} mixes images in tar shards with {bad!r}, which is not one: list either image files "
            "or <shard>.tar:<member> samples"
        )
    paths = list(dict.fromkeys(shard for shard, _ in parts))
    skipped: list[tuple[str, str]] = []
    found: dict[str, tuple[int, ShardSample]] = {}
    for k, path in enumerate(paths):
        found |= {s.name: (k, s) for s in _shard_samples(path, skipped, on_corrupt)}
    dropped = {name for name, _ in skipped}
    names, labels, shard, offset, size = [], [], [], [], []
    for name, label in entries:
        if name in dropped:
            continue
        if name not in found:
            raise ValueError(f"file list {where}: {name} is not a sample of its shard")
        k, s = found[name]
        names.append(name)
        labels.append(label)
        shard.append(k)
        offset.append(s.offset)
        size.append(s.size)
    if not names:
        raise ValueError(f"no readable images in {where}: all {len(entries)} samples were skipped")
    with_label = sum(label is not None for label in labels)
    if with_label not in (0, len(labels)):
        raise ValueError(
            f"file list {where}: {with_label} of {len(labels)} lines have a label; give a label on every line"
        )
    labelled = with_label > 0
    labels = [int(y) for y in labels] if labelled else [0] * len(names)
    classes = [str(i) for i in range(max(labels) + 1)] if labelled else []
    return ImageList(
        names, labels, classes, skipped, labelled, ShardIndex(paths, names, shard, offset, size)
    )

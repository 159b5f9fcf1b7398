"""Data sets in tar shards (the webdataset layout): reading them as the loaders' samples, and writing them.

Layout: each tar shard holds samples as consecutive members sharing a key, ``<key>.<ext>``, the key being the member
name up to the first dot of its file name: one image (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``, ``.tif``,
``.tiff``) and, for labelled data, ``<key>.cls`` holding the class index as decimal text. Other members are ignored.
``--data`` (and every loader's ``root``) names shards as

- a pattern with brace ranges or lists, ``/data/imagenet-train-{000000..001023}.tar`` (zero-padded as written),
  ``/data/{train,extra}-{0..9}.tar``, or one ``.tar`` file;
- a folder written by :func:`write_shards` (``fastclr shards DIR OUT``): the shards its ``manifest.json`` lists.

Class names come from that manifest where there is one beside the shards (``fastclr shards`` records the
ImageFolder's), else they are the class indices, ``"0" ... "C-1"``.

How the loaders read shards: the shards are indexed once into a flat list of samples. A shard written by
:func:`write_shards` has its index beside it, ``<shard>.tar.index.json`` (each sample's member name, byte offset, size
and label, and the shard's size), so start-up reads one small file per shard; a shard without a valid index (another
tool's, or one whose size no longer matches) is scanned: its member headers, the small ``.cls`` members and ~1 KiB of
each image for the up-front check (:func:`~fastclr.pipelines.data.check_encoded`). The list holds the samples in
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
import hashlib
import io
import json
import os
import posixpath
import re
import resource
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fastclr.pipelines.data import (
    IMAGE_EXTENSIONS,
    ON_CORRUPT_POLICIES,
    CorruptImageError,
    ImageList,
    check_encoded,
    not_regular_file,
    scan_images,
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
_MAX_LABEL_BYTES = 32
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B)?", re.IGNORECASE)
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TAR_BLOCK = 512


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
    """The manifest :func:`write_shards` keeps in ``folder``; ValueError naming the file if it is not one."""
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


class _Sample:
    """What one shard holds under one key, as its members are read."""

    __slots__ = ("name", "offset", "size", "label", "reason")

    def __init__(self, name: str):
        self.name, self.offset, self.size, self.label, self.reason = name, -1, 0, None, None


def _read_label(fd: int, info: tarfile.TarInfo) -> tuple[int | None, str | None]:
    """``(class index, None)`` from a ``.cls`` member, or ``(None, why not)``."""
    if info.size > _MAX_LABEL_BYTES:
        return None, f"has a {info.size}-byte .cls member (expected a class index)"
    text = os.pread(fd, info.size, info.offset_data).strip()
    if not text.isdigit():
        return None, f"has a .cls member that is not a class index ({text[:16]!r})"
    return int(text), None


def _scan_shard(path: str, skipped: list, on_corrupt: str) -> list[_Sample]:
    """The samples of one shard, checked; bad ones raise (``on_corrupt="error"``) or go to ``skipped``."""
    samples: dict[str, _Sample] = {}
    with open(path, "rb") as raw:
        fd, end = raw.fileno(), os.fstat(raw.fileno()).st_size
        try:
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                for info in tar:
                    key, ext = member_key(info.name)
                    if not key or (ext != LABEL_EXTENSION and ext not in IMAGE_MEMBER_EXTENSIONS):
                        continue
                    sample = samples.setdefault(key, _Sample(f"{path}:{key}"))
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
                if end - tar.offset < 2 * _TAR_BLOCK and samples:
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


def _write_index(shard: Path, samples: list[_Sample], scanned_as: str) -> None:
    """Write ``<shard>.index.json`` atomically: the shard's size and, per sample, ``[member, offset, size, label]``
    (``samples`` as :func:`_scan_shard` found them in the file ``scanned_as``)."""
    skip = len(scanned_as) + 1
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "bytes": os.stat(scanned_as).st_size,
        "samples": [[x.name[skip:], x.offset, x.size, x.label] for x in samples],
    }
    path = Path(str(shard) + INDEX_SUFFIX)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(index, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _indexed_samples(path: str) -> list[_Sample] | None:
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
        sample = _Sample(f"{path}:{member}")
        sample.offset, sample.size, sample.label = offset, size, label
        samples.append(sample)
    return samples


def _shard_samples(path: str, skipped: list, on_corrupt: str) -> list[_Sample]:
    """The samples of one shard: from its index where it has a valid one, else scanned (:func:`_scan_shard`)."""
    indexed = _indexed_samples(path)
    return indexed if indexed is not None else _scan_shard(path, skipped, on_corrupt)


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
    found: dict[str, tuple[int, _Sample]] = {}
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


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def parse_shard_size(shard_size: int | str) -> tuple[str, int]:
    """``("images", n)`` for a plain count (``1000``) or ``("bytes", n)`` for a size (``500MB``, ``1GiB``)."""
    text = str(shard_size).strip()
    match = _SIZE.fullmatch(text)
    if isinstance(shard_size, bool) or match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"shard size must be a positive number of images (e.g. 1000) or of bytes with a unit "
            f"(e.g. 500MB, 1GiB), got {shard_size!r}"
        )
    count, unit = int(match.group(1)), match.group(2)
    return ("images", count) if unit is None else ("bytes", count * _UNITS[unit.lower()])


def _member_bytes(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a tar: a header block and its data padded to whole blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _plan(sizes: list[int], kind: str, limit: int, labelled: bool) -> list[tuple[int, int]]:
    """``[start, end)`` sample ranges of the shards: ``limit`` images each, or at most ``limit`` bytes each (a
    single larger sample gets a shard of its own)."""
    if kind == "images":
        return [(a, min(a + limit, len(sizes))) for a in range(0, len(sizes), limit)]
    plan, start, used = [], 0, 0
    label = _member_bytes(_MAX_LABEL_BYTES) if labelled else 0
    for i, size in enumerate(sizes):
        need = _member_bytes(size) + label
        if used and used + need > limit:
            plan.append((start, i))
            start, used = i, 0
        used += need
    plan.append((start, len(sizes)))
    return plan


def _keys(relpaths: list[str]) -> list[str]:
    """Member keys: the relative path without its extension, dots made underscores (webdataset splits at the first
    dot), made unique by the sample's index where two would collide."""
    keys, seen = [], set()
    for i, rel in enumerate(relpaths):
        stem = os.path.splitext(rel)[0].replace(os.sep, "/").replace(".", "_").lstrip("/")
        stem = stem or "sample"
        key = stem if stem not in seen else f"{stem}_{i}"
        seen.add(key)
        keys.append(key)
    return keys


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through to ``raw``."""

    def __init__(self, raw):
        self.raw, self.hash, self.bytes = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.bytes += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.bytes


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header that depends on nothing but name and size, so a shard's bytes are reproducible."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    return info


def _write_shard(path: Path, samples: list[tuple[str, str, int | None]]) -> dict:
    """Write ``(file, key, label)`` samples to the tar ``path`` via a ``.partial`` file renamed when complete."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as raw:
        out = _HashingWriter(raw)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for file, key, label in samples:
                ext = os.path.splitext(file)[1].lower()
                with open(file, "rb") as image:
                    tar.addfile(_tar_info(key + ext, os.fstat(image.fileno()).st_size), image)
                if label is not None:
                    text = str(label).encode()
                    tar.addfile(_tar_info(f"{key}.{LABEL_EXTENSION}", len(text)), io.BytesIO(text))
        raw.flush()
        os.fsync(raw.fileno())
    # The index first: a shard in place always has its index (a crash in between leaves an index without a shard,
    # written again with it when the conversion resumes).
    _write_index(path, _scan_shard(str(partial), [], "error"), str(partial))
    os.replace(partial, path)
    return {
        "name": path.name,
        "samples": len(samples),
        "bytes": out.bytes,
        "sha256": out.hash.hexdigest(),
    }


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _save_manifest(out: Path, manifest: dict) -> None:
    """Replace ``out/manifest.json`` atomically: a reader sees the old one or the new one, never half of one."""
    tmp = out / (MANIFEST_NAME + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST_NAME)


def _shard_problem(out: Path, entry: dict, verify: bool) -> str | None:
    """Why a shard the manifest lists cannot be kept as written (missing, another size, another checksum), or None."""
    path = out / entry["name"]
    if not path.is_file():
        return "is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"has {path.stat().st_size} bytes, the manifest {entry['bytes']}"
    if verify and file_sha256(path) != entry["sha256"]:
        return "does not match its sha256 in the manifest"
    return None


def verify_shards(out: str | os.PathLike) -> list[str]:
    """Re-hash every shard a finished conversion lists; the problems found, one line each (empty: all match)."""
    out = Path(out)
    manifest = read_manifest(out)
    problems = [f"{out}: the conversion is unfinished"] if not manifest.get("complete") else []
    for entry in manifest["shards"]:
        if reason := _shard_problem(out, entry, verify=True):
            problems.append(f"{out / entry['name']} {reason}")
    return problems


def write_shards(
    source: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int | str = 1000,
    *,
    prefix: str | None = None,
    on_corrupt: str = "error",
    verify: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Write an image data set as tar shards in the webdataset layout, resumably, with a checksum manifest.

    ``OUT/<prefix>-000000.tar, ...`` hold the images in the order :func:`~fastclr.pipelines.data.scan_images`
    lists them (class by class), each as ``<key>.<ext>`` (the key is its path relative to ``source``, without the
    extension) followed by ``<key>.cls`` (its class index) when the data is labelled. ``OUT/manifest.json`` records
    the class names, the images left out, and every finished shard's name, sample count, size and sha256; the loaders
    read ``OUT`` (or ``OUT/<prefix>-{000000..N}.tar``) as ``root``.

    Resumable: each shard is written to ``<name>.partial`` and renamed when complete, then entered in the manifest,
    which is replaced atomically. Running the same conversion again keeps the shards the manifest lists (checking
    their sizes, and with ``verify`` their checksums; a mismatch is written anew) and writes the rest. Shards are
    reproducible byte for byte (member headers hold no time or owner), so a resumed conversion ends with the same
    bytes as an uninterrupted one.

    Args:
        source: an ImageFolder, a flat folder of unlabelled images or a file list
            (:func:`~fastclr.pipelines.data.list_images`).
        out: the folder to write; it must be new, empty, or hold this same conversion.
        shard_size: images per shard (``1000``) or bytes per shard (``"500MB"``, ``"1GiB"``).
        prefix: shard file names' prefix (default: the source folder's name).
        on_corrupt: ``"error"`` stops on the first bad image before anything is written; ``"skip"`` leaves bad
            images out (they are listed in the manifest).
        verify: re-hash shards already written before keeping them.
        progress: show a progress bar (images).
        log: where the progress lines go.

    Returns:
        The manifest (a dict, as written to ``OUT/manifest.json``).
    """
    kind, limit = parse_shard_size(shard_size)
    source, out = Path(source), Path(out)
    if is_shard_source(source):
        raise ValueError(
            f"{source} already names tar shards; give the image folder or file list they came from"
        )
    if not source.exists():
        raise FileNotFoundError(f"data set not found: {source}")
    prefix = prefix if prefix is not None else (source.name if source.is_dir() else source.stem)
    if not _PREFIX.fullmatch(prefix or ""):
        raise ValueError(
            f"shard prefix {prefix!r} must start with a letter or digit and hold only letters, digits, '.', '_', '-'"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    out_real, base_real = out.resolve(), source.resolve() if source.is_dir() else None
    if base_real is not None and (out_real == base_real or base_real in out_real.parents):
        raise ValueError(
            f"output {out} lies inside the data set {source}: write the shards elsewhere"
        )
    images = scan_images(source, on_corrupt)
    files = [os.path.abspath(f) for f in images.files]
    # Keys are paths relative to the folder; a file list may name images anywhere: to the folder holding them all.
    base = (
        source.absolute()
        if source.is_dir()
        else os.path.commonpath([os.path.dirname(f) for f in files])
    )
    relpaths = [os.path.relpath(f, base) for f in files]
    sizes = [os.stat(f).st_size for f in files]
    keys = _keys(relpaths)
    plan = _plan(sizes, kind, limit, images.labelled)
    listed = list(zip(relpaths, images.labels, sizes, strict=True))
    listing = json.dumps([images.classes, images.labelled, kind, limit, prefix, listed])
    fingerprint = hashlib.sha256(listing.encode()).hexdigest()
    names = [f"{prefix}-{k:06d}.tar" for k in range(len(plan))]
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "source": str(source.resolve()),
        "prefix": prefix,
        "shard_size": {kind: limit},
        "pattern": f"{prefix}-{{000000..{len(plan) - 1:06d}}}.tar",
        "num_samples": len(images.files),
        "num_shards": len(plan),
        "labelled": images.labelled,
        "classes": images.classes,
        "skipped": [list(s) for s in images.skipped],
        "fingerprint": fingerprint,
        "complete": False,
        "shards": [],
    }
    done: dict[str, dict] = {}
    if (out / MANIFEST_NAME).exists():
        old = read_manifest(out)
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out} holds shards of another conversion (other images, labels, shard size or prefix than "
                f"{source} with --shard-size {shard_size}): write to a new folder, or delete {out} first"
            )
        done = {entry["name"]: entry for entry in old["shards"]}
    elif out.exists() and any(out.iterdir()):
        raise ValueError(
            f"output {out} is not empty and holds no {MANIFEST_NAME}: write the shards to a new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    _save_manifest(out, {**manifest, "shards": [done[n] for n in names if n in done]})

    from tqdm import tqdm

    bar = tqdm(total=len(images.files), unit="img", disable=not progress, desc=f"shards -> {out}")
    written = 0
    try:
        for name, (start, end) in zip(names, plan, strict=True):
            entry = done.get(name)
            reason = entry and _shard_problem(out, entry, verify)
            if entry is None or reason:
                if reason:
                    bar.write(f"{out / name} {reason}: writing it again")
                samples = [
                    (files[i], keys[i], images.labels[i] if images.labelled else None)
                    for i in range(start, end)
                ]
                done[name] = _write_shard(out / name, samples)
                written += 1
                _save_manifest(out, {**manifest, "shards": [done[n] for n in names if n in done]})
            bar.update(end - start)
    finally:
        bar.close()
    manifest = {**manifest, "complete": True, "shards": [done[n] for n in names]}
    _save_manifest(out, manifest)
    if log is not None:
        total = sum(e["bytes"] for e in manifest["shards"])
        log(
            f"{out}: {len(images.files)} images in {len(plan)} shards ({total / 2**20:.1f} MiB; {written} written "
            f"now, {len(plan) - written} kept), {len(images.skipped)} skipped; read them with --data {out} "
            f"or --data {out / manifest['pattern']}"
        )
    return manifest

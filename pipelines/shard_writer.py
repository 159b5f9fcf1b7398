"""Writing an image data set as tar shards (``fastclr shards DIR OUT``): resumable, reproducible byte for byte, with a
checksum manifest and an index beside each shard; :mod:`fastclr.pipelines.shards` describes the layout and reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

from fastclr.pipelines.data import scan_images
from fastclr.pipelines.shards import (
    INDEX_FORMAT,
    INDEX_SUFFIX,
    INDEX_VERSION,
    LABEL_EXTENSION,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MAX_LABEL_BYTES,
    TAR_BLOCK,
    ShardSample,
    is_shard_source,
    read_manifest,
    scan_shard,
)

_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B)?", re.IGNORECASE)
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _write_index(shard: Path, samples: list[ShardSample], scanned_as: str) -> None:
    """Write ``<shard>.index.json`` atomically: the shard's size and, per sample, ``[member, offset, size, label]``
    (``samples`` as :func:`scan_shard` found them in the file ``scanned_as``)."""
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
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def _plan(sizes: list[int], kind: str, limit: int, labelled: bool) -> list[tuple[int, int]]:
    """``[start, end)`` sample ranges of the shards: ``limit`` images each, or at most ``limit`` bytes each (a
    single larger sample gets a shard of its own)."""
    if kind == "images":
        return [(a, min(a + limit, len(sizes))) for a in range(0, len(sizes), limit)]
    plan, start, used = [], 0, 0
    label = _member_bytes(MAX_LABEL_BYTES) if labelled else 0
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
    _write_index(path, scan_shard(str(partial), [], "error"), str(partial))
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

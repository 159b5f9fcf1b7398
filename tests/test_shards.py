"""Tar shards: the writer (resumable, checksummed), the reader against the folder it came from, and both loaders
reading shards with the folder's order, rank partition, determinism, resume and corrupt-sample policy.

Solid-colour PNGs survive crop, resize and flip unchanged, so with the colour ops off the red level of a view names
the image it came from (as in tests/test_pipeline.py).
"""

import io
import json
import os
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastclr.pipelines import (
    CorruptImageError,
    EvalLoader,
    SimCLRLoader,
    TorchEvalLoader,
    TorchSimCLRLoader,
    dali_available,
)
from fastclr.pipelines import shard_writer as writer_module
from fastclr.pipelines import shards as shards_module
from fastclr.pipelines.data import scan_images
from fastclr.pipelines.shard_writer import (
    file_sha256,
    parse_shard_size,
    verify_shards,
    write_shards,
)
from fastclr.pipelines.shards import MANIFEST_NAME, expand_pattern, scan_shards

pytestmark = pytest.mark.timeout(120)

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not importable")
SIMCLR = [
    pytest.param(partial(SimCLRLoader, augment_impl="dali"), id="dali", marks=needs_dali),
    pytest.param(TorchSimCLRLoader, id="torch"),
]
EVAL = [
    pytest.param(EvalLoader, id="dali", marks=needs_dali),
    pytest.param(TorchEvalLoader, id="torch"),
]
NO_COLOR = dict(color_p=0.0, gray_p=0.0, blur_p=0.0)
IDENTITY = dict(normalize=False, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **NO_COLOR)
# Passes the up-front check, fails in the decoder.
BAD_JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"


def colour(i):
    return (4 * i, 128, 255 - 4 * i)


def image_ids(batch):
    """Image index of each view of a (B, 3, H, W) batch in [0, 1] of solid ``colour(i)`` images."""
    return (batch[:, 0].float().mean(dim=(1, 2)) * 255 / 4).round().long().tolist()


def make_folder(root, count=40, classes=3, textured=False):
    """``count`` 16 px images, image i in ``root/c<i % classes>/<i>.png``: solid ``colour(i)``, or (textured)
    random pixels (so that augmentations show)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (
            rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            if textured
            else np.full((16, 16, 3), colour(i), np.uint8)
        )
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def png_bytes(value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, members):
    """A tar of ``(name, bytes)`` members, as another tool might write webdataset shards."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    """(folder of 40 solid images in 3 classes, the same as shards of 7 images: 6 shards, the last short)."""
    root = tmp_path_factory.mktemp("shards")
    folder = make_folder(root / "train")
    write_shards(folder, root / "out", 7, progress=False, log=None)
    return folder, root / "out"


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    root = tmp_path_factory.mktemp("textured")
    folder = make_folder(root / "train", count=24, textured=True)
    write_shards(folder, root / "out", 5, progress=False, log=None)
    return folder, root / "out"


def batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return [tuple(t.clone() for t in batch) for batch in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v), f"max |difference| {(u.float() - v.float()).abs().max()}"


# ----------------------------------------------------------------------------------------------------------------------
# Naming shards


def test_patterns_expand_like_braces():
    assert expand_pattern("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_pattern("a-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar"]
    assert expand_pattern("{x,y}-{0..1}.tar") == ["x-0.tar", "x-1.tar", "y-0.tar", "y-1.tar"]
    assert expand_pattern("/d/one.tar") == ["/d/one.tar"]
    for bad, match in (
        ("a-{3..1}.tar", "runs backwards"),
        ("a-{x}.tar", "neither a range"),
        ("a-{0..1.tar", "unmatched"),
        ("a-{0..99999999}.tar", "more than 1000000 shards"),
        ("{0..9999}-{0..9999}.tar", "more than 1000000 shards"),
    ):
        with pytest.raises(ValueError, match=match):
            expand_pattern(bad)


def test_shard_size_is_images_or_bytes():
    assert parse_shard_size(1000) == ("images", 1000)
    assert parse_shard_size("64MB") == ("bytes", 64 * 10**6)
    assert parse_shard_size("1GiB") == ("bytes", 2**30)
    for bad in (0, "-3", "12 apples", "", True):
        with pytest.raises(ValueError, match="shard size must be a positive number"):
            parse_shard_size(bad)


# ----------------------------------------------------------------------------------------------------------------------
# The writer


def test_writer_layout_and_manifest(identity):
    folder, out = identity
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["num_samples"] == 40 and manifest["num_shards"] == 6
    assert (
        manifest["classes"] == ["c0", "c1", "c2"]
        and manifest["pattern"] == "train-{000000..000005}.tar"
    )
    assert [s["samples"] for s in manifest["shards"]] == [7] * 5 + [5]
    for entry in manifest["shards"]:
        assert file_sha256(out / entry["name"]) == entry["sha256"]
        assert (out / entry["name"]).stat().st_size == entry["bytes"]
    assert verify_shards(out) == []
    with tarfile.open(out / "train-000000.tar") as tar:
        names = tar.getnames()
        assert names[:4] == ["c0/000.png", "c0/000.cls", "c0/003.png", "c0/003.cls"]
        assert tar.extractfile("c0/003.cls").read() == b"0"
        assert tar.extractfile("c0/003.png").read() == (folder / "c0" / "003.png").read_bytes()
    # A checksum that no longer matches is reported by name.
    damaged = out.parent / "damaged"
    write_shards(folder, damaged, 7, progress=False, log=None)
    data = bytearray((damaged / "train-000002.tar").read_bytes())
    data[600] ^= 0xFF
    (damaged / "train-000002.tar").write_bytes(bytes(data))
    (problem,) = verify_shards(damaged)
    assert "train-000002.tar does not match its sha256" in problem


def test_writer_resumes_after_an_interruption(identity, tmp_path, monkeypatch):
    folder, reference = identity
    real, calls = writer_module._write_shard, []

    def interrupted(path, samples):
        if len(calls) == 3:
            path.with_name(path.name + ".partial").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        calls.append(path.name)
        return real(path, samples)

    monkeypatch.setattr(writer_module, "_write_shard", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_shards(folder, out, 7, progress=False, log=None)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 3
    with pytest.raises(ValueError, match="unfinished conversion \\(3 of 6 shards\\)"):
        scan_shards(out)

    monkeypatch.setattr(writer_module, "_write_shard", real)
    lines = []
    write_shards(folder, out, 7, progress=False, log=lines.append)
    assert "3 written now, 3 kept" in lines[0]
    assert not list(out.glob("*.partial"))
    # Byte for byte what an uninterrupted conversion wrote.
    for shard in sorted(reference.glob("*.tar")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert (
        json.loads((out / MANIFEST_NAME).read_text())["shards"]
        == json.loads((reference / MANIFEST_NAME).read_text())["shards"]
    )

    # A shard damaged after the fact: kept on a size check, written again with verify.
    data = bytearray((out / "train-000001.tar").read_bytes())
    data[600] ^= 0xFF
    (out / "train-000001.tar").write_bytes(bytes(data))
    write_shards(folder, out, 7, progress=False, log=lines.append)
    assert "0 written now" in lines[-1]
    write_shards(folder, out, 7, verify=True, progress=False, log=lines.append)
    assert "1 written now" in lines[-1] and verify_shards(out) == []


def test_writer_refuses_bad_input_before_writing(identity, tmp_path):
    folder, out = identity
    with pytest.raises(FileNotFoundError, match="data set not found"):
        write_shards(tmp_path / "missing", tmp_path / "a", 7, progress=False)
    with pytest.raises(ValueError, match="lies inside the data set"):
        write_shards(folder, folder / "c0" / "shards", 7, progress=False)
    with pytest.raises(ValueError, match="holds shards of another conversion"):
        write_shards(folder, out, 8, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no manifest.json"):
        write_shards(folder, tmp_path / "busy", 7, progress=False)
    with pytest.raises(ValueError, match="already names tar shards"):
        write_shards(out, tmp_path / "b", 7, progress=False)
    with pytest.raises(ValueError, match="shard prefix"):
        write_shards(folder, tmp_path / "c", 7, prefix="../up", progress=False)
    with pytest.raises(ValueError, match="shard size"):
        write_shards(folder, tmp_path / "d", "lots", progress=False)
    bad = make_folder(tmp_path / "bad", count=4)
    (bad / "c1" / "empty.png").write_bytes(b"")
    with pytest.raises(CorruptImageError, match=r"c1/empty\.png is empty"):
        write_shards(bad, tmp_path / "e", 7, progress=False)
    assert not any((tmp_path / name).exists() for name in "abcde")
    manifest = write_shards(bad, tmp_path / "e", "2KB", on_corrupt="skip", progress=False, log=None)
    assert manifest["num_samples"] == 4 and manifest["skipped"][0][0].endswith("empty.png")
    # At most 2 KB of members each, plus tar's end-of-archive record.
    assert len(manifest["shards"]) == 4 and all(
        s["bytes"] <= 2000 + 10240 for s in manifest["shards"]
    )


def test_cli_converts_and_reports_errors(identity, tmp_path, capsys):
    from fastclr.cli import main

    folder, _ = identity
    assert (
        main(["shards", str(folder), str(tmp_path / "out"), "--shard-size", "16", "--no-progress"])
        == 0
    )
    assert "40 images in 3 shards" in capsys.readouterr().out
    assert main(["shards", str(tmp_path / "nope"), str(tmp_path / "o2")]) == 1
    assert "fastclr: error: data set not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# The reader


def test_shards_list_the_folders_samples(identity):
    folder, out = identity
    files = scan_images(folder)
    for source in (out, out / "train-{000000..000005}.tar"):
        shards = scan_images(source)
        assert shards.labels == files.labels and shards.classes == files.classes and shards.labelled
        assert [n.rsplit(":", 1)[1] for n in shards.files] == [
            os.path.relpath(f, folder) for f in files.files
        ]
        assert [shards.shards.read(i) for i in (0, 17, 39)] == [
            Path(files.files[i]).read_bytes() for i in (0, 17, 39)
        ]
    # A subset keeps the class names of the manifest beside it.
    part = scan_images(out / "train-{000001..000002}.tar")
    assert len(part.files) == 14 and part.classes == ["c0", "c1", "c2"]


def _scan_fresh(source, monkeypatch, on_corrupt="error"):
    monkeypatch.setattr(shards_module, "_SCANS", type(shards_module._SCANS)())  # no cached scan
    images = scan_images(source, on_corrupt)
    return images, [images.shards.offset.tolist(), images.shards.size.tolist()]


def test_written_shards_are_read_from_their_index_without_opening_a_tar(
    identity, tmp_path, monkeypatch
):
    """``fastclr shards`` writes ``<shard>.tar.index.json``; start-up reads it and no tar header or image byte, and
    finds what scanning the shards finds. An index that no longer fits its shard, or a malformed one, is ignored."""
    import shutil

    folder, written = identity
    out = tmp_path / "out"
    shutil.copytree(written, out)
    assert sorted(p.name for p in out.glob("*.index.json")) == [
        f"train-{k:06d}.tar.index.json" for k in range(6)
    ]
    scanned = tmp_path / "scanned"  # the same shards without their indexes
    shutil.copytree(written, scanned, ignore=shutil.ignore_patterns("*.index.json"))

    def no_reading(*args, **kwargs):
        raise AssertionError("read a tar header or checked an image")

    with monkeypatch.context() as m:
        m.setattr(shards_module.tarfile, "open", no_reading)
        m.setattr(shards_module, "check_encoded", no_reading)
        indexed, where = _scan_fresh(out, monkeypatch)
    listed, where_scanned = _scan_fresh(scanned, monkeypatch)
    strip = len(str(out)), len(str(scanned))
    assert [f[strip[0] :] for f in indexed.files] == [f[strip[1] :] for f in listed.files]
    assert (indexed.labels, indexed.classes) == (listed.labels, listed.classes)
    assert where == where_scanned
    assert [indexed.shards.read(i) for i in (0, 39)] == [
        Path(f).read_bytes() for f in (scan_images(folder).files[0], scan_images(folder).files[39])
    ]

    # a shard cut short no longer matches its index: scanned, and the damage is named
    shard = out / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1500])  # into the second image
    with pytest.raises(CorruptImageError, match=r"train-000002\.tar"):
        _scan_fresh(out, monkeypatch)
    # a malformed index is ignored, not trusted
    shutil.copy(written / "train-000002.tar", shard)
    (out / "train-000001.tar.index.json").write_text(
        '{"format": "fastclr-shard-index", "samples": 3'
    )
    entry = json.loads((out / "train-000003.tar.index.json").read_text())
    entry["samples"][0][1] = 10**9  # an offset beyond the shard
    (out / "train-000003.tar.index.json").write_text(json.dumps(entry))
    assert _scan_fresh(out, monkeypatch)[1] == where


def test_foreign_shards_and_their_errors(tmp_path):
    """Shards written by another tool: no manifest, labels only as numbers, unlabelled ones, bad ones."""
    a = write_tar(
        tmp_path / "a.tar", [("x.jpg.json", b"{}"), ("k1.png", png_bytes(10)), ("k1.cls", b"2\n")]
    )
    write_tar(tmp_path / "b.tar", [("dir/k2.png", png_bytes(20)), ("dir/k2.cls", b"0")])
    images = scan_images(tmp_path / "{a,b}.tar")
    assert images.classes == ["0", "1", "2"] and images.labels == [2, 0]
    assert images.files == [f"{a}:k1.png", f"{tmp_path / 'b.tar'}:dir/k2.png"]
    write_tar(tmp_path / "u.tar", [("k.png", png_bytes(10))])
    assert not scan_images(tmp_path / "u.tar").labelled
    with pytest.raises(
        ValueError, match=r"1 of 2 samples have a \.cls label but .*u\.tar:k\.png has none"
    ):
        scan_images(tmp_path / "{a,u}.tar")
    with pytest.raises(FileNotFoundError, match=r"shard not found: .*c\.tar \(1 of the 2 shards"):
        scan_images(tmp_path / "{a,c}.tar")
    with pytest.raises(ValueError, match="names .*a.tar more than once"):
        scan_images(tmp_path / "{a,a}.tar")
    write_tar(tmp_path / "e.tar", [("notes.txt", b"hello")])
    with pytest.raises(ValueError, match="no samples in the tar shards"):
        scan_images(tmp_path / "e.tar")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(CorruptImageError, match=r"tar shard .*junk\.tar is damaged"):
        scan_images(tmp_path / "junk.tar")


def test_bad_members_follow_the_policy(tmp_path):
    good = png_bytes(40)
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("a.png", good), ("a.cls", b"0"),
            ("b.png", good[:-20]), ("b.cls", b"1"),  # truncated: no IEND
            ("c.cls", b"1"),  # no image
            ("d.png", good), ("d.cls", b"one"),  # not a class index
            ("e.png", good), ("e.cls", b"1"),
        ],
    )  # fmt: skip
    with pytest.raises(
        CorruptImageError, match=r"image .*s\.tar:b\.png is truncated \(no PNG IEND"
    ) as info:
        scan_images(shard)
    assert info.value.path == f"{shard}:b.png"
    images = scan_images(shard, on_corrupt="skip")
    assert images.files == [f"{shard}:a.png", f"{shard}:e.png"] and images.labels == [0, 1]
    reasons = dict(images.skipped)
    assert "no image member" in reasons[f"{shard}:c"]
    assert "not a class index" in reasons[f"{shard}:d.png"]
    # A shard cut short mid-member: the samples before the cut are read.
    data = shard.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: data.index(b"e.png") + 512 + 20])
    cut = scan_images(tmp_path / "cut.tar", on_corrupt="skip")
    assert len(cut.files) == 1 and any("truncated" in r for _, r in cut.skipped)


@pytest.mark.parametrize("cls", SIMCLR + EVAL)
def test_undecodable_member_is_named_or_skipped(cls, tmp_path):
    members = []
    for i in range(7):
        members += [(f"k{i}.png", png_bytes(30 * i)), (f"k{i}.cls", b"0")]
    members += [("zz-bad.jpg", BAD_JPEG), ("zz-bad.cls", b"0")]
    shard = write_tar(tmp_path / "s.tar", members)
    threads = (
        0 if cls in (TorchSimCLRLoader, TorchEvalLoader) else 1
    )  # no worker start-up per epoch
    loader = cls(shard, 4, 16, num_threads=threads)
    with pytest.raises(CorruptImageError, match=r"s\.tar:zz-bad\.jpg"):
        for epoch in range(3):  # the bad sample comes up within a few (shuffled) epochs
            batches(loader, epoch)
    loader = cls(shard, 4, 16, num_threads=threads, on_corrupt="skip")
    with pytest.warns(UserWarning, match=r"skipping undecodable image .*s\.tar:zz-bad\.jpg"):
        for epoch in range(3):
            assert sum(len(b[0]) for b in batches(loader, epoch)) == len(loader) * 4
    assert loader.num_skipped == 1


# ----------------------------------------------------------------------------------------------------------------------
# Loaders over shards: the folder's batches, ranks, determinism, resume


def test_twin_gives_the_folders_batches(textured):
    """The twin's augmentations depend on the sample's position only: shards and folder agree exactly."""
    folder, out = textured
    kw = dict(seed=3, num_threads=1)
    assert_same_batches(
        batches(TorchSimCLRLoader(folder, 4, 16, **kw), 1),
        batches(TorchSimCLRLoader(out, 4, 16, **kw), 1),
    )


@pytest.mark.parametrize("cls", SIMCLR)
def test_shards_give_the_folders_samples_in_order(cls, identity):
    folder, out = identity
    for epoch in (0, 1):
        a, b = (cls(root, 4, 16, seed=3, **IDENTITY) for root in (folder, out))
        ids = [(image_ids(x), image_ids(y)) for x, y in batches(a, epoch)]
        assert ids == [(image_ids(x), image_ids(y)) for x, y in batches(b, epoch)]


@pytest.mark.parametrize("cls", EVAL)
def test_eval_over_shards_matches_the_folder(cls, identity):
    folder, out = identity
    from_folder, from_shards = cls(folder, 8, 16, normalize=False), cls(out, 8, 16, normalize=False)
    assert from_shards.classes == from_folder.classes
    assert_same_batches(batches(from_folder), batches(from_shards))
    ids = [i for x, _ in batches(from_shards) for i in image_ids(x)]
    labels = [int(y) for _, ys in batches(from_shards) for y in ys]
    assert sorted(ids) == list(range(40)) and labels == [i % 3 for i in ids]


@pytest.mark.parametrize("cls", SIMCLR)
def test_ranks_partition_the_shards(cls, identity):
    _, out = identity
    seen = []
    for rank in range(3):
        loader = cls(out, 4, 16, shard_id=rank, num_shards=3, last_batch="keep", **IDENTITY)
        ids = [i for view_a, _ in batches(loader, 2) for i in image_ids(view_a)]
        assert ids == [int(name[-7:-4]) for name in loader.epoch_files(2)]
        seen += ids
    assert sorted(seen) == list(range(40))


@pytest.mark.parametrize("cls", SIMCLR)
def test_shards_are_deterministic_and_resume_exactly(cls, textured):
    _, out = textured
    first = batches(cls(out, 4, 16, seed=5, num_threads=1), 2)
    assert_same_batches(first, batches(cls(out, 4, 16, seed=5, num_threads=2), 2))
    assert not torch.equal(first[0][0], batches(cls(out, 4, 16, seed=5, num_threads=1), 3)[0][0])
    resumed = cls(out, 4, 16, seed=5, num_threads=1)
    resumed.set_epoch(2, skip_batches=4)
    tail = [tuple(t.clone() for t in batch) for batch in resumed]
    assert len(first) == 6 and len(tail) == 2
    assert_same_batches(first[4:], tail)


# ----------------------------------------------------------------------------------------------------------------------
# The GPU graph, defined without a GPU


@needs_dali
def test_gpu_graph_over_shards_stays_on_the_gpu(identity, monkeypatch):
    from test_pipeline_graph import gpu_graph, gpu_to_host, operators

    monkeypatch.setattr(
        "fastclr.pipelines.base.resolve_device", lambda *args: torch.device("cuda", 0)
    )
    _, out = identity
    loader = SimCLRLoader(out, 4, 224, device="gpu", color_p=1.0, gray_p=0.5, blur_p=0.5)
    indices = loader._indices(0)
    outputs = gpu_graph(lambda: loader._graph(*loader._source(indices)), loader.batch_size)
    (source,) = [op for op in operators(outputs) if op.name == "reader"]
    assert "ExternalSource" in str(source.spec) and source.outputs[0].device == "cpu"
    assert all(node.device == "gpu" for node in outputs)
    assert gpu_to_host(outputs) == []

    # The source feeds the graph batch by batch: encoded bytes and labels of the epoch's samples.
    from fastclr.pipelines.dali.loader import ShardBatches

    source = ShardBatches(loader.shards, loader.labels, indices, 4)
    images, labels = source.images(1), source.labels_of(1)
    assert len(images) == 4 and [int(y[0]) for y in labels] == [
        loader.labels[i] for i in indices[4:8]
    ]
    assert bytes(images[0]) == loader.shards.read(int(indices[4]))


# ----------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """test_trainer's generated JPEG folders as shards: (train pattern, test folder of shards)."""
    from test_trainer import make_image_folder

    root = tmp_path_factory.mktemp("e2e")
    train = make_image_folder(root / "train")
    test = make_image_folder(root / "test", per_class=6, seed=1)
    write_shards(train, root / "train-shards", 16, progress=False, log=None)
    write_shards(test, root / "test-shards", 10, progress=False, log=None)
    return str(root / "train-shards" / "train-{000000..000003}.tar"), str(root / "test-shards")


@pytest.mark.parametrize(
    "backend",
    [pytest.param("dali", marks=needs_dali), pytest.param("torch", marks=pytest.mark.slow)],
)
def test_pretrain_resume_and_evaluate_from_shards(backend, jpeg_shards, tmp_path, capsys):
    """Convert, pretrain, stop mid-epoch, resume, evaluate: the resumed run's losses are the uninterrupted run's.
    (The twin's run is slow-marked: the loaders' own tests cover it reading shards, in order and resumed.)"""
    from test_trainer import tiny_config

    from fastclr.cli import main
    from fastclr.train.checkpoint import list_checkpoints
    from fastclr.train.trainer import pretrain

    def config(out, **run):
        cfg = tiny_config(jpeg_shards, out, **run)
        cfg.data.backend, cfg.optim.epochs = backend, 2
        return cfg

    full = pretrain(config(tmp_path / "full"))
    first = pretrain(config(tmp_path / "cut", max_steps=5))  # stops mid-epoch 1
    second = pretrain(config(tmp_path / "cut", resume="auto"))
    assert first["losses"] + second["losses"] == full["losses"]  # bit-identical
    ckpt = list_checkpoints(tmp_path / "cut" / "checkpoints")[-1]
    argv = ["knn", "--ckpt", str(ckpt), "--test-data", jpeg_shards[1], "--k", "5", "--size", "16"]
    assert main([*argv, "--workers", "1", "--backend", backend]) == 0, capsys.readouterr().err
    assert "64 bank images" in capsys.readouterr().out
    missing = str(tmp_path / "missing-{0..1}.tar")
    assert main(["knn", "--ckpt", str(ckpt), "--data", missing, "--test-data", jpeg_shards[1]]) == 1
    assert "shard not found" in capsys.readouterr().err


def test_bench_compares_shards_with_the_folder(tmp_path):
    from fastclr.bench import bench_pipeline

    argv = [
        "--size",
        "32",
        "--images",
        "12",
        "--batch-size",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "1",
    ]
    argv += ["--threads", "0", "--backend", "torchvision", "--shards", "--shard-size", "5"]
    rows = bench_pipeline.main([*argv, "--csv", str(tmp_path / "rows.csv")])
    assert [r["data"] for r in rows] == [
        "synthetic 32-32 px JPEGs",
        "synthetic 32-32 px JPEGs as shards",
    ]
    assert rows[0]["n_images"] == rows[1]["n_images"] == 12
    assert rows[1]["vs_folder"] == pytest.approx(rows[1]["median"] / rows[0]["median"])

"""Data set listing, validation and per-epoch sharding (no DALI needed)."""

import os

import numpy as np
import pytest
from PIL import Image

from fastclr.pipelines.augment import SimCLRAugment
from fastclr.pipelines.data import (
    augment_seed,
    epoch_indices,
    list_images,
    num_batches,
    scan_images,
    shard_size,
)
from fastclr.pipelines.images import CorruptImageError, check_image


def write_image(path, value=(200, 60, 90), side=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for cls, count in (("zebra", 2), ("ant", 3)):
        for i in range(count):
            write_image(root / cls / f"{i}.jpg")
    write_image(root / "ant" / "nested" / "deep.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    write_image(root / "ant" / ".hidden.jpg")
    return root


def test_folder_labels_match_class_folders(folder):
    files, labels, classes = list_images(folder)
    assert classes == ["ant", "zebra"]
    assert len(files) == 6  # 3 + nested + 2; .txt and hidden files ignored
    for path, label in zip(files, labels, strict=True):
        assert os.path.relpath(path, folder).split(os.sep)[0] == classes[label]
    assert files == sorted(files, key=lambda p: (labels[files.index(p)], p))


def test_file_list_with_and_without_labels(folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\ndata/zebra/0.jpg 4\n\ndata/ant/1.jpg 0\n")
    files, labels, classes = list_images(listing)
    assert files == [str(tmp_path / "data/zebra/0.jpg"), str(tmp_path / "data/ant/1.jpg")]
    assert labels == [4, 0] and classes == ["0", "1", "2", "3", "4"]

    listing.write_text("data/zebra/0.jpg\ndata/ant/1.jpg\n")
    _, labels, classes = list_images(listing)
    assert classes == ["ant", "zebra"] and labels == [1, 0]

    listing.write_text("data/zebra/0.jpg 1\ndata/ant/1.jpg\n")
    with pytest.raises(ValueError, match="label on every line or on none"):
        list_images(listing)


def test_flat_folder_is_unlabelled(tmp_path):
    """Images directly in the root: every one listed, sorted, label 0, no classes, unlabelled."""
    for name in ("b.png", "a.jpg", "C.JPEG", ".hidden.jpg"):
        write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    images = scan_images(tmp_path)
    assert [os.path.basename(p) for p in images.files] == ["C.JPEG", "a.jpg", "b.png"]
    assert images.labels == [0, 0, 0] and images.classes == [] and not images.labelled
    assert list_images(tmp_path) == (images.files, [0, 0, 0], [])


def test_flat_folder_skips_bad_files(tmp_path):
    write_image(tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(CorruptImageError, match=r"empty\.jpg is empty"):
        scan_images(tmp_path)
    images = scan_images(tmp_path, on_corrupt="skip")
    assert [os.path.basename(p) for p in images.files] == ["good.jpg"] and not images.labelled


def test_image_folder_is_labelled(folder):
    assert scan_images(folder).labelled


def test_images_beside_class_folders_are_an_error(folder):
    write_image(folder / "loose.jpg")
    with pytest.raises(ValueError, match=f"{folder} holds both images") as info:
        list_images(folder)
    assert "loose.jpg" in str(info.value) and "2, e.g. ant/" in str(info.value)


def test_missing_empty_and_imageless_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"no images and no class folders in {empty}"):
        list_images(empty)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"no images found under {empty}"):
        list_images(empty)
    listing = tmp_path / "empty.txt"
    listing.write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no images"):
        list_images(listing)


def _bad_files(root):
    """Each kind of bad file the up-front check must catch, with the reason it gives."""
    good = write_image(root / "c" / "good.jpg").read_bytes()
    (root / "c" / "empty.jpg").write_bytes(b"")
    (root / "c" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "c" / "text.jpg").write_bytes(b"this is not an image at all")
    png = write_image(root / "c" / "good.png").read_bytes()
    (root / "c" / "truncated.png").write_bytes(png[:-20])
    os.symlink(root / "missing-target.jpg", root / "c" / "dangling.jpg")
    return {
        "empty.jpg": "empty",
        "truncated.jpg": "no JPEG end-of-image",
        "text.jpg": "unrecognised header",
        "truncated.png": "no PNG IEND",
        "dangling.jpg": "cannot be read",
    }


def test_each_bad_file_is_named(tmp_path):
    expected = _bad_files(tmp_path)
    for name, reason in expected.items():
        assert reason in check_image(tmp_path / "c" / name), name
    assert check_image(tmp_path / "c" / "good.jpg") is None
    assert check_image(tmp_path / "c" / "good.png") is None
    with pytest.raises(CorruptImageError, match=r"c/dangling\.jpg cannot be read"):
        list_images(tmp_path)


def test_skip_counts_bad_files(tmp_path):
    expected = _bad_files(tmp_path)
    images = scan_images(tmp_path, on_corrupt="skip")
    assert sorted(os.path.basename(p) for p in images.files) == ["good.jpg", "good.png"]
    assert sorted(os.path.basename(p) for p, _ in images.skipped) == sorted(expected)
    with pytest.raises(ValueError, match="on_corrupt"):
        scan_images(tmp_path, on_corrupt="ignore")


def test_all_files_bad_is_an_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="all 1 files were skipped"):
        scan_images(tmp_path, on_corrupt="skip")


@pytest.mark.parametrize("n", [61, 64])
@pytest.mark.parametrize("last_batch", ["drop", "pad", "keep"])
def test_shards_partition_each_epoch(n, last_batch):
    num_shards, batch = 3, 4
    parts = []
    for shard in range(num_shards):
        idx = epoch_indices(
            n, batch, epoch=5, seed=1, shard_id=shard, num_shards=num_shards, last_batch=last_batch
        )
        assert len(idx) == num_batches(n, batch, num_shards, shard, last_batch) * batch
        parts.append(
            idx[: shard_size(n, num_shards, shard, last_batch)] if last_batch == "keep" else idx
        )
    flat = np.concatenate(parts)
    if last_batch == "drop":  # whole batches only, no image twice
        per_shard = (n // num_shards) // batch * batch
        assert len(set(flat)) == len(flat) == per_shard * num_shards
    elif last_batch == "keep":
        assert sorted(flat) == list(range(n))  # every image exactly once
    else:
        assert set(flat) == set(range(n))  # every image, a few twice
        assert len({len(p) for p in parts}) == 1


def test_epoch_order_depends_on_seed_and_epoch_only():
    kw = dict(seed=3, shard_id=0, num_shards=1)
    a = epoch_indices(100, 10, epoch=0, **kw)
    assert np.array_equal(a, epoch_indices(100, 10, epoch=0, **kw))
    assert not np.array_equal(a, epoch_indices(100, 10, epoch=1, **kw))
    assert not np.array_equal(a, epoch_indices(100, 10, epoch=0, seed=4))
    assert np.array_equal(epoch_indices(10, 5, epoch=0, seed=0, shuffle=False), np.arange(10))
    assert augment_seed(0, 1, 0) != augment_seed(0, 1, 1) != augment_seed(0, 2, 1)


def test_bad_sharding_arguments():
    with pytest.raises(ValueError, match="yields no batch of 50"):
        epoch_indices(60, 50, epoch=0, seed=0, num_shards=2)
    with pytest.raises(ValueError, match="shard_id must be in"):
        epoch_indices(60, 5, epoch=0, seed=0, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="last_batch"):
        epoch_indices(60, 5, epoch=0, seed=0, last_batch="partial")
    with pytest.raises(ValueError, match="batch_size"):
        epoch_indices(60, 0, epoch=0, seed=0)


def test_augment_parameters_are_checked():
    assert SimCLRAugment(224).blur_p == 0.5 and SimCLRAugment(32).blur_p == 0.0
    assert SimCLRAugment(224).blur_kernel == 23 and SimCLRAugment(32).blur_kernel == 3
    assert SimCLRAugment(224, color_strength=0.5).jitter == (0.4, 0.4, 0.4, 0.1)
    with pytest.raises(ValueError, match="gray_p"):
        SimCLRAugment(32, gray_p=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        SimCLRAugment(32, crop_scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="size"):
        SimCLRAugment(0)
    for bad in (-1, float("nan"), 3.0):
        with pytest.raises(ValueError, match=r"color_strength must be in \[0, 2\.5\]"):
            SimCLRAugment(32, color_strength=bad)
    with pytest.raises(ValueError, match="crop_ratio"):
        SimCLRAugment(32, crop_ratio=(0.5, float("inf")))


# Hostile data sets: each of these once hung, exhausted memory or silently changed the data.


@pytest.mark.timeout(60)
@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
def test_devices_and_fifos_are_refused_without_reading_them(tmp_path, on_corrupt):
    """A .jpg linked to /dev/zero was read to the end (never) and a FIFO's open waited for a writer (forever)."""
    write_image(tmp_path / "c" / "good.jpg")
    os.symlink("/dev/zero", tmp_path / "c" / "zero.jpg")
    os.mkfifo(tmp_path / "c" / "pipe.jpg")
    assert "not a regular file (it is a character device)" in check_image(
        tmp_path / "c" / "zero.jpg"
    )
    assert "not a regular file (it is a FIFO)" in check_image(tmp_path / "c" / "pipe.jpg")
    if on_corrupt == "error":
        with pytest.raises(CorruptImageError, match=r"c/pipe\.jpg is not a regular file"):
            scan_images(tmp_path, on_corrupt)
    else:
        images = scan_images(tmp_path, on_corrupt)
        assert [os.path.basename(p) for p in images.files] == ["good.jpg"]
        assert sorted(os.path.basename(p) for p, _ in images.skipped) == ["pipe.jpg", "zero.jpg"]


@pytest.mark.timeout(60)
def test_a_file_list_that_is_a_device_or_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "list.txt")
    with pytest.raises(ValueError, match=r"list\.txt is not a regular file \(it is a FIFO\)"):
        list_images(tmp_path / "list.txt")
    os.symlink("/dev/zero", tmp_path / "zero.txt")
    with pytest.raises(ValueError, match="character device"):
        list_images(tmp_path / "zero.txt")


@pytest.mark.timeout(60)
def test_symlinked_folders_are_listed_once(folder):
    """A link back to an ancestor made os.walk(followlinks=True) list the class again and again (until ELOOP)."""
    expected = list_images(folder)
    os.symlink(folder, folder / "ant" / "nested" / "to-root")
    os.symlink(folder / "ant", folder / "ant" / "nested" / "to-class")
    os.symlink(folder / "zebra", folder / "ant" / "to-zebra")
    assert list_images(folder) == expected
    # A link to a folder outside the data set is still followed, once.
    write_image(folder.parent / "extra" / "x.jpg")
    os.symlink(folder.parent / "extra", folder / "zebra" / "extra")
    os.symlink(folder.parent / "extra", folder / "zebra" / "extra-again")
    files = list_images(folder)[0]
    assert len(files) == len(expected[0]) + 1


def _deep_images(root):
    """Images whose samples DALI and torchvision convert to 8 bits differently, and 8-bit twins that are fine."""
    root.mkdir(parents=True)
    gray16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(gray16).save(root / "gray16.png")
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(root / "float.tif")
    Image.fromarray(gray16.astype(np.int32)).save(root / "int32.tif")
    write_image(root / "rgb8.tif")
    write_image(root / "rgb8.png")
    return root


def test_deep_and_float_samples_are_refused_by_name(tmp_path):
    root = _deep_images(tmp_path / "c")
    assert "has 16-bit integer samples (PNG)" in check_image(root / "gray16.png")
    assert "has 32-bit floating-point samples (TIFF)" in check_image(root / "float.tif")
    assert "has 32-bit integer samples (TIFF)" in check_image(root / "int32.tif")
    assert check_image(root / "rgb8.tif") is None and check_image(root / "rgb8.png") is None
    with pytest.raises(CorruptImageError, match=r"c/float\.tif has 32-bit floating-point samples"):
        list_images(tmp_path)
    images = scan_images(tmp_path, on_corrupt="skip")
    assert sorted(os.path.basename(p) for p in images.files) == ["rgb8.png", "rgb8.tif"]


def test_tiff_with_a_directory_outside_the_file_is_refused(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + (10**6).to_bytes(4, "little") + b"\x00" * 8)
    assert "outside the 16-byte file" in check_image(tmp_path / "bad.tif")
    (tmp_path / "short.tif").write_bytes(b"MM\x00*\x00")
    assert "truncated" in check_image(tmp_path / "short.tif")

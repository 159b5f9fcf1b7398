"""The SimCLR and evaluation loaders, DALI (CPU) and torchvision twin, against one contract.

Probes: solid-colour PNG images survive crop, resize and flip unchanged, so with the colour ops
off the colour of a view names the image it came from (order, shards, labels, resume); other
small synthetic images make one augmentation visible at a time (a gradient shows a flip, stripes
show blur, a colourful image shows grayscale). Probability checks count ``n = 384`` views and
accept the observed fraction within 4.5 binomial standard deviations of ``p``
(~+-0.09 for p = 0.5, ~+-0.07 for p = 0.8 or 0.2); seeds are fixed, so the counts themselves
are deterministic.
"""

import math
import re
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from fastclr.pipelines import (
    CorruptImageError,
    EvalLoader,
    LoaderOptions,
    SimCLRAugment,
    SimCLRLoader,
    TorchEvalLoader,
    TorchSimCLRLoader,
    dali_available,
    make_loader,
)

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, never a stuck CI job

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not importable")
SIMCLR = [
    pytest.param(SimCLRLoader, id="dali", marks=needs_dali),
    pytest.param(TorchSimCLRLoader, id="torch"),
]
# Where augmentation matters, also DALI's own ops on the CPU (the graph the GPU runs); the
# default on the CPU is the numba op (tests/test_cpu_augment.py compares the two pixel by pixel).
DALI_OPS = partial(SimCLRLoader, augment_impl="dali")
AUGMENTING = [*SIMCLR, pytest.param(DALI_OPS, id="dali-ops", marks=needs_dali)]
EVAL = [
    pytest.param(EvalLoader, id="dali", marks=needs_dali),
    pytest.param(TorchEvalLoader, id="torch"),
]
EVAL_CLASSES = (EvalLoader, TorchEvalLoader)
NO_COLOR = dict(color_p=0.0, gray_p=0.0, blur_p=0.0)
IDENTITY = dict(normalize=False, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **NO_COLOR)


def make_set(root, arrays, classes=2, ext=".png"):
    """Write ``arrays[i]`` to ``root/c<i % classes>/<i>.<ext>``; returns the root."""
    for i, array in enumerate(arrays):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i:03d}{ext}")
    return root


def identity_colour(i):
    return (4 * i, 128, 255 - 4 * i)


@pytest.fixture(scope="module")
def identity_set(tmp_path_factory):
    """61 solid 16 px images; image i has red level 4 i and lies in class folder c<i % 3>."""
    arrays = [np.full((16, 16, 3), identity_colour(i), np.uint8) for i in range(61)]
    return make_set(tmp_path_factory.mktemp("identity"), arrays, classes=3)


@pytest.fixture(scope="module")
def flat_set(tmp_path_factory):
    """identity_set's 61 images directly in one folder: unlabelled, no class folders."""
    root = tmp_path_factory.mktemp("flat")
    for i in range(61):
        Image.fromarray(np.full((16, 16, 3), identity_colour(i), np.uint8)).save(
            root / f"{i:03d}.png"
        )
    return root


def image_ids(batch):
    """Image index of each view in a (B, 3, H, W) batch in [0, 1] made from ``identity_set``."""
    red = batch[:, 0].float().mean(dim=(1, 2)) * 255
    return (red / 4).round().long().tolist()


def all_batches(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def check_fraction(hits, n, p, what):
    sd = math.sqrt(p * (1 - p) / n)
    frac = hits / n
    assert abs(frac - p) <= 4.5 * sd, (
        f"{what}: {hits}/{n} = {frac:.3f}, expected {p} +- {4.5 * sd:.3f}"
    )


def views(loader, epochs=2):
    """All views of ``epochs`` epochs, stacked: (n, 3, H, W) float32."""
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for view_a, view_b in loader:
            out += [view_a.float(), view_b.float()]
    return torch.cat(out)


@pytest.mark.parametrize("cls", AUGMENTING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_views_shape_dtype_layout_range(cls, dtype, tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for _ in range(10)]
    root = make_set(tmp_path, arrays, ext=".jpg")
    with cls(root, 4, 16, dtype=dtype, normalize=False, num_threads=1, seed=0) as loader:
        batches = all_batches(loader)
    assert len(batches) == len(loader) == 2  # 10 images, batch 4, last batch dropped
    for view_a, view_b in batches:
        for view in (view_a, view_b):
            assert view.shape == (4, 3, 16, 16) and view.dtype == dtype
            assert view.is_contiguous(memory_format=torch.channels_last)
            assert view.device.type == "cpu"
            assert view.min() >= 0 and view.max() <= 1
        assert not torch.equal(view_a, view_b)  # independent augmentations

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normed = cls(root, 4, 16, mean=mean, std=std, num_threads=1, seed=0)
    view = next(iter(normed))[0].float()
    low = (0 - torch.tensor(mean)) / torch.tensor(std)
    high = (1 - torch.tensor(mean)) / torch.tensor(std)
    per_channel = view.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= low - 1e-2).all()
    assert (per_channel.max(1).values <= high + 1e-2).all()
    assert (per_channel.min(1).values < 0).any()  # normalised, not in [0, 1]


@pytest.mark.parametrize("cls", AUGMENTING)
def test_seed_reproduces_and_epochs_differ(cls, tmp_path):
    rng = np.random.default_rng(1)
    root = make_set(tmp_path, [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(8)])
    first = all_batches(cls(root, 4, 16, seed=7, num_threads=1))
    again = all_batches(cls(root, 4, 16, seed=7, num_threads=2))
    other = all_batches(cls(root, 4, 16, seed=8, num_threads=1))
    loader = cls(root, 4, 16, seed=7, num_threads=1)
    loader.set_epoch(1)
    next_epoch = all_batches(loader)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], next_epoch[0][0])
    assert loader.epoch == 2  # a completed epoch advances to the next


@pytest.mark.parametrize("cls", SIMCLR)
def test_skip_batches_replays_the_tail_of_an_epoch(cls, tmp_path):
    rng = np.random.default_rng(2)
    root = make_set(
        tmp_path, [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(20)]
    )
    loader = cls(root, 4, 16, seed=3, num_threads=1)
    loader.set_epoch(2)
    full = all_batches(loader)
    resumed = cls(root, 4, 16, seed=3, num_threads=1)
    resumed.set_epoch(2, skip_batches=3)
    tail = all_batches(resumed)
    assert len(full) == 5 and len(tail) == 2
    for a, b in zip(full[3:], tail, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="skip_batches"):
        resumed.set_epoch(0, skip_batches=6)


@pytest.mark.parametrize("cls", SIMCLR)
@pytest.mark.parametrize("last_batch", ["drop", "keep"])
def test_shards_partition_the_epoch(cls, last_batch, identity_set):
    seen = []
    for shard in range(3):
        loader = cls(
            identity_set, 4, 16, shard_id=shard, num_shards=3, last_batch=last_batch, **IDENTITY
        )
        loader.set_epoch(1)
        ids = [i for view_a, view_b in loader for i in image_ids(view_a)]
        assert ids == [int(p.split("/")[-1][:3]) for p in loader.epoch_files(1)]
        seen += ids
    if last_batch == "keep":
        assert sorted(seen) == list(range(61))
    else:
        assert len(seen) == len(set(seen)) == 3 * 20  # 20 = whole batches of 61 // 3


@pytest.mark.parametrize("cls", SIMCLR)
def test_two_views_come_from_the_same_image_and_order_changes(cls, identity_set):
    loader = cls(identity_set, 8, 16, **IDENTITY)
    order0 = [i for a, b in loader for i in image_ids(a) if image_ids(b)]
    pairs = [(image_ids(a), image_ids(b)) for a, b in loader]  # epoch 1
    order1 = [i for a, _ in pairs for i in a]
    assert all(a == b for a, b in pairs)
    assert sorted(order0) != order0 != order1


@pytest.mark.parametrize("cls", AUGMENTING)
def test_grayscale_probability(cls, tmp_path):
    root = make_set(tmp_path, [np.full((16, 16, 3), (220, 40, 90), np.uint8)] * 96)
    v = views(cls(root, 32, 16, **{**IDENTITY, "gray_p": 0.2}))
    gray = ((v[:, 0] - v[:, 1]).abs().amax(dim=(1, 2)) < 1e-3) & (
        (v[:, 1] - v[:, 2]).abs().amax(dim=(1, 2)) < 1e-3
    )
    check_fraction(int(gray.sum()), len(v), 0.2, "grayscale")


@pytest.mark.parametrize("cls", SIMCLR)
def test_flip_probability(cls, tmp_path):
    ramp = np.zeros((16, 16, 3), np.uint8)
    ramp[..., 0] = np.arange(16) * 16  # red rises left to right
    root = make_set(tmp_path, [ramp] * 96)
    v = views(cls(root, 32, 16, **IDENTITY))
    flipped = v[:, 0, :, :8].mean(dim=(1, 2)) > v[:, 0, :, 8:].mean(dim=(1, 2))
    check_fraction(int(flipped.sum()), len(v), 0.5, "horizontal flip")


@pytest.mark.parametrize("cls", AUGMENTING)
def test_color_jitter_probability(cls, tmp_path):
    colour = np.array((180, 70, 110), np.uint8)
    root = make_set(tmp_path, [np.full((16, 16, 3), colour, np.uint8)] * 96)
    v = views(cls(root, 32, 16, **{**IDENTITY, "color_p": 0.8}))
    changed = (v.mean(dim=(2, 3)) * 255 - torch.tensor(colour)).abs().amax(dim=1) > 2.5
    check_fraction(int(changed.sum()), len(v), 0.8, "colour jitter")


@pytest.mark.parametrize("cls", AUGMENTING)
def test_blur_probability(cls, tmp_path):
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel columns: any sigma >= 1.5 flattens them
    root = make_set(tmp_path, [stripes] * 96)
    kw = {**IDENTITY, "blur_p": 0.5, "blur_sigma": (1.5, 2.0)}
    v = views(cls(root, 32, 64, **kw))
    blurred = v[:, 0].std(dim=(1, 2)) < 0.2  # sharp stripes: std ~0.5
    check_fraction(int(blurred.sum()), len(v), 0.5, "gaussian blur")
    assert cls(root, 32, 64).augment.blur_p == 0.5  # default: by size
    assert cls(root, 32, 32).augment.blur_p == 0.0


@pytest.mark.parametrize("cls", AUGMENTING)
def test_solarize_probability(cls, tmp_path):
    root = make_set(tmp_path, [np.full((16, 16, 3), 200, np.uint8)] * 96)
    v = views(cls(root, 32, 16, **{**IDENTITY, "solarize_p": 0.5}))
    level = v.mean(dim=(1, 2, 3)) * 255
    assert ((level - 200).abs() < 1.5).logical_or((level - 55).abs() < 1.5).all()
    check_fraction(int((level < 128).sum()), len(v), 0.5, "solarize")


@pytest.mark.parametrize("cls", EVAL)
def test_eval_labels_match_folders_in_fixed_order(cls, identity_set):
    loader = cls(identity_set, 8, 16, normalize=False)
    assert len(loader) == 8 and loader.classes == ["c0", "c1", "c2"]
    batches = all_batches(loader)
    assert [len(x) for x, _ in batches] == [8] * 7 + [5]  # partial last batch kept
    ids = [i for x, _ in batches for i in image_ids(x)]
    labels = [int(y) for _, y in batches for y in y]
    assert batches[0][1].dtype == torch.int64
    assert sorted(ids) == list(range(61))
    assert labels == [i % 3 for i in ids]
    assert ids == [int(p.split("/")[-1][:3]) for p in loader.epoch_files(0)]
    assert ids == [i for x, _ in loader for i in image_ids(x)]  # same order every epoch


@pytest.mark.parametrize("cls", EVAL)
def test_eval_augment_shuffles_and_keeps_labels(cls, identity_set):
    loader = cls(identity_set, 8, 16, normalize=False, augment=True, num_shards=2, shard_id=1)
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        pairs = [(i, int(y)) for x, ys in loader for i, y in zip(image_ids(x), ys, strict=True)]
        assert all(y == i % 3 for i, y in pairs)
        orders.append([i for i, _ in pairs])
    assert len(orders[0]) == 30 and orders[0] != orders[1]


@needs_dali
def test_dali_eval_matches_torchvision_eval(tmp_path):
    """Same resize + centre crop. 72x48 -> 48x32 -> 28x28 keeps every size and crop offset an
    integer: where the crop offset is x.5, DALI rounds up and torchvision to even."""
    rng = np.random.default_rng(4)
    smooth = [
        np.asarray(
            Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(
                (72, 48), Image.BICUBIC
            )
        )
        for _ in range(6)
    ]
    root = make_set(tmp_path, smooth)
    dali = torch.cat([x for x, _ in EvalLoader(root, 6, 28, normalize=False)])
    twin = torch.cat([x for x, _ in TorchEvalLoader(root, 6, 28, normalize=False)])
    err = (dali - twin).abs()
    assert err.mean() < 0.003, f"mean |dali - torchvision| = {err.mean():.4f}"


@needs_dali
@pytest.mark.parametrize("impl", ["numba", "dali"])
def test_dali_and_twin_colour_statistics_agree(impl, tmp_path):
    """The same jitter distribution: mean and spread of a solid colour's jittered views."""
    root = make_set(tmp_path, [np.full((16, 16, 3), (180, 70, 110), np.uint8)] * 96)
    kw = {**IDENTITY, "color_p": 1.0}
    dali = views(SimCLRLoader(root, 32, 16, augment_impl=impl, **kw)).mean(dim=(2, 3))
    twin = views(TorchSimCLRLoader(root, 32, 16, num_threads=0, **kw)).mean(dim=(2, 3))
    assert (dali.mean(0) - twin.mean(0)).abs().max() < 0.06, (dali.mean(0), twin.mean(0))
    assert (dali.std(0) - twin.std(0)).abs().max() < 0.06, (dali.std(0), twin.std(0))


@pytest.mark.parametrize("cls", SIMCLR)
def test_flat_folder_of_unlabelled_images_pretrains(cls, flat_set, identity_set):
    loader = cls(flat_set, 8, 16, num_threads=1, **IDENTITY)
    assert not loader.labelled and loader.classes == [] and len(loader) == 7
    ids = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for view_a, view_b in loader:
            assert view_a.shape == view_b.shape == (8, 3, 16, 16)
            assert image_ids(view_a) == image_ids(view_b)
            ids.append(image_ids(view_a))
    epoch_0 = [i for batch in ids[:7] for i in batch]
    assert len(set(epoch_0)) == 56 and set(epoch_0) <= set(range(61))  # 61 // 8 whole batches
    assert ids[:7] != ids[7:]  # shuffled anew each epoch
    assert cls(identity_set, 8, 16).labelled


@pytest.mark.parametrize("cls", EVAL)
@pytest.mark.parametrize("augment", [False, True], ids=["centre-crop", "augment"])
def test_evaluation_refuses_a_flat_folder(cls, augment, flat_set):
    expected = f"{cls.__name__}: {flat_set} is a flat folder of unlabelled images"
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        cls(flat_set, 8, 16, augment=augment)
    assert "kNN and linear evaluation need labelled data" in str(info.value)
    assert "root/<class>/<image>" in str(info.value)


@pytest.mark.parametrize("cls", SIMCLR + EVAL)
def test_images_beside_class_folders_are_refused(cls, tmp_path):
    root = make_set(tmp_path, [np.full((16, 16, 3), 90, np.uint8)] * 8)
    Image.fromarray(np.full((16, 16, 3), 30, np.uint8)).save(root / "stray.png")
    with pytest.raises(
        ValueError, match=re.escape(f"{root} holds both images (1, e.g. stray.png)")
    ):
        cls(root, 4, 16)


@pytest.mark.parametrize("cls", SIMCLR + EVAL)
def test_undecodable_file_is_named(cls, tmp_path):
    make_set(tmp_path, [np.full((16, 16, 3), 90, np.uint8)] * 7, ext=".jpg")
    bad = tmp_path / "c0" / "zz-bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9")  # passes the check
    loader = cls(tmp_path, 4, 16, num_threads=1)
    with pytest.raises(CorruptImageError, match="zz-bad.jpg"):
        for epoch in range(3):  # the bad file must come up within a few (shuffled) epochs
            loader.set_epoch(epoch)
            list(loader)


@pytest.mark.parametrize("cls", SIMCLR + EVAL)
def test_bad_inputs_raise_or_skip(cls, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        cls(tmp_path / "missing", 4, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images and no class folders"):
        cls(tmp_path / "empty", 4, 16)
    root = make_set(tmp_path / "data", [np.full((16, 16, 3), 90, np.uint8)] * 8, ext=".jpg")
    good = (root / "c0" / "000.jpg").read_bytes()
    (root / "c1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "c1" / "empty.jpg").write_bytes(b"")
    with pytest.raises(CorruptImageError, match=r"c1/empty\.jpg is empty"):
        cls(root, 4, 16)
    loader = cls(root, 4, 16, on_corrupt="skip")
    assert loader.num_skipped == 2 and len(loader.files) == 8
    assert sum(len(batch[0]) for batch in loader) == 8
    with pytest.raises(ValueError, match="device"):
        cls(root, 4, 16, device="tpu", on_corrupt="skip")
    with pytest.raises(TypeError, match="dtype"):
        cls(root, 4, 16, dtype=torch.int8, on_corrupt="skip")


@pytest.mark.parametrize("cls", SIMCLR + EVAL)
def test_options_and_spec_are_shared(cls, identity_set):
    """Both backends validate the same keywords into one LoaderOptions and one SimCLRAugment."""
    loader = cls(identity_set, 4, 16, seed=5, dtype=torch.float16, normalize=False)
    assert loader.options == LoaderOptions(
        seed=5,
        dtype=torch.float16,
        normalize=False,
        **({"last_batch": "keep"} if cls in EVAL_CLASSES else {}),
    )
    assert loader.seed == 5 and loader.dtype == torch.float16  # options read as attributes
    assert loader.device == torch.device("cpu")
    if cls in EVAL_CLASSES:
        assert loader.augment is None
        assert cls(identity_set, 4, 16, augment=True).augment == SimCLRAugment(
            16, color_p=0.0, gray_p=0.0, blur_p=0.0
        )
        with pytest.raises(TypeError, match=rf"{cls.__name__}\(\).*'last_batch'"):
            cls(identity_set, 4, 16, last_batch="drop")
    else:
        assert loader.augment == SimCLRAugment(16)
        assert cls(identity_set, 4, 16, gray_p=0.5).augment.gray_p == 0.5
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(\).*'colour_p'"):
        cls(identity_set, 4, 16, colour_p=0.5)
    with pytest.raises(AttributeError, match="no attribute 'sead'"):
        getattr(loader, "sead")  # noqa: B009


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_gpu_without_cuda_is_a_clear_error(identity_set):
    for cls in (SimCLRLoader, TorchSimCLRLoader):
        with pytest.raises(ValueError, match="CUDA"):
            cls(identity_set, 4, 16, device="gpu")


def test_make_loader_picks_backend(identity_set):
    kw = dict(root=identity_set, batch_size=4, size=16)
    expected = SimCLRLoader if dali_available() else TorchSimCLRLoader
    assert type(make_loader(**kw)) is expected
    assert type(make_loader("torch", **kw)) is TorchSimCLRLoader
    assert type(make_loader("torch", eval=True, **kw)) is TorchEvalLoader
    with pytest.raises(ValueError, match="backend"):
        make_loader("jax", **kw)


@needs_dali
def test_augment_impl_is_resolved_and_checked(identity_set):
    from fastclr.pipelines.dali import resolve_augment_impl

    assert SimCLRLoader(identity_set, 4, 16).augment_impl == "numba"  # numba is a dependency
    assert DALI_OPS(identity_set, 4, 16).augment_impl == "dali"
    assert resolve_augment_impl("auto", "gpu") == "dali"
    assert resolve_augment_impl("auto", torch.device("cpu")) == "numba"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_augment_impl("numba", "gpu")
    with pytest.raises(ValueError, match="augment_impl"):
        SimCLRLoader(identity_set, 4, 16, augment_impl="cuda")

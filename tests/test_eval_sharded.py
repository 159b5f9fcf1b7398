"""Evaluation sharded over ranks: W gloo ranks on 127.0.0.1 against one process with unsharded loaders.

The promise: with every rank reading its shard (images ``r, r+W, ...``) of the bank and of the queries,
:func:`knn_eval` gives every rank exactly, bit for bit, the features, predictions and accuracies of one process,
whatever the shard sizes; :func:`linear_eval` counts every test image once and reports the same numbers on every rank.
Spawning processes that import torch costs seconds, so one world of 3 ranks is spawned once (a module-scoped fixture
running every check, for W = 2 in the group of ranks 0 and 1) and the tests below only compare what the ranks sent
back with what this process computes.
"""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch
from torch import nn

from fastclr.eval.knn import (
    extract_features,
    gather_shards,
    knn_classify,
    knn_eval,
)
from fastclr.eval.linear import linear_eval
from fastclr.pipelines import TorchEvalLoader
from fastclr.testing.distributed import spawn_world

WORLD_SIZES = (2, 3)
# 23 bank and 11 query images: shards of 12/11 and 8/8/7 bank images, 6/5 and 4/4/3 queries.
N_BANK, N_QUERY, CLASSES, SIZE, BATCH = 23, 11, 3, 8, 4
KNN = dict(
    k=5, temperature=0.1, num_classes=CLASSES, chunk=3, bank_chunk=5
)  # several blocks of both
WORLD_TIMEOUT_S = 240.0


def make_images(root, n: int, seed: int) -> None:
    """An ImageFolder of ``n`` small PNGs in CLASSES classes, each class a colour plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % CLASSES
        pixels = rng.normal(60 + 70 * c, 40, size=(SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8)
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def make_backbone() -> nn.Module:
    """The same small CNN in every process (fixed seed), with a batch norm that eval mode must freeze."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 6),
    )
    net[1].running_mean.uniform_(-0.5, 0.5)
    return net


def loader(root, shard_id: int = 0, num_shards: int = 1, augment: bool = False):
    return TorchEvalLoader(
        root,
        BATCH,
        SIZE,
        augment=augment,
        num_threads=0,
        shard_id=shard_id,
        num_shards=num_shards,
    )


# ---------------------------------------------------------------------------------------------------------------------
# What every rank runs (module level, so that the spawned processes can unpickle it).


def _outcome(fn) -> str:
    """The error a collective call raised on this rank ('ValueError: ...'), or 'no error'."""
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def checks(rank: int, world_size: int, group, train: str, test: str) -> dict:
    """Everything one world size is checked on, with ``group`` (None: the default group) as the world."""
    backbone = make_backbone()
    out = {}
    with loader(train, rank, world_size) as bank, loader(test, rank, world_size) as queries:
        local, _ = extract_features(backbone, bank, "cpu")
        out["local_rows"] = len(local)
        # 40-byte blocks: one 6-d fp32 row per rank and collective, so the gather runs in many blocks
        out["bank"] = gather_shards(local, block_bytes=40, group=group)
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            r = knn_eval(backbone, bank, queries, "cpu", bank_dtype=dtype, group=group, **KNN)
            out[name] = {"top1": r.top1, "top5": r.top5, "predictions": r.predictions}
    # The last shard without its last row (12 + 10 rows, 8 + 8 + 6) is refused on every rank, not gathered wrong.
    short = local[:-1] if rank == world_size - 1 else local
    out["short_shard"] = _outcome(lambda: gather_shards(short, group=group))
    with loader(train, rank, world_size, augment=True) as tr, loader(test, rank, world_size) as te:
        before = [p.detach().clone() for p in backbone.parameters()]
        out["linear"] = linear_eval(
            backbone, tr, te, num_classes=CLASSES, epochs=2, lr=0.5, progress=False, group=group
        )
        out["linear_backbone_kept"] = all(
            torch.equal(a, p) for a, p in zip(before, backbone.parameters(), strict=True)
        )
    return out


def world_worker(rank: int, world_size: int, train: str, test: str) -> dict:
    """W = 3 in the default group, then W = 2 in the group of ranks 0 and 1: one spawn for both sizes."""
    import torch.distributed as torch_dist

    from fastclr.train import dist

    pair = torch_dist.new_group([0, 1])  # collective: every rank creates it
    out = {world_size: checks(rank, world_size, None, train, test)}
    if rank < 2:
        out[2] = checks(rank, 2, pair, train, test)

    def fails_on_rank_1():
        if rank == 1:
            raise ValueError("rank 1 cannot read its shard")
        return rank

    info = dist.DistInfo(rank, world_size, rank, torch.device("cpu"))
    out["every_rank"] = _outcome(lambda: dist.run_on_every_rank(fails_on_rank_1, info))
    out["every_rank_ok"] = dist.run_on_every_rank(lambda: rank * 10, info)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# This process: the data, the single-process reference, one world per size.


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-sharded")
    make_images(root / "train", N_BANK, seed=0)
    make_images(root / "test", N_QUERY, seed=1)
    return root / "train", root / "test"


@pytest.fixture(scope="module")
def single(data):
    """One process, unsharded loaders, one thread as in the ranks: features and kNN results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backbone = make_backbone()
        with loader(data[0]) as bank_loader, loader(data[1]) as query_loader:
            bank, bank_y = extract_features(backbone, bank_loader, "cpu")
            queries, query_y = extract_features(backbone, query_loader, "cpu")
        out = {"bank": bank}
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            r = knn_classify(bank.to(dtype), bank_y, queries, query_y, normalized=True, **KNN)
            out[name] = {"top1": r.top1, "top5": r.top5, "predictions": r.predictions}
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def spawned(data):
    return spawn_world(
        world_worker, 3, str(data[0]), str(data[1]), timeout_s=WORLD_TIMEOUT_S, pg_timeout_s=60
    )


@pytest.fixture(params=WORLD_SIZES, ids=lambda w: f"W={w}")
def world(request, spawned):
    """``(W, what each of the W ranks sent back)``."""
    w = request.param
    return w, [r[w] for r in spawned[:w]]


def test_every_rank_extracts_its_share(world):
    w, results = world
    assert [r["local_rows"] for r in results] == [len(range(r, N_BANK, w)) for r in range(w)]


def assert_identical(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit for bit, or a message saying which rows differ."""
    assert got.shape == expected.shape, (
        f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    )
    rows = (got != expected).reshape(len(got), -1).any(dim=1).nonzero().flatten().tolist()
    assert not rows, f"{what}: rows {rows} differ"


def test_gathered_features_are_the_single_process_features(world, single):
    _, results = world
    for rank, r in enumerate(results):
        assert_identical(r["bank"], single["bank"], f"rank {rank} features")


@pytest.mark.parametrize("bank_dtype", ["fp32", "fp16"])
def test_sharded_knn_equals_single_process_knn(world, single, bank_dtype):
    _, results = world
    expected = single[bank_dtype]
    for rank, r in enumerate(results):
        got = r[bank_dtype]
        assert_identical(got["predictions"], expected["predictions"], f"rank {rank} predictions")
        assert (got["top1"], got["top5"]) == (expected["top1"], expected["top5"]), rank


def test_a_shard_that_is_not_strided_is_refused_on_every_rank(world):
    w, results = world
    for r in results:
        assert r["short_shard"].startswith("ValueError: gather_shards: rank row counts"), r[
            "short_shard"
        ]
        assert f"over {w} ranks" in r["short_shard"]


def test_an_error_on_one_rank_is_raised_on_every_rank(spawned):
    assert [r["every_rank"] for r in spawned] == ["ValueError: rank 1 cannot read its shard"] * 3
    assert [r["every_rank_ok"] for r in spawned] == [0, 10, 20]


def test_sharded_linear_eval_counts_every_test_image_once_alike_on_every_rank(world):
    _, results = world
    first = results[0]["linear"]
    assert first["test_images"] == N_QUERY
    assert all(r["linear"] == first for r in results), [r["linear"] for r in results]
    assert all(r["linear_backbone_kept"] for r in results)


# ---------------------------------------------------------------------------------------------------------------------
# In this process only.


def test_eval_loader_shards_are_the_strided_split_gather_shards_expects(data):
    """The contract between the loaders and the gather: shard r of W reads images r, r+W, ... in order."""
    with loader(data[0]) as whole:
        files = whole.epoch_files(0)
    for w in WORLD_SIZES:
        for r in range(w):
            with loader(data[0], r, w) as shard:
                assert shard.epoch_files(0) == files[r::w], (w, r)


def test_without_a_process_group_knn_eval_is_knn_classify(data, single):
    backbone = make_backbone()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with loader(data[0]) as bank, loader(data[1]) as queries:
            r = knn_eval(backbone, bank, queries, "cpu", **KNN)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(r.predictions, single["fp32"]["predictions"])
    assert gather_shards(single["bank"]) is single["bank"]


def test_knn_eval_rejects_a_bad_bank_dtype(data):
    with pytest.raises(ValueError, match="bank_dtype"):
        knn_eval(make_backbone(), [], [], "cpu", num_classes=3, bank_dtype=torch.bfloat16)


def test_knn_command_takes_its_process_group_timeout_from_the_flag(monkeypatch, tmp_path):
    from fastclr.train import evaluate

    joined = {}

    def init_distributed(device, timeout):
        joined["timeout"] = timeout
        raise KeyboardInterrupt  # stop right there

    monkeypatch.setattr(evaluate.dist, "init_distributed", init_distributed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_knn(tmp_path / "ckpt.pt", dist_timeout=2.5)
    assert joined["timeout"] == datetime.timedelta(minutes=2.5)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_linear(tmp_path / "ckpt.pt", dist_timeout=7)
    assert joined["timeout"] == datetime.timedelta(minutes=7)


@pytest.mark.parametrize("minutes", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_dist_timeout_is_one_error_line(minutes, tmp_path, capsys):
    from fastclr.cli import main

    assert main(["knn", "--ckpt", str(tmp_path / "c.pt"), "--dist-timeout", str(minutes)]) == 1
    assert "dist_timeout must be" in capsys.readouterr().err


def test_init_distributed_refuses_a_timeout_that_is_not_a_positive_timedelta():
    from fastclr.train import dist

    for bad in (None, datetime.timedelta(0), 60):
        with pytest.raises(ValueError, match="timeout must be a positive datetime.timedelta"):
            dist.init_distributed("cpu", timeout=bad)


def test_fewer_images_than_ranks_is_refused_alike_on_every_rank(tmp_path):
    """With N < W images a rank's shard is empty: every rank refuses the data, naming it and W, before any loader."""
    from fastclr.train.config import PretrainConfig
    from fastclr.train.evaluate import _data_paths, check_shards_not_empty

    check_shards_not_empty("--data", "d", 3, 3)  # one image per rank is enough
    with pytest.raises(ValueError, match=r"--data d: 2 image\(s\) for 3 ranks"):
        check_shards_not_empty("--data", "d", 2, 3)
    make_images(tmp_path / "train", 5, seed=0)
    make_images(tmp_path / "test", 3, seed=1)
    train, test = str(tmp_path / "train"), str(tmp_path / "test")
    assert _data_paths(PretrainConfig(), train, test, "kNN", 3) == (train, test)
    # the check reads only what every rank knows (the listing, W): every rank raises this, none waits
    with pytest.raises(ValueError, match=rf"--test-data {test}: 3 image\(s\) for 4 ranks"):
        _data_paths(PretrainConfig(), train, test, "kNN", 4)

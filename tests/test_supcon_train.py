"""Supervised contrastive pretraining end to end: the pair loaders' ``labels=True`` and ``fastclr pretrain --loss
supcon`` on generated labelled images."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from fastclr.pipelines import SimCLRLoader, TorchSimCLRLoader, UnlabelledDataError, write_shards

CLASSES, PER_CLASS, BATCH = 4, 6, 4
# class c is a flat grey image of level LEVELS[c]: its pixels say its class
LEVELS = (20, 90, 160, 230)
LOADERS = {"dali": SimCLRLoader, "torch": TorchSimCLRLoader}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageFolder root/class<c>/<i>.png: CLASSES classes of PER_CLASS flat grey 12 px images."""
    root = tmp_path_factory.mktemp("supcon") / "train"
    for c, level in enumerate(LEVELS):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.new("RGB", (12, 12), (level,) * 3).save(root / f"class{c}" / f"{i}.png")
    return root


def loader(backend, root, labels, **kw):
    options = dict(size=8, num_threads=1, seed=3, device="cpu", dtype=torch.float32, **kw)
    return LOADERS[backend](str(root), BATCH, labels=labels, **options)


def classes_seen(view: torch.Tensor) -> torch.Tensor:
    """(B,) class whose grey level is nearest each un-normalised, un-jittered view's mean."""
    level = view.float().mean(dim=(1, 2, 3)) * 255
    return (level[:, None] - torch.tensor(LEVELS, dtype=torch.float32)).abs().argmin(dim=1)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_pairs_carry_the_labels_of_their_images(backend, folder):
    plain = dict(normalize=False, color_p=0.0, gray_p=0.0, blur_p=0.0)
    with loader(backend, folder, True, **plain) as labelled:
        for epoch in range(2):
            batches = list(labelled)
            assert len(batches) == CLASSES * PER_CLASS // BATCH
            labels = torch.cat([b[2] for b in batches])
            assert all(
                len(b) == 3 and b[2].dtype == torch.int64 and b[2].shape == (BATCH,)
                for b in batches
            )
            assert all(b[2].device == b[0].device for b in batches)
            for view_a, view_b, batch_labels in batches:
                assert torch.equal(classes_seen(view_a), batch_labels)
                assert torch.equal(classes_seen(view_b), batch_labels)
            # and against the file list: each label is the class folder of the file read in that slot
            files = labelled.epoch_files(epoch)
            assert labels.tolist() == [labelled.classes.index(Path(f).parent.name) for f in files]
            assert sorted(labels.tolist()) == sorted(
                c for c in range(CLASSES) for _ in range(PER_CLASS)
            )


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_labels_leave_the_views_and_their_exact_resume_unchanged(backend, folder):
    with loader(backend, folder, False) as unlabelled, loader(backend, folder, True) as labelled:
        unlabelled.set_epoch(1)
        labelled.set_epoch(1)
        plain, full = list(unlabelled), list(labelled)
        for (a, b), (a2, b2, _) in zip(plain, full, strict=True):
            assert torch.equal(a, a2) and torch.equal(b, b2)
        labelled.set_epoch(1, skip_batches=2)
        tail = list(labelled)
    assert len(tail) == len(full) - 2
    for got, want in zip(tail, full[2:], strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_pairs_from_tar_shards_carry_their_labels(backend, folder, tmp_path):
    write_shards(folder, tmp_path / "shards", shard_size=10, progress=False, log=lambda *a: None)
    plain = dict(normalize=False, color_p=0.0, gray_p=0.0, blur_p=0.0)
    with loader(backend, tmp_path / "shards", True, **plain) as labelled:
        batches = list(labelled)
    assert len(batches) == CLASSES * PER_CLASS // BATCH
    for view_a, _, labels in batches:
        assert labels.dtype == torch.int64 and torch.equal(classes_seen(view_a), labels)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_labelled_pairs_refuse_a_flat_folder(backend, tmp_path):
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(UnlabelledDataError, match="flat folder of unlabelled images"):
        loader(backend, tmp_path, True)
    loader(backend, tmp_path, False).close()  # without labels a flat folder is fine
    with pytest.raises(ValueError, match="labels must be a bool"):
        loader(backend, tmp_path, 1)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_supcon_pretraining_refuses_unlabelled_data(backend, tmp_path):
    from fastclr.train.build import build_train_loader
    from fastclr.train.config import ConfigError, PretrainConfig
    from fastclr.train.dist import DistInfo

    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    cfg = PretrainConfig.from_dict(
        {"loss": {"loss": "supcon"}, "data": {"data": str(tmp_path), "backend": backend, "size": 8,
                                              "workers": 1}, "optim": {"batch_size": 2}}
    )  # fmt: skip
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="--loss supcon takes its positives from the labels"):
        build_train_loader(cfg, cpu, torch.float32)


def test_pretrain_with_supcon_trains_and_saves_a_checkpoint(folder, tmp_path, monkeypatch):
    from fastclr.cli import main
    from fastclr.train.checkpoint import list_checkpoints, load_checkpoint
    from fastclr.train.trainer import Trainer

    seen = []
    compute_loss = Trainer.compute_loss

    def spy(self, view_a, view_b, labels=None, **kw):
        seen.append(labels)
        return compute_loss(self, view_a, view_b, labels, **kw)

    monkeypatch.setattr(Trainer, "compute_loss", spy)
    out = tmp_path / "run"
    argv = [
        "pretrain", "--loss", "supcon", "--data", str(folder), "--size", "16", "--workers", "1", "--arch", "cnn7",
        "--width", "8", "--proj-dim", "16", "--batch-size", "12", "--epochs", "1", "--warmup-epochs", "0",
        "--lr-scaling", "none", "--knn-every", "0", "--no-progress", "--out", str(out), "--backend", "dali",
    ]  # fmt: skip
    assert main(argv) == 0
    assert len(seen) == CLASSES * PER_CLASS // 12 == 2
    assert all(
        labels is not None and labels.dtype == torch.int64 and labels.shape == (12,)
        for labels in seen
    )
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert (ckpt["step"], ckpt["epoch"]) == (2, 1)

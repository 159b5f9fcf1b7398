"""``fastclr finetune``: head truncation per K, the v2 defaults, an end-to-end run with exact resume, export, bad input."""

import json
import shutil

import pytest
import torch
from test_labels import image_folder
from test_trainer import make_image_folder

from fastclr.cli import main
from fastclr.models import SimCLRClassifier, SimCLRModel
from fastclr.train.checkpoint import load_checkpoint, save_checkpoint
from fastclr.train.config import ConfigError, PretrainConfig
from fastclr.train.dist import DistInfo
from fastclr.train.evaluate import export_classifier
from fastclr.train.finetune import FinetuneTrainer, configure, finetune
from fastclr.train.stage import load_classifier

HEAD = dict(
    proj_layers=3, proj_hidden=24, proj_dim=16
)  # cnn7 width 8: 64-d features -> 24 -> 24 -> 16


def pretrained(path, proj_layers=3):
    """A pretraining checkpoint whose weights and BN statistics are not the builder's (so loading them shows)."""
    cfg = PretrainConfig()
    m = cfg.model
    m.arch, m.width, m.cifar_stem = "cnn7", 8, True
    m.proj_layers, m.proj_hidden, m.proj_dim = proj_layers, 24, 16
    cfg.data.size, cfg.data.backend = 16, "dali"
    torch.manual_seed(1)
    model = SimCLRModel(
        "cnn7", cifar_stem=True, width=8, proj_layers=proj_layers, proj_hidden=24, proj_dim=16
    )
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():  # running variances stay positive
                t.add_(torch.rand_like(t) if "running" in name else 0.1 * torch.randn_like(t))
    state = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "model": model.state_dict(),
        "config": cfg.to_dict(),
    }
    return save_checkpoint(state, path), model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return make_image_folder(root / "train"), make_image_folder(root / "test", per_class=6, seed=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return pretrained(tmp_path_factory.mktemp("pre") / "ckpt")[0]


def tiny(ckpt, data, out, fraction=0.5, **settings):
    """32 labelled images (half of 4 x 16), batch 8: 4 steps per epoch, 2 epochs, top-1 on 24 test images."""
    overrides = dict(
        size=16,
        workers=1,
        backend="dali",
        batch_size=8,
        epochs=2,
        out=str(out),
        progress=False,
        test_data=str(data[1]),
        log_every=2,
    )
    return configure(
        ckpt, str(data[0]), label_fraction=fraction, overrides={**overrides, **settings}
    )


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_head_truncation_keeps_the_first_k_layers_and_their_weights(k):
    torch.manual_seed(0)
    simclr = SimCLRModel("cnn7", cifar_stem=True, width=8, **HEAD)
    model = SimCLRClassifier.from_pretrained(simclr, k, 5)
    state, pre = model.state_dict(), simclr.state_dict()
    # layer i < 3 is Linear/BN/ReLU at head.3i..3i+2; the last, a bare Linear, is head.6
    kept = {
        key for key in pre if key.startswith("head.") and (k == 3 or int(key.split(".")[1]) < 3 * k)
    }
    assert {key for key in state if key.startswith("head.")} == kept
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(value, pre[key]), key  # the very tensors, not re-initialised copies
    assert model.feat_dim == [64, 24, 24, 16][k] and state["fc.weight"].shape == (5, model.feat_dim)
    assert (
        not state["fc.weight"].any() and not state["fc.bias"].any()
    )  # v2's zero-initialised classifier
    x = torch.randn(4, 3, 16, 16)
    simclr.eval(), model.eval()
    features = SimCLRClassifier.from_pretrained(simclr, k, None).eval()(x)
    expected = simclr.backbone(x)
    for layer in list(simclr.head)[: 3 * k if k < 3 else None]:
        expected = layer(expected)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    assert torch.equal(model(x), torch.zeros(4, 5))
    # the builder the export line uses makes the same shapes: the state loads strictly
    SimCLRClassifier("cnn7", 5, cifar_stem=True, width=8, head_layers=k, **HEAD).load_state_dict(
        state
    )


def test_head_layer_outside_the_head_is_refused(ckpt, data, tmp_path):
    for k in (-1, 4, True):
        with pytest.raises(ConfigError, match=r"--from-head-layer must be an integer in \[0, 3\]"):
            configure(ckpt, str(data[0]), label_fraction=0.5, from_head_layer=k)
    two = pretrained(tmp_path / "two", proj_layers=2)[0]
    with pytest.raises(ConfigError, match=r"in \[0, 2\]"):
        configure(two, str(data[0]), label_fraction=0.5, from_head_layer=3)


def test_the_model_starts_from_the_checkpoint(ckpt, data, tmp_path):
    cfg, subset = tiny(ckpt, data, tmp_path / "run")
    model = FinetuneTrainer(
        cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), subset
    ).make_model()
    assert model.training and all(
        p.requires_grad for p in model.parameters()
    )  # whole network, train mode
    saved = load_checkpoint(ckpt)["model"]
    for key, value in model.state_dict().items():
        if key.startswith(("backbone.", "head.")):
            assert torch.equal(value, saved[key]), key
    assert {key.split(".")[1] for key in model.state_dict() if key.startswith("head.")} == {
        "0",
        "1",
    }


def test_v2_defaults_follow_the_subset(ckpt, tmp_path):
    data = image_folder(tmp_path / "d", {"a": 40, "b": 40, "c": 40})
    few = tmp_path / "few.txt"
    few.write_text("a_0.JPEG\nb_0.JPEG\nc_0.JPEG\n")  # 2.5% of the labels
    cfg, subset = configure(ckpt, str(data), labels_file=few)
    o = cfg.optim
    assert (o.lr, o.lr_scaling, o.weight_decay, o.warmup_epochs, o.momentum) == (
        0.005,
        "sqrt",
        0.0,
        0.0,
        0.9,
    )
    assert (o.epochs, o.batch_size, cfg.finetune.from_head_layer) == (60, 3, 1)
    assert cfg.data.size == 16 and cfg.model.proj_layers == 3 and cfg.classes == ["a", "b", "c"]
    cfg, _ = configure(ckpt, str(data), label_fraction=0.1)
    assert (cfg.optim.epochs, cfg.optim.batch_size) == (30, 12)
    assert len(subset.files) == 3


def test_finetune_trains_writes_its_labels_and_resumes_exactly(ckpt, data, tmp_path):
    full = finetune(*tiny(ckpt, data, tmp_path / "full"))
    assert full["status"] == "completed" and full["step"] == len(full["losses"]) == 8
    labels = (tmp_path / "full" / "labels.txt").read_text().splitlines()
    assert len(labels) == 32 and labels[0].startswith("class0/")
    # named for what they hold: the classifier's top-1 on --test-data and on the logged training batches
    assert not (tmp_path / "full" / "knn.csv").exists()
    header, *rows = (tmp_path / "full" / "test.csv").read_text().splitlines()
    assert header == "step,epoch,test_top1"
    assert "train_top1" in (tmp_path / "full" / "metrics.csv").read_text().splitlines()[0].split(
        ","
    )
    # test top-1 at the start and every epoch; at the start the zero logits all say class 0
    assert [int(r.split(",")[0]) for r in rows] == [0, 4, 8]
    assert full["knn_init"] == pytest.approx(0.25) and 0 <= full["knn_final"] <= 1
    saved = load_checkpoint(full["checkpoint"])
    assert saved["config"]["finetune"]["from_head_layer"] == 1
    assert json.loads(saved["config"]["finetune"]["classes"]) == [f"class{c}" for c in range(4)]

    # --test-data may change on resume (it does not touch the trajectory): these two go without the monitor
    cut = finetune(*tiny(ckpt, data, tmp_path / "cut", max_steps=3, test_data=None))  # mid-epoch 0
    assert cut["status"] == "max_steps"
    rest = finetune(*tiny(ckpt, data, tmp_path / "cut", resume="auto", test_data=None))
    assert cut["losses"] + rest["losses"] == full["losses"]  # bit-identical

    # a changed setting of the [finetune] section is refused on resume, naming it
    cfg, subset = tiny(ckpt, data, tmp_path / "cut", resume="auto")
    cfg.finetune.label_seed = 5
    with pytest.raises(ValueError, match=r"finetune\.label_seed \(checkpoint 0, now 5\)"):
        finetune(cfg, subset)

    # the fine-tuned checkpoint exports as a plain classifier that the printed line rebuilds and loads
    model, _ = load_classifier(full["checkpoint"])
    r = export_classifier(full["checkpoint"], tmp_path / "clf.pt")
    scope: dict = {}
    exec(r["load"], scope)
    loaded = scope["model"].eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))  # memory layouts differ: close, not bit for bit
    assert r["num_classes"] == 4 and r["head_layers"] == 1 and r["classes"][0] == "class0"
    with pytest.raises(ValueError, match=r"--with-head 2: .* sits on 1 projection-head layer"):
        export_classifier(full["checkpoint"], tmp_path / "x.pt", with_head=2)


def test_export_with_head_of_a_pretrained_checkpoint(tmp_path, capsys):
    path, simclr = pretrained(tmp_path / "pre")
    out = tmp_path / "enc.safetensors"
    assert main(["export", "--ckpt", str(path), "--out", str(out), "--with-head", "2"]) == 0
    printed = capsys.readouterr().out
    assert "cnn7 backbone + 2 projection-head layer(s)" in printed
    scope: dict = {}
    exec(printed.strip().splitlines()[-1], scope)
    encoder = scope["model"].eval()
    simclr.eval()
    x = torch.randn(2, 3, 16, 16)
    first_two = torch.nn.Sequential(*list(simclr.head)[:6])
    torch.testing.assert_close(encoder(x), first_two(simclr.backbone(x)), rtol=0, atol=0)
    assert (
        main(["export", "--ckpt", str(path), "--out", str(tmp_path / "e.pt"), "--with-head", "4"])
        == 1
    )
    assert "head layer must be an int in [0, 3]" in capsys.readouterr().err


def test_cli_refuses_bad_input_before_training(ckpt, data, tmp_path, capsys):
    base = ["finetune", "--ckpt", str(ckpt), "--data", str(data[0]), "--out", str(tmp_path / "o")]
    assert main([*base, "--label-fraction", "1.5"]) == 1
    assert "--label-fraction must be a number in (0, 1]" in capsys.readouterr().err
    assert main([*base, "--labels-file", str(tmp_path / "none.txt")]) == 1
    assert "--labels-file" in capsys.readouterr().err
    assert (
        main(
            [
                "finetune",
                "--ckpt",
                str(tmp_path / "no.pt"),
                "--data",
                str(data[0]),
                "--label-fraction",
                "0.5",
            ]
        )
        == 1
    )
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(
        SystemExit
    ):  # neither --label-fraction nor --labels-file: argparse's usage error
        main(base)
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.slow
def test_torchrun_two_processes_finetune_alike(ckpt, data, tmp_path):
    """DDP: both ranks take the same number of full batches, evaluate their test shard and end identical."""
    import os
    import sys

    from test_trainer import _free_port, _run

    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "fastclr", "finetune", "--ckpt", str(ckpt), "--data", str(data[0]),
        "--test-data", str(data[1]), "--label-fraction", "0.5", "--batch-size", "8", "--epochs", "2", "--size", "16",
        "--workers", "1", "--backend", "dali", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    code, output = _run(cmd, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert code == 0, output
    assert "2 process(es) on cpu" in output and "parameters identical on all 2 ranks" in output, (
        output
    )
    saved = load_checkpoint(sorted((out / "checkpoints").iterdir())[-1])
    # 32 labelled images, global batch 8 -> 4 per rank, 16 per shard -> 4 steps per epoch
    assert (saved["step"], saved["world_size"]) == (8, 2)


def test_the_classifier_stays_out_of_lars_trust_ratio_and_decay(ckpt, data, tmp_path):
    """A zero-initialised layer under LARS's trust ratio eta * ||w|| / ||g|| would barely move: the reference keeps
    its supervised head out of the ratio and the decay, and so does fastclr."""
    cfg, subset = tiny(ckpt, data, tmp_path / "run", weight_decay=1e-4)
    trainer = FinetuneTrainer(
        cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), subset
    )
    trainer.model, trainer.steps_per_epoch = trainer.make_model(), 4
    optimizer, _ = trainer.make_optimizer()
    fc = {id(p) for p in trainer.model.fc.parameters()}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert not ids & fc or (ids == fc and group["lars_exclude"] and group["weight_decay"] == 0)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(
        list(trainer.model.parameters())
    )
    # no warm-up: every group, the classifier's too, at the peak from the first step
    peak = 0.005 * 8**0.5
    assert {g["lr"] for g in optimizer.param_groups} == {peak}


def test_knn_and_linear_evaluate_the_backbone_of_a_fine_tuned_checkpoint(
    ckpt, data, tmp_path, capsys
):
    from fastclr.train.evaluate import load_model

    run = finetune(*tiny(ckpt, data, tmp_path / "run", epochs=1))
    model, cfg = load_model(run["checkpoint"])
    assert isinstance(model, SimCLRClassifier) and cfg.finetune.from_head_layer == 1
    saved = load_checkpoint(run["checkpoint"])["model"]
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, saved[f"backbone.{key}"]), key
    # --data and --test-data default to the run's (the labelled ImageFolder, not the label list)
    fast = ["--ckpt", run["checkpoint"], "--workers", "1", "--batch-size", "16"]
    assert main(["knn", *fast, "--k", "5"]) == 0, capsys.readouterr().err
    assert "kNN top-1 (k=5)" in capsys.readouterr().out
    assert main(["linear", *fast, "--epochs", "1", "--no-progress"]) == 0, capsys.readouterr().err
    assert "linear evaluation: top-1" in capsys.readouterr().out


def test_the_stage_commands_help_builds_without_the_training_stack(capsys):
    import subprocess
    import sys

    for command in ("finetune", "distill"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        assert "--eval-every" in capsys.readouterr().out
    # building the parser (every command and --help does) imports the flags, not the trainer
    probe = "import sys, fastclr.cli; fastclr.cli._parser(); print(sorted(m for m in sys.modules if m in {M}))"
    heavy = {
        "fastclr.train.trainer",
        "fastclr.train.finetune",
        "fastclr.train.distill",
        "fastclr.train.stage",
    }
    out = subprocess.run(
        [sys.executable, "-c", probe.replace("{M}", repr(heavy))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_rank_takes_the_full_batches_of_the_shortest_shard(tmp_path):
    """Shards of 15 images over 2 ranks hold 8 and 7: 2 and 1 full batches of 4 (2 and 2 with the short one), so
    both ranks must take 1, or one of them waits forever in DDP's all-reduce."""
    from fastclr.train.build import build_labelled_loader, labelled_steps

    assert labelled_steps(15, 4, 2) == 1 and labelled_steps(17, 4, 2) == 2
    assert labelled_steps(16, 4, 1) == 4 and labelled_steps(3, 4, 2) == 0
    for n, b, w in [(15, 4, 2), (17, 4, 2), (103, 8, 3), (64, 16, 4), (10, 1, 7)]:
        shards = [len(range(r, n, w)) for r in range(w)]  # round-robin, as the loaders shard
        assert labelled_steps(n, b, w) == min(s // b for s in shards)

    root = make_image_folder(tmp_path / "d", classes=3, per_class=5)  # 15 images
    cfg = PretrainConfig()
    cfg.data.size, cfg.data.backend, cfg.data.workers = 16, "torch", 0
    cfg.optim.batch_size = 8  # 4 per rank
    counts = []
    for rank in (0, 1):
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        loader = build_labelled_loader(cfg, info, str(root), torch.float32)
        try:
            loader.set_epoch(0)
            batches = [len(labels) for _, labels in loader]
        finally:
            loader.close()
        counts.append((len(loader), batches))
    assert counts == [(1, [4]), (1, [4])]


def test_the_held_out_monitor_scores_every_shard_with_rank_0s_batch_norm_statistics(monkeypatch):
    """Like kNN's monitor, Top1Monitor broadcasts rank 0's buffers before scoring this rank's shard."""
    from fastclr.train import dist, stage

    calls = []
    monkeypatch.setattr(dist, "broadcast_buffers", lambda m, info: calls.append(("buffers", m)))
    monkeypatch.setattr(
        stage, "classifier_top1", lambda m, *a, **k: calls.append(("top1", m)) or 0.5
    )
    info = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    cfg = PretrainConfig()
    cfg.data.test_data = "unused"
    monitor = stage.Top1Monitor(cfg, info, ["a", "b"], None)
    monitor._loader = [(torch.zeros(1, 3, 8, 8), torch.zeros(1))]  # prepared: no folder opened
    model = torch.nn.BatchNorm2d(3)
    assert monitor(model) == 0.5
    assert calls == [("buffers", model), ("top1", model)]


def test_finetune_from_tar_shards_equals_finetune_from_their_folder(ckpt, data, tmp_path):
    """The same label subset, samples, batches and (torchvision twin) augmentations: bit-identical losses. The
    subset is written as the samples' names and read back through --labels-file, and the official lists' bare
    names (``x.JPEG``) find the members ``fastclr shards`` wrote (``x.jpeg``)."""
    from fastclr.pipelines.shard_writer import write_shards
    from fastclr.train.labels import read_subset

    # the images of data[0] under names unique across classes, as ImageNet's are
    train = tmp_path / "train"
    for f in sorted(data[0].rglob("*.jpg")):
        (train / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, train / f.parent.name / f"{f.parent.name}_{f.name}")
    shards = tmp_path / "shards"
    write_shards(train, shards, shard_size=20, progress=False)  # 64 images: 4 shards
    source = str(shards / "train-{000000..000003}.tar")
    common = dict(backend="torch", test_data=None, epochs=1)
    folder = finetune(*tiny(ckpt, (str(train), data[1]), tmp_path / "folder", **common))
    cfg, subset = tiny(ckpt, (source, data[1]), tmp_path / "shard", **common)
    assert all(".tar:" in f for f in subset.files)
    # the shards' folder draws the same subset as their pattern
    assert tiny(ckpt, (str(shards), data[1]), tmp_path / "x", **common)[1] == subset
    from_shards = finetune(cfg, subset)
    assert from_shards["status"] == "completed" and from_shards["step"] == 4
    assert from_shards["losses"] == folder["losses"]

    written = (tmp_path / "shard" / "labels.txt").read_text().splitlines()
    assert len(written) == 32 and all(line.startswith(str(shards.resolve())) for line in written)
    again = configure(
        ckpt, source, labels_file=tmp_path / "shard" / "labels.txt", overrides={"size": 16}
    )[1]
    assert again.files == subset.files and again.labels == subset.labels
    official = tmp_path / "official.txt"
    official.write_text(
        "".join(f.rsplit("/", 1)[1].replace(".jpg", ".JPEG") + "\n" for f in written)
    )
    listed = read_subset(official, source, subset.files, subset.labels, subset.classes)
    assert listed.files == subset.files


def test_unlabelled_tar_shards_are_refused_for_fine_tuning_naming_the_labels(
    ckpt, tmp_path, capsys
):
    from fastclr.pipelines.shard_writer import write_shards

    flat = tmp_path / "flat"
    flat.mkdir()
    make_image_folder(tmp_path / "tmp", classes=1, per_class=6)
    for f in (tmp_path / "tmp").rglob("*.jpg"):
        f.rename(flat / f.name)
    write_shards(flat, tmp_path / "shards", shard_size=3, progress=False)
    out = tmp_path / "o"
    args = ["finetune", "--ckpt", str(ckpt), "--data", str(tmp_path / "shards"), "--out", str(out)]
    assert main([*args, "--label-fraction", "0.5"]) == 1
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'shards'} holds tar shards without .cls members" in err, err
    assert not out.exists()  # nothing written

"""The fastclr command line: every subcommand, and one clear error line (exit 1, no traceback) for each bad input."""

import re
import sys
import types

import pytest
import torch
from test_trainer import make_image_folder

from fastclr.cli import main
from fastclr.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fastclr.train.config import PretrainConfig

TINY = [
    "--size", "16", "--workers", "1", "--arch", "cnn7", "--width", "8", "--proj-dim", "32", "--batch-size", "16",
    "--warmup-epochs", "0", "--lr", "1.0", "--lr-scaling", "none", "--knn-every", "0", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-data")
    return make_image_folder(root / "train"), make_image_folder(root / "test", per_class=6, seed=1)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A one-epoch run through the CLI; returns (its newest checkpoint, its run directory)."""
    out = tmp_path_factory.mktemp("cli-run") / "run"
    argv = [
        "pretrain",
        "--data",
        str(data[0]),
        "--test-data",
        str(data[1]),
        *TINY,
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return list_checkpoints(out / "checkpoints")[-1], out


def error_line(capsys, code) -> str:
    """The single 'fastclr: error:' line of a failed command (and proof that nothing else went wrong)."""
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fastclr: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_pretrain_knn_linear_export(trained, data, tmp_path, capsys):
    ckpt, out = trained
    assert load_checkpoint(ckpt)["step"] == 4
    assert (out / "config.toml").is_file() and (out / "curves.png").is_file()
    assert len((out / "knn.csv").read_text().splitlines()) == 1 + 2  # random init and trained
    # folders from the ckpt
    assert main(["knn", "--ckpt", str(ckpt), "--k", "5", "--workers", "1", "--size", "16"]) == 0
    assert re.search(
        r"kNN top-1 \(k=5\): \d+\.\d\d%.*64 bank images.*24 test images", capsys.readouterr().out
    )
    argv = [
        "linear",
        "--ckpt",
        str(ckpt),
        "--data",
        str(data[0]),
        "--test-data",
        str(data[1]),
        "--epochs",
        "1",
    ]
    assert main([*argv, "--batch-size", "16", "--workers", "1", "--no-progress"]) == 0
    assert re.search(
        r"linear evaluation: top-1 \d+\.\d\d%, top-5 \d+\.\d\d%", capsys.readouterr().out
    )
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "backbone.pt")]) == 0
    assert "cnn7 backbone" in capsys.readouterr().out
    from fastclr.models import build_backbone

    backbone, _ = build_backbone("cnn7", width=8)
    exported = torch.load(tmp_path / "backbone.pt", weights_only=True)
    backbone.load_state_dict(exported)  # strict: exactly the backbone's keys
    trained_backbone = {
        k[len("backbone.") :]: v
        for k, v in load_checkpoint(ckpt)["model"].items()
        if k.startswith("backbone.")
    }
    assert all(torch.equal(exported[k], v) for k, v in trained_backbone.items())


def test_export_loads_into_torchvision_resnet(tmp_path, capsys):
    import torchvision

    from fastclr.models import SimCLRModel

    cfg = PretrainConfig()
    cfg.model.arch = "resnet18"
    model = SimCLRModel("resnet18")
    state = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "model": model.state_dict(),
        "config": cfg.to_dict(),
    }
    ckpt = save_checkpoint(state, tmp_path)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "r18.pt")]) == 0
    resnet = torchvision.models.resnet18(weights=None)
    result = resnet.load_state_dict(
        torch.load(tmp_path / "r18.pt", weights_only=True), strict=False
    )
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.equal(resnet.conv1.weight, model.backbone.conv1.weight)


def test_pretrain_without_data_runs_the_digits_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTCLR_CACHE", str(tmp_path / "cache"))
    code = main(
        [
            "pretrain",
            "--max-steps",
            "1",
            "--workers",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "demo"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    # the embedded data and the cpu-demo preset
    assert "digits-32px/train" in printed and 'arch = "cnn7"' in printed
    assert re.search(r"kNN top-1 \(k=\d+\): random init \d+\.\d\d% -> trained \d+\.\d\d%", printed)
    assert len(list((tmp_path / "cache" / "digits-32px" / "train").glob("*/*.jpg"))) > 1000


def test_info_explains_the_auto_choices(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    for expected in (
        "torch 2.",
        "loss impl 'auto' -> ",
        "data backend 'auto' -> ",
        "pipeline device 'auto' -> ",
        "pipeline augment_impl 'auto' -> ",
        "precision 'auto' -> ",
        "--compile: torch.compile of the model, except under multi-GPU DDP",
    ):
        assert expected in printed


def test_bench_dispatches_to_the_benchmark_module(monkeypatch):
    seen = {}
    fake = types.ModuleType("fastclr.bench.bench_train")
    fake.main = lambda argv: seen.setdefault("argv", argv)
    monkeypatch.setitem(sys.modules, "fastclr.bench.bench_train", fake)
    assert main(["bench", "train", "--steps", "3", "--loader", "dali"]) == 0
    assert seen["argv"] == ["--steps", "3", "--loader", "dali"]


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--arch", "vgg16"], r"unknown arch 'vgg16'; choose one of resnet18"),
        (["--temperature", "0"], r"temperature must be a positive finite number, got 0\.0"),
        (["--temperature", "-0.5"], r"temperature must be a positive"),
        (["--lr", "0"], r"lr must be a positive finite number, got 0\.0"),
        (["--lr", "-1"], r"lr must be a positive"),
        (["--precision", "fp16"], r"precision fp16 needs a GPU"),
        (
            ["--batch-size", "128"],
            r"--data .*train, --batch-size 128: .*64 images yields no batch of 128",
        ),
    ],
)
def test_bad_settings(data, tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(data[0]), *TINY, *flags, "--out", str(out)])
    assert re.search(match, error_line(capsys, code))
    assert not list_checkpoints(out / "checkpoints")


def test_batch_not_divisible_by_world_size(data, tmp_path, capsys, monkeypatch):
    # checked before any process group is joined, so nothing waits for peers
    monkeypatch.setenv("WORLD_SIZE", "3")
    code = main(["pretrain", "--data", str(data[0]), *TINY, "--out", str(tmp_path / "run")])
    assert "batch_size 16 is not divisible by the world size 3" in error_line(capsys, code)


def test_missing_and_empty_data(tmp_path, capsys):
    code = main(
        ["pretrain", "--data", str(tmp_path / "nowhere"), *TINY, "--out", str(tmp_path / "run")]
    )
    assert re.search(r"--data .*nowhere: no such file or directory", error_line(capsys, code))
    (tmp_path / "empty").mkdir()
    code = main(
        ["pretrain", "--data", str(tmp_path / "empty"), *TINY, "--out", str(tmp_path / "run")]
    )
    assert re.search(r"--data .*empty: the directory is empty", error_line(capsys, code))
    code = main(["pretrain", "--preset", "no-such", "--out", str(tmp_path / "run")])
    assert "unknown preset 'no-such'; available: cifar10-r18, cpu-demo, imagenet-r50" in error_line(
        capsys, code
    )


def test_unreadable_and_foreign_checkpoints(data, tmp_path, capsys):
    junk, foreign = tmp_path / "junk.pt", tmp_path / "foreign.pt"
    junk.write_bytes(b"\x00garbage")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    base = ["pretrain", "--data", str(data[0]), *TINY, "--out", str(tmp_path / "run")]
    assert re.search(
        r"cannot read checkpoint .*junk\.pt",
        error_line(capsys, main([*base, "--resume", str(junk)])),
    )
    assert "foreign.pt is not a fastclr checkpoint" in error_line(
        capsys, main([*base, "--resume", str(foreign)])
    )
    assert "missing.pt: checkpoint not found" in error_line(
        capsys, main([*base, "--resume", str(tmp_path / "missing.pt")])
    )
    for command in (
        ["knn", "--ckpt", str(junk)],
        ["export", "--ckpt", str(foreign), "--out", str(tmp_path / "x.pt")],
    ):
        assert re.search(r"junk\.pt|foreign\.pt", error_line(capsys, main(command)))
    assert not (tmp_path / "x.pt").exists() and not list_checkpoints(
        tmp_path / "run" / "checkpoints"
    )


def test_resume_with_a_different_config_names_the_keys(trained, data, capsys):
    ckpt, out = trained
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    argv = [
        "pretrain",
        "--data",
        str(data[0]),
        *TINY,
        "--epochs",
        "1",
        "--out",
        str(out),
        "--resume",
        "auto",
    ]
    line = error_line(capsys, main([*argv, "--width", "16", "--temperature", "0.1"]))
    assert (
        "different config: loss.temperature (checkpoint 0.5, now 0.1), model.width (checkpoint 8, now 16)"
        in line
    )
    # nothing written, nothing removed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_demo_reruns_go_to_a_fresh_run_directory(tmp_path):
    from fastclr.cli import _unused_run_dir

    out = str(tmp_path / "cpu-demo")
    assert _unused_run_dir(out) == out
    for name in ("cpu-demo", "cpu-demo-2"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "ckpt-000000001.pt").write_bytes(b"")
    assert _unused_run_dir(out) == out + "-3"


def test_digits_demo_data_set(tmp_path):
    from PIL import Image

    from fastclr.train.demo_data import DONE_MARKER, digits_dataset

    train, test = digits_dataset(size=16, root=tmp_path / "digits")
    n_train, n_test = len(list(train.glob("*/*.jpg"))), len(list(test.glob("*/*.jpg")))
    assert n_train + n_test == 1797 and 0.18 < n_test / 1797 < 0.22
    assert (
        sorted(p.name for p in train.iterdir())
        == sorted(p.name for p in test.iterdir())
        == [str(d) for d in range(10)]
    )
    with Image.open(next(train.glob("3/*.jpg"))) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    (train / "3").rename(train / "x")  # a cached copy (marker present) is reused as is, not rebuilt
    assert (tmp_path / "digits" / DONE_MARKER).exists() and digits_dataset(
        size=16, root=tmp_path / "digits"
    ) == (train, test)
    assert (train / "x").exists()
    with pytest.raises(ValueError, match="at least 8 px"):
        digits_dataset(size=4, root=tmp_path / "small")


def test_test_data_with_other_classes(data, tmp_path, capsys):
    other = make_image_folder(tmp_path / "other", classes=3, per_class=2)
    code = main(
        [
            "pretrain",
            "--data",
            str(data[0]),
            "--test-data",
            str(other),
            *TINY,
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert re.search(
        r"--test-data .*other: its classes .* differ from the training classes",
        error_line(capsys, code),
    )

"""The fastclr command line: every subcommand, and one clear error line (exit 1, no traceback) for each bad input."""

import re
import sys
import types

import pytest
import torch
from test_trainer import make_image_folder

import fastclr.device
from fastclr.cli import main
from fastclr.train.checkpoint import list_checkpoints, load_checkpoint
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


def test_pretrain_without_data_runs_the_shapes_demo(tmp_path, monkeypatch, capsys):
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
    assert "shapes-32px-" in printed and 'arch = "cnn7"' in printed
    assert re.search(r"kNN top-1 \(k=\d+\): random init \d+\.\d\d% -> trained \d+\.\d\d%", printed)
    (demo,) = (tmp_path / "cache").glob("shapes-32px-*")
    assert len(list((demo / "train").glob("*/*.jpg"))) == 3000


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


@pytest.mark.parametrize(
    ("native", "cpu_line", "precision_line"),
    [
        (
            True,
            "bf16 native",
            "precision 'auto' -> bf16 autocast (this CPU computes bf16 natively: ",
        ),
        (False, "bf16 emulated", "precision 'auto' -> fp32 (a CPU without native bf16"),
    ],
)
def test_info_shows_the_cpu_precision_choice_and_why(
    monkeypatch, capsys, native, cpu_line, precision_line
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fastclr.device, "native_cpu_bf16", lambda: native)
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("CPU: ") and cpu_line in line for line in lines), lines
    assert any(line.startswith(precision_line) for line in lines), lines


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


def test_shapes_demo_data_set(tmp_path):
    import numpy as np
    from PIL import Image

    from fastclr.train.demo_data import DONE_MARKER, SHAPES, shapes_dataset

    train, test = shapes_dataset(
        size=16, root=tmp_path / "shapes", train_per_class=4, test_per_class=2
    )
    assert (
        sorted(p.name for p in train.iterdir())
        == sorted(p.name for p in test.iterdir())
        == sorted(SHAPES)
    )
    assert len(list(train.glob("*/*.jpg"))) == 40 and len(list(test.glob("*/*.jpg"))) == 20
    images = [np.asarray(Image.open(p)) for p in sorted(train.glob("circle/*.jpg"))]
    assert all(im.shape == (16, 16, 3) for im in images)
    # Colour is a nuisance: two circles never share their background colour (the corner pixel).
    assert len({tuple(im[0, 0] // 16) for im in images}) == len(images)
    # The same arguments draw the same images on every machine; the test split is not a copy of the training one.
    again, _ = shapes_dataset(size=16, root=tmp_path / "again", train_per_class=4, test_per_class=2)
    assert all(
        np.array_equal(
            np.asarray(Image.open(p)), np.asarray(Image.open(again / p.relative_to(train)))
        )
        for p in train.glob("*/*.jpg")
    )
    assert not np.array_equal(np.asarray(Image.open(test / "circle" / "00000.jpg")), images[0])
    (train / "ring").rename(
        train / "x"
    )  # a cached copy (marker present) is reused as is, not rebuilt
    assert (tmp_path / "shapes" / DONE_MARKER).exists()
    assert shapes_dataset(
        size=16, root=tmp_path / "shapes", train_per_class=4, test_per_class=2
    ) == (
        train,
        test,
    )
    assert (train / "x").exists()
    with pytest.raises(ValueError, match="at least 16 px"):
        shapes_dataset(size=8, root=tmp_path / "small")


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


@pytest.fixture(scope="module")
def flat(data, tmp_path_factory):
    """The training images in one flat folder (no class folders): pretraining data, unlabelled."""
    root = tmp_path_factory.mktemp("flat") / "images"
    root.mkdir()
    for i, path in enumerate(sorted(data[0].glob("*/*.jpg"))):
        (root / f"{i:03d}.jpg").write_bytes(path.read_bytes())
    return root


def test_flat_data_with_test_data_stops_before_training(data, flat, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["pretrain", "--data", str(flat), "--test-data", str(data[1]), *TINY, "--out", str(out)]
    )
    line = error_line(capsys, code)
    assert f"--test-data {data[1]} asks for the kNN monitor" in line
    assert f"--data {flat} is a flat folder of unlabelled images: pass a labelled --data" in line
    assert not list_checkpoints(out / "checkpoints")


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_evaluation_of_a_flat_folder_says_to_pass_labelled_data(
    trained, data, flat, capsys, command
):
    ckpt, _ = trained
    argv = [command, "--ckpt", str(ckpt), "--workers", "1", "--size", "16"]
    line = error_line(capsys, main([*argv, "--data", str(flat)]))
    what = {"knn": "kNN", "linear": "linear"}[command]
    assert line == (
        f"fastclr: error: {what} evaluation needs labelled images, but --data {flat} is a flat folder of unlabelled "
        "images: pass a labelled --data, an ImageFolder root/<class>/<img>"
    )
    line = error_line(capsys, main([*argv, "--test-data", str(flat)]))
    assert (
        f"--test-data {flat} is a flat folder of unlabelled images: pass a labelled --test-data"
        in line
    )


def test_tensorboard_without_the_package_is_one_error_line_at_start(
    data, tmp_path, capsys, monkeypatch
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a),
    )
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(data[0]), *TINY, "--tensorboard", "--out", str(out)])
    assert "pip install 'fastclr[tensorboard]'" in error_line(capsys, code)
    assert not out.exists()


def test_bench_returns_the_exit_status_of_gpu_check(monkeypatch):
    fake = types.ModuleType("fastclr.bench.gpu_check")
    fake.main = lambda argv: 2 if argv == ["--dry-run"] else 0
    monkeypatch.setitem(sys.modules, "fastclr.bench.gpu_check", fake)
    assert main(["bench", "gpu", "--dry-run"]) == 2
    assert main(["bench", "gpu"]) == 0
    seen = {}
    dist = types.ModuleType("fastclr.bench.bench_dist")
    dist.main = lambda argv: seen.setdefault("argv", argv) and [{"rows": 1}]
    monkeypatch.setitem(sys.modules, "fastclr.bench.bench_dist", dist)
    assert main(["bench", "dist", "--world-size", "2"]) == 0 and seen["argv"] == [
        "--world-size",
        "2",
    ]


def test_device_flags_take_the_package_vocabulary():
    from fastclr.device import DEVICE_CHOICES
    from fastclr.train.config import RunConfig

    cfg = PretrainConfig()
    cfg.run.device = "gpu"
    cfg.validate()  # a synonym of cuda, as everywhere in the package
    assert dataclasses_field(RunConfig, "device").metadata["choices"] == DEVICE_CHOICES


def dataclasses_field(cls, name):
    import dataclasses

    return next(f for f in dataclasses.fields(cls) if f.name == name)

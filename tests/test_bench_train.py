"""The training benchmark runs end to end on tiny generated data sets and records what it measured."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from fastclr.bench import bench_train
from fastclr.pipelines import dali_available
from fastclr.train.build import build_model
from fastclr.train.dist import DistInfo

pytestmark = pytest.mark.timeout(300)


def image_folder(root, classes: int = 2, per_class: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            cells = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
            cells[..., c % 3] = 255  # a class colour, so kNN has something to find
            Image.fromarray(cells).resize((32, 32)).save(root / f"c{c}" / f"{i}.jpg")
    return root


def tiny(*extra: str) -> list[str]:
    return [
        "--arch",
        "cnn7",
        "--width",
        "4",
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--no-progress",
        *extra,
    ]


def test_split_times_every_loader_and_loss_side_by_side(tmp_path):
    out = tmp_path / "split.csv"
    argv = tiny("--images", "32", "--steps", "2", "--warmup", "1", "--impls", "reference,torch")
    rows = bench_train.main([*argv, "--csv", str(out)])
    loaders = ["dali", "torchvision"] if dali_available() else ["torchvision"]
    assert [(r["loader"], r["loss_impl"]) for r in rows] == [
        (b, i) for b in loaders for i in ("reference", "torch")
    ]
    for r in rows:
        phases = sum(r[f"{p}_ms"] for p in bench_train.PHASES)
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        assert phases == pytest.approx(r["step_ms"], rel=0.5)  # medians of parts vs median of sums
        assert r["images_per_s"] == pytest.approx(8 / (r["step_ms"] / 1e3), rel=0.01)
    written = list(csv.DictReader(out.open()))
    assert len(written) == len(rows) and {"date", "device", "torch", "data_ms"} <= set(written[0])


def test_plain_loop_starts_from_fastclrs_initial_weights(tmp_path):
    args = bench_train.parse_args(tiny("--seed", "3"))
    args.data = tmp_path
    cfg = bench_train.make_config(args, tmp_path / "out")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    fastclr_model = build_model(cfg, info).state_dict()
    plain_model = bench_train.initial_model(args, torch.device("cpu")).state_dict()
    assert fastclr_model.keys() == plain_model.keys()
    for k, v in plain_model.items():
        assert torch.equal(v, fastclr_model[k]), k


def test_baseline_runs_both_loops_within_the_budget(tmp_path):
    train = image_folder(tmp_path / "train")
    test = image_folder(tmp_path / "test", per_class=8, seed=1)
    out = tmp_path / "baseline.csv"
    argv = tiny("--baseline", "--data", str(train), "--test-data", str(test), "--budget", "4")
    rows = bench_train.main([*argv, "--probe-steps", "2", "--csv", str(out)])
    assert [r["run"] for r in rows] == ["plain-pytorch", "fastclr"]
    # The plain loop trains until its wall-clock budget is spent; fastclr sizes whole epochs from a speed probe (no
    # upper bound on time here: under load the probe and the run see different speeds).
    assert rows[0]["train_s"] >= 4
    for r in rows:
        assert r["steps"] > 0 and r["train_s"] > 0
        assert 0 <= r["knn_init"] <= 100 and 0 <= r["knn_final"] <= 100
        assert r["knn_gain"] == pytest.approx(r["knn_final"] - r["knn_init"], abs=0.02)
    assert rows[0]["knn_init"] == rows[1]["knn_init"]
    assert (rows[0]["precision"], rows[0]["lr"]) == ("fp32", 0.06)  # the plain loop's SGD
    assert rows[1]["lr"] == 8.0 and rows[1]["temperature"] == rows[0]["temperature"] == 0.1
    assert len(list(csv.DictReader(out.open()))) == 2


def test_baseline_needs_held_out_data(tmp_path):
    train = image_folder(tmp_path / "train")
    with pytest.raises(SystemExit, match="--test-data"):
        bench_train.main(tiny("--baseline", "--data", str(train)))


def test_rejects_a_missing_data_dir(tmp_path):
    with pytest.raises(SystemExit, match="not a directory"):
        bench_train.main(tiny("--data", str(tmp_path / "nope")))


def test_refuses_to_append_rows_under_another_header(tmp_path):
    out = tmp_path / "old.csv"
    out.write_text("date,run,knn_gain\n2026-01-01,fastclr,1.0\n")
    before = out.read_text()
    with pytest.raises(SystemExit, match="other columns"):
        bench_train.append_csv(out, [{"date": "x", "run": "fastclr", "knn_gain": 2, "seed": 0}])
    assert out.read_text() == before

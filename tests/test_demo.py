"""The demo shows SimCLR learning: a shortened `make demo` on the embedded shapes must lift kNN accuracy by a wide margin.

A random-init CNN sorts the shapes mostly by colour (about 30% kNN top-1 over ten classes); SimCLR's colour jitter,
grayscale and crops teach it to ignore colour and position. This run (620 steps of the cpu-demo recipe on 2,000 images,
seed 0) gains about 30 points; a broken augmentation, a loss with the wrong sign or an optimiser that does not step
leaves the gain far below the bound (each was checked by breaking it once).
"""

from __future__ import annotations

import pytest

from fastclr.train.config_io import load_preset
from fastclr.train.demo_data import shapes_dataset
from fastclr.train.trainer import pretrain

MIN_GAIN = 0.15


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_dataset(
        32, root=tmp_path_factory.mktemp("shapes") / "set", train_per_class=200, test_per_class=50
    )


def test_short_demo_gains_at_least_15_knn_points(shapes, tmp_path):
    cfg = load_preset("cpu-demo")
    cfg.data.data, cfg.data.test_data = str(shapes[0]), str(shapes[1])
    cfg.optim.epochs, cfg.run.knn_every = 20, 0
    cfg.run.out, cfg.run.progress, cfg.run.seed = str(tmp_path / "demo"), False, 0
    r = pretrain(cfg)
    gain = r["knn_final"] - r["knn_init"]
    assert r["status"] == "completed" and r["step"] == 620
    assert gain >= MIN_GAIN, (
        f"kNN top-1 {100 * r['knn_init']:.1f}% -> {100 * r['knn_final']:.1f}%: gain {100 * gain:+.1f} points "
        f"< {100 * MIN_GAIN:.0f}"
    )


def test_bench_demo_reads_the_summary_line_and_appends_a_row(tmp_path, monkeypatch):
    from fastclr.bench import bench_demo

    monkeypatch.setenv("FASTCLR_CACHE", str(tmp_path / "cache"))
    (row,) = bench_demo.main(["--seeds", "3", "--out", str(tmp_path), "--max-steps", "2"])
    assert row["seed"] == 3 and row["steps"] == 2 and row["total_s"] > 0
    assert row["gain_points"] == pytest.approx(row["knn_trained"] - row["knn_init"], abs=0.011)
    lines = (tmp_path / "bench_demo.csv").read_text().splitlines()
    assert lines[0].split(",") == list(bench_demo.COLUMNS) and len(lines) == 2

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

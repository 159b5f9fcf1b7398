"""The pipeline benchmark runs end to end on a few tiny images and records what it measured."""

import csv

import pytest
from PIL import Image

from fastclr.bench import bench_pipeline
from fastclr.pipelines import dali_available

pytestmark = pytest.mark.timeout(180)


def test_make_jpegs_sizes_and_classes(tmp_path):
    root = bench_pipeline.make_jpegs(tmp_path / "d", 12, 40, 60)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 12 and len({f.parent.name for f in files}) == 10
    for f in files:
        assert all(40 <= side <= 60 for side in Image.open(f).size)


def test_bench_runs_side_by_side_and_appends_csv(tmp_path):
    out = tmp_path / "results.csv"
    plot = tmp_path / "bench.png"
    argv = ["--size", "32", "--images", "24", "--batch-size", "4", "--repeats", "2"]
    argv += ["--warmup", "1", "--threads", "1", "--csv", str(out), "--plot", str(plot)]
    rows = bench_pipeline.main(argv)
    backends = ["dali", "dali-ops", "torchvision"] if dali_available() else ["torchvision"]
    assert [r["backend"] for r in rows] == backends
    for r in rows:
        assert r["size"] == 32 and r["n_images"] == 24
        assert 0 < r["low"] <= r["median"] <= r["high"] and r["cpu_ms"] > 0
    if len(rows) > 1:
        twin = rows[-1]
        assert twin["speedup"] == 1.0 and twin["cpu_speedup"] == 1.0
        for r in rows[:-1]:
            assert r["speedup"] == pytest.approx(r["median"] / twin["median"])
            assert r["cpu_speedup"] == pytest.approx(twin["cpu_ms"] / r["cpu_ms"])
    bench_pipeline.main(argv[:-2])  # a second run appends below the same header
    written = list(csv.DictReader(out.open()))
    assert len(written) == 2 * len(rows)
    assert {"date", "device", "torch", "dali", "load_avg", "median", "cpu_ms"} <= set(written[0])
    assert plot.stat().st_size > 1000


def test_bench_rejects_a_missing_data_dir(tmp_path):
    with pytest.raises(SystemExit, match="not a directory"):
        bench_pipeline.main(["--data", str(tmp_path / "nope")])

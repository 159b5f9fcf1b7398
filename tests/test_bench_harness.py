"""The benchmarks' shared harness: CSV header checks, the output folder, the environment row, the table."""

import argparse
import csv
import io
from pathlib import Path

import pytest
import torch

from fastclr.bench import (
    bench_cpu_augment,
    bench_dist,
    bench_loss,
    bench_pipeline,
    bench_train,
    harness,
)
from fastclr.bench.harness import add_out_argument, append_csv, environment, print_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


# ---------------------------------------------------------------------------------------------------------------------
# append_csv


def test_append_csv_creates_then_appends_under_one_header(tmp_path):
    path = tmp_path / "new" / "x.csv"
    append_csv(path, [{"a": 1, "b": 2.5}])
    # Same columns in another order: appended in the file's order.
    append_csv(path, [{"b": 4, "a": 3}, {"a": 5, "b": 6}])
    assert path.read_text().splitlines() == ["a,b", "1,2.5", "3,4", "5,6"]


def test_append_csv_writes_a_key_some_rows_lack_as_empty(tmp_path):
    path = tmp_path / "x.csv"
    append_csv(
        path, [{"impl": "torch", "status": "skipped"}, {"impl": "ref", "ms": 1.5, "status": "ok"}]
    )
    assert list(csv.DictReader(path.open())) == [
        {"impl": "torch", "status": "skipped", "ms": ""},
        {"impl": "ref", "status": "ok", "ms": "1.5"},
    ]


@pytest.mark.parametrize(
    "row, named",
    [
        (
            {"date": "x", "run": "a"},
            "the file's, not in the rows: knn_gain; the rows', not in the file: -",
        ),
        ({"date": "x", "run": "a", "knn_gain": 1, "seed": 0}, "the rows', not in the file: seed"),
        (
            {"date": "x", "run": "a", "gain": 1},
            "not in the rows: knn_gain; the rows', not in the file: gain",
        ),
    ],
)
def test_append_csv_refuses_other_columns_and_writes_nothing(tmp_path, row, named):
    path = tmp_path / "old.csv"
    path.write_text("date,run,knn_gain\n2026-01-01,fastclr,1.0\n")
    before = path.read_bytes()
    with pytest.raises(SystemExit) as err:
        append_csv(path, [row])
    message = str(err.value)
    assert str(path) in message and "other columns" in message and named in message, message
    assert path.read_bytes() == before


def test_append_csv_of_no_rows_creates_nothing(tmp_path):
    append_csv(tmp_path / "x.csv", [])
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Where results go


def checkout(root: Path) -> Path:
    (root / "bench").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "fastclr"\n')
    return root / "bench"


def test_default_out_dir_in_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "BENCH_DIR", checkout(tmp_path / "src" / "fastclr"))
    monkeypatch.chdir(tmp_path)
    assert harness.default_out_dir() == tmp_path / "src" / "fastclr" / "bench" / "results"


@pytest.mark.parametrize("site", ["site-packages", "dist-packages"])
def test_default_out_dir_when_installed_is_the_working_directory(tmp_path, monkeypatch, site):
    # Even with a fastclr pyproject.toml next to it: an installed bench folder is never written into.
    bench = checkout(tmp_path / "venv" / "lib" / "python3.11" / site / "fastclr")
    monkeypatch.setattr(harness, "BENCH_DIR", bench)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert harness.default_out_dir() == work / "fastclr-bench"


def test_default_out_dir_needs_fastclrs_pyproject(tmp_path, monkeypatch):
    bench = checkout(tmp_path / "other")
    (bench.parent / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    monkeypatch.setattr(harness, "BENCH_DIR", bench)
    monkeypatch.chdir(tmp_path)
    assert harness.default_out_dir() == tmp_path / "fastclr-bench"
    (bench.parent / "pyproject.toml").unlink()
    assert harness.default_out_dir() == tmp_path / "fastclr-bench"


def test_this_checkout_writes_into_bench_results():
    assert harness.default_out_dir() == RESULTS


def test_out_argument_defaults_to_default_out_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "BENCH_DIR", tmp_path / "site-packages" / "fastclr" / "bench")
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_out_argument(parser)
    assert parser.parse_args([]).out == tmp_path / "fastclr-bench"
    assert parser.parse_args(["--out", "elsewhere"]).out == Path("elsewhere")


@pytest.mark.parametrize(
    "parse",
    [
        bench_train.parse_args,
        bench_pipeline.parse_args,
        lambda argv: bench_dist.build_parser().parse_args(argv),
    ],
    ids=["train", "pipeline", "dist"],
)
def test_benchmarks_take_out(parse, tmp_path):
    assert parse(["--out", str(tmp_path)]).out == tmp_path
    assert parse([]).out == harness.default_out_dir()


def test_bench_loss_writes_its_csv_and_plot_into_out(tmp_path):
    results_before = {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()}
    argv = ["--sizes", "4", "--dim", "8", "--impls", "floor", "reference", "--repeats", "1"]
    rows = bench_loss.main([*argv, "--device", "cpu", "--out", str(tmp_path)])
    assert [r["status"] for r in rows] == ["ok", "ok"]
    written = list(csv.DictReader((tmp_path / "bench_loss.csv").open()))
    assert [r["impl"] for r in written] == ["floor", "reference"]
    assert written[1]["x_floor"] and float(written[1]["median_s"]) > 0
    assert (tmp_path / "bench_loss.png").stat().st_size > 1000
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()} == results_before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only skip")
@pytest.mark.parametrize("loss", ["ntxent-bank", "dcl", "dclw", "supcon"])
def test_every_family_loss_has_a_triton_provider_that_needs_cuda(loss):
    assert "triton" in bench_loss.LOSS_IMPLS[loss]
    with pytest.raises(RuntimeError, match="skipped: no CUDA device"):
        bench_loss.make_family_loss_fn(loss, "triton", 0.5, 8, 4)


# ---------------------------------------------------------------------------------------------------------------------
# The environment row and the CSVs already under bench/results


def header(name: str) -> list[str]:
    with (RESULTS / name).open(newline="") as f:
        return next(csv.reader(f))


@pytest.mark.parametrize(
    "columns, name",
    [
        (bench_loss.CSV_COLUMNS, "bench_loss.csv"),
        (bench_pipeline.CSV_COLUMNS, "bench_pipeline.csv"),
        (bench_cpu_augment.CSV_COLUMNS, "bench_cpu_augment.csv"),
        (bench_dist.CSV_COLUMNS, "loss_dist.csv"),
    ],
)
def test_benchmark_columns_match_the_recorded_csv(columns, name):
    assert list(columns) == header(name)


@pytest.mark.parametrize("name", ["bench_train_baseline.csv", "bench_train_trials.csv"])
def test_train_environment_columns_match_the_recorded_csv(name):
    assert header(name)[: len(bench_train.ENV_COLUMNS)] == list(bench_train.ENV_COLUMNS)


def test_environment_has_every_recorded_environment_column():
    env = environment()
    recorded = {
        "date",
        "device",
        "torch",
        "torchvision",
        "dali",
        "pillow",
        "load_avg",
        "cpu_threads",
        "python",
    }
    assert recorded <= env.keys() and {"cpu", "triton", "fastclr"} <= env.keys()
    assert all(isinstance(v, str) for v in env.values())
    assert env["device"] == env["cpu"] == environment("cpu")["device"]
    assert "cores)" in env["cpu"] and env["fastclr"] and env["date"][:2] == "20"


# ---------------------------------------------------------------------------------------------------------------------
# print_table


def test_print_table_aligns_columns_and_marks_missing_values():
    out = io.StringIO()
    rows = [
        {"impl": "reference", "ms": 12.3456, "n": 4},
        {"impl": "t", "ms": None, "n": 65536, "x": 1},
    ]
    print_table(rows, file=out)
    lines = out.getvalue().splitlines()
    assert lines == [
        "impl          ms      n  x",
        "reference  12.35      4  -",
        "t              -  65536  1",
    ]
    out = io.StringIO()
    print_table(rows, ["n", "impl"], file=out)
    assert out.getvalue().splitlines() == ["    n  impl", "    4  reference", "65536  t"]

"""Run metrics: the CSV/JSONL rows, and the same rows as TensorBoard scalars when ``--tensorboard`` asks for them."""

import json
import sys

import pytest

from fastclr.train.config import ConfigError, PretrainConfig
from fastclr.train.metrics import MetricsLog

ROWS = [
    {
        "step": 1,
        "epoch": 0,
        "loss": 4.5,
        "lr": 0.1,
        "contrastive_top1": 0.25,
        "images_per_s": 100.0,
        "data_s": 0.01,
    },
    {
        "step": 2,
        "epoch": 0,
        "loss": 4.0,
        "lr": 0.2,
        "contrastive_top1": 0.5,
        "images_per_s": 120.0,
        "data_s": 0.02,
    },
]


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def test_tensorboard_gets_every_metric_row(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    for row in ROWS:
        log.log("train", row)
    log.log("knn", {"step": 2, "epoch": 1, "knn_top1": 0.75})
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert scalars(tmp_path / "tensorboard") == {
        "train/loss": [(1, 4.5), (2, 4.0)],
        "train/lr": [(1, 0.1), (2, 0.2)],
        "train/images_per_s": [(1, 100.0), (2, 120.0)],
        "train/contrastive_top1": [(1, 0.25), (2, 0.5)],
        "knn/knn_top1": [(2, 0.75)],
    }
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 2  # the files as before


def test_no_tensorboard_unless_asked_and_never_on_other_ranks(tmp_path):
    MetricsLog(tmp_path / "plain").log("train", ROWS[0])
    MetricsLog(tmp_path / "rank1", enabled=False, tensorboard=True).log("train", ROWS[0])
    assert not (tmp_path / "plain" / "tensorboard").exists() and not (tmp_path / "rank1").exists()


def test_asking_for_tensorboard_without_the_package_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", None
    )  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'fastclr\[tensorboard\]'"):
        MetricsLog(tmp_path, tensorboard=True)

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    cfg = PretrainConfig()
    cfg.validate()  # off by default: nothing needed
    cfg.run.tensorboard = True
    with pytest.raises(
        ConfigError, match=r"--tensorboard needs the tensorboard package.*fastclr\[tensorboard\]"
    ):
        cfg.validate()


def _steps(path) -> list[int]:
    lines = path.read_text().splitlines()
    if path.suffix == ".jsonl":
        return [json.loads(line)["step"] for line in lines]
    return [int(line.split(",")[0]) for line in lines[1:]]


def test_a_resumed_run_drops_the_rows_it_trains_again(tmp_path):
    """A run killed after logging steps 1-5 but checkpointing step 3 logged 4 and 5 twice once resumed."""
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.log("train", {**ROWS[0], "step": step})
    log.log("knn", {"step": 4, "epoch": 1, "knn_top1": 0.5})
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("6,1,4.1")  # a row cut short by kill -9
    resumed = MetricsLog(tmp_path, start_step=3)
    assert _steps(tmp_path / "metrics.csv") == [1, 2, 3]
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3] and _steps(tmp_path / "knn.csv") == []
    assert (tmp_path / "metrics.csv").read_bytes().count(
        b"\r\n"
    ) == 4  # the csv module's line ends, kept
    resumed.log("train", {**ROWS[0], "step": 4})
    assert _steps(tmp_path / "metrics.csv") == [1, 2, 3, 4]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    MetricsLog(tmp_path, start_step=0)  # from scratch: no row of an earlier attempt stays
    assert _steps(tmp_path / "metrics.csv") == [] and _steps(tmp_path / "metrics.jsonl") == []

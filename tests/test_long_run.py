"""A long multi-rank run, simulated on the CPU: torchrun with 3 gloo ranks, the tiny model, the kNN monitor every epoch.

The short version (CI) trains 2 epochs and checks that the ranks agree and that the sharded monitor's last kNN top-1 is
the one ``fastclr knn`` computes in one process from the final checkpoint. The long one (``-m slow``) also kills a rank
mid-epoch; torchrun (``--max-restarts 1``) starts the ranks again, they resume from the newest checkpoint (``--resume
auto``, mid-epoch), and the final parameters must equal, bit for bit, those of the same run left alone, and agree
across ranks; then ``fastclr knn`` under torchrun gives the one-process result. The training data are tar shards
written by ``fastclr shards``.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastclr.train.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
W = 3
# 2 classes x 19 training images: the train loader drops to 12 per rank (3 steps of 4 per epoch), the monitor's bank
# shards are 13/13/12 images and its 2 x 5 queries 4/3/3.
TRAIN_PER_CLASS, TEST_PER_CLASS = 19, 5
STEPS_PER_EPOCH = 3
RESUMED = re.compile(r"resumed from \S+ckpt-(\d+)\.pt at step (\d+)")


def write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        cells = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
        cells[..., seed % 3] = 200  # a class colour for the kNN monitor to find
        Image.fromarray(cells).resize((20, 20), Image.BILINEAR).save(folder / f"{i:03d}.jpg")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    """``(training data, test folder)``: the training images as tar shards."""
    from fastclr.pipelines.shard_writer import write_shards

    root = tmp_path_factory.mktemp("long-run")
    for c in range(2):
        write_images(root / "train" / f"class{c}", TRAIN_PER_CLASS, seed=c)
        write_images(root / "test" / f"class{c}", TEST_PER_CLASS, seed=10 + c)
    write_shards(root / "train", root / "shards", 8, progress=False, log=lambda *a: None)
    return str(root / "shards"), str(root / "test")


def flags(data: tuple[str, str], out: Path, *extra: str) -> list[str]:
    """``fastclr pretrain`` flags of the tiny CPU run with the kNN monitor after every epoch."""
    return [
        "pretrain", "--data", data[0], "--test-data", data[1], "--out", str(out), "--size", "16",
        "--arch", "cnn7", "--width", "8", "--proj-dim", "16", "--batch-size", str(4 * W), "--warmup-epochs", "0",
        "--lr", "0.5", "--lr-scaling", "none", "--knn-every", "1", "--knn-k", "5", "--precision", "fp32",
        "--no-progress", "--backend", "torch", "--workers", "0", "--seed", "3", "--dist-timeout", "5", *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={W}", f"--max-restarts={restarts}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "fastclr", *args,
    ]  # fmt: skip


class Child:
    """A command in its own session, output to a file; the whole process group is killed on exit."""

    def __init__(self, cmd: list[str], log: Path):
        self.log, self._file = log, log.open("w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("FASTCLR_DEBUG", None)
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            workers = worker_pids(self.proc.pid)  # torchrun starts them in sessions of their own
            os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._file.close()

    def wait(self, timeout: float) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self._file.flush()
        return code, self.log.read_text()


def run(cmd: list[str], log: Path, timeout: float) -> str:
    with Child(cmd, log) as child:
        code, output = child.wait(timeout)
    assert code == 0, output[-4000:]
    return output


def knn_rows(out: Path) -> list[dict]:
    with (out / "knn.csv").open() as f:
        return list(csv.DictReader(f))


def one_process_knn(ckpt: Path, data: tuple[str, str]) -> float:
    from fastclr.train.evaluate import run_knn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        r = run_knn(ckpt, data[0], data[1], k=5, size=16, workers=0, backend="torch", device="cpu")
    finally:
        torch.set_num_threads(threads)
    return r["knn_top1"]


def final_checkpoint(out: Path) -> Path:
    return list_checkpoints(out / "checkpoints")[-1]


def test_three_ranks_monitor_each_epoch_and_agree(data, tmp_path):
    out = tmp_path / "short"
    output = run(torchrun(*flags(data, out, "--epochs", "1")), tmp_path / "short.log", timeout=300)
    assert (
        f"{W} process(es) on cpu" in output and f"parameters identical on all {W} ranks" in output
    )
    rows = knn_rows(out)
    assert [int(r["step"]) for r in rows] == [0, STEPS_PER_EPOCH]
    final = final_checkpoint(out)
    assert load_checkpoint(final)["step"] == STEPS_PER_EPOCH
    # the monitor, sharded over 3 ranks, against one process scoring the same weights
    assert float(rows[-1]["knn_top1"]) == pytest.approx(one_process_knn(final, data), abs=1e-12)


def worker_pids(agent_pid: int) -> list[int]:
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def newest_step(out: Path) -> int:
    found = list_checkpoints(out / "checkpoints")
    return int(found[-1].name[5:14]) if found else 0


@pytest.mark.slow
def test_a_killed_rank_restarts_and_ends_where_an_uninterrupted_run_ends(data, tmp_path, capsys):
    epochs = 6
    steps = epochs * STEPS_PER_EPOCH
    whole = tmp_path / "whole"
    run(torchrun(*flags(data, whole, "--epochs", str(epochs))), tmp_path / "whole.log", 600)

    out = tmp_path / "killed"
    cmd = torchrun(
        *flags(data, out, "--epochs", str(epochs), "--ckpt-every", "1", "--resume", "auto"),
        restarts=1,
    )
    with Child(cmd, tmp_path / "killed.log") as child:
        deadline = time.monotonic() + 400
        # mid-epoch: a checkpoint past the first epoch end that is no epoch end
        while not (newest_step(out) > STEPS_PER_EPOCH and newest_step(out) % STEPS_PER_EPOCH):
            assert child.proc.poll() is None, child.log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no mid-epoch checkpoint"
            time.sleep(0.002)
        pids = worker_pids(child.proc.pid)
        assert len(pids) == W, pids
        killed_at = newest_step(out)
        os.kill(pids[1], signal.SIGKILL)
        # torchrun (--max-restarts 1) stops the other ranks and starts all three again: they resume from the newest
        # checkpoint, mid-epoch
        code, output = child.wait(600)
    assert code == 0, output[-4000:]
    resumed = [int(m.group(2)) for m in RESUMED.finditer(output)]
    assert len(resumed) == 1 and killed_at <= resumed[0] < steps, output[-4000:]
    assert f"parameters identical on all {W} ranks" in output

    a, b = load_checkpoint(final_checkpoint(whole)), load_checkpoint(final_checkpoint(out))
    assert a["step"] == b["step"] == steps
    # bit for bit: the DDP bucket layout is settled before the first step of every run (build.settle_buckets)
    for k, t in a["model"].items():
        assert torch.equal(b["model"][k], t), (
            f"{k}: differs by {(b['model'][k].double() - t.double()).abs().max().item():.3g}"
        )
    # every epoch end was monitored once, whatever the restart replayed
    assert [int(r["step"]) for r in knn_rows(out)] == [
        e * STEPS_PER_EPOCH for e in range(epochs + 1)
    ]
    assert knn_rows(out)[-1]["knn_top1"] == knn_rows(whole)[-1]["knn_top1"]

    # fastclr knn under torchrun: the one-process numbers
    final = final_checkpoint(out)
    knn_cmd = torchrun(
        "knn", "--ckpt", str(final), "--data", data[0], "--test-data", data[1], "--k", "5", "--size", "16",
        "--workers", "0", "--backend", "torch", "--device", "cpu",
    )  # fmt: skip
    printed = run(knn_cmd, tmp_path / "knn.log", 300)
    top1 = float(re.search(r"kNN top-1 \(k=5\): (\d+\.\d\d)%", printed).group(1))
    assert printed.count("kNN top-1") == 1  # rank 0 prints
    assert top1 == pytest.approx(100 * one_process_knn(final, data), abs=0.006)
    with capsys.disabled():
        print(
            f"\n{W} ranks, {epochs} epochs: rank 1 killed after checkpoint step {killed_at}, resumed from step "
            f"{resumed[0]}, final parameters bit-identical to the uninterrupted run's; kNN top-1 {top1:.2f}%"
        )

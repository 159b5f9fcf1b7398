"""The training step never waits for the device: host syncs happen only where the loop reads results back.

A host sync (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, ...) drains the GPU's launch queue; the loop may
make one per read (every ``log_every`` steps and at checkpoint, epoch-end and stop boundaries), none in between.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_trainer import make_image_folder, tiny_config

from fastclr.eval import contrastive_top1
from fastclr.eval.knn import contrastive_accuracy
from fastclr.train.dist import DistInfo
from fastclr.train.metrics import MetricsLog
from fastclr.train.monitor import StepMeter
from fastclr.train.signals import GracefulStop
from fastclr.train.trainer import Trainer

PACKAGE = Path(__file__).resolve().parents[1] / "fastclr"
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _fastclr_site() -> str | None:
    """``file:line`` of the innermost fastclr frame calling in, or None for syncs of the data pipelines (which
    decode on the host) and of code outside fastclr."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(PACKAGE):
            if path.is_relative_to(PACKAGE / "pipelines"):
                return None
            return f"{path.relative_to(PACKAGE)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


@pytest.fixture
def host_syncs(monkeypatch) -> list[tuple[str, str]]:
    """Every host sync made from fastclr code while the test runs: ``(method, file:line)``."""
    calls: list[tuple[str, str]] = []
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if (site := _fastclr_site()) is not None:
                calls.append((_name, site))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_image_folder(root / "train"), None


def _trainer(data, out, **run) -> Trainer:
    cfg = tiny_config(data, out, **run)
    cfg.optim.batch_size = 4  # 16 steps per epoch: no epoch end within the 10 steps
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    trainer.setup()
    return trainer


def _run(trainer: Trainer, steps: int, syncs: list | None = None) -> str:
    log = MetricsLog(trainer.out, enabled=True)
    meter = StepMeter(trainer.cfg, log, start=0, limit=steps, t_start=time.perf_counter())
    try:
        with GracefulStop() as stop, meter:
            if syncs is not None:
                syncs.clear()  # count the steps only, not the set-up
            return trainer.run_steps(steps, stop, log, meter)
    finally:
        log.close()
        trainer.loader.close()


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_ten_steps_sync_once_per_read(data, tmp_path, host_syncs, skip_nonfinite):
    """10 steps, log_every 5, no checkpoint or epoch end among them: reads after steps 5 and 10, one sync each."""
    trainer = _trainer(data, tmp_path / "run", log_every=5, skip_nonfinite=skip_nonfinite)
    assert trainer.steps_per_epoch == 16
    copies = []
    trainer.on_phase = lambda phase: (
        phase == "optimiser" and copies.append(list(trainer.guard.copies) if trainer.guard else [])
    )
    assert _run(trainer, 10, host_syncs) == "completed"
    assert len(trainer.losses) == 10 and trainer.pending == []
    # (the loss's own backward sync is the loss owner's, see test_the_loss_makes_no_host_sync)
    loop = [(name, site) for name, site in host_syncs if not site.startswith("losses/")]
    assert [name for name, _ in loop] == ["tolist", "tolist"], loop
    assert all(site.startswith("train/trainer.py") for _, site in loop), loop
    rows = (trainer.out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [5, 10]
    if skip_nonfinite:
        # the copies a skipped step returns to are allocated once (after the first step created the momentum),
        # then refreshed in place: no clone of every buffer per step
        assert all([id(t) for t in c] == [id(t) for t in copies[1]] for c in copies[1:]), (
            "copies reallocated"
        )


def test_a_checkpoint_step_reads_before_saving(data, tmp_path, host_syncs):
    trainer = _trainer(data, tmp_path / "run", log_every=5, ckpt_every=4)
    assert _run(trainer, 10, host_syncs) == "completed"
    reads = [site for name, site in host_syncs if name == "tolist" and "trainer.py" in site]
    # steps 4, 5, 8, 10 read; 4 and 8 also check the weights before writing (an .item() each) and save RNG states
    assert len(reads) == 4, host_syncs
    saved = sorted(p.name for p in (trainer.out / "checkpoints").iterdir())
    assert saved == ["ckpt-000000004.pt", "ckpt-000000008.pt"]


def test_the_loss_makes_no_host_sync(host_syncs):
    from fastclr import NTXentLoss

    z_a = torch.randn(8, 16, requires_grad=True)
    z_b = torch.randn(8, 16, requires_grad=True)
    host_syncs.clear()
    NTXentLoss(0.5, impl="torch")(z_a, z_b).backward()
    assert host_syncs == []


# ----------------------------------------------------------------------------------------------------------------------
# The contrastive top-1, in row blocks


def _dense_top1(z_a: torch.Tensor, z_b: torch.Tensor) -> float:
    z = F.normalize(torch.cat([z_a, z_b]).double(), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(float("-inf"))
    n = len(z_a)
    return (sim.argmax(dim=1) == torch.arange(2 * n).roll(n)).double().mean().item()


@pytest.mark.parametrize("n", [1, 3, 257])
@pytest.mark.parametrize("block_rows", [1, 5, 64, 1024])
def test_contrastive_top1_in_blocks_matches_the_full_matrix(n, block_rows):
    torch.manual_seed(n)
    z_a = torch.randn(n, 130)
    z_b = z_a + 1.5 * torch.randn(n, 130)  # some anchors right, some wrong
    assert contrastive_top1(z_a, z_b, block_rows=block_rows) == pytest.approx(_dense_top1(z_a, z_b))
    on_device = contrastive_accuracy(z_a, z_b, block_rows)
    assert on_device.ndim == 0 and on_device.dtype == torch.float32


def test_contrastive_top1_never_builds_the_full_matrix(monkeypatch):
    """Every similarity block is at most block_rows x 2N."""
    shapes = []
    matmul = torch.Tensor.__matmul__

    def recorded(a, b):
        out = matmul(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", recorded)
    contrastive_top1(torch.randn(100, 8), torch.randn(100, 8), block_rows=16)
    assert shapes and max(s[0] for s in shapes) == 16 and all(s[1] == 200 for s in shapes)


# ----------------------------------------------------------------------------------------------------------------------
# The loss's equal-batch check: once per run inside check_batches_once


def test_equal_batch_check_runs_once_inside_check_batches_once(monkeypatch):
    import torch.distributed as torch_dist

    from fastclr.losses import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    try:
        gathers = []
        real = torch_dist.all_gather
        monkeypatch.setattr(
            torch_dist, "all_gather", lambda *a, **k: gathers.append(1) or real(*a, **k)
        )
        group = torch_dist.group.WORLD
        cpu = torch.device("cpu")
        distributed.check_equal_batches(8, 16, cpu, group)
        distributed.check_equal_batches(8, 16, cpu, group)
        assert len(gathers) == 2  # outside the block: every call checks
        with distributed.check_batches_once():
            for _ in range(3):
                distributed.check_equal_batches(8, 16, cpu, group)
            distributed.check_equal_batches(4, 16, cpu, group)  # a new shape is checked again
        assert len(gathers) == 2 + 1 + 1
        distributed.check_equal_batches(8, 16, cpu, group)
        assert len(gathers) == 5  # the block's memory ends with it
    finally:
        torch_dist.destroy_process_group()

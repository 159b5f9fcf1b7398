"""End-to-end pretraining on generated JPEGs: learning, checkpoints, exact resume, signals, non-finite losses, DDP."""

import csv
import datetime
import json
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
from fastclr.train.config import PretrainConfig
from fastclr.train.dist import DistInfo
from fastclr.train.trainer import Trainer, TrainingError, pretrain

REPO = Path(__file__).resolve().parents[1]


def make_image_folder(
    root: Path, classes: int = 4, per_class: int = 16, size: int = 20, seed: int = 0
) -> Path:
    """ImageFolder of JPEGs: every image a distinct smooth colour layout (upsampled 4x4 noise) on a class tint."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        tint = rng.uniform(0, 255, size=3)
        for i in range(per_class):
            cells = np.clip(0.5 * tint + rng.uniform(0, 128, size=(4, 4, 3)), 0, 255).astype(
                np.uint8
            )
            Image.fromarray(cells).resize((size, size), Image.BILINEAR).save(
                folder / f"{i}.jpg", quality=90
            )
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_image_folder(root / "train"), make_image_folder(root / "test", per_class=6, seed=1)


def tiny_config(data, out, **run) -> PretrainConfig:
    """cnn7 of width 8 at 16 px, 4 steps per epoch of batch 16, no kNN monitor: about a second per epoch on a CPU."""
    cfg = PretrainConfig()
    cfg.data.data = str(data[0])
    cfg.data.size, cfg.data.workers, cfg.data.backend = 16, 1, "dali"
    # gentle views: the loss drops within a few steps
    cfg.data.min_scale, cfg.data.color_strength = 0.6, 0.1
    cfg.model.arch, cfg.model.width, cfg.model.proj_dim = "cnn7", 8, 32
    cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.warmup_epochs = 16, 3, 0
    cfg.optim.lr, cfg.optim.lr_scaling = 2.0, "none"
    cfg.run.out, cfg.run.progress, cfg.run.knn_every, cfg.run.knn_k = str(out), False, 0, 10
    for key, value in run.items():
        setattr(cfg.run, key, value)
    return cfg


def test_loss_decreases_and_run_artifacts_are_written(data, tmp_path, capsys):
    cfg = tiny_config(data, tmp_path / "run", log_every=5)
    cfg.data.test_data, cfg.optim.epochs = str(data[1]), 5
    r = pretrain(cfg)
    losses = r["losses"]
    assert r["status"] == "completed" and len(losses) == r["step"] == 20
    printed = capsys.readouterr().out
    assert re.search(r"^epoch 5/5: loss \d+\.\d{4}, lr .*, \d+ images/s$", printed, re.M), printed
    assert "resolved config:" in printed and "kNN top-1 (k=10): random init" in printed
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
    ckpt = load_checkpoint(r["checkpoint"])
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (20, 5, 0)
    assert PretrainConfig.from_dict(ckpt["config"]) == cfg
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config"}
    out = tmp_path / "run"
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [5, 10, 15, 20]  # every log_every steps
    assert (out / "curves.png").stat().st_size > 0 and (out / "metrics.jsonl").exists()
    assert (
        PretrainConfig.from_dict(__import__("tomllib").loads((out / "config.toml").read_text()))
        == cfg
    )
    assert 0 <= r["knn_init"] <= 1 and 0 <= r["knn_final"] <= 1
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        f"ckpt-{s:09d}.pt" for s in (12, 16, 20)
    ]  # keep=3


def test_resume_reproduces_the_uninterrupted_losses_exactly(data, tmp_path):
    full = pretrain(tiny_config(data, tmp_path / "full"))
    # stops mid-epoch 1 (batch 2 of 4)
    first = pretrain(tiny_config(data, tmp_path / "cut", max_steps=6))
    assert first["status"] == "max_steps"
    ckpt = load_checkpoint(first["checkpoint"])
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (6, 1, 2)
    second = pretrain(tiny_config(data, tmp_path / "cut", resume="auto"))
    assert second["status"] == "completed"
    assert first["losses"] + second["losses"] == full["losses"]  # bit-identical, not approximately


def test_resume_with_a_memory_bank_reproduces_the_uninterrupted_losses_exactly(data, tmp_path):
    """The bank and its pointer are not in the loss's state_dict: the checkpoint carries them all the same."""

    def config(out, **run):
        cfg = tiny_config(data, out, **run)
        cfg.optim.epochs, cfg.loss.memory_bank_size = 2, 64  # 4 steps of 16 rows fill the bank
        return cfg

    full = pretrain(config(tmp_path / "full"))
    first = pretrain(config(tmp_path / "cut", max_steps=6))
    saved = load_checkpoint(first["checkpoint"])["loss"]
    assert int(saved["memory_bank.bank_ptr"]) == 6 * 16 % 64
    second = pretrain(config(tmp_path / "cut", resume="auto"))
    assert first["losses"] + second["losses"] == full["losses"]


def test_resume_with_another_config_names_the_keys(data, tmp_path):
    pretrain(tiny_config(data, tmp_path / "run", max_steps=2))
    cfg = tiny_config(data, tmp_path / "run", resume="auto")
    cfg.model.width, cfg.loss.temperature = 16, 0.2
    with pytest.raises(
        ValueError,
        match=r"different config: loss\.temperature \(checkpoint 0\.5, now 0\.2\), model\.width",
    ):
        pretrain(cfg)
    fresh = tiny_config(data, tmp_path / "run")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain(fresh)  # never silently mixes two runs in one directory


@pytest.fixture
def nan_after(monkeypatch):
    """Make the loss NaN from the given optimiser step on."""
    from fastclr.losses import nt_xent

    calls = {"n": 0, "from": None}
    forward = nt_xent.NTXentLoss.forward

    def patched(self, z_a, z_b):
        loss = forward(self, z_a, z_b)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > calls["from"] else loss

    monkeypatch.setattr(nt_xent.NTXentLoss, "forward", patched)
    return calls


def test_non_finite_loss_stops_naming_step_and_checkpoint(data, tmp_path, nan_after):
    nan_after["from"] = 5
    cfg = tiny_config(data, tmp_path / "run")
    with pytest.raises(
        TrainingError,
        match=r"non-finite loss \(nan\) at step 5 \(epoch 1, batch 1\); last good checkpoint: .*ckpt-000000004\.pt",
    ):
        pretrain(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "ckpt-000000004.pt"
    ]


def test_non_finite_loss_between_reads_is_reported_with_its_own_step(data, tmp_path, nan_after):
    """Steps are read back every log_every steps: a NaN at step 5 is found at the read after step 8 (the epoch end),
    named as step 5, and the checkpoint of step 8 is never written."""
    nan_after["from"] = 5
    with pytest.raises(TrainingError, match=r"at step 5 \(epoch 1, batch 1\)"):
        pretrain(tiny_config(data, tmp_path / "run", log_every=7, ckpt_every=3))
    # step 6 is a --ckpt-every step after the NaN: its read stops the run first
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "ckpt-000000003.pt",
        "ckpt-000000004.pt",
    ]


def test_save_refuses_non_finite_weights(data, tmp_path):
    """The backstop on the save path: whatever let them through, NaN weights are never written."""
    cfg = tiny_config(data, tmp_path / "run")
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    trainer.setup()
    trainer.loader.close()
    trainer.state.step = 3
    trainer.save()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    trainer.state.step = 4
    with pytest.raises(
        TrainingError, match=r"non-finite weights .* at step 4 .*ckpt-000000003\.pt"
    ):
        trainer.save()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "ckpt-000000003.pt"
    ]


def test_skip_nonfinite_counts_and_keeps_weights(data, tmp_path, nan_after):
    nan_after["from"] = 10
    r = pretrain(tiny_config(data, tmp_path / "run", skip_nonfinite=True))
    assert r["status"] == "completed" and r["nonfinite_skipped"] == 2
    assert all(np.isfinite(r["losses"][:10])) and not any(np.isfinite(r["losses"][10:]))
    model = load_checkpoint(r["checkpoint"])["model"]
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


def _logged(out: Path, column: str) -> list[tuple[int, float]]:
    rows = list(csv.DictReader((out / "metrics.csv").open(newline="")))
    return [(int(r["step"]), float(r[column])) for r in rows]


def test_resume_keeps_one_metrics_row_per_step_and_the_elapsed_time(data, tmp_path):
    """A run killed after logging steps 5 and 6 but before checkpointing step 6 logged them twice once resumed,
    and its elapsed_s started again from zero."""
    out = tmp_path / "run"
    pretrain(tiny_config(data, out, max_steps=6, log_every=1))
    (out / "checkpoints" / "ckpt-000000006.pt").unlink()  # as if killed before the final save
    pretrain(tiny_config(data, out, max_steps=8, log_every=1, resume="auto"))
    elapsed = _logged(out, "elapsed_s")
    assert [step for step, _ in elapsed] == list(range(1, 9))
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == list(range(1, 9))
    times = [t for _, t in elapsed]
    assert times == sorted(times), times  # continues from the checkpoint's elapsed time
    saved = load_checkpoint(out / "checkpoints" / "ckpt-000000008.pt")["extra"]["elapsed_s"]
    assert times[-1] <= saved and times[3] <= times[4]


def test_resume_with_a_smaller_data_set_is_refused(data, tmp_path):
    """Step 8 is epoch 2 of 4 steps; half the images make 2-step epochs, and the run once "completed" at step 8
    (past its 6 steps) without training and exit 0."""
    import shutil

    folder = shutil.copytree(data[0], tmp_path / "train")
    out = tmp_path / "run"
    pretrain(tiny_config((folder,), out, max_steps=8))
    for image in sorted(folder.rglob("*.jpg"))[::2]:
        image.unlink()
    with pytest.raises(
        ValueError,
        match=r"ckpt-000000008\.pt is at step 8 \(epoch 2, batch 0\) of a run with 4 steps per epoch, "
        r"but --data .* now gives 2 \(32 images per rank, batch 16\): the data set changed",
    ):
        pretrain(tiny_config((folder,), out, resume="auto"))
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "ckpt-000000008.pt"


# ----------------------------------------------------------------------------------------------------------------------
# Subprocesses: signals and torchrun


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastclr", *args]


def _tiny_flags(data, out) -> list[str]:
    """``tiny_config`` as command-line flags (with lr 1.0)."""
    return [
        "pretrain", "--data", str(data[0]), "--size", "16", "--workers", "1", "--arch", "cnn7", "--width", "8",
        "--proj-dim", "32", "--batch-size", "16", "--warmup-epochs", "0", "--lr", "1.0", "--lr-scaling", "none",
        "--knn-every", "0", "--no-progress", "--out", str(out), "--backend", "dali", "--min-scale", "0.6",
        "--color-strength", "0.1",
    ]  # fmt: skip


def _run(cmd, timeout, **kwargs):
    """Run in a new session and kill the whole process group whatever happens (never leaves workers behind)."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=REPO,
        **kwargs,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out


def sigterm_after_rows(cmd: list[str], metrics: Path, rows: int) -> tuple[int, str]:
    """Start ``cmd``, send SIGTERM once ``metrics`` (a CSV) holds more than ``rows`` lines; ``(exit code, output)``."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) > rows:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, output


def test_sigterm_mid_epoch_saves_a_loadable_checkpoint_and_exits_0(data, tmp_path):
    out = tmp_path / "run"
    metrics = out / "metrics.csv"
    cmd = _cli(*_tiny_flags(data, out), "--epochs", "100", "--log-every", "1")
    code, output = sigterm_after_rows(cmd, metrics, 3)
    assert code == 0, output
    assert "stopped by SIGTERM" in output
    logged = len(metrics.read_text().splitlines()) - 1
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    # saved at the step the signal interrupted, not at an earlier epoch end
    assert ckpt["step"] == logged
    assert (ckpt["epoch"], ckpt["batch"]) == divmod(ckpt["step"], 4)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    cfg = tiny_config(data, out, resume="auto", max_steps=ckpt["step"] + 2)
    cfg.optim.epochs, cfg.optim.lr = 100, 1.0
    resumed = pretrain(cfg)  # the same run, continued in this process
    assert resumed["status"] == "max_steps" and len(resumed["losses"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_keep_parameters_identical(data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "fastclr", *_tiny_flags(data, out), "--epochs", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code, output = _run(cmd, timeout=240, env=env)
    assert code == 0, output
    assert "2 process(es) on cpu" in output and "parameters identical on all 2 ranks" in output, (
        output
    )
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    # 64 images, global batch 16 -> 8 per rank, 32 images per shard -> 4 steps per epoch
    assert (ckpt["step"], ckpt["world_size"], len(ckpt["rng"])) == (8, 2, 2)
    # Bad input seen by rank 0 alone (here: a run directory already in use) stops both ranks, no hang.
    code, output = _run([*cmd[:5], f"--master_port={_free_port()}", *cmd[6:]], timeout=120, env=env)
    assert code != 0 and "fastclr: error: " in output, output
    assert re.search(r"fastclr \[rank 1\]: error: .*already holds checkpoints", output), output


def test_bf16_autocast_on_cpu_keeps_fp32_weights(data, tmp_path):
    r = pretrain(tiny_config(data, tmp_path / "run", precision="bf16", max_steps=2))
    fp32 = pretrain(tiny_config(data, tmp_path / "fp32", precision="fp32", max_steps=2))
    assert r["status"] == "max_steps" and all(np.isfinite(r["losses"]))
    # the forward really ran in bf16: before any update, close to the fp32 loss but not bit-identical
    assert r["losses"][0] != fp32["losses"][0] and abs(r["losses"][0] - fp32["losses"][0]) < 0.05
    weights = load_checkpoint(r["checkpoint"])["model"]
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}


# ----------------------------------------------------------------------------------------------------------------------
# GPU code paths, exercised on the CPU


@pytest.mark.filterwarnings("ignore:.*to a meta parameter:UserWarning")
def test_resume_onto_another_device_reads_rng_states_on_the_cpu(data, tmp_path):
    """Restoring once loaded every tensor onto the run's device, RNG states too, and ``set_rng_state`` then failed on
    every GPU resume (numpy cannot read a CUDA tensor). The meta device stands in for the GPU: only the model and the
    optimiser state may go there."""
    first = pretrain(tiny_config(data, tmp_path / "run", max_steps=2))
    cfg = tiny_config(data, tmp_path / "run", resume="auto")
    cfg.data.pipeline_device = "cpu"
    on_meta = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("meta"))
    trainer = Trainer(cfg, on_meta)
    trainer.setup()
    try:
        trainer.restore(Path(first["checkpoint"]))
    finally:
        trainer.loader.close()
    saved = load_checkpoint(first["checkpoint"])
    assert (trainer.state.step, trainer.state.batch) == (2, 2)
    assert torch.equal(torch.get_rng_state(), saved["rng"][0]["torch"])
    assert {p.device.type for p in trainer.model.parameters()} == {"meta"}
    moments = [
        t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    ]
    assert moments and {t.device.type for t in moments} == {"meta"}


def test_pretrain_joins_the_process_group_with_the_configured_timeout(data, tmp_path, monkeypatch):
    from fastclr.train import trainer

    joined = {}

    def init_distributed(device, timeout):
        joined["timeout"] = timeout
        raise KeyboardInterrupt  # stop right there

    monkeypatch.setattr(trainer.dist, "init_distributed", init_distributed)
    cfg = tiny_config(data, tmp_path / "run")
    cfg.run.dist_timeout = 90.0
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    assert joined["timeout"] == datetime.timedelta(minutes=90)


def _wait_for_a_slow_rank_0(rank, world_size, port, timeout_s, stretches):
    """Join a group as ``pretrain`` does (through ``init_distributed``), then have rank 0 work alone for each of
    ``stretches`` seconds (as it does while running the kNN monitor) while the others wait at a barrier."""
    import torch.distributed as torch_dist

    from fastclr.train import dist

    torch_dist.destroy_process_group()  # leave the harness's group: join the way a torchrun rank does
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = dist.init_distributed("cpu", timeout=datetime.timedelta(seconds=timeout_s))
    outcomes = []
    for stretch in stretches:
        if rank == 0:
            time.sleep(stretch)
        try:
            dist.barrier(info)
            outcomes.append("ok")
        except RuntimeError as e:
            outcomes.append(f"error: {e}")
            break
    return outcomes


def test_ranks_waiting_for_rank_0_give_up_after_the_configured_timeout():
    """NCCL's watchdog killed runs whose rank 0 ran the kNN monitor for more than its default 10 minutes; the group
    now takes its timeout from ``--dist-timeout``. Two gloo ranks, a 6 s timeout (it also bounds joining the group,
    which takes seconds on a loaded machine): a 1 s stretch of rank 0 alone is waited for, a 16 s one is given up on
    after the timeout."""
    from fastclr.testing.distributed import spawn_world

    start = time.monotonic()
    outcomes = spawn_world(
        _wait_for_a_slow_rank_0, 2, _free_port(), 6.0, [1.0, 16.0], timeout_s=120, pg_timeout_s=60
    )
    waiting = outcomes[1]
    assert waiting[0] == "ok", outcomes
    assert len(waiting) == 2 and waiting[1].startswith("error: "), outcomes
    assert re.search("time ?d? ?out", waiting[1], re.I), waiting[1]
    assert time.monotonic() - start < 60


def test_first_line_says_what_precision_auto_chose_and_why(data, tmp_path, capsys, monkeypatch):
    import fastclr.device

    monkeypatch.setattr(fastclr.device, "native_cpu_bf16", lambda: True)
    pretrain(tiny_config(data, tmp_path / "run", precision="auto", max_steps=1))
    first = capsys.readouterr().out.splitlines()[0]
    assert "precision auto -> bf16 autocast (this CPU" in first, first


def test_tensorboard_flag_writes_the_run_scalars(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(tiny_config(data, tmp_path / "run", tensorboard=True, log_every=2, max_steps=4))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]


def test_the_last_lines_say_what_happened_and_what_to_run_next(data, tmp_path, capsys):
    cfg = tiny_config(data, tmp_path / "run", max_steps=2)
    cfg.data.test_data = str(data[1])
    r = pretrain(cfg)
    assert r["total_s"] >= r["train_s"] > 0
    printed = capsys.readouterr().out
    last = printed[printed.index("kNN top-1 (k=10): random init") :].splitlines()
    assert re.fullmatch(
        r"kNN top-1 \(k=10\): random init \d+\.\d\d% -> trained \d+\.\d\d% \([+-]\d+\.\d\d points\)",
        last[0],
    ), last
    assert last[1].startswith("In words: the encoder, trained without labels,"), last
    assert "sorts the held-out images by class" in last[1], last
    duration = r"(\d+\.\d s|\d+ min \d+ s|\d+ h \d\d min)"
    assert re.fullmatch(rf"total time {duration} \(training {duration}\)", last[2]), last
    ckpt = r["checkpoint"]
    assert last[3] == f"checkpoint: {ckpt}; metrics: {r['out']}/metrics.csv; curves: {r['plot']}"
    rest = "\n".join(last[4:])
    assert f"fastclr linear --ckpt {ckpt}" in rest
    assert f"fastclr export --ckpt {ckpt} --out backbone.pt" in rest
    assert (
        "fastclr pretrain --preset cifar10-r18 --data cifar10/train --test-data cifar10/test"
        in rest
    )
    assert "-m fastclr pretrain --preset imagenet-r50 --data /data/imagenet/train" in rest


@pytest.mark.parametrize(
    "gain, says",
    [(0.2, "much better than"), (0.02, "a little better than"), (0.0, "about as well as"),
     (-0.03, "worse than")],
)  # fmt: skip
def test_the_knn_result_in_words_is_honest_about_its_sign(gain, says):
    from fastclr.train.monitor import explain_knn

    assert f"{says} at random init" in explain_knn(gain)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (4.26, "4.3 s"),
        (59.97, "1 min 0 s"),
        (92.4, "1 min 32 s"),
        (3600 + 5 * 60 + 20, "1 h 05 min"),
    ],
)
def test_durations_read_as_a_person_says_them(seconds, text):
    from fastclr.train.monitor import format_duration

    assert format_duration(seconds) == text

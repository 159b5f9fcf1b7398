"""Training under faults: kill -9, SIGTERM, a failing disk, non-finite losses, broken images, a dying DDP rank.

Every run is the tiny CPU model (cnn7 of width 8 at 16 px) on JPEGs generated in tmp_path. Child processes run in
their own session and are killed with their whole process group in ``finally``; every wait has a deadline.
``-m slow`` adds a longer kill loop and the two-rank torchrun restart.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastclr.pipelines import CorruptImageError, make_loader
from fastclr.train import checkpoint
from fastclr.train.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4  # 2 classes x 16 images, batch 8


def write_images(folder: Path, count: int, size: int = 20, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        cells = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(cells).resize((size, size), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "train"
    for c in range(2):
        write_images(root / f"class{c}", 16, seed=c)
    return root


def tiny_flags(data: Path, out: Path, *extra: str) -> list[str]:
    """``fastclr pretrain`` flags of a ~0.1 s/step run; the torchvision loader in-process (no worker processes)."""
    return [
        "pretrain", "--data", str(data), "--out", str(out), "--size", "16", "--arch", "cnn7", "--width", "8",
        "--proj-dim", "16", "--batch-size", "8", "--epochs", "1000", "--warmup-epochs", "0", "--lr", "0.5",
        "--lr-scaling", "none", "--knn-every", "0", "--no-progress", "--backend", "torch", "--workers", "0",
        "--seed", "3", *extra,
    ]  # fmt: skip


class Child:
    """``python -m fastclr ...`` in its own session, output to a file (no pipe to fill up); killed group-wide on exit."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cmd=None):
        self.log = log
        self._file = log.open("w")
        child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        child_env.pop("FASTCLR_DEBUG", None)
        self.proc = subprocess.Popen(
            cmd or [sys.executable, "-m", "fastclr", *args],
            stdout=self._file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=child_env,
            start_new_session=True,
        )

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        self._file.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (the process and any workers), then reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # exited between poll and kill
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def output(self) -> str:
        self._file.flush()
        return self.log.read_text()


def wait_for(
    condition, timeout: float, child: Child | None = None, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child is not None and not child.alive():
            raise AssertionError(
                f"process exited ({child.proc.returncode}) before {what}:\n{child.output()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def newest_step(ckpt_dir: Path) -> int:
    found = list_checkpoints(ckpt_dir)
    return int(found[-1].name[5:14]) if found else 0


def temp_files(ckpt_dir: Path) -> list[str]:
    return (
        sorted(p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp"))
        if ckpt_dir.exists()
        else []
    )


def assert_every_checkpoint_loads(ckpt_dir: Path) -> list[int]:
    """Every file under a checkpoint name loads and holds the step of its name; returns the steps."""
    steps = []
    for path in list_checkpoints(ckpt_dir):
        ckpt = load_checkpoint(path)
        assert f"ckpt-{ckpt['step']:09d}.pt" == path.name
        assert (ckpt["epoch"], ckpt["batch"]) == divmod(ckpt["step"], STEPS_PER_EPOCH)
        steps.append(ckpt["step"])
    return steps


RESUMED = re.compile(r"resumed from \S+ckpt-(\d+)\.pt at step (\d+)")


# ---------------------------------------------------------------------------------------------------------------------
# kill -9
# ---------------------------------------------------------------------------------------------------------------------


def kill_loop(data: Path, out: Path, kills: int, seed: int) -> dict[str, int]:
    """Run, SIGKILL at a random moment, restart with ``--resume auto``; ``kills`` times. Half of the kills wait for a
    checkpoint write to be under way (its temporary file exists) and strike then.

    After every kill: each checkpoint file loads; the newest step never decreases; the next run resumes from
    exactly the newest checkpoint. Returns counts for the report.
    """
    rng = random.Random(seed)
    ckpt_dir = out / "checkpoints"
    stats = {"kills": 0, "mid_write": 0, "resumes": 0, "steps_lost": 0}
    last = 0
    for i in range(kills):
        args = tiny_flags(
            data, out, "--resume", "auto", "--ckpt-every", "1", "--keep", "2", "--log-every", "1"
        )
        with Child(args, out.parent / f"kill{i}.log") as child:
            # Under way: this run has written a checkpoint of its own.
            wait_for(
                lambda last=last: newest_step(ckpt_dir) > last, 240, child, "a first checkpoint"
            )
            if i % 2:
                wait_for(lambda: temp_files(ckpt_dir), 60, child, "a checkpoint write")
            else:
                time.sleep(rng.uniform(0.0, 0.5))
            child.kill()
            output = child.output()
        stats["kills"] += 1
        stats["mid_write"] += bool(temp_files(ckpt_dir))
        if i > 0:  # the run resumed from the newest checkpoint the previous kill left
            match = RESUMED.search(output)
            assert match and int(match.group(2)) == last, output[-2000:]
            stats["resumes"] += 1
        steps = assert_every_checkpoint_loads(ckpt_dir)
        assert steps and steps[-1] >= last, (steps, last)
        logged = [
            int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]
        ]
        stats["steps_lost"] += (
            max(logged) - steps[-1]
        )  # trained but not checkpointed: lost to the kill
        last = steps[-1]
    # A clean run after the kills: resumes from the newest checkpoint, trains, leaves only loadable files.
    from fastclr.cli import main

    assert main(tiny_flags(data, out, "--resume", "auto", "--ckpt-every", "1", "--keep", "2",
                           "--max-steps", str(last + 2))) == 0  # fmt: skip
    assert assert_every_checkpoint_loads(ckpt_dir)[-1] == last + 2
    assert (
        temp_files(ckpt_dir) == []
    )  # partial files of killed writes are cleaned up by the next save
    stats["resumes"] += 1
    return stats


def test_kill_9_then_resume_auto(data, tmp_path, capsys):
    stats = kill_loop(data, tmp_path / "run", kills=2, seed=0)
    assert stats["kills"] == 2 and stats["resumes"] == 2
    with capsys.disabled():
        print(f"\nkill -9: {stats}")


@pytest.mark.slow
def test_kill_9_loop(data, tmp_path, capsys):
    stats = kill_loop(data, tmp_path / "run", kills=10, seed=1)
    assert stats["kills"] == 10 and stats["resumes"] == 10
    assert stats["mid_write"] >= 1  # at least one kill really interrupted a checkpoint write
    with capsys.disabled():
        print(f"\nkill -9 loop: {stats}")


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM
# ---------------------------------------------------------------------------------------------------------------------


def test_sigterm_during_a_checkpoint_write_saves_and_exits_0(data, tmp_path, capsys):
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"
    flags = tiny_flags(data, out, "--ckpt-every", "1", "--log-every", "1")
    with Child(flags, tmp_path / "term.log") as child:
        wait_for(lambda: newest_step(ckpt_dir) >= 2, 240, child, "two checkpoints")
        wait_for(lambda: temp_files(ckpt_dir), 60, child, "a checkpoint write")
        child.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = child.proc.wait(
            timeout=60
        )  # the bound: a pre-empting scheduler waits ~30-120 s before SIGKILL
        waited = time.monotonic() - sent
        output = child.output()
    assert code == 0, output[-3000:]
    match = re.search(r"stopped by SIGTERM at step (\d+); checkpoint (\S+);", output)
    assert match, output[-3000:]
    step = int(match.group(1))
    assert Path(match.group(2)) == ckpt_dir / f"ckpt-{step:09d}.pt"
    assert assert_every_checkpoint_loads(ckpt_dir)[-1] == step
    assert temp_files(ckpt_dir) == []
    logged = [
        int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]
    ]
    assert (
        max(logged) == step
    )  # nothing trained after the signal is lost: the checkpoint is the last step
    with capsys.disabled():
        print(
            f"\nSIGTERM during a checkpoint write: exit 0 after {waited:.2f} s, checkpoint at step {step}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# A failing disk during a save
# ---------------------------------------------------------------------------------------------------------------------


def fail_second_save(monkeypatch, where: str) -> None:
    """Make the second checkpoint save fail: ENOSPC half-way through writing (as an OSError, or as the RuntimeError
    torch's zip writer raises when a write fails: ``[enforce fail at inline_container.cc:672] unexpected pos``),
    EIO in fsync, or EACCES on rename."""
    calls = {"save": 0}
    real_save, real_fsync, real_replace = torch.save, os.fsync, os.replace

    def save(obj, f, *args, **kwargs):
        calls["save"] += 1
        if where == "write" and calls["save"] == 2:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if where == "serialiser" and calls["save"] == 2:
            f.write(b"PK\x03\x04")
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
                ) from None  # the OSError stays its __context__, as in torch
        return real_save(obj, f, *args, **kwargs)

    def fsync(fd):
        if where == "fsync" and calls["save"] == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    def replace(src, dst):
        if where == "rename" and calls["save"] == 2:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)


@pytest.mark.parametrize("where", ["write", "serialiser", "fsync", "rename"])
def test_disk_failure_during_a_save_keeps_the_previous_checkpoint(
    data, tmp_path, monkeypatch, capsys, where
):
    from fastclr.cli import main

    fail_second_save(monkeypatch, where)
    out = tmp_path / "run"
    code = main(
        tiny_flags(data, out, "--max-steps", "12")
    )  # checkpoints at the epoch ends: steps 4, 8, 12
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("fastclr: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(r"cannot write .*/checkpoints/ckpt-000000008\.pt", errors[0]), errors[
        0
    ]  # names the file it failed on
    assert (
        os.strerror(
            {"write": errno.ENOSPC, "serialiser": errno.ENOSPC, "fsync": errno.EIO}.get(
                where, errno.EACCES
            )
        )
        in errors[0]
    )
    ckpt_dir = out / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "ckpt-000000004.pt"
    ]  # no partial file left
    assert load_checkpoint(ckpt_dir / "ckpt-000000004.pt")["step"] == 4


# ---------------------------------------------------------------------------------------------------------------------
# An unreadable newest checkpoint; two runs on one --out
# ---------------------------------------------------------------------------------------------------------------------


def test_resume_auto_with_only_an_unreadable_checkpoint_refuses_naming_it(data, tmp_path, capsys):
    """It once trained from scratch, pruning counted the corrupt file towards --keep 1 and deleted every new
    checkpoint, and the run still reported one and exited 0."""
    from fastclr.cli import main

    out = tmp_path / "run"
    bad = out / "checkpoints" / "ckpt-000000099.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x00 not a checkpoint")
    flags = tiny_flags(
        data, out, "--resume", "auto", "--keep", "1", "--ckpt-every", "1", "--max-steps", "8"
    )
    assert main(flags) == 1
    err = capsys.readouterr().err
    assert re.search(
        r"fastclr: error: --resume auto: no checkpoint in .* loads; .*ckpt-000000099\.pt", err
    ), err
    assert "weights_only" not in err
    assert [p.name for p in bad.parent.iterdir()] == [bad.name]


def test_resume_auto_falls_back_past_an_unreadable_checkpoint_and_says_so(data, tmp_path, capsys):
    from fastclr.cli import main

    out = tmp_path / "run"
    flags = tiny_flags(data, out, "--keep", "1", "--ckpt-every", "1")
    assert main([*flags, "--max-steps", "2"]) == 0
    bad = out / "checkpoints" / "ckpt-000000099.pt"
    bad.write_bytes(b"\x00 not a checkpoint")
    capsys.readouterr()
    assert main([*flags, "--resume", "auto", "--max-steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"skipping cannot read checkpoint .*ckpt-000000099\.pt", printed), printed
    assert "falling back to the newest checkpoint that loads, ckpt-000000002.pt" in printed, printed
    assert RESUMED.search(printed).group(2) == "2"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "ckpt-000000005.pt",
        bad.name,
    ]
    assert load_checkpoint(out / "checkpoints" / "ckpt-000000005.pt")["step"] == 5


def test_a_second_run_on_a_live_output_folder_stops_at_once(data, tmp_path, capsys):
    """Two runs on one --out deleted each other's temporary files, pruned each other's checkpoints and mixed their
    metric rows. The second now stops naming the first; a lock left by a killed run does not block."""
    from fastclr.cli import main

    out = tmp_path / "run"
    first = tiny_flags(data, out, "--ckpt-every", "1", "--log-every", "1")
    with Child(first, tmp_path / "first.log") as child:
        wait_for(lambda: newest_step(out / "checkpoints") >= 1, 240, child, "a first checkpoint")
        started = time.monotonic()
        code = main(tiny_flags(data, out, "--seed", "4", "--resume", "auto", "--max-steps", "50"))
        waited = time.monotonic() - started
        err = capsys.readouterr().err
        assert code == 1 and waited < 10, (code, waited, err)
        host = socket.gethostname()
        assert re.search(
            rf"fastclr: error: {re.escape(str(out))} is in use by another fastclr run "
            rf"\(pid {child.proc.pid} on {re.escape(host)}, started \d{{4}}-\d\d-\d\dT[\d:]+.*\)",
            err,
        ), err
        assert child.alive()
        child.kill()  # kill -9: the kernel drops its lock
    step = newest_step(out / "checkpoints")
    assert main(tiny_flags(data, out, "--resume", "auto", "--max-steps", str(step + 1))) == 0
    assert newest_step(out / "checkpoints") == step + 1


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite losses (a real divergence: lr 1e30 overflows the activations on the second step)
# ---------------------------------------------------------------------------------------------------------------------


def finite_state(ckpt: dict) -> bool:
    tensors = [t for t in ckpt["model"].values() if t.is_floating_point()]
    for state in ckpt["optimizer"]["state"].values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    return all(torch.isfinite(t).all() for t in tensors)


def test_divergence_stops_naming_step_and_last_good_checkpoint(data, tmp_path, capsys):
    from fastclr.cli import main

    out = tmp_path / "run"
    assert main(tiny_flags(data, out, "--lr", "1e30", "--ckpt-every", "1")) == 1
    err = capsys.readouterr().err
    last_good = out / "checkpoints" / "ckpt-000000001.pt"
    assert (
        f"non-finite loss (nan) at step 1 (epoch 0, batch 1); last good checkpoint: {last_good}"
        in err
    ), err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        last_good.name
    ]  # nothing saved after NaN
    assert finite_state(load_checkpoint(last_good))


def test_skip_nonfinite_skips_counts_and_never_updates_on_nan(data, tmp_path, capsys):
    from fastclr.cli import main

    stop = tmp_path / "stop"
    main(tiny_flags(data, stop, "--lr", "1e30", "--ckpt-every", "1"))
    out = tmp_path / "skip"
    flags = tiny_flags(data, out, "--lr", "1e30", "--skip-nonfinite", "--max-steps", "6")
    assert main(flags) == 0
    assert "skipped 5 step(s) with a non-finite loss" in capsys.readouterr().out
    final = load_checkpoint(out / "checkpoints" / "ckpt-000000006.pt")
    assert final["extra"]["nonfinite_skipped"] == 5 and finite_state(final)
    # The skipped steps changed nothing: the weights are those after step 1, the last finite one.
    after_step_1 = load_checkpoint(stop / "checkpoints" / "ckpt-000000001.pt")["model"]
    assert all(torch.equal(final["model"][k], v) for k, v in after_step_1.items())
    # The count survives a resume.
    assert main([*flags[:-1], "7", "--resume", "auto"]) == 0
    assert (
        load_checkpoint(out / "checkpoints" / "ckpt-000000007.pt")["extra"]["nonfinite_skipped"]
        == 6
    )


@pytest.fixture
def nan_gradients(monkeypatch):
    """A loss whose value is finite and whose gradients are NaN: the tiled loss's backward is made to return NaN."""
    from fastclr.losses import tiled

    monkeypatch.setattr(
        tiled,
        "normalize_backward",
        lambda dz_hat, z_hat, norm: torch.full_like(dz_hat, float("nan")),
    )


def test_non_finite_gradients_with_a_finite_loss_stop_before_any_checkpoint(
    data, tmp_path, capsys, nan_gradients
):
    """A finite loss with NaN gradients: the step is non-finite all the same, and no checkpoint holding what it did
    is written."""
    from fastclr.cli import main

    out = tmp_path / "run"
    assert main(tiny_flags(data, out, "--ckpt-every", "1")) == 1
    err = capsys.readouterr().err
    assert re.search(
        r"non-finite gradients or updated weights \(loss \d+\.\d+\) at step 0 \(epoch 0, batch 0\); "
        r"last good checkpoint: none yet",
        err,
    ), err
    for path in list_checkpoints(out / "checkpoints"):
        assert finite_state(load_checkpoint(path)), path.name


def test_skip_nonfinite_skips_non_finite_gradients(data, tmp_path, capsys, nan_gradients):
    from fastclr.cli import main

    out = tmp_path / "run"
    flags = tiny_flags(data, out, "--ckpt-every", "1", "--skip-nonfinite")
    assert main([*flags, "--max-steps", "6"]) == 0
    printed = capsys.readouterr().out
    assert "skipped non-finite step(s) 0 (first: non-finite gradients" in printed, printed
    paths = list_checkpoints(out / "checkpoints")
    assert paths and all(finite_state(load_checkpoint(p)) for p in paths)
    final = load_checkpoint(paths[-1])
    assert final["step"] == 6 and final["extra"]["nonfinite_skipped"] >= 1


def test_skip_nonfinite_puts_the_memory_bank_back(data, tmp_path, monkeypatch):
    """A skipped step has already written its rows into the bank: the guard undoes that too, pointer included."""
    from fastclr.cli import main
    from fastclr.losses import memory_bank

    bank_loss = memory_bank._bank_loss
    nan_from = 2  # steps 0 and 1 train, every later step has a NaN loss
    calls = []

    def nan_after_two(*args):
        calls.append(None)
        loss = bank_loss(*args)
        return loss * float("nan") if len(calls) > nan_from else loss

    monkeypatch.setattr(memory_bank, "_bank_loss", nan_after_two)
    out = tmp_path / "run"
    flags = tiny_flags(
        data, out, "--ckpt-every", "1", "--skip-nonfinite", "--memory-bank-size", "40"
    )
    assert main([*flags, "--max-steps", "4"]) == 0
    by_step = {
        load_checkpoint(p)["step"]: load_checkpoint(p)["loss"]
        for p in list_checkpoints(out / "checkpoints")
    }
    assert sorted(by_step) == [2, 3, 4]
    assert int(by_step[2]["memory_bank.bank_ptr"]) == 2 * 8
    for step in (3, 4):  # skipped: the bank as step 2 left it
        assert torch.equal(by_step[step]["memory_bank.bank"], by_step[2]["memory_bank.bank"]), step
        assert torch.equal(
            by_step[step]["memory_bank.bank_ptr"], by_step[2]["memory_bank.bank_ptr"]
        ), step


# ---------------------------------------------------------------------------------------------------------------------
# Broken images, both pipelines
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """16 good JPEGs in two classes plus: a truncated JPEG, a zero-byte JPEG, a text file named .jpg, random bytes
    named .jpg, and a notes.txt that is not an image by name (not listed, not counted)."""
    root = tmp_path_factory.mktemp("broken") / "train"
    good = write_images(root / "a", 8) + write_images(root / "b", 8, seed=1)
    bad = {
        "truncated": root / "b" / "truncated.jpg",
        "empty": root / "a" / "empty.jpg",
        "text": root / "b" / "text.jpg",
        "noise": root / "a" / "noise.jpg",
    }
    bad["truncated"].write_bytes(good[0].read_bytes()[: good[0].stat().st_size * 2 // 3])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is not an image\n")
    bad["noise"].write_bytes(
        np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes()
    )
    (root / "a" / "notes.txt").write_text("a non-image file among the images\n")
    return root, bad


def undecodable_jpeg(path: Path, good: Path) -> Path:
    """A file that passes every cheap check (JPEG magic, end-of-image marker) but no decoder can read."""
    noise = np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8).tobytes()
    path.write_bytes(good.read_bytes()[:4] + noise + b"\xff\xd9")
    return path


def loader(backend: str, root: Path, on_corrupt: str):
    return make_loader(
        backend=backend, root=str(root), batch_size=4, size=16, device="cpu", num_threads=1,
        seed=0, on_corrupt=on_corrupt, last_batch="drop",
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_corrupt_files_fail_naming_the_file(broken_data, backend):
    root, bad = broken_data
    with pytest.raises(CorruptImageError) as info:
        loader(backend, root, "error")
    named = [name for name, path in bad.items() if str(path) in str(info.value)]
    assert len(named) == 1, str(info.value)  # one clear message naming one of the bad files


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_corrupt_files_skipped_and_counted(broken_data, backend):
    root, bad = broken_data
    loaded = loader(backend, root, "skip")
    try:
        assert loaded.num_skipped == len(bad) == 4
        assert {p for p, _ in loaded.skipped} == {str(p) for p in bad.values()}
        batches = list(loaded)
        assert len(batches) == len(loaded) == 16 // 4
        assert all(torch.isfinite(v).all() for pair in batches for v in pair)
    finally:
        loaded.close()


@pytest.fixture
def decoder_only_bad(tmp_path) -> tuple[Path, Path]:
    """(root, bad): eight good JPEGs and one that only the decoder rejects."""
    root = tmp_path / "train"
    good = write_images(root / "a", 8)
    return root, undecodable_jpeg(root / "a" / "zz_bad.jpg", good[0])


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_file_only_the_decoder_rejects_is_named(decoder_only_bad, backend):
    """Corruption inside the compressed data passes the up-front check; decoding it fails naming the file."""
    root, bad = decoder_only_bad
    loaded = loader(backend, root, "error")
    try:
        with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
            for _ in loaded:
                pass
    finally:
        loaded.close()


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_skip_policy_also_skips_a_file_only_the_decoder_rejects(decoder_only_bad, backend):
    root, bad = decoder_only_bad
    loaded = loader(backend, root, "skip")
    try:
        assert loaded.num_skipped == 0  # it passes the up-front check
        with pytest.warns(UserWarning, match="skipping undecodable image .*zz_bad.jpg"):
            first = [a for a, _ in loaded]
        assert len(first) == len(loaded) == 2 and loaded.num_skipped == 1
        assert loaded.skipped[0][0] == str(bad) and "decoded" in loaded.skipped[0][1]
        with warnings.catch_warnings():
            warnings.simplefilter(
                "error"
            )  # known from now on: no second warning, no second failure
            assert len([a for a, _ in loaded]) == 2 and loaded.num_skipped == 1
    finally:
        loaded.close()


def test_pretrain_with_skip_policy_trains_on_the_good_images(broken_data, tmp_path, capsys):
    from fastclr.cli import main

    root, _ = broken_data
    out = tmp_path / "run"
    flags = tiny_flags(
        root, out, "--on-corrupt", "skip", "--max-steps", "3", "--backend", "dali", "--workers", "1"
    )
    assert main(flags) == 0, capsys.readouterr().err
    assert load_checkpoint(out / "checkpoints" / "ckpt-000000003.pt")["step"] == 3
    assert (
        main(tiny_flags(root, tmp_path / "strict")) == 1
    )  # the default policy: stop, naming the file
    err = capsys.readouterr().err
    assert err.startswith("fastclr: error:") and "empty.jpg is empty (0 bytes)" in err, err


# ---------------------------------------------------------------------------------------------------------------------
# A dying rank under torchrun
# ---------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(agent_pid: int) -> list[int]:
    """Pids of the processes torchrun's agent started (its children), from /proc."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


@pytest.mark.slow
def test_torchrun_restarts_after_a_rank_is_killed(data, tmp_path, capsys):
    out = tmp_path / "ddp"
    ckpt_dir = out / "checkpoints"
    # 32 images, global batch 8 -> 4 per rank, 16 images per shard -> 4 steps per epoch on both ranks.
    flags = tiny_flags(data, out, "--resume", "auto", "--ckpt-every", "1", "--max-steps", "40")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "fastclr", *flags,
    ]  # fmt: skip
    with Child([], tmp_path / "torchrun.log", cmd=cmd) as child:
        wait_for(lambda: newest_step(ckpt_dir) >= 3, 300, child, "three checkpoints")
        pids = worker_pids(child.proc.pid)
        assert len(pids) == 2, pids
        killed_at = newest_step(ckpt_dir)
        os.kill(pids[1], signal.SIGKILL)  # one rank dies mid-epoch
        code = child.proc.wait(timeout=400)
        output = child.output()
    assert code == 0, output[-4000:]
    resumed = [int(m.group(2)) for m in RESUMED.finditer(output)]
    assert len(resumed) == 1 and resumed[0] >= killed_at, output[-4000:]
    final = load_checkpoint(list_checkpoints(ckpt_dir)[-1])
    assert (final["step"], final["world_size"]) == (40, 2)
    assert "parameters identical on all 2 ranks" in output
    with capsys.disabled():
        print(
            f"\ntorchrun: rank 1 killed at checkpoint step {killed_at}, restarted from step {resumed[0]}, finished at 40"
        )

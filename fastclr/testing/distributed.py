"""Run a function on W fresh processes joined in one ``torch.distributed`` group, bounded in time, always torn down.

    from fastclr.testing.distributed import spawn_world

    def worker(rank, world_size, n):        # module level: the ranks import it by reference
        ...
        return {"loss": loss.item()}

    results = spawn_world(worker, 2, 8, env={"TRITON_INTERPRET": "1"})   # one result per rank

Used by ``tests/test_distributed.py`` and ``bench/bench_dist.py``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in this process for the block: spawned children inherit it from their first instruction."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _rank_main(
    worker: Callable,
    args: tuple,
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    pg_timeout_s: float,
    threads: int,
    out_dir: str,
) -> None:
    """Entry point of one spawned rank: join the group, run the worker, leave its result (or traceback) in out_dir."""
    import torch.distributed as dist

    out = Path(out_dir)
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        timeout = datetime.timedelta(seconds=pg_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        try:
            result = worker(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"result": result}, out / f"rank{rank}.pt")
    except Exception:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def spawn_world(
    worker: Callable,
    world_size: int,
    *args,
    env: dict[str, str] | None = None,
    timeout_s: float = 300.0,
    pg_timeout_s: float = 60.0,
    backend: str = "gloo",
    threads: int = 1,
) -> list:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` fresh processes joined in one process group.

    The group's store is served from this process on 127.0.0.1 at a port the OS picks, so concurrent worlds never collide.
    Every process is bounded: the whole world gets ``timeout_s`` seconds, a collective ``pg_timeout_s``; when a rank fails,
    the others are given a few seconds to report, then terminated (killed if need be), whatever happens.

    Args:
        worker: a module-level function (it is pickled by reference); its result is read back with
            ``torch.load(weights_only=True)``: tensors, numbers, strings, None, and lists/tuples/dicts of them.
        world_size: W >= 1 processes.
        *args: passed on to the worker after (rank, world_size).
        env: environment variables each rank starts with (e.g. TRITON_INTERPRET=1): they are in place before the
            rank imports anything, the worker's module included. This process's environment is restored.
        timeout_s: wall-clock limit for the whole world.
        pg_timeout_s: limit for any one collective (and for joining the group).
        backend: "gloo" (CPU) or "nccl" (one GPU per rank).
        threads: torch intra-op threads per rank.

    Returns:
        The W results, by rank.

    Raises:
        RuntimeError: a rank failed; the message holds every failed rank's traceback.
        TimeoutError: the world ran past ``timeout_s``.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    import torch.distributed as dist

    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    with tempfile.TemporaryDirectory(prefix="fastclr-world-") as out_dir:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(
                    worker,
                    args,
                    rank,
                    world_size,
                    store.port,
                    backend,
                    pg_timeout_s,
                    threads,
                    out_dir,
                ),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        try:
            with _environ(dict(env or {})):
                for p in procs:
                    p.start()
            deadline = time.monotonic() + timeout_s
            failed_at = None
            while any(p.is_alive() for p in procs):
                now = time.monotonic()
                if now >= deadline:
                    break
                if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                    failed_at = now
                # A failed rank leaves its peers blocked in a collective: grant them 5 s to report, then stop them.
                if failed_at is not None and now - failed_at > 5.0:
                    break
                wait([p.sentinel for p in procs if p.is_alive()], timeout=0.2)
            stuck = [rank for rank, p in enumerate(procs) if p.is_alive()]
        finally:
            _tear_down(procs)
        out = Path(out_dir)
        errors = [
            f"--- rank {rank} ---\n{(out / f'rank{rank}.err').read_text()}"
            for rank in range(world_size)
            if (out / f"rank{rank}.err").exists()
        ]
        if errors:
            raise RuntimeError(f"{len(errors)} of {world_size} ranks failed:\n" + "\n".join(errors))
        if stuck:
            raise TimeoutError(
                f"ranks {stuck} of {world_size} were still running after {timeout_s} s and were killed"
            )
        bad = [
            f"rank {rank}: "
            + (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}")
            for rank, p in enumerate(procs)
            if (code := p.exitcode) != 0
        ]
        if bad:
            # A native abort (e.g. gloo's on mismatched collective shapes) leaves no traceback, only its stderr.
            raise RuntimeError("ranks died without a result: " + ", ".join(bad))
        return [
            torch.load(out / f"rank{rank}.pt", weights_only=True)["result"]
            for rank in range(world_size)
        ]


def _tear_down(procs) -> None:
    """Terminate, then kill, every process still alive; reap them all (one never started is skipped)."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is None:
            continue
        p.join(timeout=5.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=5.0)

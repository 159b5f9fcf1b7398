"""Process-group set-up from the environment ``torchrun`` provides (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

Without those variables (a plain ``python -m fastclr pretrain``) everything degrades to one process, no process group.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastclr.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node, its compute device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def env_world_size() -> int:
    """The number of processes torchrun launched (1 without torchrun), known before joining the group."""
    return _env_int("WORLD_SIZE", 1)


# What --dist-timeout defaults to (minutes). Set explicitly, never left to torch, whose default differs by backend
# (NCCL's watchdog: 10 minutes; gloo: 30).
DEFAULT_TIMEOUT_MIN = 60.0


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store of ``env://`` (torchrun's), its keys prefixed by torchrun's restart count.

    After ``--max-restarts`` restarts the workers, they may meet in the store of the attempt that failed: a rank then
    reads a dead peer's address from the previous attempt's keys before its new peer has written its own, and the
    group fails to connect (gloo: ``connectFullMesh failed ... Connection refused``). One prefix per attempt keeps
    every attempt's keys apart.
    """
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    return dist.PrefixStore(
        f"fastclr/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
    )


def init_distributed(
    device: str = "auto",
    timeout: datetime.timedelta = datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN),
) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs); no-op for a single process.

    ``timeout`` bounds every collective: a rank waiting longer (for a rank stuck in I/O, or one that died) fails
    instead of hanging. The long phases are shared out so that no wait comes near it: the kNN evaluation gives every
    rank its slice (:func:`fastclr.eval.knn_eval`) and collectives move their data in blocks.
    """
    if not isinstance(timeout, datetime.timedelta) or timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be a positive datetime.timedelta, got {timeout!r}")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # Share the CPU cores between the processes of this node instead of oversubscribing them.
        local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
        if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            device_id=dev if dev.type == "cuda" else None,
            timeout=timeout,
            store=_attempt_store(rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (a pickled broadcast; for small control values only)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (a pickled gather; for small values only)."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks (identity for one process)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank.

    DDP broadcasts them at the start of every forward, so after the last step each rank holds the statistics updated
    by its own batch; evaluating shards with those would score each shard with a different model.
    """
    if info.distributed:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def parameters_differ(model: torch.nn.Module, info: DistInfo) -> bool:
    """Does any rank hold a parameter that differs, bit for bit, from rank 0's copy? (Every rank gets the answer.)"""
    differing = torch.zeros((), device=info.device)
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        differing += (ref != p.detach()).any().float()
    return bool(all_reduce_sum(differing, info).item())


def run_on_every_rank(fn: Callable[[], Any], info: DistInfo) -> Any:
    """``fn()`` on every rank; if it raises a ValueError/OSError on any rank, every rank raises (the lowest rank's).

    For work each rank does for itself (opening its shard of a data set) whose failure on one rank must not leave the
    others waiting in the next collective.
    """
    result, error = None, None
    try:
        result = fn()
    except (ValueError, OSError) as e:
        if not info.distributed:
            raise
        error = e
    errors = [e for e in all_gather_object(error, info) if e is not None]
    if errors:
        raise errors[0]
    return result


def run_on_main(fn: Callable[[], Any], info: DistInfo) -> Any:
    """``fn()`` on rank 0 only, its result on every rank; if it raises a ValueError/OSError, every rank raises it.

    Without this, bad input noticed by rank 0 alone would leave the other ranks waiting in a collective forever.
    """
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            if not info.distributed:
                raise
            error = e
    result, error = broadcast_object((result, error), info)
    if error is not None:
        raise error
    return result

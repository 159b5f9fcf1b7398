"""Gathering negatives across ranks with ``torch.distributed`` (any backend: NCCL, gloo): which group, equal batches,
and an all_gather with autograd for the reference.

The tiled and fused paths gather the normalised rows of every rank without autograd (``fastclr.nt_xent_spec``'s
``all_gather_rows``) and compute the *whole* gradient of the sum of all ranks' losses with respect to their local rows
themselves (the symmetric form, see ``tiled.py``): the only extra communication in backward is one scalar per rank
(each rank's upstream gradient).
"""

from __future__ import annotations

import contextlib

import torch

from fastclr.nt_xent_spec import all_gather_rows


def require_distributed() -> None:
    """RuntimeError unless this PyTorch build has torch.distributed (what gather_distributed=True needs)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(
            "gather_distributed=True needs torch.distributed, which this PyTorch build does not provide"
        )


def resolve_group(gather_distributed: bool, group=None):
    """The process group to gather from, or None when there is nothing to gather (flag off, no group, world size 1).

    The caller has checked ``require_distributed`` for gather_distributed=True."""
    if not gather_distributed:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


_checked_once: set | None = (
    None  # (group, n, d) already checked inside check_batches_once(); None outside it
)


@contextlib.contextmanager
def check_batches_once():
    """Inside this block each (group, N, D) is checked by :func:`check_equal_batches` on its first call only.

    The check is an all_gather and a host read: a sync per step. A loop whose ranks all feed one fixed batch shape
    for the whole block (the trainer's equal drop-last shards) needs it once; a rank that changed shape alone inside
    the block would check alone and hang the group, so only such loops may use it.
    """
    global _checked_once
    outer, _checked_once = _checked_once, set()
    try:
        yield
    finally:
        _checked_once = outer


def check_equal_batches(n: int, d: int, device: torch.device, group) -> None:
    """Raise the same ValueError on every rank unless all ranks hold (n, d) embeddings (all_gather needs equal shapes)."""
    import torch.distributed as dist

    if _checked_once is not None and (group, n, d) in _checked_once:
        return
    world = dist.get_world_size(group)
    mine = torch.tensor([n, d], dtype=torch.int64, device=device)
    shapes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shapes, mine, group=group)
    shapes = [tuple(s.tolist()) for s in shapes]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(
            "gather_distributed needs the same per-rank batch on every rank; got (N, D) per rank: "
            + ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
        )
    if _checked_once is not None:
        _checked_once.add((group, n, d))


class _AllGatherRows(torch.autograd.Function):
    """all_gather with autograd: the backward sums every rank's gradient for this rank's rows (all-reduce, then slice)."""

    @staticmethod
    def forward(ctx, x, group):
        cols, offset = all_gather_rows(x, group)
        ctx.group, ctx.rows = group, slice(offset, offset + x.shape[0])
        return cols

    @staticmethod
    def backward(ctx, grad_cols):
        import torch.distributed as dist

        # Every backend has all_reduce (gloo has no reduce_scatter); the copy keeps autograd's buffer untouched.
        grad = grad_cols.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rows], None


def all_gather_rows_autograd(x: torch.Tensor, group) -> torch.Tensor:
    """(A*W, ...) rows of every rank with a gradient path back to this rank's x (A, ...)."""
    return _AllGatherRows.apply(x, group)

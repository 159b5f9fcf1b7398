"""Non-finite steps without a host sync: the device-side guard that undoes a bad step, and the queued steps' read-back.

A training step leaves its loss, a non-finite flag and (on logged steps) its contrastive top-1 on the device as a
:class:`PendingStep`. :class:`UpdateGuard` undoes a flagged step in place with ``torch.where``, so the host need not
look. Every ``--log-every`` steps the trainer packs the pending steps with :func:`pack_pending`, all-reduces and reads
the tensor once (its one host sync), and :func:`unpack_pending` turns the numbers into a :class:`ReadBack`. Without
--skip-nonfinite a flagged step stops the run with :func:`nonfinite_error`; :func:`check_finite_state` is the backstop
that refuses to checkpoint NaN/inf weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from fastclr.train.checkpoint import RunState


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message names the step and the last good checkpoint."""


def any_nonfinite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """0-d bool on the device: does any tensor hold a NaN or inf? (The max-abs norm overflows for no finite value.)"""
    return (
        torch.stack(torch._foreach_norm(list(tensors), float("inf"))).isfinite().all().logical_not()
    )


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of an optimiser's per-parameter state (LARS: the momentum buffers)."""
    return [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]


class PendingStep(NamedTuple):
    """A step queued on the device and not yet read back: its data position and its device-side results."""

    step: int  # optimiser steps taken before it
    epoch: int
    batch: int
    loss: torch.Tensor  # 0-d float32, this rank's loss
    nonfinite: torch.Tensor  # 0-d bool: the loss, the gradients or the updated weights were NaN/inf
    top1: torch.Tensor | None  # 0-d float32 contrastive top-1, on logged steps only


class ReadBack(NamedTuple):
    """What one read-back found: the losses of the steps since the last read (averaged over ranks), the contrastive
    top-1 of a logged step among them (averaged over ranks), whether any rank asked to stop, and the non-finite steps
    among them with their losses."""

    losses: list[float]
    top1: float | None
    stop: bool
    nonfinite: list[tuple[PendingStep, float]]


def pack_pending(
    steps: list[PendingStep], stop_requested: bool, device: torch.device
) -> torch.Tensor:
    """One float tensor on the device: the steps' losses, their non-finite flags, the last top-1 (if any) and this
    rank's stop vote; summed over ranks, it tells every rank the same."""
    top1s = [p.top1 for p in steps if p.top1 is not None]
    vote = torch.full((1,), float(stop_requested), device=device)
    return torch.cat(
        [
            torch.stack([p.loss for p in steps]),
            torch.stack([p.nonfinite for p in steps]).float(),
            torch.stack(top1s[-1:]) if top1s else vote[:0],
            vote,
        ]
    )


def unpack_pending(steps: list[PendingStep], values: list[float], world_size: int) -> ReadBack:
    """The :class:`ReadBack` of :func:`pack_pending`'s tensor, summed over ``world_size`` ranks and read as ``values``."""
    n = len(steps)
    losses = [v / world_size for v in values[:n]]
    flags = values[n : 2 * n]
    bad = [(p, loss) for p, loss, flag in zip(steps, losses, flags, strict=True) if flag]
    has_top1 = len(values) == 2 * n + 2
    top1 = values[2 * n] / world_size if has_top1 else None
    return ReadBack(losses, top1, values[-1] > 0, bad)


def describe_nonfinite(loss: float) -> str:
    """What went wrong in a flagged step, given its loss (averaged over ranks)."""
    if loss != loss or abs(loss) == float("inf"):
        return f"non-finite loss ({loss})"
    return f"non-finite gradients or updated weights (loss {loss:.4f})"


def nonfinite_error(bad: list[tuple[PendingStep, float]], last_ckpt: Path | None) -> TrainingError:
    """The error that stops a run at its first non-finite step (without --skip-nonfinite)."""
    first, loss = bad[0]
    where = last_ckpt if last_ckpt is not None else "none yet"
    return TrainingError(
        f"{describe_nonfinite(loss)} at step {first.step} (epoch {first.epoch}, batch {first.batch}); "
        f"last good checkpoint: {where}. Lower --lr, try --precision fp32, or pass --skip-nonfinite"
    )


def check_finite_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, s: RunState, last_ckpt: Path | None
) -> None:
    """Refuse to checkpoint NaN/inf weights or optimiser state (a backstop: the read-back stops or undoes
    non-finite steps first). Every rank checks its identical copy, so every rank raises together."""
    state = optimizer_tensors(optimizer)
    tensors = [t for t in (*model.state_dict().values(), *state) if t.is_floating_point()]
    if any_nonfinite(tensors).item():  # host sync, on checkpoint steps only
        where = last_ckpt if last_ckpt is not None else "none yet"
        raise TrainingError(
            f"non-finite weights or optimiser state at step {s.step} (epoch {s.epoch}, batch {s.batch}): "
            f"not saved; last good checkpoint: {where}"
        )


class UpdateGuard:
    """Undoes a step on the device when a device flag says so, with no host read (as a GradScaler skips a step).

    Before each step :meth:`save` copies the weights, the optimiser state and the buffers (BatchNorm running
    statistics, which the forward updates; the loss's, e.g. a memory bank and its pointer, which the loss updates)
    into preallocated tensors, in place; after it :meth:`undo_if` puts them back with ``torch.where``. Optimiser state
    the step created (momentum on the first step) is zeroed, which is how LARS starts it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: torch.nn.Module | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.loss_buffers = [] if loss is None else list(loss.buffers())
        self.saved: list[torch.Tensor] = []
        self.copies: list[torch.Tensor] = []

    def _live(self) -> list[torch.Tensor]:
        state = optimizer_tensors(self.optimizer)
        return [*self.model.parameters(), *self.model.buffers(), *self.loss_buffers, *state]

    @torch.no_grad()
    def save(self) -> None:
        live = self._live()
        if [t.shape for t in live] != [t.shape for t in self.copies]:
            self.copies = [
                torch.empty_like(t) for t in live
            ]  # once, and when the optimiser adds state
        torch._foreach_copy_(self.copies, live)
        self.saved = live

    @torch.no_grad()
    def undo_if(self, flag: torch.Tensor) -> None:
        for t, copy in zip(self.saved, self.copies, strict=True):
            torch.where(flag, copy, t, out=t)
        saved = {id(t) for t in self.saved}
        for t in self._live():
            if id(t) not in saved:
                torch.where(flag, torch.zeros((), dtype=t.dtype, device=t.device), t, out=t)

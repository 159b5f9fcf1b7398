"""Learning-rate scaling and the per-iteration warm-up + cosine schedule of SimCLR."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

_BASE_LR = {"linear": 0.3, "sqrt": 0.075}


def scaled_lr(batch_size: int, base_lr: float | None = None, scaling: str = "linear") -> float:
    """SimCLR's learning rate for a global batch ``B``.

    ``linear``: ``base_lr * B / 256`` with ``base_lr = 0.3`` by default;
    ``sqrt``: ``base_lr * sqrt(B)`` with ``base_lr = 0.075`` by default (better for small batches and
    long runs, SimCLR appendix B.1).

    Raises:
        ValueError: non-positive ``batch_size`` or ``base_lr``, or an unknown ``scaling``.
    """
    if scaling not in _BASE_LR:
        raise ValueError(f"unknown lr scaling {scaling!r}; choose one of {', '.join(_BASE_LR)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if base_lr is None:
        base_lr = _BASE_LR[scaling]
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
    if scaling == "linear":
        return base_lr * batch_size / 256
    return base_lr * math.sqrt(batch_size)


class WarmupCosine(LRScheduler):
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to 0.

    Stepped once per iteration (after ``optimizer.step()``); every param group gets the same rate:

        lr(s) = base_lr * s / warmup_steps                                    for s < warmup_steps
        lr(s) = base_lr * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))  up to total_steps
        lr(s) = 0                                                             after total_steps

    Args:
        optimizer: the wrapped optimizer; its lr is set to ``lr_at(0) == 0`` on construction.
        total_steps: iterations of the whole run.
        warmup_steps: warm-up iterations, ``0 <= warmup_steps <= total_steps``.
        base_lr: peak learning rate (e.g. ``scaled_lr(batch_size)``).

    Example:
        >>> sched = WarmupCosine(opt, total_steps=epochs * steps_per_epoch,
        ...                      warmup_steps=10 * steps_per_epoch, base_lr=scaled_lr(512))
        >>> for batch in loader: ...; opt.step(); sched.step()
    """

    def __init__(
        self, optimizer: Optimizer, total_steps: int, warmup_steps: int, base_lr: float
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if (
            isinstance(warmup_steps, bool)
            or not isinstance(warmup_steps, int)
            or not 0 <= warmup_steps <= total_steps
        ):
            raise ValueError(
                f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}"
            )
        if not base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
        self.total_steps, self.warmup_steps, self.base_lr = total_steps, warmup_steps, base_lr
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        """The learning rate at iteration ``step`` (a pure function of the step)."""
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        if step >= self.total_steps:
            return 0.0
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)

    _get_closed_form_lr = get_lr

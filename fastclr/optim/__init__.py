"""Optimisation: LARS with SimCLR semantics, its param groups, lr scaling and the warm-up cosine schedule."""

from fastclr.optim.lars import LARS, lars_param_groups
from fastclr.optim.schedules import WarmupCosine, scaled_lr

__all__ = ["LARS", "WarmupCosine", "lars_param_groups", "scaled_lr"]

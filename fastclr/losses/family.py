"""What the contrastive-loss family (NT-Xent with a memory bank, DCL, DCLW, SupCon) shares: the checks of its extra
inputs (labels, memory bank sizes, weight functions).

The family runs on the tiled torch path (``fastclr.losses.tiled.row_stats``), on the materialised references and on
the fused Triton kernels: NT-Xent's covers DCL/DCLW (the positive left out of its denominator, DCLW's weights added in
torch) and SupCon (NT-Xent's log-sum-exp, the label positives from per-class sums in torch), the bank kernel
(``fastclr.kernels.memory_bank``) the memory bank. Every loss resolves its impl as NT-Xent does
(``fastclr.nt_xent_spec.check_impl``, then ``fastclr.losses.backends.pick_path``: "auto" is triton for CUDA tensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_labels(labels, z_a: torch.Tensor) -> None:
    """TypeError/ValueError naming the problem unless labels is an integer (N,) tensor on z_a's device."""
    n = z_a.shape[0]
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must have an integer dtype (class indices), got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(
            f"labels must have shape (N,) = ({n},), one per sample of z_a, got {tuple(labels.shape)}"
        )
    if labels.device != z_a.device:
        raise ValueError(
            f"labels must be on the embeddings' device {z_a.device}, got {labels.device}"
        )


def check_memory_bank_size(size) -> tuple[int, int] | None:
    """(K, D) of a memory bank, or None for no bank, from what lightly 1.6.0 accepts: 0, or a (K, D) pair.

    Like lightly, a bare positive int is refused (the feature dimension D cannot be guessed) and (0, D) means no bank.
    """
    # a str is a Sequence but never a size: most likely an impl passed by position
    if isinstance(size, str):
        raise TypeError(
            f"memory_bank_size must be 0 or a (K, D) pair, got {size!r}; impl is a keyword argument "
            f"(NTXentLoss(temperature, impl={size!r}))"
        )
    if isinstance(size, bool) or not isinstance(size, int | Sequence | torch.Size):
        raise TypeError(
            f"memory_bank_size must be 0 or a (num_negatives, dim) pair of ints, got {type(size).__name__}"
        )
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"memory_bank_size must be non-negative, got {size}")
        if size > 0:
            raise ValueError(
                f"memory_bank_size={size} does not give the feature dimension: pass memory_bank_size=({size}, dim), "
                "or 0 for no bank"
            )
        return None
    entries = tuple(size)
    if len(entries) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in entries):
        raise ValueError(
            f"memory_bank_size must be a (num_negatives, dim) pair of ints, got {size!r}"
        )
    k, d = entries
    if k < 0 or d < 0:
        raise ValueError(f"memory_bank_size entries must be non-negative, got {size!r}")
    if k == 0:
        return None
    if d == 0:
        raise ValueError(f"memory_bank_size {size!r}: the feature dimension must be positive")
    return k, d


def check_positive(value, name: str) -> float:
    """value as a float. TypeError unless a real number, ValueError unless finite and > 0 (the message names it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def check_weight_fn(weight_fn) -> None:
    """TypeError unless weight_fn is None or callable."""
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(
            f"weight_fn must be None or a callable (u, v) -> (N,) weights, got {type(weight_fn).__name__}"
        )


def check_pair_weights(weights: torch.Tensor, n: int) -> torch.Tensor:
    """weights as returned by a weight function: ValueError unless a tensor of shape (N,) or a scalar."""
    if not isinstance(weights, torch.Tensor) or weights.shape not in ((), (n,)):
        shape = (
            tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        )
        raise ValueError(f"weight_fn must return (N,) = ({n},) weights, got {shape}")
    return weights

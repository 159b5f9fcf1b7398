"""Public NT-Xent API: ``nt_xent`` and ``NTXentLoss`` (with an optional memory bank), where the inputs are checked
(once) and the path is chosen."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastclr.losses import distributed as dist_utils
from fastclr.losses.backends import (
    backend,
    checked_triton,
    pick_path,
    resolve_impl,
    triton_available,
)
from fastclr.losses.custom_op import nt_xent_op
from fastclr.losses.family import check_memory_bank_size
from fastclr.losses.memory_bank import MemoryBank, bank_step
from fastclr.losses.reference import nt_xent_reference
from fastclr.nt_xent_spec import (
    IMPLS,
    check_embeddings,
    check_impl,
    check_temperature,
)

__all__ = ["IMPLS", "NTXentLoss", "nt_xent", "resolve_impl", "triton_available"]


def nt_xent(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.5,
    *,
    impl: str = "auto",
    gather_distributed: bool = False,
    group=None,
) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy) of SimCLR, Chen et al. 2020, arXiv:2002.05709.

    L = 1/(2N) * sum_i -log( exp(s(i, pos(i))/tau) / sum_{k != i} exp(s(i, k)/tau) ) over the 2N anchors of both views,
    s the cosine similarity (inputs are L2-normalised here).

    Args:
        z_a: (N, D) embeddings of the first views.
        z_b: (N, D) embeddings of the second views; row i of z_a and row i of z_b are a positive pair.
        temperature: tau > 0 (0.5 for CIFAR-size recipes, 0.1 for ImageNet's).
        impl: "auto" (triton on CUDA, else torch), "triton" (fused kernel), "torch" (tiled, any device), "reference".
            For fp32 inputs the fused kernel follows PyTorch's TF32 switch for matmuls (exact by default; TF32 after
            ``torch.backends.cuda.matmul.fp32_precision = "tf32"``); see ``fastclr.nt_xent_spec.fp32_dot_precision``.
        gather_distributed: use the embeddings of every rank of the process group as negatives (exact gradients).
        group: process group for gather_distributed (default: the world).

    Returns:
        0-d tensor in the input dtype: the mean over this rank's 2N anchors.

    Example:
        >>> z_a, z_b = model(x_a), model(x_b)
        >>> loss = fastclr.nt_xent(z_a, z_b, temperature=0.5)
    """
    temperature = check_temperature(temperature)
    check_impl(impl)
    if gather_distributed:
        dist_utils.require_distributed()
    return _checked_nt_xent(z_a, z_b, temperature, impl, gather_distributed, group)


def _checked_nt_xent(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    impl: str,
    gather_distributed: bool,
    group,
) -> torch.Tensor:
    """``nt_xent`` once temperature, impl and torch.distributed are checked: checks the embeddings, routes them."""
    check_embeddings(z_a, z_b)
    path = pick_path(impl, z_a.device, z_a.dtype)
    fast, precision = None, "tf32"
    if path == "triton":
        fast, precision = checked_triton(z_a)
    elif path == "torch":
        fast = backend(path)
        fast.check(z_a)
    dist_group = dist_utils.resolve_group(gather_distributed, group)
    if dist_group is not None:
        dist_utils.check_equal_batches(z_a.shape[0], z_a.shape[1], z_a.device, dist_group)
    if fast is None:
        return nt_xent_reference(z_a, z_b, temperature, group=dist_group)
    if dist_group is None:
        # One opaque custom op with registered autograd: torch.compile(fullgraph=True) traces through without a break.
        return nt_xent_op(z_a, z_b, temperature, impl=path, precision=precision)
    return fast.loss(z_a, z_b, temperature, group=dist_group)


class NTXentLoss(nn.Module):
    """Drop-in NT-Xent loss module: lightly 1.6.0's ``NTXentLoss(temperature, memory_bank_size, gather_distributed)``
    in value and gradients, with or without a memory bank.

    The 2N x 2N similarity matrix is never materialised by the "torch" and "triton" paths.

    Args:
        temperature: tau > 0.
        memory_bank_size: 0 (no bank: NT-Xent over the batch), or (K, D) for a bank of K negatives of D features
            (lightly's semantics, see ``fastclr.losses.memory_bank``: the anchors are z_a's rows, the negatives the
            bank's, and z_b's unit rows enter the bank after each training step). A bare int K > 0 is refused, as
            lightly refuses it: D cannot be guessed.
        gather_distributed: without a bank, gather negatives from all ranks of the default process group, with exact
            gradients; with a bank, enqueue every rank's z_b rows.
        impl: "auto" | "triton" | "torch" | "reference" (see ``fastclr.nt_xent``); with a bank "triton" is the fused
            bank kernel (``fastclr.nt_xent_bank``).

    Shapes:
        forward(z_a (N, D), z_b (N, D)) -> 0-d tensor.

    Example:
        >>> criterion = NTXentLoss(temperature=0.5)
        >>> loss = criterion(model(x_a), model(x_b))
        >>> loss.backward()
        >>> moco_style = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: int | Sequence[int] = 0,
        gather_distributed: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.impl = check_impl(impl)
        bank_size = check_memory_bank_size(memory_bank_size)
        if gather_distributed:
            dist_utils.require_distributed()
        self.gather_distributed = gather_distributed
        self.memory_bank = None if bank_size is None else MemoryBank(bank_size, gather_distributed)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if self.memory_bank is not None:
            return bank_step(
                self.memory_bank,
                z_a,
                z_b,
                self.temperature,
                self.impl,
                self.gather_distributed,
            )
        return _checked_nt_xent(
            z_a, z_b, self.temperature, self.impl, self.gather_distributed, group=None
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}, gather_distributed={self.gather_distributed}"

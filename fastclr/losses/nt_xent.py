"""Public NT-Xent API: ``nt_xent`` and ``NTXentLoss``, where the inputs are checked (once) and the path is chosen."""

from __future__ import annotations

import torch
from torch import nn

from fastclr.losses import distributed as dist_utils
from fastclr.losses.backends import backend, pick_path, resolve_impl, triton_available
from fastclr.losses.custom_op import nt_xent_op
from fastclr.losses.reference import nt_xent_reference
from fastclr.nt_xent_spec import (
    IMPLS,
    check_embeddings,
    check_impl,
    check_temperature,
    fp32_dot_precision,
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
    path = pick_path(impl, z_a.device)
    # Only fp32 inputs of the kernel have a choice of dot precision; other dtypes ignore the argument.
    precision = fp32_dot_precision() if path == "triton" and z_a.dtype == torch.float32 else "tf32"
    fast = None if path == "reference" else backend(path, precision)
    if fast is not None:
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
    """Drop-in NT-Xent loss module (same value as lightly's ``NTXentLoss(temperature)`` without a memory bank).

    The 2N x 2N similarity matrix is never materialised by the "torch" and "triton" paths.

    Args:
        temperature: tau > 0.
        impl: "auto" | "triton" | "torch" | "reference" (see ``fastclr.nt_xent``).
        gather_distributed: gather negatives from all ranks of the default process group, with exact gradients.

    Shapes:
        forward(z_a (N, D), z_b (N, D)) -> 0-d tensor.

    Example:
        >>> criterion = NTXentLoss(temperature=0.5)
        >>> loss = criterion(model(x_a), model(x_b))
        >>> loss.backward()
    """

    def __init__(
        self, temperature: float = 0.5, impl: str = "auto", gather_distributed: bool = False
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.impl = check_impl(impl)
        if gather_distributed:
            dist_utils.require_distributed()
        self.gather_distributed = gather_distributed

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return _checked_nt_xent(
            z_a, z_b, self.temperature, self.impl, self.gather_distributed, group=None
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}, gather_distributed={self.gather_distributed}"

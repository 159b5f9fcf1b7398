"""Public NT-Xent API: ``nt_xent`` and ``NTXentLoss``, with input checks and the one place where ``impl`` is resolved."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastclr.losses import distributed as dist_utils
from fastclr.losses.custom_op import nt_xent_op
from fastclr.losses.reference import nt_xent_reference
from fastclr.losses.tiled import nt_xent_tiled

IMPLS = ("auto", "triton", "torch", "reference")


def triton_available() -> bool:
    """True when triton imports (it ships with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to a concrete path. "auto": triton for CUDA tensors when triton imports, else the tiled torch path."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def check_inputs(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> None:
    """Raise a TypeError/ValueError naming the problem with the embeddings or the temperature."""
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {z.dtype}")
        if z.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(z.shape)}")
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    if z_a.shape[0] == 0:
        raise ValueError("N = 0: the batch is empty")
    if z_a.shape[1] == 0:
        raise ValueError("D = 0: the embeddings are empty")
    if z_a.dtype != z_b.dtype:
        raise TypeError(f"z_a and z_b must have the same dtype, got {z_a.dtype} and {z_b.dtype}")
    if z_a.device != z_b.device:
        raise ValueError(
            f"z_a and z_b must be on the same device, got {z_a.device} and {z_b.device}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


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
        gather_distributed: use the embeddings of every rank of the process group as negatives (exact gradients).
        group: process group for gather_distributed (default: the world).

    Returns:
        0-d tensor in the input dtype: the mean over this rank's 2N anchors.

    Example:
        >>> z_a, z_b = model(x_a), model(x_b)
        >>> loss = fastclr.nt_xent(z_a, z_b, temperature=0.5)
    """
    check_inputs(z_a, z_b, temperature)
    path = resolve_impl(impl, z_a.device)
    dist_group = dist_utils.resolve_group(gather_distributed, group)
    if dist_group is not None:
        dist_utils.check_equal_batches(z_a.shape[0], z_a.shape[1], z_a.device, dist_group)
    if path == "reference":
        return nt_xent_reference(z_a, z_b, float(temperature), group=dist_group)
    if dist_group is None:
        # One opaque custom op with registered autograd: torch.compile(fullgraph=True) traces through without a break.
        return nt_xent_op(z_a, z_b, float(temperature), impl=path)
    if path == "triton":
        from fastclr.kernels.nt_xent import nt_xent_triton

        return nt_xent_triton(z_a, z_b, float(temperature), group=dist_group)
    return nt_xent_tiled(z_a, z_b, float(temperature), group=dist_group)


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
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if gather_distributed:
            import torch.distributed as dist

            if not dist.is_available():
                raise RuntimeError(
                    "gather_distributed=True needs torch.distributed, which this PyTorch build lacks"
                )
        self.temperature = float(temperature)
        self.impl = impl
        self.gather_distributed = gather_distributed

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return nt_xent(
            z_a, z_b, self.temperature, impl=self.impl, gather_distributed=self.gather_distributed
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}, gather_distributed={self.gather_distributed}"

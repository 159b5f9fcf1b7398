"""NT-Xent as PyTorch custom ops (``torch.library``), so that ``torch.compile(fullgraph=True)`` sees one opaque node.

    fastclr::nt_xent_fwd(z_a, z_b, temperature, impl, precision) -> (loss, z_hat, norm, lse)
    fastclr::nt_xent_bwd(grad, z_a, z_b, z_hat, norm, lse, temperature, impl, precision) -> (dz_a, dz_b)

impl = "torch" runs the tiled PyTorch path (``fastclr.losses.tiled``) on any device, impl = "triton" the fused kernel
(``fastclr.kernels.nt_xent``; CUDA tensors, or CPU under TRITON_INTERPRET=1), triton imported only then. The residuals
(z_hat, norm, lse) are O(N D): z_hat (2N, D) and norm (2N,) in both; lse is (2N,) for "torch" and the kernel's (2N, 2)
row statistics for "triton". Each op has a fake (meta) implementation with exactly those shapes, and the forward op has
its autograd formula registered (the backward op). Only the single-process loss goes through these ops; gathering
negatives across ranks stays on the autograd Functions.
"""

from __future__ import annotations

import torch

from fastclr.losses.tiled import compute_dtype, tiled_backward, tiled_forward

IMPLS = ("torch", "triton")
_Residuals = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} for the custom op, got {impl!r}")


@torch.library.custom_op("fastclr::nt_xent_fwd", mutates_args=())
def nt_xent_fwd(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, impl: str, precision: str
) -> _Residuals:
    """(loss 0-d in z_a's dtype, z_hat, norm, lse) for z_a, z_b (N, D); see the module docstring."""
    _check_impl(impl)
    if impl == "triton":
        from fastclr.kernels.nt_xent import nt_xent_forward

        loss, state = nt_xent_forward(z_a, z_b, temperature, precision=precision)
        return loss, state.zhat, state.norm, state.stats
    loss, z_hat, norm, _, lse, _, _ = tiled_forward(z_a, z_b, temperature)
    return loss, z_hat, norm, lse


@nt_xent_fwd.register_fake
def _nt_xent_fwd_fake(z_a, z_b, temperature, impl, precision):
    _check_impl(impl)
    a, d = 2 * z_a.shape[0], z_a.shape[1]
    loss = z_a.new_empty(())
    if impl == "triton":
        f32 = dict(dtype=torch.float32, device=z_a.device)
        return loss, z_a.new_empty((a, d)), torch.empty(a, **f32), torch.empty((a, 2), **f32)
    work = dict(dtype=compute_dtype(z_a.dtype), device=z_a.device)
    return loss, torch.empty((a, d), **work), torch.empty(a, **work), torch.empty(a, **work)


@torch.library.custom_op("fastclr::nt_xent_bwd", mutates_args=())
def nt_xent_bwd(
    grad: torch.Tensor,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    z_hat: torch.Tensor,
    norm: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    impl: str,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz_a, dz_b), each (N, D) in z_a's dtype, for the upstream gradient ``grad`` (0-d) of the loss."""
    _check_impl(impl)
    if impl == "triton":
        from fastclr.kernels.nt_xent import ForwardState, nt_xent_backward

        state = ForwardState(z_hat, norm, lse, z_hat, lse, 0)
        return nt_xent_backward(grad, z_a, z_b, state, temperature, precision=precision)
    n = z_a.shape[0]
    dz = tiled_backward(grad, z_a.dtype, z_hat, norm, z_hat, lse, lse, temperature, 0)
    return dz[:n].clone(), dz[n:].clone()  # custom op outputs may not alias each other


@nt_xent_bwd.register_fake
def _nt_xent_bwd_fake(grad, z_a, z_b, z_hat, norm, lse, temperature, impl, precision):
    return torch.empty_like(z_a), torch.empty_like(z_b)


def _setup_context(ctx, inputs, output):
    z_a, z_b, temperature, impl, precision = inputs
    _, z_hat, norm, lse = output
    ctx.save_for_backward(z_a, z_b, z_hat, norm, lse)
    ctx.meta = (temperature, impl, precision)


def _backward(ctx, grad_loss, *_residual_grads):
    z_a, z_b, z_hat, norm, lse = ctx.saved_tensors
    temperature, impl, precision = ctx.meta
    dz_a, dz_b = nt_xent_bwd(grad_loss, z_a, z_b, z_hat, norm, lse, temperature, impl, precision)
    return dz_a, dz_b, None, None, None


nt_xent_fwd.register_autograd(_backward, setup_context=_setup_context)


def nt_xent_op(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.5,
    *,
    impl: str = "torch",
    precision: str = "tf32",
) -> torch.Tensor:
    """The single-process NT-Xent loss through ``fastclr::nt_xent_fwd`` (differentiable; no input checks, see
    ``fastclr.nt_xent``). z_a, z_b: (N, D). precision applies to fp32 inputs of the triton kernel only."""
    return nt_xent_fwd(z_a, z_b, float(temperature), impl, precision)[0]

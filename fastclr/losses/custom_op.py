"""NT-Xent as PyTorch custom ops (``torch.library``), so that ``torch.compile(fullgraph=True)`` sees one opaque node.

    fastclr::nt_xent_fwd(z_a, z_b, temperature, impl, precision) -> (loss, zhat, norm, stats, square)
    fastclr::nt_xent_bwd(grad, z_a, z_b, zhat, norm, stats, square, temperature, impl, precision) -> (dz_a, dz_b)

impl = "torch" runs the tiled PyTorch path (``fastclr.losses.tiled``) on any device, impl = "triton" the fused kernel
(``fastclr.kernels.nt_xent``; CUDA tensors, or CPU under TRITON_INTERPRET=1), both through ``backends.backend``. The
residuals are the single-process ``ForwardState``'s tensors, O(N D): zhat (2N, D) and norm (2N,) in both; stats is the
lse (2N,) for "torch" and the kernel's (2N, 2) row statistics for "triton"; square is the kernel's diagonal squares of
S after its upper-triangle forward (``fastclr.kernels.nt_xent.diagonal_square``: 2N x 128 fp32 at the default tiles),
and an empty (0,) tensor where there is none (always for "torch"). Each op has a fake (meta) implementation with
exactly those shapes, and the forward op has its autograd formula registered (the backward op). Only the
single-process loss goes through these ops; gathering negatives across ranks stays on the autograd Functions.
"""

from __future__ import annotations

import torch

from fastclr.losses.backends import backend
from fastclr.nt_xent_spec import ForwardState

_Residuals = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _residuals(loss: torch.Tensor, state: ForwardState) -> _Residuals:
    """The op's outputs: a state's square, or an empty tensor where it has none (an op returns tensors only)."""
    square = state.square
    if square is None:
        square = state.norm.new_empty(0, dtype=torch.float32)
    return loss, state.zhat, state.norm, state.stats, square


@torch.library.custom_op("fastclr::nt_xent_fwd", mutates_args=())
def nt_xent_fwd(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, impl: str, precision: str
) -> _Residuals:
    """(loss 0-d in z_a's dtype, zhat, norm, stats, square) for z_a, z_b (N, D); see the module docstring."""
    return _residuals(*backend(impl, precision).forward(z_a, z_b, temperature))


@nt_xent_fwd.register_fake
def _nt_xent_fwd_fake(z_a, z_b, temperature, impl, precision):
    return _residuals(z_a.new_empty(()), backend(impl, precision).empty_state(z_a, temperature))


@torch.library.custom_op("fastclr::nt_xent_bwd", mutates_args=())
def nt_xent_bwd(
    grad: torch.Tensor,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    zhat: torch.Tensor,
    norm: torch.Tensor,
    stats: torch.Tensor,
    square: torch.Tensor,
    temperature: float,
    impl: str,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz_a, dz_b), each (N, D) in z_a's dtype, for the upstream gradient ``grad`` (0-d) of the loss."""
    state = ForwardState.local(zhat, norm, stats, square if square.numel() else None)
    return backend(impl, precision).backward(grad, z_a, z_b, state, temperature)


@nt_xent_bwd.register_fake
def _nt_xent_bwd_fake(grad, z_a, z_b, zhat, norm, stats, square, temperature, impl, precision):
    return torch.empty_like(z_a), torch.empty_like(z_b)


def _setup_context(ctx, inputs, output):
    z_a, z_b, ctx.temperature, ctx.impl, ctx.precision = inputs
    _, zhat, norm, stats, square = output
    ctx.save_for_backward(z_a, z_b, zhat, norm, stats, square)


def _backward(ctx, grad_loss, *_residual_grads):
    z_a, z_b, zhat, norm, stats, square = ctx.saved_tensors
    dz_a, dz_b = nt_xent_bwd(
        grad_loss, z_a, z_b, zhat, norm, stats, square, ctx.temperature, ctx.impl, ctx.precision
    )
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

"""What every NT-Xent path agrees on: numerical constants, input checks, the forward state and how ranks share it.

A leaf (it imports only torch): the loss modules (``fastclr.losses``), the Triton kernel (``fastclr.kernels.nt_xent``)
and the training config all import it, and none of them reaches into another for a constant, a check or a state layout.
The checks run once, at the public boundary (``fastclr.nt_xent``, ``NTXentLoss``, the config); everything below trusts
its caller.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

IMPLS = ("auto", "triton", "torch", "reference")
EPS = 1e-12  # the normalisation clamp, as F.normalize: z_hat = z / max(||z||, EPS)
# Below this temperature exp((S - 1)/tau) can underflow to 0 for every negative (|S| <= 1 gives exponents down to -2/tau,
# and exp(-2/0.025) = 1.8e-35 is still a normal fp32). Smaller temperatures take the max-subtracted path.
SHIFT_MIN_TEMPERATURE = 0.025
# The smallest accepted temperature. Down to it the tiled path keeps the fp32 reference's accuracy (tests/test_fuzz_loss.py
# checks 0.02 ... 1e-30 against float64); below ~3e-39, 1/tau itself overflows fp32.
MIN_TEMPERATURE = 1e-30


def fp32_dot_precision() -> str:
    """The fused kernel's precision for fp32 inputs, chosen by PyTorch's own switch for fp32 matrix products.

    "tf32" (TF32 tensor cores, inputs rounded to nearest: ~2^-11 relative error per operand) when PyTorch allows TF32
    for CUDA matmuls (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``torch.set_float32_matmul_precision
    ("high")`` or ``torch.backends.cuda.matmul.allow_tf32 = True``); "ieee" (exact fp32 products on FMA units, several
    times slower) otherwise, which is PyTorch's default. bf16/fp16 inputs always use their own tensor-core dots.
    """
    mode = torch.backends.cuda.matmul.fp32_precision
    if mode == "none":  # inherits the global setting
        mode = torch.backends.fp32_precision
    return "tf32" if mode == "tf32" else "ieee"


# Dynamo cannot trace the C getter behind the switch: it must take the result as a constant of the traced graph.
# That is all torch.compiler.assume_constant_result does (it sets this flag), but calling it imports torch._dynamo and
# with it triton, which ``import fastclr`` must not; tests/test_nt_xent.py checks that the two stay the same.
fp32_dot_precision._dynamo_marked_constant = True


def row_norms(z: torch.Tensor) -> torch.Tensor:
    """max(||z_i||, EPS) of every row of z (A, D): (A,) in z's dtype, overflow- and underflow-free.

    Each row is divided by its largest |z_ij| before squaring, ||z|| = s ||z / s||: squared, fp32 rows of norm >= ~1e19
    overflow to inf (they became zero vectors, z / inf) and tiny rows underflow. The scale s is a constant for
    autograd: the norm is homogeneous, so its gradient is z / ||z|| either way. A NaN or inf entry still gives NaN.
    """
    scale = z.detach().abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: 0 / 1, not 0 / 0
    return (torch.linalg.vector_norm(z / scale, dim=1) * scale[:, 0]).clamp_min(EPS)


def check_temperature(temperature) -> float:
    """tau as a float. TypeError unless a real number, ValueError unless finite and > 0, and a ValueError below
    MIN_TEMPERATURE."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be at least {MIN_TEMPERATURE:g}, got {temperature:g}: below it the logits S/tau and "
            "the gradients (~1/tau) leave the fp32 range"
        )
    return float(temperature)


def check_impl(impl: str) -> str:
    """impl itself, or a ValueError unless it is one of IMPLS."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def check_embeddings(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    """TypeError/ValueError naming the problem unless z_a, z_b are non-empty (N, D) float tensors of one dtype and
    device."""
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


class ForwardState(NamedTuple):
    """What a backward needs besides z_a, z_b, all O(A D) (the kernel's square: A x its BLOCK_M fp32): A = 2N local
    rows, M candidate columns.

    Both fast paths fill the same fields. The tiled torch path keeps them in its compute dtype (fp32 for fp16/bf16
    inputs) with stats = (m_i, log l_i, argmax_i) (A, 3) (see ``fastclr.losses.tiled.row_stats``); the kernel keeps
    zhat in the input dtype, norm in fp32 and stats = (m_i, log l_i) (A, 2) fp32 (see ``fastclr.kernels.nt_xent``),
    and after its upper-triangle forward the S of its diagonal squares (``fastclr.kernels.nt_xent.diagonal_square``).
    """

    zhat: torch.Tensor  # (A, D) local rows z / max(||z||, EPS)
    norm: torch.Tensor  # (A,) max(||z||, EPS)
    stats: torch.Tensor  # per-row softmax statistics: (A, 3) or (A, 2)
    cols: torch.Tensor  # (M, D) candidate columns: zhat itself unless gathered from every rank
    stats_cols: torch.Tensor  # the stats of every candidate column
    # The kernel's diagonal squares of S, (A padded to B, B) fp32, after its upper-triangle forward; else None.
    square: torch.Tensor | None = None
    offset: int = 0  # the column of local row 0

    @classmethod
    def local(
        cls,
        zhat: torch.Tensor,
        norm: torch.Tensor,
        stats: torch.Tensor,
        square: torch.Tensor | None = None,
    ) -> ForwardState:
        """One process: the candidates are the local rows."""
        return cls(zhat=zhat, norm=norm, stats=stats, cols=zhat, stats_cols=stats, square=square)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensor fields in order, for ``ctx.save_for_backward``; ``ForwardState(*tensors, offset=...)`` rebuilds
        the state from them."""
        return tuple(self)[:-1]


def all_gather_rows(x: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """x (A, ...) of every rank concatenated along dim 0, without autograd: (x_all (A*W, ...), this rank's row offset).

    With ``group`` None: (x, 0), the single-process candidates.
    """
    if group is None:
        return x, 0
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts), dist.get_rank(group) * x.shape[0]


def all_gather_scalar(x: torch.Tensor, group) -> torch.Tensor:
    """(W,) tensor of a 0-d (or one-element) tensor from every rank; (1,) with ``group`` None."""
    return all_gather_rows(x.reshape(1), group)[0]

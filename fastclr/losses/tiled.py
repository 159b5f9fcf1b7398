r"""Memory-lean NT-Xent in plain PyTorch: row blocks, per-row logsumexp, symmetric single-pass backward.

Notation: z = [z_a; z_b] (A = 2N rows), z_hat_i = z_i / max(||z_i||, eps), S = z_hat z_hat^T over the candidate columns
(the local rows, or the rows of every rank when negatives are gathered), pos(i) = (i + N) mod A.

    forward    lse_i = log sum_{j != i} exp(S_ij / tau),      L = 1/A * sum_i (lse_i - S_{i,pos(i)} / tau)
    backward   dL/dz_hat_i = g/(A tau) * [ sum_{j != i} (P_ij + P_ji) z_hat_j - 2 z_hat_pos(i) ],
               P_ij = exp(S_ij/tau - lse_i),   P_ji = exp(S_ij/tau - lse_j)        (S is symmetric)
    chain      dL/dz_i = (dz_hat_i - z_hat_i <z_hat_i, dz_hat_i>) / ||z_i||

Each row block recomputes its (B, M) slice of S and gets its full gradient from that slice alone: no transpose pass, no
scatter, three GEMMs in all (S forward, S again and P @ Z backward). Only O(A*D) state and the A log-sum-exps are kept.

With negatives gathered from W ranks, rank r's loss is the mean over its own A anchors and the gradient above becomes the
gradient of sum_r g_r L_r with respect to the local rows: the P_ji term of a column j is weighted by the upstream gradient g
of the rank that owns j. DDP's gradient averaging then yields exactly the full-batch gradient.
"""

from __future__ import annotations

import math

import torch

from fastclr.losses import distributed as dist_utils

# Below this temperature exp((S - 1)/tau) can underflow to 0 for every negative (|S| <= 1 gives exponents down to -2/tau,
# and exp(-2/0.025) = 1.8e-35 is still a normal fp32). Smaller temperatures take the max-subtracted path.
SHIFT_MIN_TEMPERATURE = 0.025
EPS = 1e-12  # as F.normalize
DEFAULT_BLOCK_ROWS = 256


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 accumulate in fp32; fp32 and fp64 stay as they are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_rows(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (A, D) -> (z_hat (A, D), norm (A,) clamped at EPS) in z's dtype."""
    norm = torch.linalg.vector_norm(z, dim=1).clamp_min(EPS)
    return z / norm[:, None], norm


def normalize_backward(
    dz_hat: torch.Tensor, z_hat: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """Chain rule through z_hat = z / max(||z||, eps): project out the radial part, divide by the norm.

    Rows whose norm was clamped (||z|| <= eps) have z_hat = z/eps, whose Jacobian is simply I/eps.
    """
    radial = (z_hat * dz_hat).sum(dim=1, keepdim=True)
    dz = (dz_hat - z_hat * radial) / norm[:, None]
    clamped = norm <= EPS
    if clamped.any():
        dz[clamped] = dz_hat[clamped] / EPS
    return dz


def _blocks(a: int, block_rows: int):
    for start in range(0, a, block_rows):
        yield start, min(start + block_rows, a)


def rows_lse(
    z_hat: torch.Tensor, cols: torch.Tensor, temperature: float, offset: int, block_rows: int
) -> torch.Tensor:
    """Per-row log-sum-exp over the non-self columns: lse_i = log sum_{j != i} exp(S_ij / tau). Returns (A,)."""
    inv_t = 1.0 / temperature
    a = z_hat.shape[0]
    lse = torch.empty(a, dtype=z_hat.dtype, device=z_hat.device)
    shift = temperature >= SHIFT_MIN_TEMPERATURE
    for start, stop in _blocks(a, block_rows):
        rows = torch.arange(stop - start, device=z_hat.device)
        logits = (
            z_hat[start:stop] * inv_t
        ) @ cols.T  # (B, M) = S / tau; 1/tau folded into the small operand
        if shift:
            # |S| <= 1, so S/tau - 1/tau <= 0: a fixed shift replaces the row max and exp cannot overflow.
            logits.sub_(inv_t).exp_()
            logits[rows, rows + offset + start] = 0.0
            lse[start:stop] = logits.sum(dim=1).log_().add_(inv_t)
        else:
            logits[rows, rows + offset + start] = float("-inf")
            lse[start:stop] = torch.logsumexp(logits, dim=1)
    return lse


def rows_grad(
    z_hat: torch.Tensor,
    cols: torch.Tensor,
    lse: torch.Tensor,
    lse_cols: torch.Tensor,
    g_rows: torch.Tensor,
    g_cols: torch.Tensor,
    temperature: float,
    offset: int,
    n: int,
    block_rows: int,
) -> torch.Tensor:
    """dJ/dz_hat (A, D) for J = sum_r g_r L_r, from the symmetric form in the module docstring.

    z_hat: (A, D) local rows; cols: (M, D) candidates with the local rows at cols[offset:offset+A]; lse: (A,); lse_cols: (M,);
    g_rows: 0-d upstream gradient of this rank; g_cols: (M,) upstream gradient of the rank owning each column.
    """
    inv_t = 1.0 / temperature
    a = z_hat.shape[0]
    grad = torch.empty_like(z_hat)
    shift = temperature >= SHIFT_MIN_TEMPERATURE
    if shift:
        # P_ij + P_ji = exp(S_ij/tau - 1/tau) * (u_i + u_j) with u = g * exp(1/tau - lse): one exp per element, not two.
        u_cols = g_cols * torch.exp(inv_t - lse_cols)
    for start, stop in _blocks(a, block_rows):
        rows = torch.arange(stop - start, device=z_hat.device)
        logits = (z_hat[start:stop] * inv_t) @ cols.T
        if shift:
            weight = torch.add(u_cols[offset + start : offset + stop, None], u_cols[None, :])
            weight.mul_(logits.sub_(inv_t).exp_())
        else:
            weight = torch.exp(logits - lse[start:stop, None]).mul_(g_rows)
            weight.add_(torch.exp(logits.sub_(lse_cols[None, :])).mul_(g_cols[None, :]))
        weight[rows, rows + offset + start] = 0.0
        grad[start:stop] = weight @ cols
    pos = offset + (torch.arange(a, device=z_hat.device) + n) % a
    grad.sub_(cols[pos] * (2.0 * g_rows))
    return grad.mul_(1.0 / (a * temperature))


class NTXentTiledFunction(torch.autograd.Function):
    """Tiled NT-Xent: forward keeps z_hat, norms and lse (O(A*D)); backward recomputes S block by block."""

    @staticmethod
    def forward(ctx, z_a, z_b, temperature, block_rows, group):
        n = z_a.shape[0]
        z = torch.cat([z_a, z_b]).to(compute_dtype(z_a.dtype))
        z_hat, norm = normalize_rows(z)
        cols, offset = z_hat, 0
        if group is not None:
            cols, offset = dist_utils.all_gather_rows(z_hat, group)
        lse = rows_lse(z_hat, cols, temperature, offset, block_rows)
        pos = offset + (torch.arange(2 * n, device=z.device) + n) % (2 * n)
        pos_logit = (z_hat * cols[pos]).sum(dim=1) / temperature
        lse_cols = lse if group is None else dist_utils.all_gather_rows(lse, group)[0]
        ctx.save_for_backward(z_hat, norm, cols, lse, lse_cols)
        ctx.meta = (temperature, offset, n, block_rows, group, z_a.dtype)
        return (lse - pos_logit).mean().to(z_a.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z_hat, norm, cols, lse, lse_cols = ctx.saved_tensors
        temperature, offset, n, block_rows, group, dtype = ctx.meta
        g = grad_out.to(z_hat.dtype)
        if group is None:
            g_cols = g.expand(cols.shape[0])
        else:
            # Each rank's loss may be scaled differently upstream: weight columns by their owner's gradient.
            g_cols = dist_utils.all_gather_scalar(g, group).repeat_interleave(2 * n)
        dz_hat = rows_grad(
            z_hat, cols, lse, lse_cols, g, g_cols, temperature, offset, n, block_rows
        )
        dz = normalize_backward(dz_hat, z_hat, norm).to(dtype)
        return dz[:n], dz[n:], None, None, None


def nt_xent_tiled(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.5,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    group=None,
) -> torch.Tensor:
    """Tiled NT-Xent (no input checks; see ``fastclr.nt_xent``). z_a, z_b: (N, D). Returns the scalar loss."""
    if not (isinstance(block_rows, int) and block_rows > 0):
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite, got {temperature}")
    return NTXentTiledFunction.apply(z_a, z_b, float(temperature), block_rows, group)

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
DEFAULT_BLOCK_COLS = (
    1024  # a 256 x 1024 fp32 tile is 1 MiB: it stays in L2 through its elementwise passes
)


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


def _tiles(a: int, m: int, block_rows: int, block_cols: int):
    """(row start, row stop, col start, col stop) over the (a, m) logits, column tiles innermost."""
    for r0 in range(0, a, block_rows):
        for c0 in range(0, m, block_cols):
            yield r0, min(r0 + block_rows, a), c0, min(c0 + block_cols, m)


def _self_columns(
    r0: int, r1: int, c0: int, c1: int, offset: int, device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tile rows, tile cols) of the self-similarity entries S_{i, offset+i} that fall inside a tile, or None."""
    lo, hi = max(r0, c0 - offset), min(r1, c1 - offset)
    if lo >= hi:
        return None
    i = torch.arange(lo, hi, device=device)
    return i - r0, i + offset - c0


def _logits_tile(
    buf: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shift: float
) -> torch.Tensor:
    """buf[:B, :C] = rows @ cols^T - shift, the shift written by the fill and accumulated by the GEMM (no extra pass)."""
    out = buf[: rows.shape[0], : cols.shape[0]]
    return out.fill_(-shift).addmm_(rows, cols.T)


def rows_lse(
    z_hat: torch.Tensor,
    cols: torch.Tensor,
    temperature: float,
    offset: int,
    block_rows: int,
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> torch.Tensor:
    """Per-row log-sum-exp over the non-self columns: lse_i = log sum_{j != i} exp(S_ij / tau). Returns (A,).

    Works on (block_rows, block_cols) tiles that stay in cache, so memory is O(A*D + tile) whatever the batch.
    """
    inv_t = 1.0 / temperature
    a, m = z_hat.shape[0], cols.shape[0]
    rows_scaled = z_hat * inv_t  # 1/tau folded into the small operand
    buf = z_hat.new_empty(min(block_rows, a), min(block_cols, m))
    shift = temperature >= SHIFT_MIN_TEMPERATURE
    total = z_hat.new_zeros(a)
    if shift:
        # |S| <= 1, so S/tau - 1/tau <= 0: a fixed shift replaces the running max and exp cannot overflow.
        for r0, r1, c0, c1 in _tiles(a, m, block_rows, block_cols):
            tile = _logits_tile(buf, rows_scaled[r0:r1], cols[c0:c1], inv_t).exp_()
            if (diag := _self_columns(r0, r1, c0, c1, offset, z_hat.device)) is not None:
                tile[diag] = 0.0
            total[r0:r1] += tile.sum(dim=1)
        return total.log_().add_(inv_t)
    # Online log-sum-exp (running max); finfo.min instead of -inf keeps exp(m_old - m_new) finite-or-zero, never NaN.
    low = torch.finfo(z_hat.dtype).min
    run_max = torch.full((a,), low, dtype=z_hat.dtype, device=z_hat.device)
    for r0, r1, c0, c1 in _tiles(a, m, block_rows, block_cols):
        tile = _logits_tile(buf, rows_scaled[r0:r1], cols[c0:c1], 0.0)
        if (diag := _self_columns(r0, r1, c0, c1, offset, z_hat.device)) is not None:
            tile[diag] = float("-inf")
        new_max = torch.maximum(run_max[r0:r1], tile.amax(dim=1)).clamp_min_(low)
        total[r0:r1] = total[r0:r1] * torch.exp(run_max[r0:r1] - new_max) + torch.exp(
            tile - new_max[:, None]
        ).sum(1)
        run_max[r0:r1] = new_max
    return total.log_().add_(run_max)


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
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> torch.Tensor:
    """dJ/dz_hat (A, D) for J = sum_r g_r L_r, from the symmetric form in the module docstring.

    z_hat: (A, D) local rows; cols: (M, D) candidates with the local rows at cols[offset:offset+A]; lse: (A,); lse_cols: (M,);
    g_rows: 0-d upstream gradient of this rank; g_cols: (M,) upstream gradient of the rank owning each column.
    """
    inv_t = 1.0 / temperature
    a, m = z_hat.shape[0], cols.shape[0]
    rows_scaled = z_hat * inv_t
    grad = torch.zeros_like(z_hat)
    buf = z_hat.new_empty(min(block_rows, a), min(block_cols, m))
    weight_buf = torch.empty_like(buf)
    shift = temperature >= SHIFT_MIN_TEMPERATURE
    if shift:
        # P_ij + P_ji = exp(S_ij/tau - 1/tau) * (u_i + u_j) with u = g * exp(1/tau - lse): one exp per element, not two.
        u_cols = g_cols * torch.exp(inv_t - lse_cols)
        u_rows = u_cols[offset : offset + a]
    for r0, r1, c0, c1 in _tiles(a, m, block_rows, block_cols):
        if shift:
            tile = _logits_tile(buf, rows_scaled[r0:r1], cols[c0:c1], inv_t).exp_()
            weight = weight_buf[: r1 - r0, : c1 - c0]
            torch.add(u_rows[r0:r1, None], u_cols[None, c0:c1], out=weight).mul_(tile)
        else:
            tile = _logits_tile(buf, rows_scaled[r0:r1], cols[c0:c1], 0.0)
            weight = torch.exp(tile - lse[r0:r1, None]).mul_(g_rows)
            weight.add_(torch.exp(tile.sub_(lse_cols[None, c0:c1])).mul_(g_cols[None, c0:c1]))
        if (diag := _self_columns(r0, r1, c0, c1, offset, z_hat.device)) is not None:
            weight[diag] = 0.0
        grad[r0:r1].addmm_(weight, cols[c0:c1])
    pos = offset + (torch.arange(a, device=z_hat.device) + n) % a
    grad.sub_(cols[pos] * (2.0 * g_rows))
    return grad.mul_(1.0 / (a * temperature))


def tiled_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
    group=None,
):
    """Loss and the O(A*D) state backward needs: (loss 0-d in z_a's dtype, z_hat (A, D), norm (A,), cols (M, D),
    lse (A,), lse_cols (M,), offset). Without ``group`` the columns are the local rows (cols is z_hat, offset 0)."""
    n = z_a.shape[0]
    z_hat, norm = normalize_rows(torch.cat([z_a, z_b]).to(compute_dtype(z_a.dtype)))
    cols, offset = z_hat, 0
    if group is not None:
        cols, offset = dist_utils.all_gather_rows(z_hat, group)
    lse = rows_lse(z_hat, cols, temperature, offset, block_rows, block_cols)
    pos = offset + (torch.arange(2 * n, device=z_hat.device) + n) % (2 * n)
    pos_logit = (z_hat * cols[pos]).sum(dim=1) / temperature
    lse_cols = lse if group is None else dist_utils.all_gather_rows(lse, group)[0]
    loss = (lse - pos_logit).mean().to(z_a.dtype)
    return loss, z_hat, norm, cols, lse, lse_cols, offset


def tiled_backward(
    grad_out: torch.Tensor,
    dtype: torch.dtype,
    z_hat: torch.Tensor,
    norm: torch.Tensor,
    cols: torch.Tensor,
    lse: torch.Tensor,
    lse_cols: torch.Tensor,
    temperature: float,
    offset: int,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
    group=None,
) -> torch.Tensor:
    """dL/dz (A, D) in ``dtype`` for the upstream gradient ``grad_out`` (0-d), from ``tiled_forward``'s state."""
    n = z_hat.shape[0] // 2
    g = grad_out.to(z_hat.dtype)
    if group is None:
        g_cols = g.expand(cols.shape[0])
    else:
        # Each rank's loss may be scaled differently upstream: weight columns by their owner's gradient.
        g_cols = dist_utils.all_gather_scalar(g, group).repeat_interleave(2 * n)
    dz_hat = rows_grad(
        z_hat, cols, lse, lse_cols, g, g_cols, temperature, offset, n, block_rows, block_cols
    )
    return normalize_backward(dz_hat, z_hat, norm).to(dtype)


class NTXentTiledFunction(torch.autograd.Function):
    """Tiled NT-Xent: forward keeps z_hat, norms and lse (O(A*D)); backward recomputes S block by block."""

    @staticmethod
    def forward(ctx, z_a, z_b, temperature, block_rows, block_cols, group):
        loss, z_hat, norm, cols, lse, lse_cols, offset = tiled_forward(
            z_a, z_b, temperature, block_rows, block_cols, group
        )
        ctx.save_for_backward(z_hat, norm, cols, lse, lse_cols)
        ctx.meta = (temperature, offset, block_rows, block_cols, group, z_a.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        temperature, offset, block_rows, block_cols, group, dtype = ctx.meta
        dz = tiled_backward(
            grad_out, dtype, *ctx.saved_tensors, temperature, offset, block_rows, block_cols, group
        )
        n = dz.shape[0] // 2
        return dz[:n], dz[n:], None, None, None, None


def nt_xent_tiled(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.5,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
    group=None,
) -> torch.Tensor:
    """Tiled NT-Xent (no input checks; see ``fastclr.nt_xent``). z_a, z_b: (N, D). Returns the scalar loss."""
    for name, value in (("block_rows", block_rows), ("block_cols", block_cols)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite, got {temperature}")
    return NTXentTiledFunction.apply(z_a, z_b, float(temperature), block_rows, block_cols, group)

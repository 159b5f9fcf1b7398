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

import torch

from fastclr.nt_xent_spec import (
    EPS,
    SHIFT_MIN_TEMPERATURE,
    ForwardState,
    all_gather_rows,
    all_gather_scalar,
    row_norms,
)

DEFAULT_BLOCK_ROWS = 256
DEFAULT_BLOCK_COLS = (
    1024  # a 256 x 1024 fp32 tile is 1 MiB: it stays in L2 through its elementwise passes
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 accumulate in fp32; fp32 and fp64 stay as they are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_rows(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (A, D) -> (z_hat (A, D), norm (A,) clamped at EPS) in z's dtype."""
    norm = row_norms(z)
    return z / norm[:, None], norm


def normalize_backward(
    dz_hat: torch.Tensor, z_hat: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """Chain rule through z_hat = z / max(||z||, eps): project out the radial part, divide by the norm.

    Rows whose norm was clamped (||z|| <= eps) have z_hat = z/eps, whose Jacobian is simply I/eps.
    """
    radial = (z_hat * dz_hat).sum(dim=1, keepdim=True)
    dz = (dz_hat - z_hat * radial) / norm[:, None]
    clamped = (norm <= EPS)[:, None]  # chosen on the device: no host sync
    return torch.where(clamped, dz_hat / EPS, dz)


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
    state: ForwardState,
    g_rows: torch.Tensor,
    g_cols: torch.Tensor,
    temperature: float,
    block_rows: int,
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> torch.Tensor:
    """dJ/dz_hat (A, D) for J = sum_r g_r L_r, from the symmetric form in the module docstring.

    state: the forward's (stats = lse, with cols[offset:offset+A] the local rows); g_rows: 0-d upstream gradient of this
    rank; g_cols: (M,) upstream gradient of the rank owning each column.
    """
    z_hat, cols, offset = state.zhat, state.cols, state.offset
    lse, lse_cols = state.stats, state.stats_cols
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
    pos = offset + (torch.arange(a, device=z_hat.device) + a // 2) % a
    grad.sub_(cols[pos] * (2.0 * g_rows))
    return grad.mul_(1.0 / (a * temperature))


def tiled_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    *,
    group=None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> tuple[torch.Tensor, ForwardState]:
    """(loss 0-d in z_a's dtype, the O(A*D) state backward needs, with stats = lse (A,)).

    Without ``group`` the columns are the local rows (cols is zhat, offset 0).
    """
    n = z_a.shape[0]
    z_hat, norm = normalize_rows(torch.cat([z_a, z_b]).to(compute_dtype(z_a.dtype)))
    cols, offset = all_gather_rows(z_hat, group)
    lse = rows_lse(z_hat, cols, temperature, offset, block_rows, block_cols)
    pos = offset + (torch.arange(2 * n, device=z_hat.device) + n) % (2 * n)
    pos_logit = (z_hat * cols[pos]).sum(dim=1) / temperature
    lse_cols, _ = all_gather_rows(lse, group)
    loss = (lse - pos_logit).mean().to(z_a.dtype)
    state = ForwardState(
        zhat=z_hat, norm=norm, stats=lse, cols=cols, stats_cols=lse_cols, offset=offset
    )
    return loss, state


def tiled_backward(
    grad_out: torch.Tensor,
    state: ForwardState,
    temperature: float,
    *,
    dtype: torch.dtype,
    group=None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz_a, dz_b), each (N, D) in ``dtype`` and views of one (A, D) buffer, for the upstream gradient ``grad_out``
    (0-d) and ``tiled_forward``'s state."""
    a = state.zhat.shape[0]
    g = grad_out.to(state.zhat.dtype)
    # Each rank's loss may be scaled differently upstream: weight columns by their owner's gradient.
    g_cols = g.expand(a) if group is None else all_gather_scalar(g, group).repeat_interleave(a)
    dz_hat = rows_grad(state, g, g_cols, temperature, block_rows, block_cols)
    dz = normalize_backward(dz_hat, state.zhat, state.norm).to(dtype)
    return dz[: a // 2], dz[a // 2 :]


def empty_state(z_a: torch.Tensor) -> ForwardState:
    """The single-process state ``tiled_forward`` returns for z_a (N, D), as empty tensors (the custom op's fake)."""
    a, d = 2 * z_a.shape[0], z_a.shape[1]
    work = dict(dtype=compute_dtype(z_a.dtype), device=z_a.device)
    return ForwardState.local(
        torch.empty((a, d), **work), torch.empty(a, **work), torch.empty(a, **work)
    )


class NTXentTiledFunction(torch.autograd.Function):
    """Tiled NT-Xent: forward keeps z_hat, norms and lse (O(A*D)); backward recomputes S block by block."""

    @staticmethod
    def forward(ctx, z_a, z_b, temperature, block_rows, block_cols, group):
        options = dict(group=group, block_rows=block_rows, block_cols=block_cols)
        loss, state = tiled_forward(z_a, z_b, temperature, **options)
        ctx.save_for_backward(*state.tensors())
        ctx.offset, ctx.temperature, ctx.dtype = state.offset, temperature, z_a.dtype
        ctx.options = options
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        state = ForwardState(*ctx.saved_tensors, offset=ctx.offset)
        dz_a, dz_b = tiled_backward(
            grad_out, state, ctx.temperature, dtype=ctx.dtype, **ctx.options
        )
        return dz_a, dz_b, None, None, None, None


def nt_xent_tiled(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.5,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
    group=None,
) -> torch.Tensor:
    """Tiled NT-Xent with autograd. z_a, z_b: (N, D), checked by the caller (see ``fastclr.nt_xent``); only the tile
    sizes, which nothing else takes, are checked here. Returns the scalar loss."""
    for name, value in (("block_rows", block_rows), ("block_cols", block_cols)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return NTXentTiledFunction.apply(z_a, z_b, float(temperature), block_rows, block_cols, group)

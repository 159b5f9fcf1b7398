r"""Memory-lean NT-Xent in plain PyTorch: tiles of S, per-row softmax statistics, single-pass backward.

Notation: z = [z_a; z_b] (A = 2N rows), z_hat_i = z_i / max(||z_i||, eps), S = z_hat z_hat^T over the candidate columns
(the local rows, or the rows of every rank when negatives are gathered), pos(i) = (i + N) mod A.

    forward    lse_i = log sum_{j != i} exp(S_ij / tau),      L = 1/A * sum_i (lse_i - S_{i,pos(i)} / tau)
    backward   dL/dz_hat_i = g/(A tau) * [ sum_{j != i} (P_ij + P_ji) z_hat_j - 2 z_hat_pos(i) ],
               P_ij = exp(S_ij/tau - lse_i),   P_ji = exp(S_ij/tau - lse_j)        (S is symmetric)
    chain      dL/dz_i = (dz_hat_i - z_hat_i <z_hat_i, dz_hat_i>) / ||z_i||

One process, tau >= SHIFT_MIN_TEMPERATURE (the usual case): S is square and symmetric and the shift fixed, so only the
upper-triangle tiles are computed (``symmetric_row_stats``, ``symmetric_grad``): each gives the sums, and the gradient
terms, of its rows and of its columns. Two GEMM-equivalents in all: half for S forward, half for S again, one for
W @ Z. Otherwise (negatives gathered from every rank, or a small tau with a running max), each row block recomputes its
(B, M) slice of S and gets its full gradient from that slice alone: no transpose pass, no scatter, no communication in
backward, three GEMMs in all. Only O(A*D) state and per-row statistics are kept:
lse_i as the pair (m_i, log l_i), m_i a logit exactly as the tiles compute it, so that the backward's exponents
S_ij/tau - m_i stay exact near each row's maximum at any temperature (see ``row_stats``).

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

DEFAULT_BLOCK_ROWS = (
    512  # also the side of the square tiles of the single-process upper-triangle schedule
)
DEFAULT_BLOCK_COLS = (
    1024  # a 512 x 1024 fp32 tile is 2 MiB: it stays in L2 through its elementwise passes
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


def _diagonal(
    r0: int, r1: int, c0: int, c1: int, shift: int, device, lo: int = 0, hi: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(tile rows, tile cols, rows) of the entries S_{i, i+shift}, lo <= i < hi, that fall inside a tile, or None.

    shift = offset gives the self-similarities; offset +- N the positives of the first and second view.
    """
    start, stop = max(r0, c0 - shift, lo), min(r1, c1 - shift, r1 if hi is None else hi)
    if start >= stop:
        return None
    i = torch.arange(start, stop, device=device)
    return i - r0, i + shift - c0, i


def _self_columns(
    r0: int, r1: int, c0: int, c1: int, offset: int, device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tile rows, tile cols) of the self-similarity entries S_{i, offset+i} that fall inside a tile, or None."""
    found = _diagonal(r0, r1, c0, c1, offset, device)
    return None if found is None else found[:2]


def _copy_positives(
    out: torch.Tensor, tile: torch.Tensor, r0, r1, c0, c1, offset: int, a: int
) -> None:
    """out[i] = the tile's entry for (i, pos(i)), pos(i) = offset + (i + A/2) mod A, for the rows whose positive it
    holds."""
    n = a // 2
    for shift, lo, hi in ((offset + n, 0, n), (offset - n, n, a)):
        if (found := _diagonal(r0, r1, c0, c1, shift, tile.device, lo, hi)) is not None:
            rows, cols, i = found
            out[i] = tile[rows, cols]


def _logits_tile(
    buf: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, inv_t: float, shift: float
) -> torch.Tensor:
    """buf[:B, :C] = (rows @ cols^T) / tau - shift: the shift written by the fill, 1/tau and the shift applied by the GEMM
    (no extra pass).

    1/tau scales the finished dot product, never an operand, so S_ij/tau is the same float whichever of z_hat_i, z_hat_j
    is the row: the backward's P_ji = exp(S_ij/tau - lse_j) then sees exactly the logit the forward summed into lse_j.
    Scaling an operand instead rounds the two differently, an error of ~1e-7/tau in the exponent that grows without
    bound as tau shrinks (a 7% gradient error at tau = 1e-6).
    """
    out = buf[: rows.shape[0], : cols.shape[0]]
    return out.fill_(-shift).addmm_(rows, cols.T, alpha=inv_t)


def row_stats(
    z_hat: torch.Tensor,
    cols: torch.Tensor,
    temperature: float,
    offset: int,
    block_rows: int,
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row softmax statistics over the non-self columns and the positives' logits:
    (stats (A, 3) = (m_i, log l_i, k_i), pos (A,) = S_{i,pos(i)}/tau - m_i), with lse_i = m_i + log l_i,
    k_i the column of the row's maximum (-1 with the fixed shift, which needs none) and
    l_i = sum_{j != i} exp(S_ij/tau - m_i), so that L_i = log l_i - pos_i.

    m_i is 1/tau (the fixed shift) for tau >= SHIFT_MIN_TEMPERATURE, else the row's largest logit. lse_i itself is never
    stored: it is about 1/tau, and rounded to the dtype it would be off by ~1e-7/tau, which exp(S_ij/tau - lse_i) turns
    into a relative error of the same size (7% at tau = 1e-6). m_i is a logit exactly as the tiles compute it, so the
    backward's S_ij/tau - m_i is exact near the maximum and the pair keeps the backward accurate at any temperature. The
    positive's logit is read from its tile for the same reason: L_i is a difference of two logits, and computing one of
    them another way would leave an error of ~1e-7/tau in it.

    Works on (block_rows, block_cols) tiles that stay in cache, so memory is O(A*D + tile) whatever the batch.
    """
    inv_t = 1.0 / temperature
    a, m = z_hat.shape[0], cols.shape[0]
    buf = z_hat.new_empty(min(block_rows, a), min(block_cols, m))
    total = z_hat.new_zeros(a)
    pos = z_hat.new_empty(a)
    if temperature >= SHIFT_MIN_TEMPERATURE:
        # |S| <= 1, so S/tau - 1/tau <= 0: a fixed shift replaces the running max and exp cannot overflow.
        for r0, r1, c0, c1 in _tiles(a, m, block_rows, block_cols):
            tile = _logits_tile(buf, z_hat[r0:r1], cols[c0:c1], inv_t, inv_t)
            _copy_positives(pos, tile, r0, r1, c0, c1, offset, a)
            tile.exp_()
            if (diag := _self_columns(r0, r1, c0, c1, offset, z_hat.device)) is not None:
                tile[diag] = 0.0
            total[r0:r1] += tile.sum(dim=1)
        no_arg = torch.full_like(total, -1.0)
        return torch.stack([torch.full_like(total, inv_t), total.log_(), no_arg], dim=1), pos
    # Online log-sum-exp (running max); finfo.min instead of -inf keeps exp(m_old - m_new) finite-or-zero, never NaN.
    low = torch.finfo(z_hat.dtype).min
    run_max = torch.full((a,), low, dtype=z_hat.dtype, device=z_hat.device)
    run_arg = torch.full_like(run_max, -1.0)
    for r0, r1, c0, c1 in _tiles(a, m, block_rows, block_cols):
        tile = _logits_tile(buf, z_hat[r0:r1], cols[c0:c1], inv_t, 0.0)
        _copy_positives(pos, tile, r0, r1, c0, c1, offset, a)
        if (diag := _self_columns(r0, r1, c0, c1, offset, z_hat.device)) is not None:
            tile[diag] = float("-inf")
        tile_max, tile_arg = tile.max(dim=1)
        run_arg[r0:r1] = torch.where(tile_max > run_max[r0:r1], tile_arg + c0, run_arg[r0:r1])
        new_max = torch.maximum(run_max[r0:r1], tile_max).clamp_min_(low)
        total[r0:r1] = total[r0:r1] * torch.exp(run_max[r0:r1] - new_max) + torch.exp(
            tile - new_max[:, None]
        ).sum(1)
        run_max[r0:r1] = new_max
    return torch.stack([run_max, total.log_(), run_arg], dim=1), pos.sub_(run_max)


def rows_grad(
    state: ForwardState,
    g_rows: torch.Tensor,
    g_cols: torch.Tensor,
    temperature: float,
    block_rows: int,
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> torch.Tensor:
    """dJ/dz_hat (A, D) for J = sum_r g_r L_r, from the symmetric form in the module docstring.

    state: the forward's (stats = ``row_stats``, with cols[offset:offset+A] the local rows); g_rows: 0-d upstream
    gradient of this rank; g_cols: (M,) upstream gradient of the rank owning each column.
    """
    z_hat, cols, offset = state.zhat, state.cols, state.offset
    m_rows, log_l_rows = state.stats[:, 0], state.stats[:, 1]
    m_cols, log_l_cols = state.stats_cols[:, 0], state.stats_cols[:, 1]
    inv_t = 1.0 / temperature
    a, m = z_hat.shape[0], cols.shape[0]
    grad = torch.zeros_like(z_hat)
    buf = z_hat.new_empty(min(block_rows, a), min(block_cols, m))
    weight_buf = torch.empty_like(buf)
    shift = temperature >= SHIFT_MIN_TEMPERATURE
    if shift:
        # P_ij + P_ji = exp(S_ij/tau - 1/tau) * (u_i + u_j) with u = g / l: one exp per element, not two.
        u_cols = g_cols * torch.exp(-log_l_cols)
        u_rows = u_cols[offset : offset + a]
    else:
        # The column index of each column's row maximum (exact in fp32 below 2^24 columns).
        arg_cols = state.stats_cols[:, 2]
        row_ids = torch.arange(offset, offset + a, device=z_hat.device, dtype=arg_cols.dtype)
    for r0, r1, c0, c1 in _tiles(a, m, block_rows, block_cols):
        if shift:
            tile = _logits_tile(buf, z_hat[r0:r1], cols[c0:c1], inv_t, inv_t).exp_()
            weight = weight_buf[: r1 - r0, : c1 - c0]
            torch.add(u_rows[r0:r1, None], u_cols[None, c0:c1], out=weight).mul_(tile)
        else:
            # S_ij/tau - m first: near the maximum both are large and their difference is exact. P_ji reuses S_ij,
            # which can differ from the S_ji row j's maximum was taken from by an ulp (a GEMM is not bitwise
            # symmetric), ~1e-7/tau in the exponent: at the argmax, where that matters, the difference is exactly 0.
            tile = _logits_tile(buf, z_hat[r0:r1], cols[c0:c1], inv_t, 0.0)
            weight = torch.exp((tile - m_rows[r0:r1, None]).sub_(log_l_rows[r0:r1, None]))
            weight.mul_(g_rows)
            tile.sub_(m_cols[None, c0:c1])
            own_max = arg_cols[None, c0:c1] == row_ids[r0:r1, None]
            col_part = tile.masked_fill_(own_max, 0.0).sub_(log_l_cols[None, c0:c1]).exp_()
            weight.add_(col_part.mul_(g_cols[None, c0:c1]))
        if (diag := _self_columns(r0, r1, c0, c1, offset, z_hat.device)) is not None:
            weight[diag] = 0.0
        grad[r0:r1].addmm_(weight, cols[c0:c1])
    pos = offset + (torch.arange(a, device=z_hat.device) + a // 2) % a
    grad.sub_(cols[pos] * (2.0 * g_rows))
    return grad.mul_(1.0 / (a * temperature))


def _square_tiles(a: int, block: int):
    """(row start, row stop, col start, col stop) of the upper triangle of the (a, a) logits in square blocks, the
    diagonal blocks included."""
    for r0 in range(0, a, block):
        for c0 in range(r0, a, block):
            yield r0, min(r0 + block, a), c0, min(c0 + block, a)


def symmetric_row_stats(
    z_hat: torch.Tensor, temperature: float, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_stats`` for one process and tau >= SHIFT_MIN_TEMPERATURE from the upper-triangle tiles alone.

    With the fixed shift m_i = 1/tau the row sums l_i = sum_{j != i} exp(S_ij/tau - 1/tau) are plain sums of a
    symmetric matrix, so tile (I, J), J > I, gives the sums of rows I (over its rows) and of rows J (over its columns):
    half the GEMM and half the exps of ``row_stats``. The positive pairs (i, i + N) lie in the upper triangle and give
    the positive logit of both of their rows.
    """
    inv_t = 1.0 / temperature
    a, n = z_hat.shape[0], z_hat.shape[0] // 2
    buf = z_hat.new_empty(min(block, a), min(block, a))
    total = z_hat.new_zeros(a)
    pos = z_hat.new_empty(a)
    for r0, r1, c0, c1 in _square_tiles(a, block):
        tile = _logits_tile(buf, z_hat[r0:r1], z_hat[c0:c1], inv_t, inv_t)
        if (found := _diagonal(r0, r1, c0, c1, n, z_hat.device)) is not None:
            rows, cols, i = found
            pos[i] = pos[i + n] = tile[rows, cols]
        tile.exp_()
        if r0 == c0:
            tile.diagonal().zero_()
        else:
            total[c0:c1] += tile.sum(dim=0)
        total[r0:r1] += tile.sum(dim=1)
    no_arg = torch.full_like(total, -1.0)
    return torch.stack([torch.full_like(total, inv_t), total.log_(), no_arg], dim=1), pos


def symmetric_grad(
    state: ForwardState, g: torch.Tensor, temperature: float, block: int
) -> torch.Tensor:
    """``rows_grad`` for one process and tau >= SHIFT_MIN_TEMPERATURE from the upper-triangle tiles alone.

    The weights W_ij = (P_ij + P_ji) g = exp(S_ij/tau - 1/tau) (u_i + u_j), u = g / l, are symmetric: tile (I, J),
    J > I, adds W @ z_hat_J to rows I and W^T @ z_hat_I to rows J. S is recomputed once per pair of blocks, so the
    backward is one GEMM for the products and half of one for S.
    """
    z_hat = state.zhat
    inv_t = 1.0 / temperature
    a = z_hat.shape[0]
    u = g * torch.exp(-state.stats[:, 1])
    grad = torch.zeros_like(z_hat)
    buf = z_hat.new_empty(min(block, a), min(block, a))
    weight_buf = torch.empty_like(buf)
    for r0, r1, c0, c1 in _square_tiles(a, block):
        tile = _logits_tile(buf, z_hat[r0:r1], z_hat[c0:c1], inv_t, inv_t).exp_()
        weight = weight_buf[: r1 - r0, : c1 - c0]
        torch.add(u[r0:r1, None], u[None, c0:c1], out=weight).mul_(tile)
        if r0 == c0:
            weight.diagonal().zero_()
        else:
            grad[c0:c1].addmm_(weight.T, z_hat[r0:r1])
        grad[r0:r1].addmm_(weight, z_hat[c0:c1])
    pos = (torch.arange(a, device=z_hat.device) + a // 2) % a
    grad.sub_(z_hat[pos] * (2.0 * g))
    return grad.mul_(1.0 / (a * temperature))


def _symmetric(group, temperature: float) -> bool:
    """Whether the upper-triangle schedule applies: one process (S square and symmetric) and the fixed shift."""
    return group is None and temperature >= SHIFT_MIN_TEMPERATURE


def tiled_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    *,
    group=None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> tuple[torch.Tensor, ForwardState]:
    """(loss 0-d in z_a's dtype, the O(A*D) state backward needs, with stats = ``row_stats`` (A, 3)).

    Without ``group`` the columns are the local rows (cols is zhat, offset 0).
    """
    z_hat, norm = normalize_rows(torch.cat([z_a, z_b]).to(compute_dtype(z_a.dtype)))
    cols, offset = all_gather_rows(z_hat, group)
    if _symmetric(group, temperature):
        stats, pos = symmetric_row_stats(z_hat, temperature, block_rows)
    else:
        stats, pos = row_stats(z_hat, cols, temperature, offset, block_rows, block_cols)
    stats_cols, _ = all_gather_rows(stats, group)
    loss = (stats[:, 1] - pos).mean().to(z_a.dtype)  # lse_i - S_i,pos(i)/tau
    state = ForwardState(
        zhat=z_hat, norm=norm, stats=stats, cols=cols, stats_cols=stats_cols, offset=offset
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
    if _symmetric(group, temperature):
        dz_hat = symmetric_grad(state, g, temperature, block_rows)
    else:
        dz_hat = rows_grad(state, g, g_cols, temperature, block_rows, block_cols)
    dz = normalize_backward(dz_hat, state.zhat, state.norm).to(dtype)
    return dz[: a // 2], dz[a // 2 :]


def empty_state(z_a: torch.Tensor) -> ForwardState:
    """The single-process state ``tiled_forward`` returns for z_a (N, D), as empty tensors (the custom op's fake)."""
    a, d = 2 * z_a.shape[0], z_a.shape[1]
    work = dict(dtype=compute_dtype(z_a.dtype), device=z_a.device)
    return ForwardState.local(
        torch.empty((a, d), **work), torch.empty(a, **work), torch.empty((a, 3), **work)
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

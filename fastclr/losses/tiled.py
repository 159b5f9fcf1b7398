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

The contrastive-loss family (``fastclr.losses.dcl``, ``supcon``, ``memory_bank``) runs on the same tiles through
``row_terms``, whose options leave pos(i) out of the row sums too (DCL), compare labels inside each tile and sum the
logits of the label positives P(i) = {j != i : y_j = y_i} (SupCon), or add K extra columns x_k without gradient (a memory
bank). Its backward takes per-row coefficients c_i and e_i, the upstream gradients of lse_i and of the label sums:

    tau dJ/dz_hat_i = sum_{kept j} (c_i P_ij + c_j P_ji) z_hat_j + sum_{p in P(i)} (e_i + e_p) z_hat_p + sum_k c_i P_ik x_k

The last sum needs no second pass: the extra columns have no gradient, so the forward keeps sum_k P_ik x_k (A, D) from
the tiles it already computes (FlashAttention's forward, with the bank as keys and values): a bank costs two (A x K x D)
GEMMs in all where recomputing its tiles in the backward would cost three.
"""

from __future__ import annotations

from typing import NamedTuple

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


class RowStats(NamedTuple):
    """What ``row_stats`` keeps per row, O(A) in all (A local rows)."""

    stats: torch.Tensor  # (A, 3): (m_i, log l_i, k_i), see ``row_stats``
    pos: (
        torch.Tensor
    )  # (A,): S_{i,pos(i)}/tau - m_i, the pair positive's logit as its tile holds it
    # (A, 2): (sum_{p in P(i)} (S_ip/tau - m_i), |P(i)|) with labels, else None
    labelled: torch.Tensor | None
    # (A, D): sum_k exp(S_ik/tau - m_i) x_k over the extra columns, with ``extra_sums``, else None
    extra_sum: torch.Tensor | None = None


def _pos_entries(r0: int, r1: int, c0: int, c1: int, offset: int, a: int, device):
    """(tile rows, tile cols) index pairs of the entries S_{i, pos(i)}, pos(i) = offset + (i + A/2) mod A, in a tile."""
    n = a // 2
    found = (
        _diagonal(r0, r1, c0, c1, shift, device, lo, hi)
        for shift, lo, hi in ((offset + n, 0, n), (offset - n, n, a))
    )
    return [f[:2] for f in found if f is not None]


def _excluded(r0: int, r1: int, c0: int, c1: int, offset: int, a: int, exclude_pos: bool, device):
    """(tile rows, tile cols) index pairs of a tile's entries left out of the row sums: S_{i, offset+i}, and with
    ``exclude_pos`` also S_{i, pos(i)}."""
    diag = _self_columns(r0, r1, c0, c1, offset, device)
    found = [] if diag is None else [diag]
    if exclude_pos:
        found += _pos_entries(r0, r1, c0, c1, offset, a, device)
    return found


def _same_labels(labels, r0: int, r1: int, c0: int, c1: int, offset: int, device) -> torch.Tensor:
    """(B, C) bool tile of P: y_i == y_j and j != i, compared inside the tile (no (A, M) mask exists)."""
    y_rows, y_cols = labels
    same = y_rows[r0:r1, None] == y_cols[None, c0:c1]
    if (diag := _self_columns(r0, r1, c0, c1, offset, device)) is not None:
        same[diag] = False
    return same


def row_stats(
    z_hat: torch.Tensor,
    cols: torch.Tensor,
    temperature: float,
    offset: int,
    block_rows: int,
    block_cols: int = DEFAULT_BLOCK_COLS,
    *,
    exclude_pos: bool = False,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra: torch.Tensor | None = None,
    extra_sums: bool = False,
) -> RowStats:
    """Per-row softmax statistics over the kept columns, the pair positives' logits and, with labels, the label
    positives' logits: ``RowStats`` with stats (A, 3) = (m_i, log l_i, k_i), lse_i = m_i + log l_i,
    l_i = sum_{kept j} exp(S_ij/tau - m_i), k_i the column of the row's maximum (-1 with the fixed shift, which needs
    none), pos_i = S_{i,pos(i)}/tau - m_i, so that NT-Xent's L_i = log l_i - pos_i.

    The kept columns are the candidates ``cols`` (M, D) but row i's own, S_{i, offset+i}, and with ``exclude_pos`` its
    positive's too (DCL), then the ``extra`` (K, D) columns, which have no gradient (a memory bank; their column
    indices k_i count on from M). With ``labels`` = (y (A,), y_cols (M,)) labels are compared inside each tile and
    labelled[i] = (sum_{p in P(i)} (S_ip/tau - m_i), |P(i)|), P(i) = {j != i : y_j = y_i} among ``cols``; not together
    with ``exclude_pos``, and below SHIFT_MIN_TEMPERATURE only (with the fixed shift the label sums come from
    per-class sums, ``_label_terms``).

    With ``extra_sums`` the same pass also keeps extra_sum_i = sum_k exp(S_ik/tau - m_i) x_k (A, D), rescaled when
    the running maximum moves (FlashAttention's recurrence). The extra columns have no gradient, so their whole part of
    the backward is then c_i/l_i * extra_sum_i (``rows_grad``): one GEMM in the forward instead of two in the backward.

    m_i is 1/tau (the fixed shift) for tau >= SHIFT_MIN_TEMPERATURE, else the row's largest logit. lse_i itself is never
    stored: it is about 1/tau, and rounded to the dtype it would be off by ~1e-7/tau, which exp(S_ij/tau - lse_i) turns
    into a relative error of the same size (7% at tau = 1e-6). m_i is a logit exactly as the tiles compute it, so the
    backward's S_ij/tau - m_i is exact near the maximum and the pair keeps the backward accurate at any temperature. The
    positives' logits are read from their tiles for the same reason: a loss is a difference of logits, and computing
    one of them another way would leave an error of ~1e-7/tau in it; the label sums are kept relative to the running
    maximum as it moves, for the same reason.

    Works on (block_rows, block_cols) tiles that stay in cache, so memory is O((A + M + K) D + tile) whatever the batch.
    """
    if labels is not None and temperature >= SHIFT_MIN_TEMPERATURE:
        raise ValueError("row_stats: with the fixed shift the label sums come from _label_terms")
    inv_t = 1.0 / temperature
    a, m = z_hat.shape[0], cols.shape[0]
    sources = [(cols, True)] + ([] if extra is None else [(extra, False)])
    width = max(min(block_cols, src.shape[0]) for src, _ in sources)
    buf = z_hat.new_empty(min(block_rows, a), width)
    total = z_hat.new_zeros(a)
    pos = z_hat.new_zeros(a)
    label_sum = count = None
    extra_sum = z_hat.new_zeros(a, z_hat.shape[1]) if extra is not None and extra_sums else None
    if labels is not None:
        label_sum, count = z_hat.new_zeros(a), z_hat.new_zeros(a)
    device = z_hat.device
    if temperature >= SHIFT_MIN_TEMPERATURE:
        # |S| <= 1, so S/tau - 1/tau <= 0: a fixed shift replaces the running max and exp cannot overflow.
        for src, in_batch in sources:
            for r0, r1, c0, c1 in _tiles(a, src.shape[0], block_rows, block_cols):
                tile = _logits_tile(buf, z_hat[r0:r1], src[c0:c1], inv_t, inv_t)
                if in_batch:
                    _copy_positives(pos, tile, r0, r1, c0, c1, offset, a)
                tile.exp_()
                if in_batch:
                    for idx in _excluded(r0, r1, c0, c1, offset, a, exclude_pos, device):
                        tile[idx] = 0.0
                elif extra_sum is not None:
                    extra_sum[r0:r1].addmm_(tile, src[c0:c1])
                total[r0:r1] += tile.sum(dim=1)
        no_arg = torch.full_like(total, -1.0)
        stats = torch.stack([torch.full_like(total, inv_t), total.log_(), no_arg], dim=1)
        return RowStats(stats, pos, None, extra_sum)
    # Online log-sum-exp (running max); finfo.min instead of -inf keeps exp(m_old - m_new) finite-or-zero, never NaN.
    low = torch.finfo(z_hat.dtype).min
    run_max = torch.full((a,), low, dtype=z_hat.dtype, device=device)
    run_arg = torch.full_like(run_max, -1.0)
    for src, in_batch in sources:
        first_col = 0 if in_batch else m
        for r0, r1, c0, c1 in _tiles(a, src.shape[0], block_rows, block_cols):
            tile = _logits_tile(buf, z_hat[r0:r1], src[c0:c1], inv_t, 0.0)
            if in_batch:
                _copy_positives(pos, tile, r0, r1, c0, c1, offset, a)
                for idx in _excluded(r0, r1, c0, c1, offset, a, exclude_pos, device):
                    tile[idx] = float("-inf")
            old_max = run_max[r0:r1]
            tile_max, tile_arg = tile.max(dim=1)
            run_arg[r0:r1] = torch.where(
                tile_max > old_max, tile_arg + first_col + c0, run_arg[r0:r1]
            )
            new_max = torch.maximum(old_max, tile_max).clamp_min_(low)
            if labels is not None:
                # kept relative to the running maximum: shift what is summed so far to the new one
                label_sum[r0:r1] += count[r0:r1] * (old_max - new_max)
                if in_batch:
                    same = _same_labels(labels, r0, r1, c0, c1, offset, device)
                    label_sum[r0:r1] += torch.where(same, tile - new_max[:, None], 0.0).sum(dim=1)
                    count[r0:r1] += same.sum(dim=1)
            rescale = torch.exp(old_max - new_max)
            weights = torch.exp(tile - new_max[:, None])
            total[r0:r1] = total[r0:r1] * rescale + weights.sum(1)
            # The extra columns come last: extra_sum is zero before them.
            if not in_batch and extra_sum is not None:
                extra_sum[r0:r1].mul_(rescale[:, None]).addmm_(weights, src[c0:c1])
            run_max[r0:r1] = new_max
    stats = torch.stack([run_max, total.log_(), run_arg], dim=1)
    labelled = None if labels is None else torch.stack([label_sum, count], 1)
    return RowStats(stats, pos.sub_(run_max), labelled, extra_sum)


def rows_grad(
    z_hat: torch.Tensor,
    cols: torch.Tensor,
    stats: torch.Tensor,
    stats_cols: torch.Tensor,
    offset: int,
    c_rows: torch.Tensor,
    c_cols: torch.Tensor,
    temperature: float,
    block_rows: int,
    block_cols: int = DEFAULT_BLOCK_COLS,
    *,
    exclude_pos: bool = False,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
    e_rows: torch.Tensor | None = None,
    e_cols: torch.Tensor | None = None,
    extra_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """tau * dJ/dz_hat (A, D) for J = sum_i c_i lse_i + sum_i e_i sum_{p in P(i)} S_ip/tau over the rows of every
    rank, from the symmetric form in the module docstring:

        tau dJ/dz_hat_i = sum_{kept j} (c_i P_ij + c_j P_ji) z_hat_j + sum_{p in P(i)} (e_i + e_p) z_hat_p
                          + sum_k c_i P_ik x_k                      (x_k the extra columns, which have no gradient)

    z_hat, cols, stats, offset, exclude_pos, labels: as ``row_stats`` had them; stats_cols (M, 3): the stats of
    every column's row; c_rows (A,), c_cols (M,): the coefficients c of the local rows and of every column (the upstream
    gradient of each row's lse, gathered from its rank); e_rows, e_cols likewise for the label sums. extra_sum: what
    ``row_stats(extra_sums=True)`` kept of the extra columns, their whole term:
    sum_k c_i P_ik x_k = c_i/l_i extra_sum_i.
    """
    m_rows, log_l_rows = stats[:, 0], stats[:, 1]
    m_cols, log_l_cols = stats_cols[:, 0], stats_cols[:, 1]
    inv_t = 1.0 / temperature
    a, m = z_hat.shape[0], cols.shape[0]
    device = z_hat.device
    grad = torch.zeros_like(z_hat)
    buf = z_hat.new_empty(min(block_rows, a), min(block_cols, m))
    weight_buf = torch.empty_like(buf)
    shift = temperature >= SHIFT_MIN_TEMPERATURE
    if shift:
        # P_ij c_i + P_ji c_j = exp(S_ij/tau - 1/tau) * (u_i + u_j) with u = c / l: one exp per element, not two.
        u_cols = c_cols * torch.exp(-log_l_cols)
        u_rows = c_rows * torch.exp(-log_l_rows)
    else:
        # The column index of each column's row maximum (exact in fp32 below 2^24 columns).
        arg_cols = stats_cols[:, 2]
        row_ids = torch.arange(offset, offset + a, device=device, dtype=arg_cols.dtype)
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
            weight.mul_(c_rows[r0:r1, None])
            tile.sub_(m_cols[None, c0:c1])
            own_max = arg_cols[None, c0:c1] == row_ids[r0:r1, None]
            col_part = tile.masked_fill_(own_max, 0.0).sub_(log_l_cols[None, c0:c1]).exp_()
            weight.add_(col_part.mul_(c_cols[None, c0:c1]))
        for idx in _excluded(r0, r1, c0, c1, offset, a, exclude_pos, device):
            weight[idx] = 0.0
        if labels is not None:
            same = _same_labels(labels, r0, r1, c0, c1, offset, device)
            weight.add_(torch.add(e_rows[r0:r1, None], e_cols[None, c0:c1]).mul_(same))
        grad[r0:r1].addmm_(weight, cols[c0:c1])
    if extra_sum is not None:
        grad.add_(extra_sum * (c_rows * torch.exp(-log_l_rows))[:, None])
    return grad


def _square_tiles(a: int, block: int):
    """(row start, row stop, col start, col stop) of the upper triangle of the (a, a) logits in square blocks, the
    diagonal blocks included."""
    for r0 in range(0, a, block):
        for c0 in range(r0, a, block):
            yield r0, min(r0 + block, a), c0, min(c0 + block, a)


def symmetric_row_stats(
    z_hat: torch.Tensor,
    temperature: float,
    block: int,
    *,
    exclude_pos: bool = False,
) -> RowStats:
    """``row_stats`` for one process and tau >= SHIFT_MIN_TEMPERATURE from the upper-triangle tiles alone.

    With the fixed shift m_i = 1/tau the row sums l_i = sum_{kept j} exp(S_ij/tau - 1/tau) are plain sums of a
    symmetric matrix, so tile (I, J), J > I, gives the sums of rows I (over its rows) and of rows J (over its columns):
    half the GEMM and half the exps of ``row_stats``. The positive pairs (i, i + N) lie in the upper triangle and give
    the positive logit of both of their rows. What is left out (self, with ``exclude_pos`` the positives) is symmetric
    too. (Label positives with the fixed shift come from per-class sums, ``_label_terms``, not from the tiles.)
    """
    inv_t = 1.0 / temperature
    a, n = z_hat.shape[0], z_hat.shape[0] // 2
    device = z_hat.device
    buf = z_hat.new_empty(min(block, a), min(block, a))
    total = z_hat.new_zeros(a)
    pos = z_hat.new_empty(a)
    for r0, r1, c0, c1 in _square_tiles(a, block):
        tile = _logits_tile(buf, z_hat[r0:r1], z_hat[c0:c1], inv_t, inv_t)
        if (found := _diagonal(r0, r1, c0, c1, n, device)) is not None:
            rows, cols, i = found
            pos[i] = pos[i + n] = tile[rows, cols]
        tile.exp_()
        if r0 == c0:
            tile.diagonal().zero_()
        if exclude_pos:
            for idx in _pos_entries(r0, r1, c0, c1, 0, a, device):
                tile[idx] = 0.0
        if r0 != c0:
            total[c0:c1] += tile.sum(dim=0)
        total[r0:r1] += tile.sum(dim=1)
    no_arg = torch.full_like(total, -1.0)
    stats = torch.stack([torch.full_like(total, inv_t), total.log_(), no_arg], dim=1)
    return RowStats(stats, pos, None)


def symmetric_grad(
    z_hat: torch.Tensor,
    stats: torch.Tensor,
    c: torch.Tensor,
    temperature: float,
    block: int,
    *,
    exclude_pos: bool = False,
) -> torch.Tensor:
    """``rows_grad`` for one process and tau >= SHIFT_MIN_TEMPERATURE from the upper-triangle tiles alone.

    The weights W_ij = c_i P_ij + c_j P_ji = exp(S_ij/tau - 1/tau) (u_i + u_j), u = c / l, are symmetric: tile (I, J), J > I, adds W @ z_hat_J to rows I and W^T @ z_hat_I to rows J. S is
    recomputed once per pair of blocks, so the backward is one GEMM for the products and half of one for S.
    """
    inv_t = 1.0 / temperature
    a = z_hat.shape[0]
    device = z_hat.device
    u = c * torch.exp(-stats[:, 1])
    grad = torch.zeros_like(z_hat)
    buf = z_hat.new_empty(min(block, a), min(block, a))
    weight_buf = torch.empty_like(buf)
    for r0, r1, c0, c1 in _square_tiles(a, block):
        tile = _logits_tile(buf, z_hat[r0:r1], z_hat[c0:c1], inv_t, inv_t).exp_()
        weight = weight_buf[: r1 - r0, : c1 - c0]
        torch.add(u[r0:r1, None], u[None, c0:c1], out=weight).mul_(tile)
        if r0 == c0:
            weight.diagonal().zero_()
        if exclude_pos:
            for idx in _pos_entries(r0, r1, c0, c1, 0, a, device):
                weight[idx] = 0.0
        if r0 != c0:
            grad[c0:c1].addmm_(weight.T, z_hat[r0:r1])
        grad[r0:r1].addmm_(weight, z_hat[c0:c1])
    return grad


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
        found = symmetric_row_stats(z_hat, temperature, block_rows)
    else:
        found = row_stats(z_hat, cols, temperature, offset, block_rows, block_cols)
    stats, pos = found.stats, found.pos
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
    offset = state.offset
    if _symmetric(group, temperature):
        dz_hat = symmetric_grad(state.zhat, state.stats, g_cols, temperature, block_rows)
    else:
        dz_hat = rows_grad(
            state.zhat, state.cols, state.stats, state.stats_cols, offset,
            g_cols[offset : offset + a], g_cols, temperature, block_rows, block_cols,
        )  # fmt: skip
    pos = offset + (torch.arange(a, device=state.zhat.device) + a // 2) % a
    dz_hat.sub_(state.cols[pos] * (2.0 * g)).mul_(1.0 / (a * temperature))
    dz = normalize_backward(dz_hat, state.zhat, state.norm).to(dtype)
    return dz[: a // 2], dz[a // 2 :]


def empty_state(z_a: torch.Tensor, temperature: float) -> ForwardState:
    """The single-process state ``tiled_forward`` returns for z_a (N, D), as empty tensors (the custom op's fake); its
    shapes do not depend on the temperature."""
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


# ---------------------------------------------------------------------------------------------------------------------
# The contrastive-loss family (DCL, SupCon, NT-Xent against a memory bank) on the same tiles


def normalized(z: torch.Tensor) -> torch.Tensor:
    """z (A, D) -> z_hat (A, D) = z / max(||z||, EPS) in the compute dtype, through autograd: the family losses take
    their other O(A D) terms (positives, weights) from autograd too."""
    return normalize_rows(z.to(compute_dtype(z.dtype)))[0]


def pair_cosines(z_hat: torch.Tensor) -> torch.Tensor:
    """(2N,) s(i, pos(i)) of the unit rows z_hat = [a_hat; b_hat] (2N, D): <a_hat_i, b_hat_i>, once per view, through
    autograd."""
    a, b = z_hat.chunk(2)
    return (a * b).sum(dim=1).repeat(2)


class RowTerms(NamedTuple):
    """The per-row terms ``row_terms`` returns, each (A,); lse_i = shift_i + log_sum_i."""

    shift: torch.Tensor  # m_i (see ``row_stats``), a constant for autograd
    log_sum: torch.Tensor  # log l_i = log sum_{kept j} exp(S_ij/tau - m_i): its gradient is lse_i's
    # S_{i,pos(i)}/tau - m_i as its tile holds it (zeros without in-batch columns)
    pair: torch.Tensor
    # sum_{p in P(i)} (S_ip/tau - m_i) over the label positives (zeros without labels)
    positive: torch.Tensor
    count: torch.Tensor  # |P(i)|, a constant (zeros without labels)


class _ClassSums(NamedTuple):
    """Per-class sums of the candidate columns, for label positives with the fixed shift (``_label_terms``)."""

    own: torch.Tensor  # (A,) class index of each local row
    sums: torch.Tensor  # (C, D) sum of the columns of each class
    counts: torch.Tensor  # (C,) columns of each class
    index: torch.Tensor  # (M,) class index of each column


def _class_sums(cols: torch.Tensor, y_cols: torch.Tensor, offset: int, a: int) -> _ClassSums:
    classes, index = torch.unique(y_cols, return_inverse=True)
    sums = cols.new_zeros(classes.shape[0], cols.shape[1]).index_add_(0, index, cols)
    counts = torch.bincount(index, minlength=classes.shape[0])
    return _ClassSums(index[offset : offset + a], sums, counts, index)


def _label_terms(z_hat, cols, y_cols, offset: int, temperature: float) -> torch.Tensor:
    """(A, 2) = (sum_{p in P(i)} (S_ip/tau - 1/tau), |P(i)|) with the fixed shift, from per-class sums of the columns:
    sum_{p in P(i)} S_ip = z_hat_i . (sum of row i's class - z_hat_i). The same numbers the tiles' label comparison
    gives (``row_stats``), at O((A + M) D) instead of a compare, a select and two sums per tile entry."""
    found = _class_sums(cols, y_cols, offset, z_hat.shape[0])
    count = (found.counts[found.own] - 1).to(z_hat.dtype)
    dots = (z_hat * (found.sums[found.own] - z_hat)).sum(dim=1)
    return torch.stack([(dots - count) / temperature, count], dim=1)


def _label_grad(z_hat, cols, y_cols, offset: int, e_rows, e_cols) -> torch.Tensor:
    """tau d/dz_hat_i of sum_i e_i sum_{p in P(i)} S_ip/tau = sum_{p in P(i)} (e_i + e_p) z_hat_p
    = e_i (C_{y_i} - z_hat_i) + (E_{y_i} - e_i z_hat_i), C and E the per-class sums of the columns and of e_j z_hat_j."""
    found = _class_sums(cols, y_cols, offset, z_hat.shape[0])
    weighted = cols.new_zeros(found.sums.shape).index_add_(0, found.index, cols * e_cols[:, None])
    e = e_rows[:, None]
    return e * (found.sums[found.own] - z_hat) + (weighted[found.own] - e * z_hat)


class LabelSums(NamedTuple):
    """What ``label_sums`` returns, each (A,)."""

    positive: torch.Tensor  # sum_{p in P(i)} (S_ip - 1)/tau over the label positives
    count: torch.Tensor  # |P(i)|, a constant


class LabelSumsFunction(torch.autograd.Function):
    """``_label_terms`` with autograd for z_hat, the rows and labels gathered from ``group``: the backward gathers the
    (A,) upstream gradients once and weights each row's class by them (``_label_grad``), so that W ranks give the
    full-batch gradient as ``row_terms`` does."""

    @staticmethod
    def forward(ctx, z_hat, labels, temperature, group):
        cols, offset = all_gather_rows(z_hat, group)
        y_cols = all_gather_rows(labels, group)[0]
        found = _label_terms(z_hat, cols, y_cols, offset, temperature)
        ctx.save_for_backward(z_hat, cols, y_cols)
        ctx.offset, ctx.temperature, ctx.group = offset, temperature, group
        count = found[:, 1].clone()
        ctx.mark_non_differentiable(count)
        return found[:, 0].clone(), count

    @staticmethod
    def backward(ctx, g_positive, _g_count):
        z_hat, cols, y_cols = ctx.saved_tensors
        e_cols = all_gather_rows(g_positive, ctx.group)[0] if ctx.group is not None else g_positive
        grad = _label_grad(z_hat, cols, y_cols, ctx.offset, g_positive, e_cols)
        return grad.mul_(1.0 / ctx.temperature), None, None, None


def label_sums(
    z_hat: torch.Tensor, labels: torch.Tensor, temperature: float, *, group=None
) -> LabelSums:
    """The label positives' logits of unit rows z_hat (A, D) with labels (A,) int64, P(i) = {j != i : y_j = y_i} among
    the rows of every rank of ``group``, from per-class sums in O((A W) D), differentiable with respect to z_hat (exact
    under DDP). For a loss whose log-sum-exp comes from elsewhere (SupCon on the fused kernel)."""
    return LabelSums(*LabelSumsFunction.apply(z_hat, labels, float(temperature), group))


class RowTermsFunction(torch.autograd.Function):
    """``row_stats`` with autograd for z_hat: forward keeps z_hat, the gathered columns and the stats (O(A D)), and
    the extra columns' weighted sum when z_hat needs a gradient; backward recomputes the candidates' tiles
    (``rows_grad``), after one all_gather of the (A, 2) upstream coefficients. One
    process with the fixed shift and no extra columns takes the upper-triangle schedule (``symmetric_row_stats``,
    ``symmetric_grad``): every option is symmetric in (i, j)."""

    @staticmethod
    def forward(
        ctx, z_hat, extra, labels, temperature, group, in_batch, exclude_pos, block_rows, block_cols
    ):
        cols, offset = all_gather_rows(z_hat, group) if in_batch else (z_hat[:0], 0)
        y_cols = None if labels is None else all_gather_rows(labels, group)[0]
        ctx.symmetric = in_batch and extra is None and _symmetric(group, temperature)
        # With the fixed shift the label sums come from per-class sums; below it from the tiles, relative to the
        # running maximum (see ``row_stats``).
        ctx.class_sums = labels is not None and temperature >= SHIFT_MIN_TEMPERATURE
        tile_labels = None if labels is None or ctx.class_sums else labels
        if ctx.symmetric:
            found = symmetric_row_stats(z_hat, temperature, block_rows, exclude_pos=exclude_pos)
        else:
            found = row_stats(
                z_hat, cols, temperature, offset, block_rows, block_cols, exclude_pos=exclude_pos,
                labels=None if tile_labels is None else (labels, y_cols), extra=extra,
                extra_sums=extra is not None and ctx.needs_input_grad[0],
            )  # fmt: skip
        if ctx.class_sums:
            found = found._replace(labelled=_label_terms(z_hat, cols, y_cols, offset, temperature))
        stats_cols = all_gather_rows(found.stats, group)[0] if in_batch else found.stats[:0]
        ctx.save_for_backward(z_hat, cols, found.stats, stats_cols, labels, y_cols, found.extra_sum)
        ctx.offset, ctx.temperature, ctx.group = offset, temperature, group
        ctx.in_batch, ctx.exclude_pos = in_batch, exclude_pos
        ctx.blocks = (block_rows, block_cols)
        shift, log_sum = found.stats[:, 0].clone(), found.stats[:, 1].clone()
        if found.labelled is None:
            positive, count = torch.zeros_like(shift), torch.zeros_like(shift)
        else:
            positive, count = found.labelled[:, 0].clone(), found.labelled[:, 1].clone()
        ctx.mark_non_differentiable(shift, count)
        return shift, log_sum, found.pos, positive, count

    @staticmethod
    def backward(ctx, _g_shift, g_log_sum, g_pair, g_positive, _g_count):
        z_hat, cols, stats, stats_cols, labels, y_cols, extra_sum = ctx.saved_tensors
        c = torch.zeros_like(stats[:, 0]) if g_log_sum is None else g_log_sum
        e = torch.zeros_like(c) if g_positive is None else g_positive
        c_cols, e_cols = c, e
        if not ctx.in_batch:  # no candidate columns: the extra ones only
            c_cols, e_cols = c[:0], e[:0]
        elif ctx.group is not None:
            # Each row's upstream gradient, from every rank: the only communication of the backward.
            c_cols, e_cols = all_gather_rows(torch.stack([c, e], dim=1), ctx.group)[0].unbind(1)
        tile_labels = None if labels is None or ctx.class_sums else labels
        if ctx.symmetric:
            grad = symmetric_grad(
                z_hat, stats, c, ctx.temperature, ctx.blocks[0], exclude_pos=ctx.exclude_pos
            )
        else:
            grad = rows_grad(
                z_hat, cols, stats, stats_cols, ctx.offset, c, c_cols, ctx.temperature, *ctx.blocks,
                exclude_pos=ctx.exclude_pos,
                labels=None if tile_labels is None else (labels, y_cols),
                e_rows=e, e_cols=e_cols, extra_sum=extra_sum,
            )  # fmt: skip
        if ctx.class_sums:
            grad.add_(_label_grad(z_hat, cols, y_cols, ctx.offset, e, e_cols))
        if g_pair is not None and cols.shape[0]:
            # d(S_{i,pos(i)})/d z_hat_i = z_hat_pos(i), and row pos(i)'s own pair term gives the same column: the
            # positive of a local row is local, so no gathered coefficient is needed.
            a = z_hat.shape[0]
            pos = (torch.arange(a, device=z_hat.device) + a // 2) % a
            grad.add_(z_hat[pos] * (g_pair + g_pair[pos])[:, None])
        return grad.mul_(1.0 / ctx.temperature), None, None, None, None, None, None, None, None


def row_terms(
    z_hat: torch.Tensor,
    temperature: float,
    *,
    group=None,
    in_batch: bool = True,
    exclude_pos: bool = False,
    labels: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> RowTerms:
    """The per-row terms of a contrastive loss over unit rows z_hat (A, D), differentiable with respect to z_hat.

    The columns of row i are the rows of every rank of ``group`` (``in_batch``; z_hat itself without a group) but
    row i itself, and with ``exclude_pos`` its positive pos(i) = (i + A/2) mod A too (DCL), then the ``extra`` (K, D)
    rows without gradient (a memory bank). ``labels`` (A,) int64 (gathered with the rows) adds the sums over the label
    positives (SupCon). A loss made of these terms and of other autograd terms (positives, weights) gets exact
    gradients, under DDP too: the backward weights each column by the upstream gradient of the row it belongs to.

    Memory is O((A W + K) D): no (A, A W) matrix exists. Tile sizes default to DEFAULT_BLOCK_ROWS/COLS.
    """
    if labels is not None and exclude_pos:
        raise ValueError("row_terms: labels and exclude_pos do not combine")
    # Without in-batch columns (a bank) the same 2 MiB tile, twice as tall: each bank tile then serves twice the anchors
    # in both of its GEMMs (S and sum_k P_ik x_k), 9% faster at N = 8192, K = 16384 on 2 CPU cores.
    tall = 1 if in_batch else 2
    blocks = (block_rows or DEFAULT_BLOCK_ROWS * tall, block_cols or DEFAULT_BLOCK_COLS // tall)
    return RowTerms(
        *RowTermsFunction.apply(
            z_hat, extra, labels, float(temperature), group, in_batch, exclude_pos, *blocks
        )
    )

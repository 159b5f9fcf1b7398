r"""Fused NT-Xent in Triton: in-kernel L2 normalisation, online-logsumexp forward, single-pass symmetric backward.

Notation (the tiled torch path's; ``fastclr.nt_xent_spec`` holds the constants, checks and state both share):
z = [z_a; z_b] (A = 2N rows), z_hat_i = z_i / max(||z_i||, eps),
S = z_hat cols^T with cols = z_hat (or the z_hat of every rank, local row i at column OFFSET + i), pos(i) = (i + N) mod A.

    forward    lse_i = log sum_{j != i} exp(S_ij / tau),        L = 1/A * sum_i (lse_i - S_{i,pos(i)} / tau)
    backward   dL/dz_hat_i = g/(A tau) * [ sum_{j != i} (P_ij + P_ji) cols_j - 2 z_hat_pos(i) ]
               P_ij = exp(S_ij/tau - lse_i),   P_ji = exp(S_ij/tau - lse_j)             (S is symmetric)
    chain      dL/dz_i = (dz_hat_i - z_hat_i <z_hat_i, dz_hat_i>) / ||z_i||       (dz_hat_i / eps for clamped rows)

The trick that makes it cheap: S is symmetric, so the row block i of S alone yields the whole gradient of rows i
(the P_ji term needs only lse_j, saved by the forward): no transpose pass, no atomics, and forward + backward cost three
(2N)x(2N)xD GEMMs (S forward, S again and W @ cols backward). The (2N)x(2N) matrix never exists in memory.

Launches (two each way):
    forward    _nt_xent_norm_fwd_kernel   raw z_a, z_b -> z_hat (A, D) in the input dtype and norms (A,); one process:
                                          z_hat rows zero-padded to a multiple of 16 elements, which the GEMM kernels
                                          read whole (aligned, unmasked: vector loads at any D, see ``padded_width``)
               _nt_xent_fwd_kernel        row blocks x all column blocks: online logsumexp in fp32 -> per-row stats
                                          (m_i, log l_i), the positive picked from the same S tiles, and the mean loss,
                                          reduced in a fixed order by the last program to finish (no host sync)
    backward   _nt_xent_bwd_kernel        row blocks (x output D chunks): acc_i = g_max sum_j W_ij cols_j with
                                          W_ij = (g P_ij + g_j P_ji - 2 g [j = pos(i)]) / g_max, W_ii = 0,
                                          g_max = max_r |g_r|: W (|W| <= 2) is rounded to the input dtype for the
                                          tensor cores, the upstream gradients' scale g_max is applied in fp32
               _nt_xent_norm_bwd_kernel   dz_hat = acc / (A tau), then the chain through the normalisation

Exponentials are base 2 (``exp2`` is the native instruction): QK_SCALE = log2(e)/tau. Every exponent is a difference of
cosines times QK_SCALE, never a difference of two numbers of size 1/tau (see _nt_xent_fwd_kernel).
For D up to MAX_BLOCK_D the whole row fits one block and forward + backward execute exactly three GEMMs (plus padding);
above it the forward loops over D, and the backward splits the output D into chunks of CHUNK_BLOCK_DO and recomputes S
per chunk, (D / CHUNK_BLOCK_DO + 2) GEMMs in all (see ``executed_macs``).
Exact fp32 (precision="ieee") multiplies on the FMA units instead of the tensor cores. Triton's FMA dot keeps a thread's
operand slices for the whole K extent in registers, so one block of D = 128 or 256 spills at any tile worth running; the
exact path loops over D in EXACT_BLOCK_D = 32 steps at every D > 32, with backward output chunks of up to EXACT_BLOCK_DO =
256 (three GEMMs up to D = 256, D / 256 + 2 above) and its own candidates (``_EXACT_FP32_CANDIDATES``). What it costs
against tf32: the FMA peak is 1/7.4 of the dense tf32 tensor-core peak on an H100 SXM (66.9 vs 494.7 TFLOP/s; 1/8 on an
A100), so ieee is at least ~7x slower on the GEMMs; 16 outputs per thread (the backward's logits tile: 4) leave it bound
by shared-memory operand loads below even that peak (an estimate from the compiled code, not a measurement).
Under TRITON_INTERPRET=1 the INTERPRETER constexpr upcasts dot operands to fp32 (the interpreter's bf16 dot returns
garbage, its fp32 dot is exact) and rounds fp32 -> bf16 to nearest even by hand (its cast truncates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastclr.nt_xent_spec import (
    EPS,
    SHIFT_MIN_TEMPERATURE,
    ForwardState,
    all_gather_rows,
    all_gather_scalar,
)

LOG2E = math.log2(math.e)
# Globals read inside @triton.jit must be constexpr.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(math.log(2.0))
# Widest D kept in one block; the backward accumulator is BLOCK_M x MAX_BLOCK_D fp32.
MAX_BLOCK_D = 256
# D > MAX_BLOCK_D: D step of the logits loop, and the backward output chunk (256 would spill next to that loop).
CHUNK_BLOCK_D = 64
CHUNK_BLOCK_DO = 128
# Exact fp32 (precision="ieee") multiplies on the FMA units, whose tl.dot holds both operands' whole K extent in
# registers: every D above EXACT_BLOCK_D loops over D in steps of it, with backward output chunks of up to EXACT_BLOCK_DO.
EXACT_BLOCK_D = 32
EXACT_BLOCK_DO = 256
# The two memory-bound normalisation kernels: 16 x 64 tiles keep the six live tiles of the chain rule in registers.
ELEMENTWISE_BLOCK_R = 16
ELEMENTWISE_BLOCK_D = 64
REDUCE_BLOCK = 128  # partial sums the forward's last program adds per step
PRECISIONS = ("tf32", "ieee")
_TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 x -> DTYPE, rounded to nearest even (what the GPU's cvt.rn does)."""
    if INTERPRETER and DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is a constexpr, not a constant)
        # The interpreter's fp32 -> bf16 cast truncates: round on the bits first (ties to even), then the cast is exact.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _round_operand(
    x, DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr
):
    """fp32 x -> a tl.dot operand of DTYPE. For tf32 dots, fp32 rounded to the nearest tf32 value (ties away from zero,
    cvt.rna): the tensor cores read only the top 19 bits of an fp32 operand, which truncates, a bias of ~2^-11
    relative toward zero on every product."""
    if INPUT_PRECISION == "tf32" and DTYPE == tl.float32:  # noqa: SIM300 (constexprs)
        if INTERPRETER:
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
        else:
            x = tl.inline_asm_elementwise(
                "cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
            )
    return _round_to(x, DTYPE, INTERPRETER)


@triton.jit
def _load_rows(
    ptr,
    row0,
    n_rows,
    d0,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """(BLOCK_R, BLOCK_D) tile at rows row0.., columns d0.. of a row-major (n_rows, D) buffer, zero outside.

    The 64-bit part of the address is one scalar; in-tile offsets are int32 (BLOCK_R * D < 2^31), half the registers
    of a tile of 64-bit pointers.
    """
    base = ptr + tl.cast(row0, tl.int64) * D
    r = tl.arange(0, BLOCK_R)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    tile = tl.load(
        base + (r[:, None] * D + offs_d[None, :]),
        mask=((row0 + r)[:, None] < n_rows) & (offs_d[None, :] < D),
        other=0.0,
    )
    if INTERPRETER:
        # The interpreter's tl.dot on bf16/fp16 returns garbage, its fp32 dot is exact: upcast the (already rounded)
        # operands so the interpreter computes what the tensor cores compute up to the accumulation order.
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _logits_tile(
    zhat_ptr,
    cols_ptr,
    q,
    r0,
    A,
    c0,
    M,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_BLOCKS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """S for rows r0.. x columns c0.., (BLOCK_M, BLOCK_N) fp32. With D_BLOCKS == 1 the row tile q is preloaded."""
    if D_BLOCKS == 1:
        k = _load_rows(cols_ptr, c0, M, 0, D, BLOCK_N, BLOCK_D, INTERPRETER)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    else:
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D_BLOCKS * BLOCK_D, BLOCK_D):
            q_d = _load_rows(zhat_ptr, r0, A, d0, D, BLOCK_M, BLOCK_D, INTERPRETER)
            k_d = _load_rows(cols_ptr, c0, M, d0, D, BLOCK_N, BLOCK_D, INTERPRETER)
            s = tl.dot(q_d, tl.trans(k_d), s, input_precision=INPUT_PRECISION)
    return s


@triton.jit
def _sumsq_step(ss, mx, x):
    """One (BLOCK_R, BLOCK_D) block of row-wise sums of squares kept relative to the running max |x| (ss * mx^2 is the
    sum so far): squared, fp32 values above ~1.8e19 overflow (the row became a zero vector, z / inf). Returns the new
    (ss, mx); a NaN or inf entry makes ss NaN."""
    new = tl.maximum(mx, tl.max(tl.abs(x), 1))
    scale = tl.where(new > 0, new, 1.0)  # all-zero so far: 0 / 1, not 0 / 0
    ratio = mx / scale
    xs = x / scale[:, None]
    return ss * ratio * ratio + tl.sum(xs * xs, 1), new


@triton.jit
def _nt_xent_norm_fwd_kernel(
    za_ptr,
    zb_ptr,
    zhat_ptr,
    norm_ptr,
    count_ptr,
    N,
    D,
    stride_a,
    stride_b,
    stride_zhat,
    EPS_: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Rows r of z_a and of z_b -> z_hat rows r and N + r (input dtype; tf32 values for tf32 dots, so the GEMMs read
    them rounded to nearest, see _round_operand) and their norms max(||z||, eps) (fp32). z_hat rows are stride_zhat
    >= D wide (see ``padded_width``): columns D.. are written as zeros, so the GEMM kernels read whole rows unmasked."""
    pid = tl.program_id(0)
    if pid == 0:
        # The forward kernel's arrival counter starts at zero (stream order puts this store before that launch).
        tl.store(count_ptr, 0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < N
    ra = za_ptr + r[:, None].to(tl.int64) * stride_a
    rb = zb_ptr + r[:, None].to(tl.int64) * stride_b
    ssa = tl.zeros((BLOCK_R,), dtype=tl.float32)
    ssb = tl.zeros((BLOCK_R,), dtype=tl.float32)
    mxa = tl.zeros((BLOCK_R,), dtype=tl.float32)
    mxb = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (offs[None, :] < D)
        a = tl.load(ra + offs[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(rb + offs[None, :], mask=m, other=0.0).to(tl.float32)
        ssa, mxa = _sumsq_step(ssa, mxa, a)
        ssb, mxb = _sumsq_step(ssb, mxb, b)
    # F.normalize semantics: divide by max(||z||, eps), so zero rows stay zero. ||z|| = mx * sqrt(ss); NaN propagates
    # (the GPU's max would otherwise return eps for a NaN norm).
    na = tl.where(mxa > 0, mxa, 1.0) * tl.sqrt(ssa)
    nb = tl.where(mxb > 0, mxb, 1.0) * tl.sqrt(ssb)
    na = tl.maximum(na, EPS_, propagate_nan=tl.PropagateNan.ALL)
    nb = tl.maximum(nb, EPS_, propagate_nan=tl.PropagateNan.ALL)
    out_a = zhat_ptr + r[:, None].to(tl.int64) * stride_zhat
    out_b = zhat_ptr + (N + r[:, None]).to(tl.int64) * stride_zhat
    for d0 in range(0, stride_zhat, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (offs[None, :] < D)
        # The padding columns get the zeros of the masked loads.
        out_m = ok[:, None] & (offs[None, :] < stride_zhat)
        a = tl.load(ra + offs[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(rb + offs[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(
            out_a + offs[None, :],
            _round_operand(
                a / na[:, None], zhat_ptr.dtype.element_ty, INPUT_PRECISION, INTERPRETER
            ),
            mask=out_m,
        )
        tl.store(
            out_b + offs[None, :],
            _round_operand(
                b / nb[:, None], zhat_ptr.dtype.element_ty, INPUT_PRECISION, INTERPRETER
            ),
            mask=out_m,
        )
    tl.store(norm_ptr + r, na, mask=ok)
    tl.store(norm_ptr + N + r, nb, mask=ok)


@triton.jit
def _nt_xent_fwd_kernel(
    zhat_ptr,
    cols_ptr,
    stats_ptr,
    partial_ptr,
    count_ptr,
    loss_ptr,
    A,
    M,
    D,
    OFFSET,
    QK_SCALE,
    inv_t,
    inv_a,
    SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_BLOCKS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One program per BLOCK_M rows: the logsumexp over all M columns (diagonal masked), the positive logit picked from
    the same S tiles, the per-row loss, and the fixed-order mean.

    Writes stats_ptr[i] = (m_i, log l_i) with lse_i = m_i/tau + log l_i: m_i the row max of S in cosine units (1 on the
    fixed-shift path), l_i = sum_{j != i} exp((S_ij - m_i)/tau). Every exponent, here and in the backward, is then a
    difference of cosines scaled by 1/tau, never a difference of two numbers of size 1/tau (at tau = 0.01 that alone
    would cost fp32 ~1e-5 absolute, on a gradient that can be ~0).
    """
    tl.static_assert(
        BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16"
    )
    tl.static_assert(D_BLOCKS >= 1)
    pid = tl.program_id(0)
    n = A // 2
    r0 = pid * BLOCK_M
    r1 = tl.minimum(r0 + BLOCK_M, A)
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < A
    q = rows  # placeholder; the row tile is preloaded only when all of D fits one block
    if D_BLOCKS == 1:
        q = _load_rows(zhat_ptr, r0, A, 0, D, BLOCK_M, BLOCK_D, INTERPRETER)
    diag = rows + OFFSET
    pos_col = OFFSET + tl.where(rows < n, rows + n, rows - n)
    # The positive columns of this row block form at most two runs, [lo_a, hi_a) and [lo_b, hi_b) (local indices).
    lo_a = r0 + n
    hi_a = tl.minimum(r1, n) + n
    lo_b = tl.maximum(r0, n) - n
    hi_b = r1 - n
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of S (cosine units)
    s_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        s = _logits_tile(
            zhat_ptr, cols_ptr, q, r0, A, start_n, M, D,
            BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER,
        )  # fmt: skip
        c0 = start_n - OFFSET
        c1 = c0 + BLOCK_N
        if ((c0 < hi_a) & (c1 > lo_a)) | ((c0 < hi_b) & (c1 > lo_b)):
            # Only the (at most two) tiles holding positives pay for the select; the positive comes from the very S
            # that enters the logsumexp, so identical rows give exactly log(A - 1).
            s_pos += tl.sum(tl.where(cols[None, :] == pos_col[:, None], s, 0.0), 1)
        valid = col_ok[None, :] & (cols[None, :] != diag[:, None])
        if SHIFT:
            # |S| <= 1, so (S - 1)/tau <= 0 (up to rounding): the fixed shift 1/tau replaces the running max and exp
            # cannot overflow; for tau >= SHIFT_MIN_TEMPERATURE the smallest term exp(-2/tau) is a normal fp32.
            # QK_SCALE = log2(e)/tau turns exp into the native exp2.
            p = tl.where(valid, tl.exp2((s - 1.0) * QK_SCALE), 0.0)
            l_i += tl.sum(p, 1)
        else:
            # Online logsumexp: rescale the running sum when the running max grows.
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A tile can hold only masked columns for a row; subtract 0 then so that -inf - -inf never makes NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2((m_i - m_safe) * QK_SCALE) + tl.sum(
                tl.exp2((s - m_safe[:, None]) * QK_SCALE), 1
            )
            m_i = m_new
    if SHIFT:
        m_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    log_l = tl.log(l_i)
    tl.store(stats_ptr + 2 * rows, m_i, mask=row_ok)
    tl.store(stats_ptr + 2 * rows + 1, log_l, mask=row_ok)
    # loss_i = lse_i - S_pos/tau = log l_i + (m_i - S_pos)/tau
    row_loss = tl.where(row_ok, log_l + (m_i - s_pos) * inv_t, 0.0)
    tl.store(partial_ptr + pid, tl.sum(row_loss, 0))
    # Mean without a host sync, deterministic: every program publishes its partial sum, the last one to arrive adds
    # them in program order. The barrier orders all threads' stores before the (acq_rel) ticket.
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr, 1)
    n_prog = tl.num_programs(0)
    if ticket == n_prog - 1:
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, n_prog, BLOCK_R):
            k = k0 + tl.arange(0, BLOCK_R)
            # .cg reads L2, where the other programs' partials are, never a stale L1 line.
            total += tl.load(partial_ptr + k, mask=k < n_prog, other=0.0, cache_modifier=".cg")
        tl.store(
            loss_ptr, _round_to(tl.sum(total, 0) * inv_a, loss_ptr.dtype.element_ty, INTERPRETER)
        )
        tl.store(
            count_ptr, 0
        )  # re-armed, so a re-run of this launch alone (autotuning) reduces correctly too


@triton.jit
def _nt_xent_bwd_kernel(
    zhat_ptr,
    cols_ptr,
    stats_ptr,
    stats_cols_ptr,
    g_ptr,
    g_cols_ptr,
    acc_ptr,
    A,
    M,
    D,
    OFFSET,
    QK_SCALE,
    SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_BLOCKS: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Program (row block, output D chunk): acc_i = sum_{j != i} (g P_ij + g_j P_ji - 2 g [j = pos(i)]) cols_j, fp32
    (A, D), no atomics. With the forward's stats (m, log l): P_ij = exp((S_ij - m_i)/tau - log l_i). The W of the
    GEMM holds the g's divided by g_max = max_r |g_r|, and the fp32 accumulator is multiplied by g_max at the end.
    """
    tl.static_assert(
        BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16"
    )
    tl.static_assert(
        D_BLOCKS > 1 or BLOCK_DO == BLOCK_D,
        "one D block: the logits tile doubles as the W @ cols operand",
    )
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    r0 = pid_m * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < A
    q = rows  # placeholder; the row tile is preloaded only when all of D fits one block
    if D_BLOCKS == 1:
        q = _load_rows(zhat_ptr, r0, A, 0, D, BLOCK_M, BLOCK_D, INTERPRETER)
    diag = rows + OFFSET
    n = A // 2
    r1 = tl.minimum(r0 + BLOCK_M, A)
    pos_col = OFFSET + tl.where(rows < n, rows + n, rows - n)
    lo_a = r0 + n
    hi_a = tl.minimum(r1, n) + n
    lo_b = tl.maximum(r0, n) - n
    hi_b = r1 - n
    # W stays free of the upstream gradients' scale: they enter it as g / g_max (so |W| <= 2), and g_max multiplies the
    # fp32 accumulator at the end. A GradScaler makes g as large as 2^15, where a W of ~2g rounded to fp16 overflows
    # (and a tiny g would underflow). Every rank's g is in g_cols (this rank's too); all zero: g_max = 1.
    g_max = tl.abs(tl.load(g_ptr).to(tl.float32))
    for r in range(0, M // A):
        g_max = tl.maximum(g_max, tl.abs(tl.load(g_cols_ptr + r).to(tl.float32)))
    g_max = tl.where(g_max > 0, g_max, 1.0)
    g = tl.load(g_ptr).to(tl.float32) / g_max
    m_i = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0.0)
    log2_l_i = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=0.0) * _LOG2E
    u_i = log2_l_i  # placeholder; only the shift form uses u
    if SHIFT:
        # m = 1 for every row: P_ij = exp2(t_ij) * exp2(-log2 l_i) with t = (S - 1) log2(e)/tau <= 0, so
        # W_ij = exp2(t_ij) * (u_i + u_j) with u = g * exp2(-log2 l): one exponential per element instead of two.
        u_i = g * tl.exp2(-log2_l_i)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        m_j = tl.load(stats_cols_ptr + 2 * cols, mask=col_ok, other=0.0)
        log2_l_j = tl.load(stats_cols_ptr + 2 * cols + 1, mask=col_ok, other=0.0) * _LOG2E
        # Column j belongs to rank j // A: weight its P_ji by that rank's upstream gradient (g itself when local).
        g_j = tl.load(g_cols_ptr + cols // A, mask=col_ok, other=0.0).to(tl.float32) / g_max
        if D_BLOCKS == 1:
            k = _load_rows(cols_ptr, start_n, M, 0, D, BLOCK_N, BLOCK_D, INTERPRETER)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        else:
            s = _logits_tile(
                zhat_ptr, cols_ptr, q, r0, A, start_n, M, D,
                BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER,
            )  # fmt: skip
            k = _load_rows(
                cols_ptr, start_n, M, pid_d * BLOCK_DO, D, BLOCK_N, BLOCK_DO, INTERPRETER
            )
        if SHIFT:
            u_j = g_j * tl.exp2(-log2_l_j)
            w = tl.exp2((s - 1.0) * QK_SCALE) * (u_i[:, None] + u_j[None, :])
        else:
            w = g * tl.exp2((s - m_i[:, None]) * QK_SCALE - log2_l_i[:, None])
            w += g_j[None, :] * tl.exp2((s - m_j[None, :]) * QK_SCALE - log2_l_j[None, :])
        valid = col_ok[None, :] & (cols[None, :] != diag[:, None])
        w = tl.where(valid, w, 0.0)
        c0 = start_n - OFFSET
        c1 = c0 + BLOCK_N
        if ((c0 < hi_a) & (c1 > lo_a)) | ((c0 < hi_b) & (c1 > lo_b)):
            # The positive's -2g joins W here, in fp32: W_pos = g (P_ij + P_ji) tends to 2g as the pair gets confident,
            # and subtracting 2g z_hat_pos after W was rounded to bf16 would leave only rounding noise.
            w = tl.where(cols[None, :] == pos_col[:, None], w - 2.0 * g, w)
        # W goes through the tensor cores in the input dtype, or as tf32 (rounded to nearest like the GPU does, also
        # when interpreting).
        w = _round_operand(w, cols_ptr.dtype.element_ty, INPUT_PRECISION, INTERPRETER)
        if INTERPRETER:
            w = w.to(tl.float32)
        acc = tl.dot(w, k, acc, input_precision=INPUT_PRECISION)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out = acc_ptr + rows[:, None].to(tl.int64) * D + offs_o[None, :]
    tl.store(out, acc * g_max, mask=row_ok[:, None] & (offs_o[None, :] < D))


@triton.jit
def _nt_xent_norm_bwd_kernel(
    za_ptr,
    zb_ptr,
    norm_ptr,
    acc_ptr,
    dza_ptr,
    dzb_ptr,
    N,
    D,
    stride_a,
    stride_b,
    stride_acc,
    grad_scale,
    EPS_: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Rows r and N + r: dz_hat = grad_scale * acc, then the chain rule through the normalisation.

    z_hat is recomputed in fp32 from the raw rows and the saved norms, so the projection is as exact as the input.
    """
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < N
    na = tl.load(norm_ptr + r, mask=ok, other=1.0)
    nb = tl.load(norm_ptr + N + r, mask=ok, other=1.0)
    ra = za_ptr + r[:, None].to(tl.int64) * stride_a
    rb = zb_ptr + r[:, None].to(tl.int64) * stride_b
    acc_a = acc_ptr + r[:, None].to(tl.int64) * stride_acc
    acc_b = acc_ptr + (N + r[:, None]).to(tl.int64) * stride_acc
    rad_a = tl.zeros((BLOCK_R,), dtype=tl.float32)
    rad_b = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (offs[None, :] < D)
        ha = tl.load(ra + offs[None, :], mask=m, other=0.0).to(tl.float32) / na[:, None]
        hb = tl.load(rb + offs[None, :], mask=m, other=0.0).to(tl.float32) / nb[:, None]
        dha = grad_scale * tl.load(acc_a + offs[None, :], mask=m, other=0.0)
        dhb = grad_scale * tl.load(acc_b + offs[None, :], mask=m, other=0.0)
        rad_a += tl.sum(ha * dha, 1)
        rad_b += tl.sum(hb * dhb, 1)
    # Clamped rows (norm == eps) have z_hat = z / eps, whose Jacobian is I / eps: no radial projection.
    rad_a = tl.where(na <= EPS_, 0.0, rad_a)
    rad_b = tl.where(nb <= EPS_, 0.0, rad_b)
    out_a = dza_ptr + r[:, None].to(tl.int64) * D
    out_b = dzb_ptr + r[:, None].to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (offs[None, :] < D)
        ha = tl.load(ra + offs[None, :], mask=m, other=0.0).to(tl.float32) / na[:, None]
        hb = tl.load(rb + offs[None, :], mask=m, other=0.0).to(tl.float32) / nb[:, None]
        dha = grad_scale * tl.load(acc_a + offs[None, :], mask=m, other=0.0)
        dhb = grad_scale * tl.load(acc_b + offs[None, :], mask=m, other=0.0)
        dza = (dha - ha * rad_a[:, None]) / na[:, None]
        dzb = (dhb - hb * rad_b[:, None]) / nb[:, None]
        tl.store(
            out_a + offs[None, :], _round_to(dza, dza_ptr.dtype.element_ty, INTERPRETER), mask=m
        )
        tl.store(
            out_b + offs[None, :], _round_to(dzb, dzb_ptr.dtype.element_ty, INTERPRETER), mask=m
        )


# Fixed when the kernels above were decorated: TRITON_INTERPRET=1 at import made them interpreted functions.
INTERPRET = bool(triton.knobs.runtime.interpret)

# --------------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of the two GEMM kernels; ``name`` is how benchmarks select it."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"BM{self.block_m}_BN{self.block_n}_W{self.num_warps}_S{self.num_stages}"


CONFIGS = {
    c.name: c
    for c in (
        KernelConfig(128, 64, 8, 3),
        KernelConfig(128, 128, 8, 2),
        KernelConfig(64, 64, 4, 3),
        KernelConfig(64, 32, 4, 2),
        KernelConfig(64, 64, 8, 3),
        KernelConfig(64, 64, 8, 2),
        KernelConfig(64, 32, 8, 2),
        KernelConfig(64, 32, 8, 1),
        KernelConfig(32, 32, 8, 2),
    )
}
KERNELS = ("fwd", "bwd")

# The pruned autotune sets, best guess first, by kernel, D tier (0: one block of D <= 128, 1: one block of 256, 2: the D
# loop) and input element size: the configs that compile with no spills and within the shared memory of sm_80 and
# sm_90 (``python -m fastclr.kernels.report``; tests/test_kernel_report.py checks every entry). Rows come in 64s because
# Hopper's wgmma works on 64-row warpgroup tiles (and Ampere's mma.sync tiles them well); the backward keeps a
# BLOCK_M x BLOCK_DO fp32 accumulator next to the logits tile, which leaves no registers for 128-row blocks and at
# BLOCK_DO = 256 needs 8 warps to share it. fp32 tiles take twice the shared memory per pipeline stage.
_CANDIDATES = {
    # Unaligned D compiles the aligned kernel (z_hat's padded rows, ``padded_width``): before that, BM128_BN128_W8_S2
    # spilled on sm_80 at D = 100 (255 registers + 168 B of stack); now D = 100 and 128 share one binary. Dropped for
    # sm_80 spills on the running-max path: BM64_BN128_W4_S3 at D <= 128 (16 B), BM128_BN128_W8_S2 at D = 256 (32 B).
    ("fwd", 0, 2): ("BM128_BN64_W8_S3", "BM128_BN128_W8_S2", "BM64_BN64_W4_S3", "BM64_BN32_W4_S2"),
    ("fwd", 1, 2): ("BM128_BN64_W8_S3", "BM64_BN64_W8_S3", "BM64_BN32_W4_S2"),
    ("fwd", 2, 2): ("BM128_BN64_W8_S3", "BM64_BN64_W8_S3", "BM64_BN32_W4_S2"),
    ("bwd", 0, 2): ("BM64_BN64_W8_S3", "BM64_BN64_W4_S3", "BM64_BN32_W4_S2", "BM64_BN32_W8_S2"),
    ("bwd", 1, 2): ("BM64_BN64_W8_S3", "BM64_BN64_W8_S2", "BM64_BN32_W8_S2"),
    ("bwd", 2, 2): ("BM64_BN32_W8_S2",),
    ("fwd", 0, 4): ("BM128_BN64_W8_S3", "BM64_BN64_W4_S3", "BM64_BN32_W4_S2"),
    ("fwd", 1, 4): ("BM64_BN32_W4_S2",),
    ("fwd", 2, 4): ("BM64_BN32_W8_S2",),
    ("bwd", 0, 4): ("BM64_BN32_W4_S2", "BM64_BN32_W8_S2"),
    ("bwd", 1, 4): ("BM64_BN32_W8_S2",),
    ("bwd", 2, 4): ("BM64_BN32_W8_S1",),
}  # fmt: skip
# fp32 with precision="ieee": tl.dot runs on the FMA units, and Triton's FMA dot keeps both operands' K slices in
# registers (the register blocking of a thread's m x n outputs costs (m + n) K registers). At one block of D = 128 or 256
# only 1-4 outputs per thread compile spill-free, and which ones does not follow a pattern; in EXACT_BLOCK_D = 32 steps
# (``d_tiling``) every D compiles the same loop body, the forward keeps 16 outputs per thread (BM64_BN64_W8) and the
# backward's W @ cols GEMM 16-32; the backward's logits tile stays at 32 x 32, the largest that is clean on sm_80.
_EXACT_FP32_FWD = ("BM64_BN64_W8_S3", "BM64_BN32_W8_S2")
_EXACT_FP32_BWD = ("BM32_BN32_W8_S2",)
_EXACT_FP32_CANDIDATES = {
    (kernel, tier, 4): _EXACT_FP32_FWD if kernel == "fwd" else _EXACT_FP32_BWD
    for kernel in ("fwd", "bwd")
    for tier in (0, 1, 2)
}


def list_configs() -> list[str]:
    """Names accepted by ``config=`` of ``nt_xent_triton`` / ``nt_xent_forward`` / ``nt_xent_backward``."""
    return list(CONFIGS)


class BlockD(NamedTuple):
    """How D is tiled: BLOCK_D (logits loop step), D_BLOCKS (its trip count), BLOCK_DO (backward output chunk)."""

    block_d: int
    d_blocks: int
    block_do: int


def d_tiling(d: int, exact: bool = False) -> BlockD:
    """D <= MAX_BLOCK_D: one power-of-two block (>= 16, tl.dot's minimum). Larger D: a loop of CHUNK_BLOCK_D steps and
    backward output chunks of CHUNK_BLOCK_DO. exact (fp32 with precision="ieee", FMA dots): D > EXACT_BLOCK_D loops in
    EXACT_BLOCK_D steps, the backward in output chunks of up to EXACT_BLOCK_DO."""
    block = max(16, triton.next_power_of_2(d))
    if exact and d > EXACT_BLOCK_D:
        return BlockD(EXACT_BLOCK_D, triton.cdiv(d, EXACT_BLOCK_D), min(block, EXACT_BLOCK_DO))
    if d <= MAX_BLOCK_D:
        return BlockD(block, 1, block)
    return BlockD(CHUNK_BLOCK_D, triton.cdiv(d, CHUNK_BLOCK_D), CHUNK_BLOCK_DO)


def d_tier(d: int) -> int:
    """0: one block of D <= 128, 1: one block of 256, 2: the D loop (D > MAX_BLOCK_D). Exact fp32 keys its candidates on
    the same D ranges (its tiling is its own, see ``d_tiling``)."""
    tiling = d_tiling(d)
    return 2 if tiling.d_blocks > 1 else int(tiling.block_d > 128)


def _exact_fp32(itemsize: int, precision: str) -> bool:
    """fp32 inputs with precision="ieee": the FMA-unit dots, their own tiling and candidates."""
    return itemsize == 4 and precision == "ieee"


def candidate_configs(
    kernel: str, a: int, d: int, itemsize: int = 2, precision: str = "tf32"
) -> list[KernelConfig]:
    """The configs worth trying for this kernel, (2N, D), input element size (2: bf16/fp16, 4: fp32) and fp32 dot
    precision ("ieee" multiplies on the FMA units, its own list), best guess first (blocks beyond the padded batch only
    add masked work, so small batches keep the smallest tiles)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if itemsize not in (2, 4):
        raise ValueError(f"itemsize must be 2 (bf16/fp16) or 4 (fp32), got {itemsize!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    table = _EXACT_FP32_CANDIDATES if _exact_fp32(itemsize, precision) else _CANDIDATES
    listed = [CONFIGS[name] for name in table[(kernel, d_tier(d), itemsize)]]
    a_pad = max(64, triton.next_power_of_2(a))
    fitting = [c for c in listed if c.block_m <= a_pad and c.block_n <= a_pad]
    return fitting or [min(listed, key=lambda c: (c.block_m, c.block_n))]


def resolve_config(
    kernel: str, a: int, d: int, config: str | None, itemsize: int = 2, precision: str = "tf32"
) -> KernelConfig:
    """A named config (checked against CONFIGS) or the first candidate for this size."""
    if config is None:
        return candidate_configs(kernel, a, d, itemsize, precision)[0]
    if config not in CONFIGS:
        raise ValueError(f"unknown kernel config {config!r}; choose one of {list_configs()}")
    return CONFIGS[config]


def executed_macs(
    a: int,
    d: int,
    config: str | None = None,
    m: int | None = None,
    itemsize: int = 2,
    precision: str = "tf32",
) -> dict[str, int]:
    """Multiply-accumulates the GEMM kernels execute (padding included; tensor cores, or FMA units for exact fp32),
    counted from grid x loop trips.

    a = 2N local rows, m = candidate columns (a unless negatives are gathered). Returns {"fwd", "bwd", "total", "ideal",
    "ratio"} with ideal = 3 m a d (the three-GEMM floor) and ratio = total / ideal.
    """
    m = a if m is None else m
    tiling = d_tiling(d, _exact_fp32(itemsize, precision))
    out = {}
    for kernel in KERNELS:
        cfg = resolve_config(kernel, a, d, config, itemsize, precision)
        rows = triton.cdiv(a, cfg.block_m) * cfg.block_m
        cols = triton.cdiv(m, cfg.block_n) * cfg.block_n
        logits = rows * cols * tiling.d_blocks * tiling.block_d
        if kernel == "fwd":
            out["fwd"] = logits
        else:
            chunks = triton.cdiv(d, tiling.block_do)
            out["bwd"] = chunks * (logits + rows * cols * tiling.block_do)
    out["total"] = out["fwd"] + out["bwd"]
    out["ideal"] = 3 * m * a * d
    out["ratio"] = out["total"] / out["ideal"]
    return out


def _autotuned(fn, kernel: str):
    """Autotuning over the pruned candidates on a GPU, keyed on (2N, M, D) and every constexpr that changes the code the
    kernel compiles to besides those (the logsumexp path, the dot precision); the autotuner adds the dtypes."""

    by_name = {
        name: triton.Config(
            {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        for name, c in CONFIGS.items()
    }

    def prune(configs, named_args, **kwargs):
        # The launch passes every argument by keyword, and the autotuner's named_args hold only positional ones.
        args = {**named_args, **kwargs}
        itemsize = args["zhat_ptr"].element_size()
        cands = candidate_configs(kernel, args["A"], args["D"], itemsize, args["INPUT_PRECISION"])
        # Best guess first: with equal timings (or none, see kernels/stub_driver.py) the autotuner keeps it.
        return [by_name[c.name] for c in cands]

    return triton.autotune(
        configs=list(by_name.values()),
        key=["A", "M", "D", "SHIFT", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": prune},
    )(fn)


# One autotuner per kernel and target (the stub driver compiles for several in one process).
_AUTOTUNED: dict[tuple, object] = {}


def _launch(
    kernel: str, fn, grid_fn, a: int, d: int, itemsize: int, config: str | None, **kwargs
) -> None:
    """Launch with a named config, the heuristic pick (interpreter), or autotuning (GPU, no config named)."""
    if config is None and not INTERPRET:
        target = triton.runtime.driver.active.get_current_target()
        tuned = _AUTOTUNED.get((kernel, target))
        if tuned is None:
            tuned = _AUTOTUNED[(kernel, target)] = _autotuned(fn, kernel)
        tuned[grid_fn](**kwargs)
        return
    cfg = resolve_config(kernel, a, d, config, itemsize, kwargs["INPUT_PRECISION"])
    meta = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
    fn[grid_fn](**kwargs, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _launch_device_type() -> str:
    """The torch device type the active Triton driver launches on ("cuda"; "cpu" for kernels/stub_driver.py)."""
    try:
        return triton.runtime.driver.active.get_active_torch_device().type
    except RuntimeError:  # no active driver: no GPU
        return "cuda"


# --------------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------------


def check_supported(z: torch.Tensor, precision: str = "tf32") -> None:
    """What the kernel needs beyond ``fastclr.nt_xent_spec.check_embeddings`` (z_a and z_b share z's dtype and device):
    fp32/bf16/fp16 on the launch device (any device when interpreting), and a known precision. ``fastclr.nt_xent``
    runs it once; the host functions below trust their callers."""
    if z.dtype not in _TL_DTYPES:
        raise TypeError(f"the triton kernel takes fp32/bf16/fp16 z_a and z_b, got {z.dtype}")
    if not INTERPRET and z.device.type != _launch_device_type():
        raise ValueError(
            f"the triton kernel needs CUDA tensors (got {z.device}); set TRITON_INTERPRET=1 to interpret it on CPU"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def empty_state(z_a: torch.Tensor) -> ForwardState:
    """The single-process state ``nt_xent_forward`` returns for z_a (N, D), as empty tensors (the custom op's fake):
    zhat in the input dtype, norm (A,) fp32, stats (A, 2) fp32 = (m_i, log l_i), lse_i = m_i / tau + log l_i."""
    a, d = 2 * z_a.shape[0], z_a.shape[1]
    f32 = dict(dtype=torch.float32, device=z_a.device)
    # The same strides as the forward's z_hat: (A, D) columns of rows padded to padded_width(D).
    zhat = z_a.new_empty((a, padded_width(d)))[:, :d]
    return ForwardState.local(zhat, torch.empty(a, **f32), torch.empty((a, 2), **f32))


def _unit_stride(z: torch.Tensor) -> torch.Tensor:
    """Rows may be strided, elements within a row must be contiguous for vector loads."""
    return z if z.stride(1) == 1 else z.contiguous()


def padded_width(d: int) -> int:
    """The row stride of z_hat: D rounded up to a multiple of 16 elements. Triton specialises an integer argument
    divisible by 16 (tt.divisibility), so the GEMM kernels, which read whole padded rows (the padding is zeros, adding
    nothing to S or acc), get 16-byte-aligned rows and unmasked columns: vector loads and cp.async at any D."""
    return triton.cdiv(d, 16) * 16


def _gemm_operands(state: ForwardState, d: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """z_hat and the candidate columns as the GEMM kernels read them, and their row width: the single-process forward's
    rows, padded with zeros to ``padded_width(D)``; gathered rows, or a state laid out otherwise (e.g. copied), as
    contiguous rows of width D."""
    w = padded_width(d)
    if state.zhat.stride() == (w, 1) and state.cols.stride() == (w, 1):
        return state.zhat, state.cols, w
    return state.zhat.contiguous(), state.cols.contiguous(), d


def _dot_precision(dtype: torch.dtype, precision: str) -> str:
    # Only fp32 has a choice (tf32 tensor cores or exact fp32 FMA); bf16/fp16 always multiply exactly into fp32.
    return precision if dtype == torch.float32 else "ieee"


def nt_xent_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.5,
    *,
    group=None,
    precision: str = "tf32",
    config: str | None = None,
) -> tuple[torch.Tensor, ForwardState]:
    """Forward: z_a, z_b (N, D) raw embeddings -> (0-d loss in the input dtype, ForwardState). Two launches.

    group: a torch.distributed process group whose ranks' rows are gathered as candidate columns, or None.
    precision: "tf32" (default) or "ieee" for fp32 inputs' dot products. config: a name from ``list_configs()``.
    """
    z_a, z_b = _unit_stride(z_a), _unit_stride(z_b)
    n, d = z_a.shape
    a = 2 * n
    dev = z_a.device
    # Zero-padded rows (see padded_width), except when gathered: padding would add (w - D) / D to every all_gather.
    w = padded_width(d) if group is None else d
    zhat = torch.empty((a, w), dtype=z_a.dtype, device=dev)
    norm = torch.empty(a, dtype=torch.float32, device=dev)
    count = torch.empty(1, dtype=torch.int32, device=dev)
    block_d = min(triton.next_power_of_2(d), ELEMENTWISE_BLOCK_D)
    _nt_xent_norm_fwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK_R),)](
        za_ptr=z_a, zb_ptr=z_b, zhat_ptr=zhat, norm_ptr=norm, count_ptr=count, N=n, D=d,
        stride_a=z_a.stride(0), stride_b=z_b.stride(0), stride_zhat=w, EPS_=EPS, BLOCK_R=ELEMENTWISE_BLOCK_R,
        BLOCK_D=block_d, INPUT_PRECISION=_dot_precision(z_a.dtype, precision), INTERPRETER=INTERPRET,
    )  # fmt: skip
    cols, offset = all_gather_rows(zhat, group)
    m = cols.shape[0]
    stats = torch.empty((a, 2), dtype=torch.float32, device=dev)
    max_programs = triton.cdiv(a, min(c.block_m for c in CONFIGS.values()))
    partial = torch.empty(max_programs, dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=z_a.dtype, device=dev)
    # The GEMM kernels work on the padded width (the same tiling as D's: every block is a multiple of 16).
    tiling = d_tiling(w, _exact_fp32(z_a.element_size(), precision))
    _launch(
        "fwd", _nt_xent_fwd_kernel, lambda meta: (triton.cdiv(a, meta["BLOCK_M"]),), a, w, z_a.element_size(), config,
        zhat_ptr=zhat, cols_ptr=cols, stats_ptr=stats, partial_ptr=partial, count_ptr=count, loss_ptr=loss,
        A=a, M=m, D=w, OFFSET=offset, QK_SCALE=LOG2E / temperature, inv_t=1.0 / temperature, inv_a=1.0 / a,
        SHIFT=temperature >= SHIFT_MIN_TEMPERATURE, BLOCK_D=tiling.block_d, D_BLOCKS=tiling.d_blocks,
        INPUT_PRECISION=_dot_precision(z_a.dtype, precision), INTERPRETER=INTERPRET, BLOCK_R=REDUCE_BLOCK,
    )  # fmt: skip
    stats_cols, _ = all_gather_rows(stats, group)
    zhat_d = zhat[:, :d]
    cols_d = zhat_d if cols is zhat else cols[:, :d]
    return loss, ForwardState(
        zhat=zhat_d, norm=norm, stats=stats, cols=cols_d, stats_cols=stats_cols, offset=offset
    )


def nt_xent_backward(
    grad_out: torch.Tensor,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    state: ForwardState,
    temperature: float = 0.5,
    *,
    group=None,
    precision: str = "tf32",
    config: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward: upstream gradient (0-d) -> (dz_a, dz_b), each (N, D) in the input dtype. Two launches, no atomics.

    With ``group`` every rank's upstream gradient is gathered (one scalar each) to weight the P_ji of its columns.
    """
    z_a, z_b = _unit_stride(z_a), _unit_stride(z_b)
    n, d = z_a.shape
    a = 2 * n
    m = state.cols.shape[0]
    g = grad_out.reshape(1).to(torch.float32)
    g_cols = all_gather_scalar(g, group)
    if m == 2:
        # One pair in all (N = 1 on one rank): each row's only candidate is its positive, so L = 0 for every z and the
        # gradient is exactly 0. The kernels would return their rounding residue of P - 1 instead, which the /eps chain
        # of an all-zero row blows up to inf.
        return torch.zeros_like(z_a), torch.zeros_like(z_b)
    zhat, cols, w = _gemm_operands(state, d)
    acc = torch.empty((a, w), dtype=torch.float32, device=z_a.device)
    tiling = d_tiling(w, _exact_fp32(z_a.element_size(), precision))
    chunks = triton.cdiv(w, tiling.block_do)
    _launch(
        "bwd", _nt_xent_bwd_kernel, lambda meta: (triton.cdiv(a, meta["BLOCK_M"]), chunks), a, w,
        z_a.element_size(), config,
        zhat_ptr=zhat, cols_ptr=cols, stats_ptr=state.stats, stats_cols_ptr=state.stats_cols, g_ptr=g,
        g_cols_ptr=g_cols, acc_ptr=acc, A=a, M=m, D=w, OFFSET=state.offset, QK_SCALE=LOG2E / temperature,
        SHIFT=temperature >= SHIFT_MIN_TEMPERATURE, BLOCK_D=tiling.block_d, D_BLOCKS=tiling.d_blocks,
        BLOCK_DO=tiling.block_do, INPUT_PRECISION=_dot_precision(z_a.dtype, precision), INTERPRETER=INTERPRET,
    )  # fmt: skip
    dz_a = torch.empty((n, d), dtype=z_a.dtype, device=z_a.device)
    dz_b = torch.empty_like(dz_a)
    _nt_xent_norm_bwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK_R),)](
        za_ptr=z_a, zb_ptr=z_b, norm_ptr=state.norm, acc_ptr=acc, dza_ptr=dz_a, dzb_ptr=dz_b,
        N=n, D=d, stride_a=z_a.stride(0), stride_b=z_b.stride(0), stride_acc=w, grad_scale=1.0 / (a * temperature),
        EPS_=EPS, BLOCK_R=ELEMENTWISE_BLOCK_R, BLOCK_D=min(triton.next_power_of_2(d), ELEMENTWISE_BLOCK_D),
        INTERPRETER=INTERPRET,
    )  # fmt: skip
    return dz_a, dz_b


class NTXentTritonFunction(torch.autograd.Function):
    """Autograd glue: the forward saves z_a, z_b and the O(A D) state; the backward runs the two backward kernels."""

    @staticmethod
    def forward(ctx, z_a, z_b, temperature, group, precision, config):
        loss, state = nt_xent_forward(
            z_a, z_b, temperature, group=group, precision=precision, config=config
        )
        ctx.save_for_backward(z_a, z_b, *state.tensors())
        ctx.offset, ctx.temperature = state.offset, temperature
        ctx.options = dict(group=group, precision=precision, config=config)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        z_a, z_b, *tensors = ctx.saved_tensors
        state = ForwardState(*tensors, offset=ctx.offset)
        dz_a, dz_b = nt_xent_backward(grad_out, z_a, z_b, state, ctx.temperature, **ctx.options)
        return dz_a, dz_b, None, None, None, None


def nt_xent_triton(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.5,
    *,
    group=None,
    precision: str = "tf32",
    config: str | None = None,
) -> torch.Tensor:
    """Fused NT-Xent with autograd. z_a, z_b: (N, D) fp32/bf16/fp16 CUDA tensors (CPU under TRITON_INTERPRET=1).

    No input checks here: ``fastclr.nt_xent`` runs them (``check_supported`` is what this kernel adds to them).

    Args:
        temperature: tau > 0.
        group: torch.distributed process group to gather negatives from, or None.
        precision: fp32 inputs only: "tf32" (tensor cores, ~1e-3 relative error on S) or "ieee" (exact fp32).
        config: a kernel variant from ``list_configs()`` (e.g. "BM64_BN64_W4_S3") forced on both GEMM kernels, for
            microbenchmarks; None autotunes on the GPU over the spill-free candidates (``candidate_configs``) and takes
            the first candidate under the interpreter.

    Returns:
        0-d loss in the input dtype.
    """
    return NTXentTritonFunction.apply(z_a, z_b, float(temperature), group, precision, config)

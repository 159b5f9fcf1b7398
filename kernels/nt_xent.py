r"""Fused NT-Xent in Triton: in-kernel L2 normalisation, online-logsumexp forward, single-pass symmetric backward.

Notation (the tiled torch path's; ``fastclr.nt_xent_spec`` holds the constants, checks and state both share):
z = [z_a; z_b] (A = 2N rows), z_hat_i = z_i / max(||z_i||, eps),
S = z_hat cols^T with cols = z_hat (or the z_hat of every rank, local row i at column OFFSET + i), pos(i) = (i + N) mod A.

    forward    lse_i = log sum_{j != i} exp(S_ij / tau),        L = 1/A * sum_i (lse_i - S_{i,pos(i)} / tau)
    backward   dL/dz_hat_i = g/(A tau) * [ sum_{j != i} (P_ij + P_ji) cols_j - 2 z_hat_pos(i) ]
               P_ij = exp(S_ij/tau - lse_i),   P_ji = exp(S_ij/tau - lse_j)             (S is symmetric)
    chain      dL/dz_i = (dz_hat_i - z_hat_i <z_hat_i, dz_hat_i>) / ||z_i||       (dz_hat_i / eps for clamped rows)

The trick that makes it cheap: S is symmetric, so the row block i of S alone yields the whole gradient of rows i
(the P_ji term needs only lse_j, saved by the forward): no transpose pass, no float atomics (an integer arrival counter
per row block picks which split combines the partials, in a fixed order), and forward + backward cost three
(2N)x(2N)xD GEMMs (S forward, S again and W @ cols backward). The (2N)x(2N) matrix never exists in memory.
On one process with the fixed shift (tau >= SHIFT_MIN_TEMPERATURE) E_ij = exp((S_ij - 1)/tau) is symmetric and
l_i = sum_{j != i} E_ij a plain sum, so the forward computes only the tiles on and above the diagonal: each gives the
row sums of its rows and the column sums of its columns (= the row sums of those rows over its rows), half a GEMM. Its
diagonal squares are whole MMA tiles; it keeps their S (2N x BLOCK_M fp32), which the backward loads instead of
computing again: forward + backward execute (2N)^2 D (5/2 - BLOCK_M / (2 2N)) MACs (``executed_macs``).

Launches (two forward, or three on the upper-triangle path; three backward):
    forward    _nt_xent_norm_fwd_kernel   raw z_a, z_b -> z_hat (A, D) in the input dtype and norms (A,); one process:
                                          z_hat rows zero-padded to a multiple of 16 elements, which the GEMM kernels
                                          read whole (aligned, unmasked: vector loads at any D, see ``padded_width``)
               _nt_xent_fwd_kernel        row blocks x column splits: online logsumexp in fp32 -> per-row partials
                                          (m, l, positive logit) per split; the last split of a row block to arrive
                                          combines them in split order into the stats (m_i, log l_i) and the row
                                          block's loss, the last row block adds those in order (no host sync)
         or    _nt_xent_sym_fwd_kernel    one process, fixed shift: row-block pairs (b, nB - 1 - b) x column splits,
                                          the tiles at and right of each row block's diagonal square: row sums per
                                          split (splits, A), column sums per row block (a workspace of at most
                                          SYM_MAX_SLOTS row blocks x A, the row blocks beyond it in further launches),
                                          positive logits (A,), the diagonal squares' S (``diagonal_square``)
               _nt_xent_sym_combine_kernel  l_i = column sums of the row blocks left of row i, in row-block-pair
                                          order (per launch, onto the earlier launches' running sum), + row sums in
                                          split order -> stats (1, log l_i), loss (the last program adds the rows'
                                          sums in order)
    backward   _nt_xent_col_terms_kernel  per column j (M,): g_j / g_max (the rank's upstream gradient), times 1/l_j
                                          on the fixed-shift path, once per column instead of per S element
               _nt_xent_bwd_kernel        row blocks x output D chunks x column splits (S of the forward's diagonal
                                          squares loaded, not computed): per split, fp32 partial
                                          acc_i = g_max sum_j W_ij cols_j with
                                          W_ij = (g P_ij + g_j P_ji - 2 g [j = pos(i)]) / g_max, W_ii = 0,
                                          g_max = max_r |g_r|: W (|W| <= 2) is rounded to the input dtype for the
                                          tensor cores, the upstream gradients' scale g_max is applied in fp32
               _nt_xent_norm_bwd_kernel   acc = the splits' partials added in split order, dz_hat = acc / (A tau),
                                          then the chain through the normalisation

Interior and boundary blocks (FlashAttention's split of its causal mask), fixed-shift path: a row block needs masks only
in a few column blocks (the diagonal, the positives, a ragged last block). The main loops run the other blocks without
any mask, their block index stepping over the boundary runs (``_interior_block``: a few scalar instructions per block),
and a second loop runs the boundary blocks with their masks, each block once (blocks where runs overlap twice, counted
once: ``executed_macs``).

Column splits (FlashDecoding's split of the key axis): a row block's columns are dealt to several programs so that the
grid has at least PROGRAMS_PER_SM x the SM count programs also where rows are few (a DDP rank's 2N = 1024 rows against
8192 gathered columns is 8 row blocks). Partials are combined in a fixed order, never with float atomics, so the
result is deterministic for a given device and config (``launch_grid`` says how many splits a launch takes).

Exponentials are base 2 (``exp2`` is the native instruction): QK_SCALE = log2(e)/tau. Every exponent is a difference of
cosines times QK_SCALE, never a difference of two numbers of size 1/tau (see _nt_xent_fwd_kernel).
For D up to MAX_BLOCK_D the whole row fits one block and forward + backward execute exactly three GEMMs (plus padding);
above it the forward loops over D, and the backward is the wide one (``wide_backward``): a fused backward would keep a
BLOCK_M x D accumulator, or recompute S once per output chunk of D (D / 128 + 2 GEMMs: 18 at D = 2048). Instead a weight
pass (the backward kernel with STORE_W) computes S once over all of D and writes W, in the input dtype, for a super-block
of columns (``wide_columns``: at most WIDE_W_BYTES, 4096 columns at 2N = 32768 in bf16), and a plain GEMM
(_nt_xent_bwd_gemm_kernel) adds W @ cols into the fp32 accumulator, super-block after super-block: three GEMMs at any D
(two and a half with the upper-triangle forward), plus W written and read once, 2 (2N)^2 bytes in bf16, small next to
the 2 (2N)^2 D MACs at such D.
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
COL_TERMS_BLOCK = 1024  # columns per program of the backward's per-column terms
# Column splits (FlashDecoding-style): the GEMM kernels' grids get at least PROGRAMS_PER_SM x the SM count programs,
# rows x splits of the columns. The interpreter pretends to have INTERPRETER_SMS, so small tests take several splits.
PROGRAMS_PER_SM = 2
INTERPRETER_SMS = 2
# The upper-triangle forward keeps the column sums of at most SYM_MAX_SLOTS row blocks at once (SYM_MAX_SLOTS x 2N fp32:
# 256 MiB at 2N = 262144); more row blocks run in chunks of SYM_MAX_SLOTS / 2 row-block pairs, one launch each.
SYM_MAX_SLOTS = 256
# The wide backward (D > MAX_BLOCK_D) writes W for a super-block of columns at a time: at most WIDE_W_BYTES (A x columns
# in the input dtype: 4096 columns at 2N = 32768 in bf16), multiplied into cols by a plain GEMM in K steps of
# GEMM_BLOCK_K (by input element size: 64 for bf16/fp16, 32 for fp32).
WIDE_W_BYTES = 256 << 20
GEMM_BLOCK_K = {2: 64, 4: 32}
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
def _load_strided(
    ptr,
    row0,
    n_rows,
    stride,
    d0,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRETER: tl.constexpr,
    EVEN: tl.constexpr = False,
):
    """(BLOCK_R, BLOCK_D) tile at rows row0.., columns d0.. of an (n_rows, D) buffer with row stride ``stride``, zero
    outside. EVEN: the caller knows every row is inside (row0 + BLOCK_R <= n_rows), so only the columns are masked
    (loop-invariant).

    The 64-bit part of the address is one scalar; in-tile offsets are int32 (BLOCK_R * stride < 2^31), half the
    registers of a tile of 64-bit pointers.
    """
    base = ptr + tl.cast(row0, tl.int64) * stride
    r = tl.arange(0, BLOCK_R)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask = offs_d[None, :] < D
    if not EVEN:
        mask = mask & ((row0 + r)[:, None] < n_rows)
    tile = tl.load(base + (r[:, None] * stride + offs_d[None, :]), mask=mask, other=0.0)
    if INTERPRETER:
        # The interpreter's tl.dot on bf16/fp16 returns garbage, its fp32 dot is exact: upcast the (already rounded)
        # operands so the interpreter computes what the tensor cores compute up to the accumulation order.
        tile = tile.to(tl.float32)
    return tile


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
    EVEN: tl.constexpr = False,
):
    """``_load_strided`` of a row-major (n_rows, D) buffer (row stride D)."""
    return _load_strided(ptr, row0, n_rows, D, d0, D, BLOCK_R, BLOCK_D, INTERPRETER, EVEN)


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
    EVEN: tl.constexpr = False,
    TRANS: tl.constexpr = False,
):
    """S for rows r0.. x columns c0.., (BLOCK_M, BLOCK_N) fp32, or with TRANS its transpose (BLOCK_N, BLOCK_M): the
    column tile as the MMA's rows. With D_BLOCKS == 1 the row tile q is preloaded. EVEN: columns c0 .. c0 + BLOCK_N
    all exist (no row mask on their loads)."""
    if D_BLOCKS == 1:
        k = _load_rows(cols_ptr, c0, M, 0, D, BLOCK_N, BLOCK_D, INTERPRETER, EVEN)
        if TRANS:
            s = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    else:
        if TRANS:
            s = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D_BLOCKS * BLOCK_D, BLOCK_D):
            q_d = _load_rows(zhat_ptr, r0, A, d0, D, BLOCK_M, BLOCK_D, INTERPRETER)
            k_d = _load_rows(cols_ptr, c0, M, d0, D, BLOCK_N, BLOCK_D, INTERPRETER, EVEN)
            if TRANS:
                s = tl.dot(k_d, tl.trans(q_d), s, input_precision=INPUT_PRECISION)
            else:
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
    n_count,
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
    >= D wide (see ``padded_width``): columns D.. are written as zeros, so the GEMM kernels read whole rows unmasked.
    Also zeroes the forward kernel's n_count <= num_programs * BLOCK_R arrival counters."""
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    # The forward kernel's arrival counters start at zero (stream order puts these stores before that launch).
    tl.store(count_ptr + r, tl.zeros((BLOCK_R,), dtype=tl.int32), mask=r < n_count)
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
def _split_columns(M, BLOCK_N: tl.constexpr, AXIS: tl.constexpr):
    """Columns [begin, end) of this program's split, program_id(AXIS) of num_programs(AXIS): the column blocks of
    BLOCK_N dealt out in runs of cdiv(blocks, splits), so the last splits may be shorter, or empty (a split count chosen
    for another tile width)."""
    per = tl.cdiv(tl.cdiv(M, BLOCK_N), tl.num_programs(AXIS)) * BLOCK_N
    begin = tl.program_id(AXIS) * per
    return begin, tl.minimum(begin + per, M)


@triton.jit
def _blocks(lo, hi, BLOCK_N: tl.constexpr):
    """Column blocks [first, last) that columns [lo, hi) touch (lo >= 0); empty when hi <= lo."""
    first = lo // BLOCK_N
    return first, tl.where(hi > lo, tl.cdiv(hi, BLOCK_N), first)


@triton.jit
def _boundary_runs(r0, r1, n, M, OFFSET, BLOCK_N: tl.constexpr):
    """The column blocks where rows [r0, r1) need masks, as four runs [f, l) of block indices that may overlap or be
    empty: the diagonal (columns OFFSET + r0 .. OFFSET + r1), the two runs of positives (pos(i) = (i + N) mod A) and
    the ragged last block (columns >= M are padding). Every other block is interior: no mask touches it."""
    f0, l0 = _blocks(OFFSET + r0, OFFSET + r1, BLOCK_N)
    f1, l1 = _blocks(OFFSET + r0 + n, OFFSET + tl.minimum(r1, n) + n, BLOCK_N)
    f2, l2 = _blocks(OFFSET + tl.maximum(r0, n) - n, OFFSET + r1 - n, BLOCK_N)
    f3, l3 = _blocks(M - M % BLOCK_N, M, BLOCK_N)
    return f0, l0, f1, l1, f2, l2, f3, l3


@triton.jit
def _in(t, f, l):
    return (t >= f) & (t < l)


@triton.jit
def _sorted_runs(ga, ea, gb, eb):
    """Runs [ga, ea) and [gb, eb) ordered by their start."""
    swap = gb < ga
    return (
        tl.where(swap, gb, ga),
        tl.where(swap, eb, ea),
        tl.where(swap, ga, gb),
        tl.where(swap, ea, eb),
    )


@triton.jit
def _skipped_runs(f0, l0, f1, l1, f2, l2, lo, hi):
    """The diagonal run and the two runs of positives (``_boundary_runs``) within blocks [lo, hi), which may overlap,
    as three disjoint runs (start, length) in increasing order: the blocks a main loop skips (``_interior_block``)."""
    g0, n0 = _clip(f0, l0, lo, hi)
    g1, n1 = _clip(f1, l1, lo, hi)
    g2, n2 = _clip(f2, l2, lo, hi)
    g0, e0, g1, e1 = _sorted_runs(g0, g0 + n0, g1, g1 + n1)
    g1, e1, g2, e2 = _sorted_runs(g1, e1, g2, g2 + n2)
    g0, e0, g1, e1 = _sorted_runs(g0, e0, g1, e1)
    # Each run starts where the earlier ones end (an overlap is trimmed, a run inside an earlier one left empty).
    g1 = tl.maximum(g1, e0)
    e1 = tl.maximum(e1, g1)
    g2 = tl.maximum(g2, e1)
    e2 = tl.maximum(e2, g2)
    return g0, e0 - g0, g1, e1 - g1, g2, e2 - g2


@triton.jit
def _interior_block(b, s0, n0, s1, n1, s2, n2):
    """The b-th block (counting from the main loop's first) once the disjoint runs (s_k, n_k) of ``_skipped_runs``,
    in increasing order, are left out: a few scalar instructions per block, no per-element mask or select."""
    b = tl.where(b >= s0, b + n0, b)
    b = tl.where(b >= s1, b + n1, b)
    return tl.where(b >= s2, b + n2, b)


@triton.jit
def _clip(f, l, tb, te):
    """Run [f, l) clipped to blocks [tb, te): (start, length)."""
    g = tl.maximum(f, tb)
    return g, tl.maximum(tl.minimum(l, te) - g, 0)


@triton.jit
def _clip_runs(f0, l0, f1, l1, f2, l2, f3, l3, tb, te):
    """The four runs of ``_boundary_runs`` clipped to blocks [tb, te): (start, length) each, for ``_boundary_block``."""
    g0, n0 = _clip(f0, l0, tb, te)
    g1, n1 = _clip(f1, l1, tb, te)
    g2, n2 = _clip(f2, l2, tb, te)
    g3, n3 = _clip(f3, l3, tb, te)
    return g0, n0, g1, n1, g2, n2, g3, n3


@triton.jit
def _boundary_block(v, g0, n0, g1, n1, g2, n2, g3, n3):
    """The v-th block of the clipped runs (g_k, n_k) laid end to end, and 1.0 unless an earlier run already had it
    (0.0: overlapping runs are visited twice but counted once)."""
    v1 = v - n0
    v2 = v1 - n1
    v3 = v2 - n2
    t = tl.where(v < n0, g0 + v, tl.where(v1 < n1, g1 + v1, tl.where(v2 < n2, g2 + v2, g3 + v3)))
    seen = (
        ((v >= n0) & _in(t, g0, g0 + n0))
        | ((v1 >= n1) & _in(t, g1, g1 + n1))
        | ((v2 >= n2) & _in(t, g2, g2 + n2))
    )
    return t, tl.where(seen, 0.0, 1.0)


@triton.jit
def _publish_mean(
    partial_ptr,
    count_ptr,
    loss_ptr,
    pid,
    n_prog,
    value,
    inv_a,
    BLOCK_R: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """The mean without a host sync: program pid of n_prog publishes its loss sum (value) in partial_ptr, and the last
    one to arrive (arrival counter at count_ptr, re-armed to 0) adds them all in program order: loss = sum * inv_a."""
    tl.store(partial_ptr + pid, value)
    # The barrier orders all threads' stores before the (acq_rel) ticket.
    tl.debug_barrier()
    if tl.atomic_add(count_ptr, 1) == n_prog - 1:
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for b0 in range(0, n_prog, BLOCK_R):
            b = b0 + tl.arange(0, BLOCK_R)
            # .cg reads L2, where the other programs' partials are, never a stale L1 line.
            total += tl.load(partial_ptr + b, mask=b < n_prog, other=0.0, cache_modifier=".cg")
        tl.store(
            loss_ptr, _round_to(tl.sum(total, 0) * inv_a, loss_ptr.dtype.element_ty, INTERPRETER)
        )
        tl.store(count_ptr, 0)


@triton.jit
def _nt_xent_fwd_kernel(
    zhat_ptr,
    cols_ptr,
    stats_ptr,
    split_ptr,
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
    EXCLUDE_POS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_BLOCKS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Program (row block of BLOCK_M, column split): over the split's columns, the logsumexp terms of its rows (diagonal
    masked) and the positive logit picked from the same S tiles, as partials (m, l, s_pos) per row in split_ptr
    (3, splits, A). On the fixed-shift path the split's interior column blocks run without any mask and its boundary
    blocks (diagonal, positives, ragged last block: ``_boundary_runs``) in a second loop with them. The last split of a
    row block to finish combines them in split order into the per-row stats and the row block's loss sum; the last row block to finish takes the mean in row-block order. No host sync, and the
    result is deterministic: every sum runs in a fixed order (the arrival counters only pick who adds). EXCLUDE_POS
    (DCL): the positive is left out of l_i (but still picked for s_pos), so the loss is lse'_i - S_pos/tau.

    Writes stats_ptr[i] = (m_i, log l_i) with lse_i = m_i/tau + log l_i: m_i the row max of S in cosine units (1 on the
    fixed-shift path), l_i = sum_{j != i} exp((S_ij - m_i)/tau); a split's partial is the same pair over its columns,
    and they combine as l_i = sum_s l_s exp((m_s - m_i)/tau), m_i = max_s m_s. Every exponent, here and in the
    backward, is then a difference of cosines scaled by 1/tau, never a difference of two numbers of size 1/tau (at
    tau = 0.01 that alone would cost fp32 ~1e-5 absolute, on a gradient that can be ~0).
    """
    tl.static_assert(
        BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16"
    )
    tl.static_assert(D_BLOCKS >= 1)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    c_begin, c_end = _split_columns(M, BLOCK_N, 1)
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
    if SHIFT:
        # |S| <= 1, so (S - 1)/tau <= 0 (up to rounding): the fixed shift 1/tau replaces the running max and exp
        # cannot overflow; for tau >= SHIFT_MIN_TEMPERATURE the smallest term exp(-2/tau) is a normal fp32.
        # QK_SCALE = log2(e)/tau turns exp into the native exp2, and S QK_SCALE - QK_SCALE is one FFMA.
        # Interior blocks, as FlashAttention splits its causal mask: no mask, and the row sums stay per element
        # (l_acc, reduced once after the loop). The loop skips the diagonal and positives' runs (the boundary loop
        # below runs them with their masks) and stops before a ragged last block (also a boundary block), so every
        # column it loads exists: no row masks on the loads.
        f0, l0, f1, l1, f2, l2, f3, l3 = _boundary_runs(r0, r1, n, M, OFFSET, BLOCK_N)
        lo = c_begin // BLOCK_N
        hi = tl.minimum(c_end, M - M % BLOCK_N) // BLOCK_N
        s0, k0, s1, k1, s2, k2 = _skipped_runs(f0, l0, f1, l1, f2, l2, lo, hi)
        l_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for v in range(0, tl.maximum(hi - lo, 0) - k0 - k1 - k2):
            start_n = _interior_block(lo + v, s0, k0, s1, k1, s2, k2) * BLOCK_N
            s = _logits_tile(
                zhat_ptr, cols_ptr, q, r0, A, start_n, M, D,
                BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER, True,
            )  # fmt: skip
            l_acc += tl.exp2(s * QK_SCALE - QK_SCALE)
        l_i = tl.sum(l_acc, 1)
        # Boundary blocks of this split: diagonal and padding masked, the positive picked from the same S that enters
        # the sum (so identical rows give exactly log(A - 1)).
        g0, n0, g1, n1, g2, n2, g3, n3 = _clip_runs(
            f0, l0, f1, l1, f2, l2, f3, l3, c_begin // BLOCK_N, tl.cdiv(c_end, BLOCK_N)
        )
        for v in range(0, n0 + n1 + n2 + n3):
            t, keep = _boundary_block(v, g0, n0, g1, n1, g2, n2, g3, n3)
            start_n = t * BLOCK_N
            cols = start_n + tl.arange(0, BLOCK_N)
            s = _logits_tile(
                zhat_ptr, cols_ptr, q, r0, A, start_n, M, D,
                BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER,
            )  # fmt: skip
            valid = (cols[None, :] < M) & (cols[None, :] != diag[:, None])
            if EXCLUDE_POS:
                valid = valid & (cols[None, :] != pos_col[:, None])
            p = tl.where(valid, tl.exp2(s * QK_SCALE - QK_SCALE), 0.0)
            l_i += tl.sum(p, 1) * keep
            s_pos += tl.sum(tl.where(cols[None, :] == pos_col[:, None], s, 0.0), 1) * keep
    else:
        for start_n in range(c_begin, c_end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            s = _logits_tile(
                zhat_ptr, cols_ptr, q, r0, A, start_n, M, D,
                BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER,
            )  # fmt: skip
            c0 = start_n - OFFSET
            c1 = c0 + BLOCK_N
            if ((c0 < hi_a) & (c1 > lo_a)) | ((c0 < hi_b) & (c1 > lo_b)):
                # Only the (at most two) tiles holding positives pay for the select (and DCL's exclusion: a mask on
                # every tile spilled on sm_80).
                is_pos = cols[None, :] == pos_col[:, None]
                s_pos += tl.sum(tl.where(is_pos, s, 0.0), 1)
                if EXCLUDE_POS:
                    s = tl.where(is_pos, float("-inf"), s)
            # Online logsumexp: rescale the running sum when the running max grows.
            s = tl.where(col_ok[None, :] & (cols[None, :] != diag[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A tile can hold only masked columns for a row; subtract 0 then so that -inf - -inf never makes NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2((m_i - m_safe) * QK_SCALE) + tl.sum(
                tl.exp2((s - m_safe[:, None]) * QK_SCALE), 1
            )
            m_i = m_new
    # The split's partials, planes m, l, s_pos of (3, splits, A).
    plane = n_splits * A
    part = split_ptr + split * A + rows
    tl.store(part, m_i, mask=row_ok)
    tl.store(part + plane, l_i, mask=row_ok)
    tl.store(part + 2 * plane, s_pos, mask=row_ok)
    # The barrier orders all threads' stores before the (acq_rel) ticket; counter 1 + pid counts this row block's splits.
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + 1 + pid, 1) == n_splits - 1:
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        s_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        if not SHIFT:
            m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            for k in range(0, n_splits):
                # .cg reads L2, where the other programs' partials are, never a stale L1 line.
                m_k = tl.load(
                    split_ptr + k * A + rows, mask=row_ok, other=0.0, cache_modifier=".cg"
                )
                m_i = tl.maximum(m_i, m_k)
            # -inf only in padding rows: every row has a candidate.
            m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
        for k in range(0, n_splits):
            part = split_ptr + k * A + rows
            l_k = tl.load(part + plane, mask=row_ok, other=0.0, cache_modifier=".cg")
            if not SHIFT:
                m_k = tl.load(part, mask=row_ok, other=0.0, cache_modifier=".cg")
                l_k = l_k * tl.exp2((m_k - m_i) * QK_SCALE)  # an empty split's m_k = -inf adds 0
            l_i += l_k
            s_pos += tl.load(part + 2 * plane, mask=row_ok, other=0.0, cache_modifier=".cg")
        log_l = tl.log(l_i)
        tl.store(stats_ptr + 2 * rows, m_i, mask=row_ok)
        tl.store(stats_ptr + 2 * rows + 1, log_l, mask=row_ok)
        # loss_i = lse_i - S_pos/tau = log l_i + (m_i - S_pos)/tau
        row_loss = tl.where(row_ok, log_l + (m_i - s_pos) * inv_t, 0.0)
        # Re-armed, so a re-run of this launch alone (autotuning) reduces correctly.
        tl.store(count_ptr + 1 + pid, 0)
        _publish_mean(
            partial_ptr, count_ptr, loss_ptr, pid, tl.num_programs(0), tl.sum(row_loss, 0), inv_a,
            BLOCK_R, INTERPRETER,
        )  # fmt: skip


@triton.jit
def _sym_boundary_exp(
    s,
    start_n,
    r0,
    r1,
    n,
    A,
    spos_ptr,
    RIGHT: tl.constexpr,
    QK_SCALE,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EXCLUDE_POS: tl.constexpr,
):
    """E^T (BLOCK_N, BLOCK_M) of a boundary block of ``_sym_piece`` from its S^T, masked (the diagonal, columns >= A,
    EXCLUDE_POS the positives), after storing the positive logits it holds. RIGHT: the block is right of the diagonal
    square (not in it).

    pos is an involution: S_{j,pos(j)} is the positive logit of column j and of row pos(j), picked from the same S that
    enters the sums (identical rows give exactly log(A - 1)) along the tile's in-thread axis. Row pos(j) takes it
    wherever it lies, column j only right of the diagonal square (inside, its own row picks it)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    pos_of_col = tl.where(cols < n, cols + n, cols - n)
    pick = tl.sum(tl.where(tl.arange(0, BLOCK_M)[None, :] == (pos_of_col - r0)[:, None], s, 0.0), 1)
    mine = (pos_of_col >= r0) & (pos_of_col < r1) & (cols < A)
    tl.store(spos_ptr + pos_of_col, pick, mask=mine)
    if RIGHT:
        tl.store(spos_ptr + cols, pick, mask=mine)
    valid = (cols[:, None] < A) & ((cols - r0)[:, None] != tl.arange(0, BLOCK_M)[None, :])
    if EXCLUDE_POS:
        valid = valid & (tl.arange(0, BLOCK_M)[None, :] != (pos_of_col - r0)[:, None])
    return tl.where(valid, tl.exp2(s * QK_SCALE - QK_SCALE), 0.0)


@triton.jit
def _sym_piece(
    zhat_ptr,
    rowpart_ptr,
    colpart_ptr,
    spos_ptr,
    square_ptr,
    blk,
    jb,
    je,
    slot,
    split,
    write,
    A,
    D,
    QK_SCALE,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_BLOCKS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    EXCLUDE_POS: tl.constexpr,
    STORE_SQUARE: tl.constexpr,
):
    """Row block blk (rows r0 = blk BLOCK_M ..) over its column blocks [jb, je), all at or right of its diagonal
    square (columns r0 .. r0 + BLOCK_M, blocks blk R .. (blk + 1) R with R = BLOCK_M / BLOCK_N).

    Tiles are computed transposed, E^T (BLOCK_N, BLOCK_M) with E = exp2(S QK_SCALE - QK_SCALE): a column's sum over
    the row block is a reduction within each thread's registers (the MMA layout spreads the tile's rows over threads),
    and in the first loop the row sums stay per element (l_acc, reduced once; the boundary loops reduce per tile,
    which keeps them spill-free next to the positives' picks). Right of the diagonal square each tile adds its row
    sums to the rows and stores its column sums in colpart_ptr[slot, columns]: E is symmetric, so they are the sums of
    those columns' rows over this row block's columns. The diagonal square gives row sums only (it holds both E_ij
    and E_ji). Masks only in the boundary loops: the diagonal square's (the second loop), then the blocks holding the
    positives of rows < N (pos(i) = i + N, the only positives right of the square) and a ragged last block (the
    third); the first loop runs the other blocks with none, each visited once (its index skips the positives' run).

    Positive logits: each S_{i,pos(i)} is stored once, in spos_ptr[i], from the tile holding column pos(i) of row i
    (the diagonal square or the positives' run), and right of the diagonal square also for row pos(i) (S_{i, i + N} is
    the positive of row i + N too). The row sums over [jb, je) go to rowpart_ptr[split, rows] when write (an empty
    piece writes zeros). EXCLUDE_POS (DCL): E_{i,pos(i)} enters neither the row nor the column sums (the pair is one
    element of the upper triangle, in a boundary block, and the sums of both its rows leave it out).

    STORE_SQUARE: the diagonal square's S, raw fp32, goes to square_ptr[rows, columns - r0] (rows padded to a multiple
    of BLOCK_M, BLOCK_M wide): the backward loads it there instead of computing those tiles again, so that the square's
    lower half, which this forward computes only because MMA tiles are whole, is not paid for twice. The host sets it
    only for N >= BLOCK_M, where no positive lies in a square: the second loop then stores S and masks the diagonal
    alone (from a loop that also picks positives the store spilled on sm_90, BM128_BN128_W8, for DCL).
    """
    R: tl.constexpr = BLOCK_M // BLOCK_N
    n = A // 2
    r0 = blk * BLOCK_M
    r1 = tl.minimum(r0 + BLOCK_M, A)
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < A
    q = rows  # placeholder; the row tile is preloaded only when all of D fits one block
    if D_BLOCKS == 1:
        q = _load_rows(zhat_ptr, r0, A, 0, D, BLOCK_M, BLOCK_D, INTERPRETER)
    off = (blk + 1) * R  # the first block right of the diagonal square
    n_blocks = tl.cdiv(A, BLOCK_N)
    full = A // BLOCK_N  # blocks before a ragged last one
    # The positives right of the diagonal square: columns r0 + N .. min(r1, N) + N (rows < N).
    f1, l1 = _blocks(r0 + n, tl.minimum(r1, n) + n, BLOCK_N)
    f1 = tl.maximum(f1, off)
    l1 = tl.maximum(l1, f1)
    # Interior blocks: [lo, hi) without the positives' run [gp, gp + n_pos), visited in order by a compact index.
    lo = tl.maximum(jb, off)
    hi = tl.minimum(je, full)
    gp, n_pos = _clip(f1, l1, lo, hi)
    cp = colpart_ptr + tl.cast(slot, tl.int64) * A
    ragged = (full >= off) & ((full < f1) | (full >= l1))
    g0, n0, g1, n1, g2, n2, g3, n3 = _clip_runs(
        blk * R, tl.minimum(off, n_blocks), f1, l1, 0, 0, full, tl.where(ragged, n_blocks, full), jb, je
    )  # fmt: skip
    l_acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for v in range(0, tl.maximum(hi - lo, 0) - n_pos):
        b = lo + v
        start_n = tl.where(b >= gp, b + n_pos, b) * BLOCK_N
        # |S| <= 1: the fixed shift (one FFMA with the scale), no mask, no select.
        e = tl.exp2(
            _logits_tile(
                zhat_ptr, zhat_ptr, q, r0, A, start_n, A, D,
                BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER, True, True,
            ) * QK_SCALE - QK_SCALE
        )  # fmt: skip
        l_acc += e
        tl.store(cp + start_n + tl.arange(0, BLOCK_N), tl.sum(e, 1))
    l_i = tl.sum(l_acc, 0)
    # Boundary blocks, each once. The diagonal square (row sums only) in a loop of its own, with STORE_SQUARE also its
    # S: storing it from the loop below would spill.
    for v in tl.range(0, n0, num_stages=1):
        start_n = (g0 + v) * BLOCK_N
        s = _logits_tile(
            zhat_ptr, zhat_ptr, q, r0, A, start_n, A, D,
            BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER, False, True,
        )  # fmt: skip
        if STORE_SQUARE:
            out = square_ptr + tl.cast(r0, tl.int64) * BLOCK_M + (start_n - r0)
            tl.store(
                out + (tl.arange(0, BLOCK_M)[None, :] * BLOCK_M + tl.arange(0, BLOCK_N)[:, None]), s
            )
            # N >= BLOCK_M: no positive in the square, whose only masks are the diagonal and a ragged end.
            cols = start_n + tl.arange(0, BLOCK_N)
            valid = (cols[:, None] < A) & ((cols - r0)[:, None] != tl.arange(0, BLOCK_M)[None, :])
            e = tl.where(valid, tl.exp2(s * QK_SCALE - QK_SCALE), 0.0)
        else:
            e = _sym_boundary_exp(
                s, start_n, r0, r1, n, A, spos_ptr, False, QK_SCALE, BLOCK_M, BLOCK_N, EXCLUDE_POS
            )
        l_i += tl.sum(e, 0)
    # The positives' run and a ragged last block outside it. Unpipelined: a few blocks per row block, and a second tile
    # in flight would spill next to the picks.
    for v in tl.range(n0, n0 + n1 + n2 + n3, num_stages=1):
        t, _ = _boundary_block(v, g0, n0, g1, n1, g2, n2, g3, n3)
        start_n = t * BLOCK_N
        s = _logits_tile(
            zhat_ptr, zhat_ptr, q, r0, A, start_n, A, D,
            BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER, False, True,
        )  # fmt: skip
        e = _sym_boundary_exp(
            s, start_n, r0, r1, n, A, spos_ptr, True, QK_SCALE, BLOCK_M, BLOCK_N, EXCLUDE_POS
        )
        l_i += tl.sum(e, 0)
        cols = start_n + tl.arange(0, BLOCK_N)
        tl.store(cp + cols, tl.sum(e, 1), mask=cols < A)
    tl.store(rowpart_ptr + tl.cast(split, tl.int64) * A + rows, l_i, mask=row_ok & write)


@triton.jit
def _nt_xent_sym_fwd_kernel(
    zhat_ptr,
    rowpart_ptr,
    colpart_ptr,
    spos_ptr,
    square_ptr,
    A,
    M,
    D,
    PAIR0,
    QK_SCALE,
    EXCLUDE_POS: tl.constexpr,
    STORE_SQUARE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_BLOCKS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """The upper-triangle forward (one process, M = A columns, fixed shift): program (pair, column split).

    Row block p = PAIR0 + program_id(0) is paired with row block nB - 1 - p (nB = cdiv(A, BLOCK_M); the middle one of
    an odd count alone): row block b has U_b = cdiv(A, BLOCK_N) - b R column blocks at and right of its diagonal
    square, and a pair's U_p + U_q is the same for every pair, so the splits of all pairs are equal in work. Split s
    takes the s-th run of cdiv(U_p + U_q, splits) blocks of p's blocks followed by q's (``_sym_piece`` for each part).
    Outputs (``_nt_xent_sym_combine_kernel`` adds them in a fixed order): row sums rowpart_ptr (splits, A), column sums
    colpart_ptr (2 pairs, A) in slots 2 (p - PAIR0) and 2 (p - PAIR0) + 1, positive logits spos_ptr (A,), and
    (STORE_SQUARE) the diagonal squares' S in square_ptr (A padded to BLOCK_M, BLOCK_M) for the backward. M is unused
    (the autotuner's key and pruning read it).
    """
    tl.static_assert(
        BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16"
    )
    tl.static_assert(
        BLOCK_M % BLOCK_N == 0, "the diagonal square is R = BLOCK_M / BLOCK_N column blocks"
    )
    R: tl.constexpr = BLOCK_M // BLOCK_N
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    p = PAIR0 + pid
    qb = tl.cdiv(A, BLOCK_M) - 1 - p
    n_blocks = tl.cdiv(A, BLOCK_N)
    u_p = n_blocks - p * R
    u_q = tl.where(qb > p, n_blocks - qb * R, 0)
    per = tl.cdiv(u_p + u_q, n_splits)
    lo = tl.minimum(split * per, u_p + u_q)
    hi = tl.minimum(lo + per, u_p + u_q)
    _sym_piece(
        zhat_ptr, rowpart_ptr, colpart_ptr, spos_ptr, square_ptr, p, p * R + tl.minimum(lo, u_p),
        p * R + tl.minimum(hi, u_p), 2 * pid, split, p >= 0, A, D, QK_SCALE, BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS,
        INPUT_PRECISION, INTERPRETER, EXCLUDE_POS, STORE_SQUARE,
    )  # fmt: skip
    _sym_piece(
        zhat_ptr, rowpart_ptr, colpart_ptr, spos_ptr, square_ptr, qb, qb * R + tl.maximum(lo - u_p, 0),
        qb * R + tl.maximum(hi - u_p, 0), 2 * pid + 1, split, qb > p, A, D, QK_SCALE,
        BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER, EXCLUDE_POS, STORE_SQUARE,
    )  # fmt: skip


@triton.jit
def _nt_xent_sym_combine_kernel(
    rowpart_ptr,
    colpart_ptr,
    colacc_ptr,
    spos_ptr,
    stats_ptr,
    partial_ptr,
    count_ptr,
    loss_ptr,
    A,
    n_splits,
    PAIR0,
    n_pairs,
    inv_t,
    inv_a,
    BLOCK_M: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Rows i (BLOCK_R per program) after one chunk of ``_nt_xent_sym_fwd_kernel``: l_i = (the earlier chunks' column
    sums, colacc_ptr, unless FIRST) + the chunk's column sums of row blocks b < i // BLOCK_M in slot order, the slots
    the tile kernel wrote (row i is right of b's diagonal square exactly then) + (LAST) the row sums in split order.
    Not LAST: l_i so far goes to colacc_ptr. LAST: stats (1, log l_i) and loss_i = log l_i + (1 - S_{i,pos(i)}) / tau,
    their mean through ``_publish_mean``. Every sum runs in a fixed order: the result is deterministic."""
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < A
    last_block = tl.cdiv(A, BLOCK_M) - 1
    blk = r // BLOCK_M
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if not FIRST:
        total = tl.load(colacc_ptr + r, mask=ok, other=0.0)
    for k in range(0, 2 * n_pairs):
        p = PAIR0 + k // 2
        b = tl.where(k % 2 == 0, p, last_block - p)
        # The middle row block of an odd count has no second slot.
        use = ok & (b < blk) & ((k % 2 == 0) | (b > p))
        total += tl.load(colpart_ptr + tl.cast(k, tl.int64) * A + r, mask=use, other=0.0)
    if LAST:
        for k in range(0, n_splits):
            total += tl.load(rowpart_ptr + tl.cast(k, tl.int64) * A + r, mask=ok, other=0.0)
        log_l = tl.log(tl.where(ok, total, 1.0))
        tl.store(stats_ptr + 2 * r, tl.full((BLOCK_R,), 1.0, dtype=tl.float32), mask=ok)
        tl.store(stats_ptr + 2 * r + 1, log_l, mask=ok)
        s_pos = tl.load(spos_ptr + r, mask=ok, other=0.0)
        row_loss = tl.where(ok, log_l + (1.0 - s_pos) * inv_t, 0.0)
        _publish_mean(
            partial_ptr, count_ptr, loss_ptr, pid, tl.num_programs(0), tl.sum(row_loss, 0), inv_a,
            BLOCK_R, INTERPRETER,
        )  # fmt: skip
    else:
        tl.store(colacc_ptr + r, total, mask=ok)


@triton.jit
def _grad_max(g_ptr, g_cols_ptr, n_ranks):
    """g_max = max_r |g_r| over every rank's upstream gradient (g_cols holds them all, this rank's too); 1 if all are 0.

    W stays free of the upstream gradients' scale: they enter it as g / g_max (so |W| <= 2), and g_max multiplies the
    fp32 accumulator at the end. A GradScaler makes g as large as 2^15, where a W of ~2g rounded to fp16 overflows
    (and a tiny g would underflow)."""
    g_max = tl.abs(tl.load(g_ptr).to(tl.float32))
    for r in range(0, n_ranks):
        g_max = tl.maximum(g_max, tl.abs(tl.load(g_cols_ptr + r).to(tl.float32)))
    return tl.where(g_max > 0, g_max, 1.0)


@triton.jit
def _nt_xent_col_terms_kernel(
    stats_cols_ptr,
    g_ptr,
    g_cols_ptr,
    terms_ptr,
    A,
    M,
    SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per-column terms of the backward, once per column instead of once per S element: column j belongs to rank
    j // A, whose upstream gradient weights its P_ji; terms_j = g_j / g_max times exp2(-log2 l_j) = 1/l_j on the
    fixed-shift path (u_j: P_ji g_j / g_max = exp2(t_ij) u_j there), or g_j / g_max alone on the running-max path.
    Local row i is column OFFSET + i, so the rows' own u_i are read from the same array."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < M
    g_max = _grad_max(g_ptr, g_cols_ptr, M // A)
    term = tl.load(g_cols_ptr + c // A, mask=ok, other=0.0).to(tl.float32) / g_max
    if SHIFT:
        term = term * tl.exp2(-tl.load(stats_cols_ptr + 2 * c + 1, mask=ok, other=0.0) * _LOG2E)
    tl.store(terms_ptr + c, term, mask=ok)


@triton.jit
def _bwd_tile(
    zhat_ptr,
    cols_ptr,
    q,
    r0,
    A,
    start_n,
    M,
    D,
    pid_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_BLOCKS: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    EVEN: tl.constexpr = False,
    STORE_W: tl.constexpr = False,
):
    """The backward's operands at column block start_n: S (BLOCK_M, BLOCK_N) fp32 and the (BLOCK_N, BLOCK_DO) rows of
    cols for output chunk pid_d (with one D block, the very tile S was computed from). EVEN: as ``_logits_tile``.
    STORE_W (the wide backward's weight pass): S alone, returned twice."""
    if STORE_W:
        s = _logits_tile(
            zhat_ptr, cols_ptr, q, r0, A, start_n, M, D,
            BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER, EVEN,
        )  # fmt: skip
        k = s
    elif D_BLOCKS == 1:
        k = _load_rows(cols_ptr, start_n, M, 0, D, BLOCK_N, BLOCK_D, INTERPRETER, EVEN)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    else:
        s = _logits_tile(
            zhat_ptr, cols_ptr, q, r0, A, start_n, M, D,
            BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, INPUT_PRECISION, INTERPRETER, EVEN,
        )  # fmt: skip
        k = _load_rows(
            cols_ptr, start_n, M, pid_d * BLOCK_DO, D, BLOCK_N, BLOCK_DO, INTERPRETER, EVEN
        )
    return s, k


@triton.jit
def _bwd_consume(
    acc, w, k, w_ptr, rows, cols, A, COL0, COL1, keep,
    STORE_W: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """acc + W @ k on the tensor cores; or, in the wide backward's weight pass (STORE_W), W stored at (rows, cols -
    COL0) of the (A, COL1 - COL0) workspace w_ptr in its element type (a block a boundary run visits twice, keep = 0,
    is stored once) and acc returned unchanged. W arrives rounded to the operand type (``_round_operand``)."""
    if STORE_W:
        width = COL1 - COL0
        out = w_ptr + tl.cast(rows, tl.int64)[:, None] * width + (cols - COL0)[None, :]
        limit = tl.where(keep != 0.0, COL1, COL0)  # every column of the block is >= COL0
        ok = (rows[:, None] < A) & (cols[None, :] < limit)
        tl.store(out, w.to(w_ptr.dtype.element_ty), mask=ok)
    else:
        if INTERPRETER:
            w = w.to(tl.float32)
        acc = tl.dot(w, k, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _boundary_w(s, cols, u_i, u_j, diag, pos_col, g, keep, QK_SCALE, EXCLUDE_POS: tl.constexpr):
    """W of a boundary block on the fixed-shift path, in fp32: exp2(S QK_SCALE - QK_SCALE) (u_i + u_j) with W_ii = 0
    and the positive's -2g, times keep (0 for a block an earlier run already had, see ``_boundary_block``)."""
    w = tl.exp2(s * QK_SCALE - QK_SCALE) * (u_i[:, None] + u_j[None, :])
    w = tl.where(cols[None, :] != diag[:, None], w, 0.0)
    # The positive's -2g joins W here, in fp32: W_pos = g (P_ij + P_ji) tends to 2g as the pair gets confident, and
    # subtracting 2g z_hat_pos after W was rounded to bf16 would leave only rounding noise.
    w_pos = -2.0 * g if EXCLUDE_POS else w - 2.0 * g
    return tl.where(cols[None, :] == pos_col[:, None], w_pos, w) * keep


@triton.jit
def _nt_xent_bwd_kernel(
    zhat_ptr,
    cols_ptr,
    stats_ptr,
    stats_cols_ptr,
    g_ptr,
    g_cols_ptr,
    terms_ptr,
    acc_ptr,
    w_ptr,
    square_ptr,
    A,
    M,
    D,
    OFFSET,
    COL0,
    COL1,
    QK_SCALE,
    SHIFT: tl.constexpr,
    EXCLUDE_POS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_BLOCKS: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    STORE_W: tl.constexpr,
    SQUARE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Program (row block, output D chunk, column split): the split's share of acc_i = sum_{j != i} (g P_ij + g_j P_ji -
    2 g [j = pos(i)]) cols_j, fp32, into acc_ptr (splits, A, D); no atomics (_nt_xent_norm_bwd_kernel adds the splits
    in order). With the forward's stats (m, log l): P_ij = exp((S_ij - m_i)/tau - log l_i). The W of the
    GEMM holds the g's divided by g_max = max_r |g_r|, and the fp32 accumulator is multiplied by g_max at the end.
    terms_ptr (M,): the per-column terms of _nt_xent_col_terms_kernel. The splits share columns [COL0, COL1).

    STORE_W (D > MAX_BLOCK_D, the wide backward): one output chunk; S is computed once over all of D and W, instead of
    multiplying cols, is written to w_ptr, the (A, COL1 - COL0) workspace of this column super-block, for
    _nt_xent_bwd_gemm_kernel. Recomputing S per output chunk would cost D / BLOCK_DO GEMMs.

    EXCLUDE_POS (DCL, whose softmax leaves the positive out, see _nt_xent_fwd_kernel): W_{i,pos(i)} = -2 g alone.

    SQUARE (one process, fixed shift, after the upper-triangle forward; 0: none): the forward's BLOCK_M, whose diagonal
    squares' S it left in square_ptr (A padded to SQUARE, SQUARE) fp32. When SQUARE is a multiple of BLOCK_M and
    BLOCK_N, a row block's square (columns sq0 .. sq0 + SQUARE, sq0 = r0 rounded down to SQUARE) replaces its diagonal
    run: the main loop and the boundary loop skip it, and a third loop, after them, loads its blocks' S instead of
    computing it. The host keeps squares only for N >= SQUARE, so none holds a positive: the diagonal is their only
    mask. Forward + backward then execute (2N)^2 D (5/2 - SQUARE / (2 2N)) MACs instead of (5/2 + SQUARE / (2 2N))
    (2N a multiple of the tiles; ``executed_macs`` counts padding).
    """
    tl.static_assert(
        BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16"
    )
    USE_SQUARE: tl.constexpr = (SQUARE > 0) and (SQUARE % BLOCK_M == 0) and (SQUARE % BLOCK_N == 0)
    tl.static_assert(
        D_BLOCKS > 1 or BLOCK_DO == BLOCK_D,
        "one D block: the logits tile doubles as the W @ cols operand",
    )
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    c_begin, c_end = _split_columns(COL1 - COL0, BLOCK_N, 2)
    c_begin += COL0
    c_end += COL0
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
    g_max = _grad_max(g_ptr, g_cols_ptr, M // A)
    g = tl.load(g_ptr).to(tl.float32) / g_max
    m_i = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0.0)
    log2_l_i = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=0.0) * _LOG2E
    # m = 1 for every row on the fixed-shift path: P_ij = exp2(t_ij) exp2(-log2 l_i) with t = (S - 1) log2(e)/tau <= 0,
    # so W_ij = exp2(t_ij) (u_i + u_j) with u = g exp2(-log2 l) / g_max: one exponential per element instead of two.
    # Local row i is column OFFSET + i: its u_i is a column term too.
    u_i = tl.load(terms_ptr + OFFSET + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    if SHIFT:
        # Interior blocks: W_ij = exp2(S QK_SCALE - QK_SCALE) (u_i + u_j), no mask (FlashAttention's split of its
        # causal mask). The loop skips the diagonal and positives' runs (the boundary loop below runs them with their
        # masks) and stops before a ragged last block (no row masks on its loads); the boundary loop needs no padding
        # mask either: columns j >= M have zero rows in cols, so their finite W (S = 0 there) adds nothing.
        f0, l0, f1, l1, f2, l2, f3, l3 = _boundary_runs(r0, r1, n, M, OFFSET, BLOCK_N)
        sq0 = 0
        # The forward's diagonal square in place of the diagonal run, which it contains.
        if USE_SQUARE:
            sq0 = r0 // SQUARE * SQUARE
            f0, l0 = _blocks(sq0, tl.minimum(sq0 + SQUARE, M), BLOCK_N)
        lo = c_begin // BLOCK_N
        hi = tl.minimum(c_end, M - M % BLOCK_N) // BLOCK_N
        s0, k0, s1, k1, s2, k2 = _skipped_runs(f0, l0, f1, l1, f2, l2, lo, hi)
        for v in range(0, tl.maximum(hi - lo, 0) - k0 - k1 - k2):
            start_n = _interior_block(lo + v, s0, k0, s1, k1, s2, k2) * BLOCK_N
            cols = start_n + tl.arange(0, BLOCK_N)
            u_j = tl.load(terms_ptr + cols)
            s, k = _bwd_tile(
                zhat_ptr, cols_ptr, q, r0, A, start_n, M, D, pid_d, BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, BLOCK_DO,
                INPUT_PRECISION, INTERPRETER, True, STORE_W,
            )  # fmt: skip
            w = tl.exp2(s * QK_SCALE - QK_SCALE) * (u_i[:, None] + u_j[None, :])
            w = _round_operand(w, cols_ptr.dtype.element_ty, INPUT_PRECISION, INTERPRETER)
            acc = _bwd_consume(
                acc, w, k, w_ptr, rows, cols, A, COL0, COL1, 1.0, STORE_W, INPUT_PRECISION, INTERPRETER,
            )  # fmt: skip
        g0, n0, g1, n1, g2, n2, g3, n3 = _clip_runs(
            f0, l0, f1, l1, f2, l2, f3, l3, c_begin // BLOCK_N, tl.cdiv(c_end, BLOCK_N)
        )
        # With the forward's squares (run 0), the boundary loop starts after them: a loop of their own loads their S.
        first = 0
        if USE_SQUARE:
            first = n0
        for v in range(first, n0 + n1 + n2 + n3):
            t, keep = _boundary_block(v, g0, n0, g1, n1, g2, n2, g3, n3)
            start_n = t * BLOCK_N
            cols = start_n + tl.arange(0, BLOCK_N)
            u_j = tl.load(terms_ptr + cols, mask=cols < M, other=0.0)
            s, k = _bwd_tile(
                zhat_ptr, cols_ptr, q, r0, A, start_n, M, D, pid_d, BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, BLOCK_DO,
                INPUT_PRECISION, INTERPRETER, False, STORE_W,
            )  # fmt: skip
            w = _boundary_w(s, cols, u_i, u_j, diag, pos_col, g, keep, QK_SCALE, EXCLUDE_POS)
            w = _round_operand(w, cols_ptr.dtype.element_ty, INPUT_PRECISION, INTERPRETER)
            acc = _bwd_consume(
                acc, w, k, w_ptr, rows, cols, A, COL0, COL1, keep, STORE_W, INPUT_PRECISION, INTERPRETER,
            )  # fmt: skip
        if USE_SQUARE:
            # The squares hold no positive (the host keeps them only for N >= SQUARE): W masks the diagonal alone.
            for v in tl.range(0, n0, num_stages=1):
                start_n = (g0 + v) * BLOCK_N
                cols = start_n + tl.arange(0, BLOCK_N)
                u_j = tl.load(terms_ptr + cols, mask=cols < M, other=0.0)
                tile = tl.arange(0, BLOCK_M)[:, None] * SQUARE + (cols - sq0)[None, :]
                s = tl.load(square_ptr + tl.cast(r0, tl.int64) * SQUARE + tile)
                k = s  # the weight pass multiplies nothing
                if not STORE_W:
                    k = _load_rows(
                        cols_ptr, start_n, M, pid_d * BLOCK_DO, D, BLOCK_N, BLOCK_DO, INTERPRETER
                    )
                w = tl.exp2(s * QK_SCALE - QK_SCALE) * (u_i[:, None] + u_j[None, :])
                w = tl.where(cols[None, :] != diag[:, None], w, 0.0)
                w = _round_operand(w, cols_ptr.dtype.element_ty, INPUT_PRECISION, INTERPRETER)
                acc = _bwd_consume(
                    acc, w, k, w_ptr, rows, cols, A, COL0, COL1, 1.0, STORE_W, INPUT_PRECISION, INTERPRETER,
                )  # fmt: skip
    else:
        for start_n in range(c_begin, c_end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            # g_j / g_max: P_ji weighted by the upstream gradient of column j's rank.
            g_j = tl.load(terms_ptr + cols, mask=col_ok, other=0.0)
            m_j = tl.load(stats_cols_ptr + 2 * cols, mask=col_ok, other=0.0)
            log2_l_j = tl.load(stats_cols_ptr + 2 * cols + 1, mask=col_ok, other=0.0) * _LOG2E
            s, k = _bwd_tile(
                zhat_ptr, cols_ptr, q, r0, A, start_n, M, D, pid_d, BLOCK_M, BLOCK_N, BLOCK_D, D_BLOCKS, BLOCK_DO,
                INPUT_PRECISION, INTERPRETER, False, STORE_W,
            )  # fmt: skip
            w = g * tl.exp2((s - m_i[:, None]) * QK_SCALE - log2_l_i[:, None])
            w += g_j[None, :] * tl.exp2((s - m_j[None, :]) * QK_SCALE - log2_l_j[None, :])
            # Padding columns stay masked here: their exp2((0 - m_i) QK_SCALE) overflows for a row whose best cosine
            # is < 0.
            w = tl.where(col_ok[None, :] & (cols[None, :] != diag[:, None]), w, 0.0)
            c0 = start_n - OFFSET
            c1 = c0 + BLOCK_N
            if ((c0 < hi_a) & (c1 > lo_a)) | ((c0 < hi_b) & (c1 > lo_b)):
                w_pos = -2.0 * g if EXCLUDE_POS else w - 2.0 * g
                w = tl.where(cols[None, :] == pos_col[:, None], w_pos, w)
            # W goes through the tensor cores in the input dtype, or as tf32 (rounded to nearest like the GPU does,
            # also when interpreting).
            w = _round_operand(w, cols_ptr.dtype.element_ty, INPUT_PRECISION, INTERPRETER)
            acc = _bwd_consume(
                acc, w, k, w_ptr, rows, cols, A, COL0, COL1, 1.0, STORE_W, INPUT_PRECISION, INTERPRETER,
            )  # fmt: skip
    if not STORE_W:
        offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        out = acc_ptr + (tl.program_id(2) * A + rows)[:, None].to(tl.int64) * D + offs_o[None, :]
        tl.store(out, acc * g_max, mask=row_ok[:, None] & (offs_o[None, :] < D))


@triton.jit
def _nt_xent_bwd_gemm_kernel(
    w_ptr,
    cols_ptr,
    g_ptr,
    g_cols_ptr,
    acc_ptr,
    A,
    M,
    D,
    COL0,
    COL1,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """The wide backward's GEMM for one column super-block: acc (A, D) fp32 += g_max W @ cols[COL0:COL1], with W
    (A, COL1 - COL0) the weight pass's workspace (scale-free, see _grad_max). Program (output D tile, row block): the
    D tiles of one row block are neighbours in launch order, so its W rows are read from L2 after the first. The
    super-blocks add in order, one launch each: deterministic."""
    tl.static_assert(
        BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot needs tiles of at least 16"
    )
    d0 = tl.program_id(0) * BLOCK_N
    r0 = tl.program_id(1) * BLOCK_M
    width = COL1 - COL0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        w = _load_rows(w_ptr, r0, A, k0, width, BLOCK_M, BLOCK_K, INTERPRETER)
        k = _load_rows(cols_ptr, COL0 + k0, COL1, d0, D, BLOCK_K, BLOCK_N, INTERPRETER)
        acc = tl.dot(w, k, acc, input_precision=INPUT_PRECISION)
    acc = acc * _grad_max(g_ptr, g_cols_ptr, M // A)
    rows = r0 + tl.arange(0, BLOCK_M)
    offs = d0 + tl.arange(0, BLOCK_N)
    out = acc_ptr + tl.cast(rows, tl.int64)[:, None] * D + offs[None, :]
    ok = (rows[:, None] < A) & (offs[None, :] < D)
    tl.store(out, tl.load(out, mask=ok, other=0.0) + acc, mask=ok)


@triton.jit
def _sum_splits(ptrs, mask, n_splits, split_stride):
    """sum_k *(ptrs + k split_stride) for k = 0 .. n_splits - 1, in that order (fp32)."""
    total = tl.load(ptrs, mask=mask, other=0.0)
    for k in range(1, n_splits):
        total += tl.load(ptrs + tl.cast(k, tl.int64) * split_stride, mask=mask, other=0.0)
    return total


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
    n_splits,
    grad_scale,
    EPS_: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Rows r and N + r: acc = the backward's n_splits partial sums (acc_ptr (splits, 2N, stride_acc)) added in split
    order, dz_hat = grad_scale * acc, then the chain rule through the normalisation.

    The first pass writes the sum over splits back into split 0 (these rows belong to this program alone), so the
    second pass reads one split. z_hat is recomputed in fp32 from the raw rows and the saved norms, so the projection is
    as exact as the input.
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
        acc_sum_a = _sum_splits(acc_a + offs[None, :], m, n_splits, 2 * N * stride_acc)
        acc_sum_b = _sum_splits(acc_b + offs[None, :], m, n_splits, 2 * N * stride_acc)
        dha = grad_scale * acc_sum_a
        dhb = grad_scale * acc_sum_b
        rad_a += tl.sum(ha * dha, 1)
        rad_b += tl.sum(hb * dhb, 1)
        if n_splits > 1:
            tl.store(acc_a + offs[None, :], acc_sum_a, mask=m)
            tl.store(acc_b + offs[None, :], acc_sum_b, mask=m)
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
# The GEMM kernels: the forward (row blocks x column splits), the upper-triangle forward (one process, fixed shift), the
# backward (for D > MAX_BLOCK_D its weight pass) and the wide backward's W @ cols GEMM (D > MAX_BLOCK_D only).
KERNELS = ("fwd", "sym_fwd", "bwd", "bwd_gemm")

# The pruned autotune sets, best guess first, by kernel, D tier (0: one block of D <= 128, 1: one block of 256, 2: the D
# loop) and input element size: the configs that compile with no spills and within the shared memory of sm_80 and
# sm_90 (``python -m fastclr.kernels.report``; tests/test_kernel_report.py checks every entry). Rows come in 64s because
# Hopper's wgmma works on 64-row warpgroup tiles (and Ampere's mma.sync tiles them well); the backward keeps a
# BLOCK_M x BLOCK_DO fp32 accumulator next to the logits tile, which leaves no registers for 128-row blocks and at
# BLOCK_DO = 256 needs 8 warps to share it. fp32 tiles take twice the shared memory per pipeline stage.
_CANDIDATES = {
    # D <= 128, 2-byte inputs: the first candidates issue the fewest instructions besides the MMAs per logit in their
    # main loops (sm_90 SASS: forward BM128_BN128_W8 4.5 against 6.3 for BM128_BN64_W8; backward BM64_BN64_W4 8.3
    # against 16.7 for W8, whose two warpgroups each compute the whole W tile for their half of the output D).
    # Unaligned D compiles the aligned kernel (z_hat's padded rows, ``padded_width``): before that, BM128_BN128_W8_S2
    # spilled on sm_80 at D = 100 (255 registers + 168 B of stack); now D = 100 and 128 share one binary. Dropped for
    # sm_80 spills on the running-max path: BM64_BN128_W4_S3 at D <= 128 (16 B), BM128_BN128_W8_S2 at D = 256 (32 B).
    ("fwd", 0, 2): ("BM128_BN128_W8_S2", "BM128_BN64_W8_S3", "BM64_BN64_W4_S3", "BM64_BN32_W4_S2"),
    ("fwd", 1, 2): ("BM128_BN64_W8_S3", "BM64_BN64_W8_S3", "BM64_BN32_W4_S2"),
    ("fwd", 2, 2): ("BM128_BN64_W8_S3", "BM64_BN64_W8_S3", "BM64_BN32_W4_S2"),
    # The upper-triangle forward computes its tiles transposed, BLOCK_N x BLOCK_M: BLOCK_N >= 64 for sm_90's wgmma
    # (its BLOCK_N = 32 tiles compile to mma.sync). The candidates a batch keeps share one BLOCK_M (see
    # ``candidate_configs``); BM128_BN128_W8_S2 issues 5.5 non-MMA instructions per computed element, against 7.3 for
    # BM128_BN64_W8_S3, whose two warpgroups split the column sums.
    ("sym_fwd", 0, 2): ("BM128_BN128_W8_S2", "BM128_BN64_W8_S3", "BM64_BN64_W4_S3"),
    ("sym_fwd", 1, 2): ("BM128_BN64_W8_S3", "BM64_BN64_W8_S3"),
    ("sym_fwd", 2, 2): ("BM128_BN64_W8_S3", "BM64_BN64_W8_S3"),
    ("bwd", 0, 2): ("BM64_BN64_W4_S3", "BM64_BN64_W8_S3", "BM64_BN32_W4_S2", "BM64_BN32_W8_S2"),
    ("bwd", 1, 2): ("BM64_BN64_W8_S3", "BM64_BN64_W8_S2", "BM64_BN32_W8_S2"),
    # D > MAX_BLOCK_D: the weight pass keeps no accumulator, only the logits tile (the forward's tiles).
    ("bwd", 2, 2): ("BM128_BN64_W8_S3", "BM64_BN64_W8_S3", "BM64_BN32_W8_S2"),
    # The wide backward's plain GEMM (W @ cols over a column super-block, BLOCK_N output columns, K steps of
    # GEMM_BLOCK_K): only at D > MAX_BLOCK_D.
    ("bwd_gemm", 2, 2): ("BM128_BN128_W8_S2", "BM128_BN64_W8_S3", "BM64_BN64_W4_S3"),
    ("fwd", 0, 4): ("BM128_BN64_W8_S3", "BM64_BN64_W4_S3", "BM64_BN32_W4_S2"),
    ("fwd", 1, 4): ("BM64_BN32_W4_S2",),
    ("fwd", 2, 4): ("BM64_BN32_W8_S2",),
    ("sym_fwd", 0, 4): ("BM128_BN64_W8_S3", "BM64_BN64_W4_S3"),
    ("sym_fwd", 1, 4): ("BM64_BN64_W8_S2",),
    ("sym_fwd", 2, 4): ("BM64_BN64_W8_S3",),  # BM64_BN64_W8_S2: 8 B of stack on sm_80
    ("bwd", 0, 4): ("BM64_BN32_W4_S2", "BM64_BN32_W8_S2"),
    ("bwd", 1, 4): ("BM64_BN32_W8_S2",),
    ("bwd", 2, 4): ("BM64_BN32_W8_S1",),
    ("bwd_gemm", 2, 4): ("BM128_BN64_W8_S3", "BM64_BN64_W4_S3"),
}  # fmt: skip
# fp32 with precision="ieee": tl.dot runs on the FMA units, and Triton's FMA dot keeps both operands' K slices in
# registers (the register blocking of a thread's m x n outputs costs (m + n) K registers). At one block of D = 128 or 256
# only 1-4 outputs per thread compile spill-free, and which ones does not follow a pattern; in EXACT_BLOCK_D = 32 steps
# (``d_tiling``) every D compiles the same loop body, the forward keeps 8 outputs per thread (BM64_BN32_W8) and the
# backward's W @ cols GEMM 16-32; the backward's logits tile stays at 32 x 32, the largest that is clean on sm_80.
# (BM64_BN64_W8_S3 spilled 8 B on sm_90 once the fixed-shift loop kept its row sums per element.)
# The upper-triangle forward's transposed tile: BM64_BN32_W8_S2 and BM32_BN32_W8_S2 took 8 B of stack on sm_90.
_EXACT_FP32 = {
    "fwd": ("BM64_BN32_W8_S2",),
    "sym_fwd": ("BM64_BN64_W8_S2",),
    "bwd": ("BM32_BN32_W8_S2",),
    "bwd_gemm": ("BM64_BN32_W8_S2",),
}
_EXACT_FP32_CANDIDATES = {
    (kernel, tier, 4): _EXACT_FP32[kernel]
    for kernel in KERNELS
    for tier in ((2,) if kernel == "bwd_gemm" else (0, 1, 2))
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


def _bwd_fixed_shift(shift: bool, d: int, itemsize: int, precision: str) -> bool:
    """Whether the backward takes the fixed-shift form (interior and boundary loops) for a fixed-shift forward. Its
    general form is exact for any forward (it reads m_i = 1 from the stats); tf32 at one block of D = 256 takes it
    because the fixed-shift form spills there on sm_90 (384-448 B of stack at BLOCK_N = 16-32)."""
    tf32_256 = itemsize == 4 and precision == "tf32" and d_tier(d) == 1
    return shift and not tf32_256


def _exact_fp32(itemsize: int, precision: str) -> bool:
    """fp32 inputs with precision="ieee": the FMA-unit dots, their own tiling and candidates."""
    return itemsize == 4 and precision == "ieee"


def candidate_configs(
    kernel: str,
    a: int,
    d: int,
    itemsize: int = 2,
    precision: str = "tf32",
    m: int | None = None,
    programs: int | None = None,
) -> list[KernelConfig]:
    """The configs worth trying for this kernel, (2N, D), input element size (2: bf16/fp16, 4: fp32) and fp32 dot
    precision ("ieee" multiplies on the FMA units, its own list), best guess first (blocks beyond the padded batch only
    add masked work, so small batches keep the smallest tiles). Given m columns and a target number of programs, the
    configs with at least that many tiles (row blocks x column blocks x output D chunks) come first, in list order:
    the column splits can then fill the GPU. The upper-triangle forward's candidates share the first one's BLOCK_M:
    its combine kernel reads the column sums per row block of that size, whichever candidate the autotuner keeps."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if itemsize not in (2, 4):
        raise ValueError(f"itemsize must be 2 (bf16/fp16) or 4 (fp32), got {itemsize!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    table = _EXACT_FP32_CANDIDATES if _exact_fp32(itemsize, precision) else _CANDIDATES
    listed = [CONFIGS[name] for name in table.get((kernel, d_tier(d), itemsize), ())]
    if not listed:  # the wide backward's GEMM at D <= MAX_BLOCK_D: not launched
        return []
    a_pad = max(64, triton.next_power_of_2(a))
    fitting = [c for c in listed if c.block_m <= a_pad and c.block_n <= a_pad]
    fitting = fitting or [min(listed, key=lambda c: (c.block_m, c.block_n))]
    if kernel == "sym_fwd":
        fitting = [c for c in fitting if c.block_m == fitting[0].block_m]
    if m is not None and programs is not None:
        chunks = _output_chunks(kernel, d, _exact_fp32(itemsize, precision))
        tiles = {
            c.name: triton.cdiv(a, c.block_m) * chunks * triton.cdiv(m, c.block_n) for c in fitting
        }
        fitting.sort(key=lambda c: tiles[c.name] < programs)  # stable: list order within each group
    return fitting


def wide_backward(d: int) -> bool:
    """Whether the backward takes its wide form at this GEMM row width: D > MAX_BLOCK_D, where a fused backward would
    recompute S once per output chunk. Instead a weight pass computes S once over all of D and writes W per column
    super-block (``wide_columns``), and a plain GEMM (``_nt_xent_bwd_gemm_kernel``) multiplies it into cols."""
    return d > MAX_BLOCK_D


def wide_columns(a: int, m: int, itemsize: int) -> int:
    """Columns per super-block of the wide backward: its W workspace (a, columns) in the input dtype stays within
    WIDE_W_BYTES, in whole multiples of the widest BLOCK_N (every candidate's column blocks tile it)."""
    step = max(c.block_n for c in CONFIGS.values())
    fit = WIDE_W_BYTES // (a * itemsize) // step * step
    return max(step, min(fit, triton.cdiv(m, step) * step))


def _output_chunks(kernel: str, d: int, exact: bool) -> int:
    """Programs along D per row block: the fused backward's output chunks, 1 for the forward and the weight pass."""
    if kernel != "bwd" or wide_backward(d):
        return 1
    return triton.cdiv(d, d_tiling(d, exact).block_do)


def column_splits(row_programs: int, col_blocks: int, programs: int) -> int:
    """The fewest column splits with row_programs x splits >= programs (at most one split per column block), each split
    a run of cdiv(col_blocks, splits) blocks (``_split_columns``)."""
    want = min(col_blocks, triton.cdiv(programs, row_programs))
    per = triton.cdiv(col_blocks, want)
    while triton.cdiv(col_blocks, per) < want:
        per -= 1
    return triton.cdiv(col_blocks, per)


class SymSchedule(NamedTuple):
    """The upper-triangle forward's launches: row-block pairs in all, pairs per launch (a chunk), column splits."""

    pairs: int
    chunk_pairs: int
    splits: int

    @property
    def chunks(self) -> int:
        return triton.cdiv(self.pairs, self.chunk_pairs)


def symmetric_schedule(
    a: int, block_m: int, block_n: int, programs: int, splits: int | None = None
) -> SymSchedule:
    """Row block b of cdiv(a, block_m) pairs with the last but b (``_nt_xent_sym_fwd_kernel``); a launch takes up to
    SYM_MAX_SLOTS / 2 pairs (their column sums are its workspace, SYM_MAX_SLOTS x a fp32 at most), and each pair's
    column blocks are dealt to ``column_splits`` splits so that a launch has about ``programs`` programs."""
    row_blocks = triton.cdiv(a, block_m)
    pairs = triton.cdiv(row_blocks, 2)
    chunk = min(pairs, max(1, SYM_MAX_SLOTS // 2))
    col_blocks = triton.cdiv(a, block_n)
    # U_p + U_q: a pair's column blocks at and right of its two diagonal squares.
    per_pair = col_blocks + (
        col_blocks - (row_blocks - 1) * (block_m // block_n) if row_blocks > 1 else 0
    )
    if splits is None:
        splits = column_splits(chunk, per_pair, programs)
    return SymSchedule(pairs, chunk, splits)


def launch_grid(
    kernel: str,
    a: int,
    d: int,
    m: int | None = None,
    config: str | None = None,
    itemsize: int = 2,
    precision: str = "tf32",
    sms: int | None = None,
    splits: int | None = None,
) -> tuple[int, ...]:
    """The grid of a GEMM kernel's launch: forward (row blocks, splits), upper-triangle forward (row-block pairs per
    launch, splits; m must be a), backward (row blocks, D chunks, splits; one chunk in the wide backward's weight pass,
    whose splits share a super-block's columns), the wide backward's GEMM (D tiles, row blocks).

    a = 2N local rows, d = the GEMM row width (``padded_width(D)`` for one process), m = candidate columns (a unless
    gathered), sms = the device's SM count (the active device when None). The config is the named one or the first
    candidate for a grid of PROGRAMS_PER_SM x sms programs; splits = ``column_splits`` for it unless given.
    """
    m = a if m is None else m
    programs = PROGRAMS_PER_SM * (sm_count() if sms is None else sms)
    cfg = resolve_config(kernel, a, d, config, itemsize, precision, m=m, programs=programs)
    if kernel == "sym_fwd":
        if m != a:
            raise ValueError(
                f"the upper-triangle forward needs m = a columns (one process), got m={m}, a={a}"
            )
        sched = symmetric_schedule(a, cfg.block_m, cfg.block_n, programs, splits)
        return (sched.chunk_pairs, sched.splits)
    rows = triton.cdiv(a, cfg.block_m)
    if kernel == "bwd_gemm":
        return (triton.cdiv(d, cfg.block_n), rows)
    chunks = _output_chunks(kernel, d, _exact_fp32(itemsize, precision))
    if kernel == "bwd" and wide_backward(d):
        m = min(m, wide_columns(a, m, itemsize))
    if splits is None:
        splits = column_splits(rows * chunks, triton.cdiv(m, cfg.block_n), programs)
    return (rows, splits) if kernel == "fwd" else (rows, chunks, splits)


_SM_COUNTS: dict[object, int] = {}


def sm_count() -> int:
    """Streaming multiprocessors of the active device (INTERPRETER_SMS when interpreting)."""
    if INTERPRET:
        return INTERPRETER_SMS
    drv = triton.runtime.driver.active
    device = drv.get_current_device()
    key = (device, drv.get_current_target())
    if key not in _SM_COUNTS:
        _SM_COUNTS[key] = drv.utils.get_device_properties(device)["multiprocessor_count"]
    return _SM_COUNTS[key]


def resolve_config(
    kernel: str,
    a: int,
    d: int,
    config: str | None,
    itemsize: int = 2,
    precision: str = "tf32",
    m: int | None = None,
    programs: int | None = None,
) -> KernelConfig:
    """A named config (checked against CONFIGS) or the first candidate for this size."""
    if config is None:
        return candidate_configs(kernel, a, d, itemsize, precision, m, programs)[0]
    if config not in CONFIGS:
        raise ValueError(f"unknown kernel config {config!r}; choose one of {list_configs()}")
    return CONFIGS[config]


def reads_square(square: int, block_m: int, block_n: int) -> bool:
    """Whether a backward of these tiles loads the upper-triangle forward's diagonal squares of width ``square``
    (``diagonal_square``; 0: none) instead of computing them: its row and column blocks tile the squares."""
    return square > 0 and square % block_m == 0 and square % block_n == 0


def boundary_runs(
    a: int, m: int, block_m: int, block_n: int, offset: int = 0, square: int = 0
) -> list[list[range]]:
    """Per row block, the column blocks of the fixed-shift kernels' four boundary runs (``_boundary_runs``): the
    diagonal, the two runs of positives and a ragged last block. With ``square`` (the backward after the upper-triangle
    forward, ``reads_square``) the first run is the row block's diagonal square, whose blocks the backward loads."""
    n, col_blocks = a // 2, triton.cdiv(m, block_n)

    def run(lo: int, hi: int) -> range:
        if hi <= lo:
            return range(0)
        return range(max(lo // block_n, 0), min(triton.cdiv(hi, block_n), col_blocks))

    out = []
    for r0 in range(0, a, block_m):
        r1 = min(r0 + block_m, a)
        sq0 = r0 // square * square if square else 0
        out.append(
            [
                run(sq0, min(sq0 + square, m)) if square else run(offset + r0, offset + r1),
                run(offset + r0 + n, offset + min(r1, n) + n),
                run(offset + max(r0, n) - n, offset + r1 - n),
                run(m - m % block_n, m),
            ]
        )
    return out


def boundary_visits(
    a: int, m: int, block_m: int, block_n: int, offset: int = 0, square: int = 0
) -> int:
    """Boundary column blocks the fixed-shift kernels visit with masks, summed over row blocks (``boundary_runs``),
    overlaps counted once per run. The splits partition the column blocks, so their number does not matter."""
    return sum(
        len(x) for runs in boundary_runs(a, m, block_m, block_n, offset, square) for x in runs
    )


def boundary_overlaps(
    a: int, m: int, block_m: int, block_n: int, offset: int = 0, square: int = 0
) -> int:
    """Blocks the fixed-shift kernels visit twice, summed over row blocks: where a row block's boundary runs
    (``boundary_runs``) overlap, the boundary loop runs the block once per run (counted once). Every other block runs
    once, in the main loop or the boundary loop."""
    return sum(
        sum(len(x) for x in runs) - len(set().union(*runs))
        for runs in boundary_runs(a, m, block_m, block_n, offset, square)
    )


def square_visits(a: int, block_m: int, block_n: int, square: int) -> int:
    """Column blocks whose S the backward loads from the upper-triangle forward's diagonal squares instead of computing
    it, summed over row blocks (0 unless ``reads_square``)."""
    if not reads_square(square, block_m, block_n):
        return 0
    return sum(len(runs[0]) for runs in boundary_runs(a, a, block_m, block_n, square=square))


def symmetric_visits(a: int, block_m: int, block_n: int) -> int:
    """Column blocks the upper-triangle forward visits, summed over row blocks, each once: per row block b its diagonal
    square (R = block_m / block_n blocks, fewer at a ragged end) and every block right of it."""
    r, col_blocks = block_m // block_n, triton.cdiv(a, block_n)
    return sum(col_blocks - b * r for b in range(triton.cdiv(a, block_m)))


def executed_macs(
    a: int,
    d: int,
    config: str | None = None,
    m: int | None = None,
    itemsize: int = 2,
    precision: str = "tf32",
    shift: bool = True,
    offset: int = 0,
    symmetric: bool = True,
    gemm_config: str | None = None,
) -> dict[str, int]:
    """Multiply-accumulates the GEMM kernels execute (padding included; tensor cores, or FMA units for exact fp32),
    counted from grid x loop trips: every column block once per row block, and on the fixed-shift path (shift, tau >=
    SHIFT_MIN_TEMPERATURE) the blocks where boundary runs overlap once more (``boundary_overlaps``, for the rank at
    column ``offset``). One process on the fixed-shift path (m = a, shift) runs the upper-triangle forward
    (``symmetric_visits``: half the tiles) unless symmetric=False, as ``nt_xent_forward(symmetric=False)``, and its
    backward loads the S of the forward's diagonal squares instead of computing it (``square_visits``; tiles that
    ``reads_square``, config applying to both kernels). D > MAX_BLOCK_D: the backward is the wide one
    (``wide_backward``), S once plus the GEMM's (config: its weight pass's tiles, gemm_config the GEMM's).

    a = 2N local rows, m = candidate columns (a unless negatives are gathered). Returns {"fwd", "bwd", "total", "ideal",
    "ratio"} with ideal = 3 m a d (the three-GEMM floor) and ratio = total / ideal.
    """
    m = a if m is None else m
    tiling = d_tiling(d, _exact_fp32(itemsize, precision))
    sym = symmetric and shift and m == a
    square = diagonal_square(a, d, itemsize, precision, config) if sym else 0
    out = {}
    wide = wide_backward(d)
    for kernel in ("sym_fwd" if sym else "fwd", "bwd"):
        cfg = resolve_config(kernel, a, d, config, itemsize, precision)
        rows = triton.cdiv(a, cfg.block_m) * cfg.block_m
        cols = triton.cdiv(m, cfg.block_n) * cfg.block_n
        tiles = rows * cols  # tiles visited (the backward multiplies each into W @ cols)
        loaded = 0  # tiles whose S the backward loads from the forward's diagonal squares
        if kernel == "sym_fwd":
            tiles = symmetric_visits(a, cfg.block_m, cfg.block_n) * cfg.block_m * cfg.block_n
        elif shift if kernel == "fwd" else _bwd_fixed_shift(shift, d, itemsize, precision):
            sq = square if kernel == "bwd" and reads_square(square, cfg.block_m, cfg.block_n) else 0
            twice = boundary_overlaps(a, m, cfg.block_m, cfg.block_n, offset, sq)
            tiles += twice * cfg.block_m * cfg.block_n
            loaded = square_visits(a, cfg.block_m, cfg.block_n, sq) * cfg.block_m * cfg.block_n
        logits = (tiles - loaded) * tiling.d_blocks * tiling.block_d
        if kernel != "bwd":
            out["fwd"] = logits
        elif wide:
            # S once (the weight pass), then W @ cols per super-block: rows x D tiles x K steps over its columns.
            gemm = resolve_config("bwd_gemm", a, d, gemm_config, itemsize, precision)
            step, cols = GEMM_BLOCK_K[itemsize], wide_columns(a, m, itemsize)
            k_steps = sum(triton.cdiv(min(cols, m - c0), step) * step for c0 in range(0, m, cols))
            gemm_rows = triton.cdiv(a, gemm.block_m) * gemm.block_m
            out["bwd"] = logits + gemm_rows * triton.cdiv(d, gemm.block_n) * gemm.block_n * k_steps
        else:
            chunks = triton.cdiv(d, tiling.block_do)
            out["bwd"] = chunks * (logits + tiles * tiling.block_do)
    out["total"] = out["fwd"] + out["bwd"]
    out["ideal"] = 3 * m * a * d
    out["ratio"] = out["total"] / out["ideal"]
    return out


def autotuner(fn, configs: dict[str, KernelConfig], candidates, key: list[str]):
    """``triton.autotune`` of ``fn`` over ``configs`` (name -> KernelConfig), each launch pruned to
    ``candidates(args)`` (the launch's arguments by name -> KernelConfigs of ``configs``, best guess first: with equal
    timings, or none, see kernels/stub_driver.py, the autotuner keeps the first), keyed on ``key``."""
    by_name = {
        name: triton.Config(
            {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        for name, c in configs.items()
    }

    def prune(_configs, named_args, **kwargs):
        # The launch passes every argument by keyword, and the autotuner's named_args hold only positional ones.
        return [by_name[c.name] for c in candidates({**named_args, **kwargs})]

    return triton.autotune(
        configs=list(by_name.values()), key=key, prune_configs_by={"early_config_prune": prune}
    )(fn)


def launch_with(fn, grid_fn, cfg: KernelConfig, **kwargs) -> None:
    """Launch ``fn`` with one config's block sizes, warps and stages."""
    meta = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
    fn[grid_fn](**kwargs, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _autotuned(fn, kernel: str):
    """Autotuning over the pruned candidates on a GPU, keyed on (2N, M, D) and every constexpr that changes the code the
    kernel compiles to besides those (the logsumexp path, the dot precision); the autotuner adds the dtypes."""

    def candidates(args):
        itemsize = args["cols_ptr" if "cols_ptr" in args else "zhat_ptr"].element_size()
        return candidate_configs(
            kernel, args["A"], args["D"], itemsize, args["INPUT_PRECISION"], args["M"],
            PROGRAMS_PER_SM * sm_count(),
        )  # fmt: skip

    # The upper-triangle forward has no SHIFT (it is the fixed-shift path) and M = A; the wide backward's GEMM neither.
    # The backward reads the forward's diagonal squares (SQUARE) or computes them, which its best tiles may depend on.
    key = {
        "sym_fwd": ["A", "M", "D", "EXCLUDE_POS", "INPUT_PRECISION"],
        "bwd": ["A", "M", "D", "SHIFT", "EXCLUDE_POS", "SQUARE", "INPUT_PRECISION"],
        "bwd_gemm": ["A", "M", "D", "INPUT_PRECISION"],
    }.get(kernel, ["A", "M", "D", "SHIFT", "EXCLUDE_POS", "INPUT_PRECISION"])
    return autotuner(fn, CONFIGS, candidates, key)


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
    cfg = resolve_config(
        kernel, a, d, config, itemsize, kwargs["INPUT_PRECISION"], kwargs["M"], PROGRAMS_PER_SM * sm_count()
    )  # fmt: skip
    launch_with(fn, grid_fn, cfg, **kwargs)


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


def empty_state(z_a: torch.Tensor, temperature: float, precision: str = "tf32") -> ForwardState:
    """The single-process state ``nt_xent_forward`` returns for z_a (N, D) at this temperature, as empty tensors (the
    custom op's fake): zhat in the input dtype, norm (A,) fp32, stats (A, 2) fp32 = (m_i, log l_i), lse_i = m_i / tau +
    log l_i, and on the upper-triangle path the diagonal squares' S (``diagonal_square``)."""
    a, d = 2 * z_a.shape[0], z_a.shape[1]
    f32 = dict(dtype=torch.float32, device=z_a.device)
    # The same strides as the forward's z_hat: (A, D) columns of rows padded to padded_width(D).
    w = padded_width(d)
    zhat = z_a.new_empty((a, w))[:, :d]
    sym = temperature >= SHIFT_MIN_TEMPERATURE
    width = diagonal_square(a, w, z_a.element_size(), precision) if sym else 0
    square = torch.empty(square_shape(a, width), **f32) if width else None
    return ForwardState.local(zhat, torch.empty(a, **f32), torch.empty((a, 2), **f32), square)


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
    splits: int | None = None,
    symmetric: bool = True,
    exclude_pos: bool = False,
) -> tuple[torch.Tensor, ForwardState]:
    """Forward: z_a, z_b (N, D) raw embeddings -> (0-d loss in the input dtype, ForwardState). Two launches; three on
    the upper-triangle path (one process and tau >= SHIFT_MIN_TEMPERATURE, unless symmetric=False), one more tile
    and combine launch per chunk of SYM_MAX_SLOTS / 2 row-block pairs beyond the first.

    group: a torch.distributed process group whose ranks' rows are gathered as candidate columns, or None.
    precision: "tf32" (default) or "ieee" for fp32 inputs' dot products. config: a name from ``list_configs()``.
    splits: column splits of the logits kernel (None: enough to fill the device, see ``launch_grid``).
    symmetric: False runs the row blocks x column splits forward also where the upper-triangle one applies (tests and
    the compile report build both). exclude_pos: DCL's denominator, without the positive pair (the loss is then DCL's,
    mean_i [lse'_i - S_i,pos(i)/tau], and the state its lse').
    """
    z_a, z_b = _unit_stride(z_a), _unit_stride(z_b)
    n, d = z_a.shape
    a = 2 * n
    dev = z_a.device
    # Zero-padded rows (see padded_width), except when gathered: padding would add (w - D) / D to every all_gather.
    w = padded_width(d) if group is None else d
    zhat = torch.empty((a, w), dtype=z_a.dtype, device=dev)
    norm = torch.empty(a, dtype=torch.float32, device=dev)
    # Arrival counters of the forward: the mean's, then one per row block (of the smallest BLOCK_M any config has).
    max_programs = triton.cdiv(a, min(c.block_m for c in CONFIGS.values()))
    norm_programs = triton.cdiv(n, ELEMENTWISE_BLOCK_R)
    assert 1 + max_programs <= norm_programs * ELEMENTWISE_BLOCK_R, (
        "the norm kernel zeroes them all"
    )
    count = torch.empty(1 + max_programs, dtype=torch.int32, device=dev)
    block_d = min(triton.next_power_of_2(d), ELEMENTWISE_BLOCK_D)
    _nt_xent_norm_fwd_kernel[(norm_programs,)](
        za_ptr=z_a, zb_ptr=z_b, zhat_ptr=zhat, norm_ptr=norm, count_ptr=count, n_count=1 + max_programs, N=n, D=d,
        stride_a=z_a.stride(0), stride_b=z_b.stride(0), stride_zhat=w, EPS_=EPS, BLOCK_R=ELEMENTWISE_BLOCK_R,
        BLOCK_D=block_d, INPUT_PRECISION=_dot_precision(z_a.dtype, precision), INTERPRETER=INTERPRET,
    )  # fmt: skip
    cols, offset = all_gather_rows(zhat, group)
    m = cols.shape[0]
    stats = torch.empty((a, 2), dtype=torch.float32, device=dev)
    partial = torch.empty(max_programs, dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=z_a.dtype, device=dev)
    # The GEMM kernels work on the padded width (the same tiling as D's: every block is a multiple of 16).
    tiling = d_tiling(w, _exact_fp32(z_a.element_size(), precision))
    if symmetric and group is None and temperature >= SHIFT_MIN_TEMPERATURE:
        square = _symmetric_forward(
            zhat, stats, partial, count, loss, w, tiling, temperature, config, precision, splits,
            exclude_pos,
        )  # fmt: skip
        return loss, ForwardState.local(zhat[:, :d], norm, stats, square)
    # The split count is fixed for the launch (the autotuner's other tile widths share it, see _split_columns).
    splits = launch_grid("fwd", a, w, m, config, z_a.element_size(), precision, splits=splits)[-1]
    split_stats = torch.empty((3, splits, a), dtype=torch.float32, device=dev)
    _launch(
        "fwd", _nt_xent_fwd_kernel, lambda meta: (triton.cdiv(a, meta["BLOCK_M"]), splits), a, w,
        z_a.element_size(), config,
        zhat_ptr=zhat, cols_ptr=cols, stats_ptr=stats, split_ptr=split_stats, partial_ptr=partial, count_ptr=count,
        loss_ptr=loss,
        A=a, M=m, D=w, OFFSET=offset, QK_SCALE=LOG2E / temperature, inv_t=1.0 / temperature, inv_a=1.0 / a,
        SHIFT=temperature >= SHIFT_MIN_TEMPERATURE, EXCLUDE_POS=exclude_pos, BLOCK_D=tiling.block_d,
        D_BLOCKS=tiling.d_blocks, INPUT_PRECISION=_dot_precision(z_a.dtype, precision), INTERPRETER=INTERPRET,
        BLOCK_R=REDUCE_BLOCK,
    )  # fmt: skip
    stats_cols, _ = all_gather_rows(stats, group)
    zhat_d = zhat[:, :d]
    cols_d = zhat_d if cols is zhat else cols[:, :d]
    return loss, ForwardState(
        zhat=zhat_d, norm=norm, stats=stats, cols=cols_d, stats_cols=stats_cols, offset=offset
    )


def _symmetric_forward(
    zhat: torch.Tensor,
    stats: torch.Tensor,
    partial: torch.Tensor,
    count: torch.Tensor,
    loss: torch.Tensor,
    w: int,
    tiling: BlockD,
    temperature: float,
    config: str | None,
    precision: str,
    splits: int | None,
    exclude_pos: bool = False,
) -> torch.Tensor | None:
    """The upper-triangle forward of ``nt_xent_forward`` (one process, fixed shift): per chunk of row-block pairs a tile
    launch and a combine launch (``symmetric_schedule``); writes stats and loss, and returns the diagonal squares' S
    for the backward (``diagonal_square``; None where the backward would not read it). Workspace: row sums (splits, A),
    column sums (2 x pairs per chunk <= SYM_MAX_SLOTS, A), their running sum (A,) when there are several chunks, and
    the positive logits (A,), all fp32."""
    a, dev, itemsize = zhat.shape[0], zhat.device, zhat.element_size()
    # The combine reads the column sums per row block: BLOCK_M is fixed here (the autotuner's candidates share it).
    block_m = resolve_config("sym_fwd", a, w, config, itemsize, precision).block_m
    width = diagonal_square(a, w, itemsize, precision, config)  # 0: no squares kept
    chunk_pairs, splits = launch_grid(
        "sym_fwd", a, w, a, config, itemsize, precision, splits=splits
    )
    pairs = triton.cdiv(triton.cdiv(a, block_m), 2)
    chunks = triton.cdiv(pairs, chunk_pairs)
    f32 = dict(dtype=torch.float32, device=dev)
    rowpart = torch.empty((splits, a), **f32)
    colpart = torch.empty((2 * chunk_pairs, a), **f32)
    colacc = torch.empty(a if chunks > 1 else 1, **f32)
    spos = torch.empty(a, **f32)
    square = torch.empty(square_shape(a, width), **f32) if width else None
    if square is not None:
        # The last row block's square may reach past this forward's last column block: zeros there, what the backward
        # would compute from the zero padding. Every other entry is written.
        square[-block_m:].zero_()
    dot_precision = _dot_precision(zhat.dtype, precision)
    for c in range(chunks):
        pair0 = c * chunk_pairs
        n_pairs = min(chunk_pairs, pairs - pair0)
        _launch(
            "sym_fwd", _nt_xent_sym_fwd_kernel, lambda meta, n_pairs=n_pairs: (n_pairs, splits), a, w, itemsize,
            config,
            zhat_ptr=zhat, rowpart_ptr=rowpart, colpart_ptr=colpart, spos_ptr=spos,
            square_ptr=spos if square is None else square, A=a, M=a, D=w, PAIR0=pair0,
            QK_SCALE=LOG2E / temperature, EXCLUDE_POS=exclude_pos, STORE_SQUARE=width > 0, BLOCK_D=tiling.block_d,
            D_BLOCKS=tiling.d_blocks, INPUT_PRECISION=dot_precision, INTERPRETER=INTERPRET,
        )  # fmt: skip
        _nt_xent_sym_combine_kernel[(triton.cdiv(a, REDUCE_BLOCK),)](
            rowpart_ptr=rowpart, colpart_ptr=colpart, colacc_ptr=colacc, spos_ptr=spos, stats_ptr=stats,
            partial_ptr=partial, count_ptr=count, loss_ptr=loss, A=a, n_splits=splits, PAIR0=pair0, n_pairs=n_pairs,
            inv_t=1.0 / temperature, inv_a=1.0 / a, BLOCK_M=block_m, FIRST=c == 0, LAST=c == chunks - 1,
            BLOCK_R=REDUCE_BLOCK, INTERPRETER=INTERPRET,
        )  # fmt: skip
    return square


def diagonal_square(
    a: int, w: int, itemsize: int, precision: str = "tf32", config: str | None = None
) -> int:
    """The upper-triangle forward's BLOCK_M where it keeps its diagonal squares' S for the backward, else 0.

    Those squares are whole MMA tiles, the lower half computed only because tiles are whole; the fixed-shift backward
    (``_bwd_fixed_shift``) loads them instead of computing them again, so forward + backward execute (2N)^2 D (5/2 -
    BLOCK_M / (2 2N)) MACs instead of (5/2 + BLOCK_M / (2 2N)). The residual is (A padded to BLOCK_M, BLOCK_M) fp32: 16
    MiB at 2N = 32768 with 128-row blocks, against 8 MiB for z_hat at D = 128 in bf16. a = 2N, w = the GEMM row width
    (``padded_width``), config as the forward's; the caller has checked that the upper-triangle forward runs.

    Also 0 below N = BLOCK_M (2N < 256 at the default tiles), where positives fall inside the squares: the loop that
    stores them leaves the positives out (with them it spilled on sm_90 for DCL), and so the backward computes them."""
    if not _bwd_fixed_shift(True, w, itemsize, precision):
        return 0
    block_m = resolve_config("sym_fwd", a, w, config, itemsize, precision).block_m
    return block_m if a // 2 >= block_m else 0


def square_shape(a: int, width: int) -> tuple[int, int]:
    """The shape of the diagonal squares' S for a = 2N rows and squares ``width`` wide (``diagonal_square``): rows
    padded to a multiple of the width, each its square's row of S."""
    return (triton.cdiv(a, width) * width, width)


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
    splits: int | None = None,
    gemm_config: str | None = None,
    exclude_pos: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward: upstream gradient (0-d) -> (dz_a, dz_b), each (N, D) in the input dtype. Three launches, no atomics;
    for D > MAX_BLOCK_D two more per column super-block beyond the first (``wide_backward``).

    With ``group`` every rank's upstream gradient is gathered (one scalar each) to weight the P_ji of its columns.
    splits: column splits of the backward GEMM kernel, whose fp32 partial sums the normalisation kernel adds in order
    (None: enough to fill the device, see ``launch_grid``). gemm_config: the wide backward GEMM's config (a name from
    ``list_configs()``; None: autotuned, as config). exclude_pos: DCL's (the forward's must match).
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
    tiling = d_tiling(w, _exact_fp32(z_a.element_size(), precision))
    itemsize, wide = z_a.element_size(), wide_backward(w)
    _, chunks, splits = launch_grid("bwd", a, w, m, config, itemsize, precision, splits=splits)
    # The wide backward's GEMM adds every super-block into one fp32 accumulator, zeroed first.
    acc = (torch.zeros if wide else torch.empty)(
        (1 if wide else splits, a, w), dtype=torch.float32, device=z_a.device
    )
    shift = _bwd_fixed_shift(temperature >= SHIFT_MIN_TEMPERATURE, w, itemsize, precision)
    terms = torch.empty(m, dtype=torch.float32, device=z_a.device)
    _nt_xent_col_terms_kernel[(triton.cdiv(m, COL_TERMS_BLOCK),)](
        stats_cols_ptr=state.stats_cols, g_ptr=g, g_cols_ptr=g_cols, terms_ptr=terms, A=a, M=m, SHIFT=shift,
        BLOCK_C=COL_TERMS_BLOCK,
    )  # fmt: skip
    dot_precision = _dot_precision(z_a.dtype, precision)
    # The upper-triangle forward's diagonal squares (``diagonal_square``), read on the fixed-shift path.
    square = state.square if shift and m == a else None
    if square is not None:
        width = square.shape[1]
        assert square.is_contiguous() and square.shape == square_shape(a, width)
        assert square.dtype == torch.float32 and n >= width, "see diagonal_square"
    common = dict(
        zhat_ptr=zhat, cols_ptr=cols, stats_ptr=state.stats, stats_cols_ptr=state.stats_cols, g_ptr=g,
        g_cols_ptr=g_cols, terms_ptr=terms, acc_ptr=acc, square_ptr=terms if square is None else square,
        SQUARE=0 if square is None else square.shape[1], A=a, M=m, D=w, OFFSET=state.offset,
        QK_SCALE=LOG2E / temperature, SHIFT=shift, EXCLUDE_POS=exclude_pos, BLOCK_D=tiling.block_d,
        D_BLOCKS=tiling.d_blocks, BLOCK_DO=tiling.block_do, INPUT_PRECISION=dot_precision, INTERPRETER=INTERPRET,
    )  # fmt: skip
    if not wide:
        _launch(
            "bwd", _nt_xent_bwd_kernel, lambda meta: (triton.cdiv(a, meta["BLOCK_M"]), chunks, splits), a, w,
            itemsize, config, w_ptr=acc, COL0=0, COL1=m, STORE_W=False, **common,
        )  # fmt: skip
    else:
        step = wide_columns(a, m, itemsize)
        weights = torch.empty((a, min(step, m)), dtype=cols.dtype, device=z_a.device)
        for c0 in range(0, m, step):
            c1 = min(c0 + step, m)
            _launch(
                "bwd", _nt_xent_bwd_kernel, lambda meta: (triton.cdiv(a, meta["BLOCK_M"]), 1, splits), a, w,
                itemsize, config, w_ptr=weights, COL0=c0, COL1=c1, STORE_W=True, **common,
            )  # fmt: skip
            _launch(
                "bwd_gemm", _nt_xent_bwd_gemm_kernel,
                lambda meta: (triton.cdiv(w, meta["BLOCK_N"]), triton.cdiv(a, meta["BLOCK_M"])), a, w, itemsize,
                gemm_config,
                w_ptr=weights, cols_ptr=cols, g_ptr=g, g_cols_ptr=g_cols, acc_ptr=acc, A=a, M=m, D=w, COL0=c0,
                COL1=c1, BLOCK_K=GEMM_BLOCK_K[itemsize], INPUT_PRECISION=dot_precision,
                INTERPRETER=INTERPRET,
            )  # fmt: skip
        splits = 1
    dz_a = torch.empty((n, d), dtype=z_a.dtype, device=z_a.device)
    dz_b = torch.empty_like(dz_a)
    _nt_xent_norm_bwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK_R),)](
        za_ptr=z_a, zb_ptr=z_b, norm_ptr=state.norm, acc_ptr=acc, dza_ptr=dz_a, dzb_ptr=dz_b,
        N=n, D=d, stride_a=z_a.stride(0), stride_b=z_b.stride(0), stride_acc=w, n_splits=splits,
        grad_scale=1.0 / (a * temperature),
        EPS_=EPS, BLOCK_R=ELEMENTWISE_BLOCK_R, BLOCK_D=min(triton.next_power_of_2(d), ELEMENTWISE_BLOCK_D),
        INTERPRETER=INTERPRET,
    )  # fmt: skip
    return dz_a, dz_b


class NTXentTritonFunction(torch.autograd.Function):
    """Autograd glue: the forward saves z_a, z_b and the O(A D) state; the backward runs the two backward kernels."""

    @staticmethod
    def forward(ctx, z_a, z_b, temperature, group, precision, config, splits, exclude_pos):
        options = dict(
            group=group, precision=precision, config=config, splits=splits, exclude_pos=exclude_pos
        )
        loss, state = nt_xent_forward(z_a, z_b, temperature, **options)
        ctx.save_for_backward(z_a, z_b, *state.tensors())
        ctx.offset, ctx.temperature = state.offset, temperature
        ctx.options = options
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        z_a, z_b, *tensors = ctx.saved_tensors
        state = ForwardState(*tensors, offset=ctx.offset)
        dz_a, dz_b = nt_xent_backward(grad_out, z_a, z_b, state, ctx.temperature, **ctx.options)
        return dz_a, dz_b, None, None, None, None, None, None


def nt_xent_triton(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.5,
    *,
    group=None,
    precision: str = "tf32",
    config: str | None = None,
    splits: int | None = None,
    exclude_pos: bool = False,
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
        splits: column splits of the forward and backward GEMM kernels, for tests and microbenchmarks; None picks
            enough to fill the device (``launch_grid``).
        exclude_pos: the positive pair left out of the denominator: DCL (Yeh et al. 2022), mean_i [log sum_{k != i,
            pos(i)} exp(S_ik/tau) - S_i,pos(i)/tau] (``fastclr.dcl`` adds DCLW's weights in torch).

    Returns:
        0-d loss in the input dtype.
    """
    return NTXentTritonFunction.apply(
        z_a, z_b, float(temperature), group, precision, config, splits, exclude_pos
    )

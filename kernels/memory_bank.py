r"""NT-Xent against a memory bank in Triton: one FlashAttention-style pass gives the logsumexp and its gradient.

Notation: anchors x (A, D), unit rows (normalised by the caller); bank q (K, D), no gradient; tau > 0.

    logits     t_ik = <x_i, q_k> / tau                                   (fp32 accumulation)
    forward    m_i = max_k t_ik,  l_i = sum_k exp(t_ik - m_i),  lse_i = m_i + log l_i
               U_i = sum_k exp(t_ik - m_i) q_k (fp32),  V_i = U_i / l_i  (the softmax-weighted mean of the bank)
    backward   d lse_i / d x_i = V_i / tau, so dL/dx_i = c_i V_i / tau for an upstream gradient c_i: plain torch, O(A D)

The trick that makes it cheap: the bank has no gradient, so everything the backward needs is V, which the forward
accumulates next to the logsumexp (FlashAttention's P @ V with V = q): forward + backward cost two (A x K x D) GEMMs,
S and P @ q, against three for a backward that recomputes S. The (A, K) matrix never exists in memory.
Over column tiles the max is a running one (FlashAttention's online softmax), so every tau works, however small: when
the max moves, l and U are rescaled by exp(m_old - m_new). Exponentials are base 2 (``exp2`` is the native instruction)
with log2(e)/tau folded into one scale, QK_SCALE, and every exponent is a difference of cosines times QK_SCALE.
Output: stats (A, 2) = (m_i, log l_i), kept as a pair: a caller forming lse_i - t_i,pos subtracts the positive logit
from m_i first, so no two numbers of size 1/tau are differenced. The gradient flag (WITH_GRAD, a constexpr) drops U
and its GEMM from the no-gradient forward, whose stats are bitwise those of the gradient forward for the same config.

Launch: row blocks x output D chunks x column splits (FlashDecoding's split of the key axis, so that a few hundred
anchors against 65536 bank rows still fill the GPU). Each program writes its split's partials (m in cosine units, l, U);
the host combines them in split order (torch, O(splits A D), deterministic): m = max_s m_s, w_s = exp2((m_s - m)
QK_SCALE), l = sum_s w_s l_s, U = sum_s w_s U_s. D up to MAX_BLOCK_D is one block (S and P @ q from the same q tile: two
GEMMs). Wider D loops over D for S and keeps U in output chunks of CHUNK_BLOCK_DO along the grid's second axis, each
chunk recomputing S: cdiv(D, 128) + 1 GEMMs (17 at D = 2048; counted with padding by ``executed_macs``). Exact fp32
(precision="ieee") takes nt_xent.py's FMA tiling (``d_tiling``): S in EXACT_BLOCK_D steps, U in chunks of up to
EXACT_BLOCK_DO.
Under TRITON_INTERPRET=1 the INTERPRETER constexpr upcasts dot operands to fp32 (the interpreter's bf16 dot is garbage)
after rounding them as the GPU does: P to the input dtype (to nearest even), fp32 tf32 operands to nearest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastclr.kernels import nt_xent as _nt
from fastclr.kernels.nt_xent import (
    LOG2E,
    PRECISIONS,
    PROGRAMS_PER_SM,
    KernelConfig,
    _dot_precision,
    _exact_fp32,
    _load_strided,
    _round_operand,
    _split_columns,
    _unit_stride,
    column_splits,
    d_tier,
    d_tiling,
    sm_count,
)

# --------------------------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_operand(
    ptr,
    row0,
    n_rows,
    stride,
    d0,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """``_load_strided``'s tile as a tl.dot operand: fp32 rounded to nearest tf32 for tf32 dots (the tensor cores would
    truncate, see ``_round_operand``)."""
    tile = _load_strided(ptr, row0, n_rows, stride, d0, D, BLOCK_R, BLOCK_D, INTERPRETER)
    if INPUT_PRECISION == "tf32":  # only fp32 inputs take tf32 dots (_dot_precision)
        tile = _round_operand(tile, tl.float32, INPUT_PRECISION, INTERPRETER)
    return tile


@triton.jit
def _bank_fwd_kernel(
    x_ptr,
    q_ptr,
    m_ptr,
    l_ptr,
    u_ptr,
    A,
    K,
    D,
    stride_x,
    stride_q,
    QK_SCALE,
    WITH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_BLOCKS: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Program (row block, output D chunk, column split): over the split's bank rows, the online logsumexp of its
    anchors and, WITH_GRAD, U for output columns pid_d * BLOCK_DO.. . Partials: m (splits, A) in cosine units (the row
    max of <x_i, q_k>), l (splits, A) = sum_k exp2((s_ik - m_i) QK_SCALE), u (splits, A, D) the same weights times q_k,
    fp32. Output chunk 0 writes m and l (every chunk computes them, bitwise alike)."""
    tl.static_assert(
        BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16"
    )
    tl.static_assert(
        D_BLOCKS > 1 or BLOCK_DO == BLOCK_D, "one D block: the logits' q tile is the P @ q operand"
    )
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    c_begin, c_end = _split_columns(K, BLOCK_N, 2)
    r0 = pid_m * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < A
    xt = rows  # placeholder; the row tile is preloaded only when all of D fits one block
    if D_BLOCKS == 1:
        xt = _load_operand(
            x_ptr, r0, A, stride_x, 0, D, BLOCK_M, BLOCK_D, INPUT_PRECISION, INTERPRETER
        )
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of <x_i, q_k>
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for start_n in range(c_begin, c_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if D_BLOCKS == 1:
            kt = _load_operand(
                q_ptr, start_n, K, stride_q, 0, D, BLOCK_N, BLOCK_D, INPUT_PRECISION, INTERPRETER
            )
            s = tl.dot(xt, tl.trans(kt), input_precision=INPUT_PRECISION)
        else:
            s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D_BLOCKS * BLOCK_D, BLOCK_D):
                x_d = _load_operand(
                    x_ptr, r0, A, stride_x, d0, D, BLOCK_M, BLOCK_D, INPUT_PRECISION, INTERPRETER
                )
                k_d = _load_operand(
                    q_ptr, start_n, K, stride_q, d0, D, BLOCK_N, BLOCK_D, INPUT_PRECISION, INTERPRETER
                )  # fmt: skip
                s = tl.dot(x_d, tl.trans(k_d), s, input_precision=INPUT_PRECISION)
            kt = s  # placeholder; the P @ q operand is the output chunk, loaded below
        # Bank rows past K are padding. Column start_n < c_end <= K is real, so every row's tile max is finite and
        # m_i - m_new never meets -inf - -inf (the first tile's exp2(-inf) = 0 clears the empty running sums).
        s = tl.where((cols < K)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # exp(t - m) = exp2((s - m_cos) QK_SCALE) with QK_SCALE = log2(e)/tau: a difference of cosines, then one scale.
        alpha = tl.exp2((m_i - m_new) * QK_SCALE)
        p = tl.exp2((s - m_new[:, None]) * QK_SCALE)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_GRAD:
            if D_BLOCKS > 1:
                kt = _load_operand(
                    q_ptr, start_n, K, stride_q, pid_d * BLOCK_DO, D, BLOCK_N, BLOCK_DO,
                    INPUT_PRECISION, INTERPRETER,
                )  # fmt: skip
            # P goes through the tensor cores in the input dtype (or tf32), rounded to nearest as the GPU rounds it,
            # also when interpreting; l keeps the unrounded fp32 sum, as FlashAttention's does.
            p_op = _round_operand(p, q_ptr.dtype.element_ty, INPUT_PRECISION, INTERPRETER)
            if INTERPRETER:
                p_op = p_op.to(tl.float32)
            acc = tl.dot(p_op, kt, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    part = split * A + rows
    if pid_d == 0:
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
    if WITH_GRAD:
        offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        out = u_ptr + part[:, None].to(tl.int64) * D + offs_o[None, :]
        tl.store(out, acc, mask=row_ok[:, None] & (offs_o[None, :] < D))


# Fixed when the kernel above was decorated: TRITON_INTERPRET=1 at import made it an interpreted function.
INTERPRET = bool(triton.knobs.runtime.interpret)

# --------------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------------

# nt_xent's tile configs, and one more stage-less FMA tile (see _EXACT_FP32_CANDIDATES).
CONFIGS = {**_nt.CONFIGS, "BM32_BN32_W8_S1": KernelConfig(32, 32, 8, 1)}

# The pruned autotune sets, best guess first, by D tier (``d_tier``: 0 one block of D <= 128, 1 one block of 256, 2 the
# D loop) and input element size. The gradient forward keeps a BLOCK_M x BLOCK_DO fp32 accumulator next to the logits
# tile (FlashAttention's forward), so these are close to the nt_xent backward's shapes; the no-gradient forward takes
# the same list, so that its stats equal the gradient forward's. Every entry compiles spill-free on sm_80 and sm_90 with
# and without the gradient (tests/test_memory_bank_triton.py; -m slow for all of them). Dropped for spills: fp32 tf32 at
# D = 256, BM64_BN32_W8_S2 (16 B of stack on sm_90), BM64_BN32_W8_S1 and BM64_BN16_W8_S2 (255 registers on sm_90).
_CANDIDATES = {
    (0, 2): ("BM128_BN64_W8_S3", "BM64_BN64_W4_S3", "BM64_BN32_W4_S2"),
    (1, 2): ("BM64_BN64_W8_S3", "BM64_BN64_W8_S2", "BM64_BN32_W8_S2"),
    (2, 2): ("BM64_BN64_W8_S3", "BM64_BN32_W8_S2"),
    (0, 4): ("BM64_BN32_W4_S2", "BM64_BN32_W8_S2"),
    (1, 4): ("BM32_BN32_W8_S2",),
    (2, 4): ("BM64_BN32_W8_S1",),
}
# Exact fp32: FMA dots hold both operands' K slices in registers, nt_xent's exact backward tile, by tier. With output
# chunks of 256 next to the D loop (tier 2) a second pipeline stage spilled on sm_80 at unaligned D (16 B at D = 300).
_EXACT_FP32_CANDIDATES = {0: ("BM32_BN32_W8_S2",), 1: ("BM32_BN32_W8_S2",), 2: ("BM32_BN32_W8_S1",)}


def candidate_configs(
    a: int, d: int, itemsize: int = 2, precision: str = "tf32"
) -> list[KernelConfig]:
    """The configs worth trying for A anchors of width D, input element size (2: bf16/fp16, 4: fp32) and fp32 dot
    precision, best guess first; tiles taller than the padded batch only add masked rows, so small A drops them."""
    if itemsize not in (2, 4):
        raise ValueError(f"itemsize must be 2 (bf16/fp16) or 4 (fp32), got {itemsize!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    exact = _exact_fp32(itemsize, precision)
    names = _EXACT_FP32_CANDIDATES[d_tier(d)] if exact else _CANDIDATES[d_tier(d), itemsize]
    listed = [CONFIGS[n] for n in names]
    fitting = [c for c in listed if c.block_m <= max(64, triton.next_power_of_2(a))]
    return fitting or [min(listed, key=lambda c: c.block_m)]


def resolve_config(
    a: int, d: int, config: str | None, itemsize: int = 2, precision: str = "tf32"
) -> KernelConfig:
    """A named config (checked against CONFIGS) or the first candidate for this size."""
    if config is None:
        return candidate_configs(a, d, itemsize, precision)[0]
    if config not in CONFIGS:
        raise ValueError(f"unknown kernel config {config!r}; choose one of {list(CONFIGS)}")
    return CONFIGS[config]


def output_chunks(d: int, with_grad: bool, exact: bool = False) -> int:
    """Programs along D per row block: U's output chunks (1 without the gradient, or when D fits one block)."""
    return triton.cdiv(d, d_tiling(d, exact).block_do) if with_grad else 1


def launch_grid(
    a: int,
    k: int,
    d: int,
    *,
    with_grad: bool,
    config: str | None = None,
    itemsize: int = 2,
    precision: str = "tf32",
    sms: int | None = None,
    splits: int | None = None,
) -> tuple[int, int, int]:
    """(row blocks, output D chunks, column splits) of a launch. The split count comes from the gradient launch's grid
    (the named config or the first candidate, PROGRAMS_PER_SM x sms programs) with or without the gradient: both
    forwards then cut the columns alike and give the same stats."""
    exact = _exact_fp32(itemsize, precision)
    cfg = resolve_config(a, d, config, itemsize, precision)
    rows = triton.cdiv(a, cfg.block_m)
    if splits is None:
        programs = PROGRAMS_PER_SM * (sm_count() if sms is None else sms)
        splits = column_splits(
            rows * output_chunks(d, True, exact), triton.cdiv(k, cfg.block_n), programs
        )
    return rows, output_chunks(d, with_grad, exact), splits


def executed_macs(
    a: int,
    k: int,
    d: int,
    *,
    with_grad: bool = True,
    config: str | None = None,
    itemsize: int = 2,
    precision: str = "tf32",
) -> dict[str, int | float]:
    """Multiply-accumulates the kernel executes (padding included), from grid x loop trips: per output chunk, S over
    the padded D (``d_tiling``) and, with the gradient, P @ q for the chunk's BLOCK_DO columns. One chunk up to
    D = MAX_BLOCK_D (S, P @ q: two GEMMs); above, cdiv(D, CHUNK_BLOCK_DO) chunks each recompute S. Returns {"logits",
    "pv", "total", "ideal", "ratio"}: ideal = (2 if with_grad else 1) a k d, ratio = total / ideal."""
    exact = _exact_fp32(itemsize, precision)
    cfg = resolve_config(a, d, config, itemsize, precision)
    tiling = d_tiling(d, exact)
    tiles = triton.cdiv(a, cfg.block_m) * cfg.block_m * triton.cdiv(k, cfg.block_n) * cfg.block_n
    chunks = output_chunks(d, with_grad, exact)
    logits = chunks * tiles * tiling.d_blocks * tiling.block_d
    pv = chunks * tiles * tiling.block_do if with_grad else 0
    ideal = (2 if with_grad else 1) * a * k * d
    return dict(logits=logits, pv=pv, total=logits + pv, ideal=ideal, ratio=(logits + pv) / ideal)


def _autotuned():
    """Autotuning over the pruned candidates on a GPU, keyed on (A, K, D) and the dot precision (the autotuner adds
    the dtypes). Not on WITH_GRAD: the two forwards share the config the first call picked, hence their stats."""

    def candidates(args):
        return candidate_configs(
            args["A"], args["D"], args["x_ptr"].element_size(), args["INPUT_PRECISION"]
        )

    return _nt.autotuner(_bank_fwd_kernel, CONFIGS, candidates, ["A", "K", "D", "INPUT_PRECISION"])


# One autotuner per target (the stub driver compiles for several in one process).
_AUTOTUNED: dict[object, object] = {}


def _launch(grid_fn, a: int, d: int, itemsize: int, config: str | None, **kwargs) -> None:
    """Launch with a named config, the first candidate (interpreter), or autotuning (GPU, no config named)."""
    if config is None and not INTERPRET:
        target = triton.runtime.driver.active.get_current_target()
        if target not in _AUTOTUNED:
            _AUTOTUNED[target] = _autotuned()
        _AUTOTUNED[target][grid_fn](**kwargs)
        return
    cfg = resolve_config(a, d, config, itemsize, kwargs["INPUT_PRECISION"])
    _nt.launch_with(_bank_fwd_kernel, grid_fn, cfg, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------------


def bank_forward(
    x: torch.Tensor,
    q: torch.Tensor,
    temperature: float,
    *,
    with_grad: bool,
    precision: str = "tf32",
    config: str | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (A, D) unit anchors, q (K, D) bank rows (same dtype and device, any row strides) -> stats (A, 2) fp32 =
    (m_i, log l_i) with lse_i = m_i + log l_i, m_i = max_k <x_i, q_k>/tau; and with_grad V (A, D) fp32, the
    softmax-weighted mean of the bank rows (d lse_i / d x_i = V_i / tau), else None. One launch and an O(splits A D)
    combine in torch; no host sync. Inputs are checked by the caller (``fastclr.kernels.nt_xent.check_supported``).

    precision: fp32 inputs' dots, "tf32" (operands rounded to nearest) or "ieee". config: a name from ``CONFIGS``.
    splits: column splits (None: enough to fill the device, ``launch_grid``).
    """
    x, q = _unit_stride(x), _unit_stride(q)
    a, d = x.shape
    k = q.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    grid = launch_grid(
        a, k, d, with_grad=with_grad, config=config, itemsize=x.element_size(), precision=precision, splits=splits
    )  # fmt: skip
    n_splits = grid[-1]
    m_part = torch.empty((n_splits, a), **f32)
    l_part = torch.empty((n_splits, a), **f32)
    # Without the gradient the kernel never touches u_ptr.
    u_part = torch.empty((n_splits, a, d), **f32) if with_grad else l_part
    tiling = d_tiling(d, _exact_fp32(x.element_size(), precision))
    qk_scale = LOG2E / temperature
    _launch(
        lambda meta: (triton.cdiv(a, meta["BLOCK_M"]), grid[1], n_splits), a, d, x.element_size(), config,
        x_ptr=x, q_ptr=q, m_ptr=m_part, l_ptr=l_part, u_ptr=u_part, A=a, K=k, D=d, stride_x=x.stride(0),
        stride_q=q.stride(0), QK_SCALE=qk_scale, WITH_GRAD=with_grad, BLOCK_D=tiling.block_d,
        D_BLOCKS=tiling.d_blocks, BLOCK_DO=tiling.block_do, INPUT_PRECISION=_dot_precision(x.dtype, precision),
        INTERPRETER=INTERPRET,
    )  # fmt: skip
    # The splits' partials, combined in split order. An empty split (a count chosen for another tile width) has
    # m = -inf and weight exp2(-inf) = 0; every row's max is finite, so m - m_s is never -inf - -inf.
    m_cos = m_part.amax(0)
    weight = torch.exp2((m_part - m_cos) * qk_scale)
    l_sum = (l_part * weight).sum(0)
    stats = torch.stack((m_cos / temperature, torch.log(l_sum)), dim=1)
    if not with_grad:
        return stats, None
    v = (u_part * weight[:, :, None]).sum(0) / l_sum[:, None]
    return stats, v


class BankLseFunction(torch.autograd.Function):
    """Autograd glue: the forward saves V (A, D) fp32; the backward is dx = c V / tau, O(A D) in torch."""

    @staticmethod
    def forward(ctx, x, q, temperature, precision, config, splits):
        with_grad = ctx.needs_input_grad[0]
        stats, v = bank_forward(
            x,
            q,
            temperature,
            with_grad=with_grad,
            precision=precision,
            config=config,
            splits=splits,
        )
        shift, log_sum = stats[:, 0].contiguous(), stats[:, 1].contiguous()
        ctx.mark_non_differentiable(shift)
        ctx.save_for_backward(v)
        ctx.temperature, ctx.x_dtype = temperature, x.dtype
        return shift, log_sum

    @staticmethod
    def backward(ctx, grad_shift, grad_log_sum):
        (v,) = ctx.saved_tensors
        dx = (grad_log_sum / ctx.temperature)[:, None] * v
        return dx.to(ctx.x_dtype), None, None, None, None, None


def bank_lse_triton(
    x: torch.Tensor,
    q: torch.Tensor,
    temperature: float,
    *,
    precision: str = "tf32",
    config: str | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp_k <x_i, q_k>/tau = shift_i + log_sum_i, fused, with autograd through x.

    Args:
        x: (A, D) anchors, unit rows, fp32/bf16/fp16, CUDA (CPU under TRITON_INTERPRET=1).
        q: (K, D) bank rows, same dtype and device; treated as a constant (no gradient).
        temperature: tau > 0.
        precision: fp32 inputs only: "tf32" (tensor cores, operands rounded to nearest) or "ieee" (exact fp32).
        config: a kernel variant from ``CONFIGS`` (nt_xent's and one more); None autotunes on a GPU over
            ``candidate_configs`` and takes the first candidate under the interpreter.
        splits: column splits, for tests and microbenchmarks; None fills the device.

    Returns:
        shift (A,) fp32 = max_k <x_i, q_k>/tau, non-differentiable, and log_sum (A,) fp32 = log sum_k exp(t_ik -
        shift_i), differentiable with respect to x. A loss lse_i - t_i,pos should be formed as (shift_i - t_i,pos) +
        log_sum_i, treating shift as the constant it is for the gradient.
    """
    return BankLseFunction.apply(x, q, float(temperature), precision, config, splits)

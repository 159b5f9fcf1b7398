"""The fused Triton NT-Xent kernel under TRITON_INTERPRET=1 (CPU tensors) against the reference loss.

Oracle: ``nt_xent_reference`` in float64 on the inputs rounded to the tested dtype. fp32 runs with precision="ieee"
(the interpreter's fp32 dot is exact, a GPU's tf32 is not). For bf16/fp16 the kernel's error against that oracle must be
at most twice the error of the reference run in the same dtype (plus a tiny absolute floor). Interpreted tl.dot costs
about 20 ns per MAC here, so sizes are chosen to keep the whole file well under two minutes on one core.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import NamedTuple

# Before triton is imported: run the kernels on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import fastclr
from fastclr.kernels import nt_xent as K
from fastclr.losses.reference import dcl_reference, nt_xent_reference

# (20, 300): D > MAX_BLOCK_D loops over D and takes the wide backward (a weight pass, then a plain GEMM).
SHAPES = [(1, 8), (3, 5), (64, 128), (20, 300)]
BIG_SHAPE = (257, 130)  # several row and column blocks, ragged in N and D
TAUS = [0.01, 0.05, 0.1, 0.5]  # 0.01 takes the running-max path, the others the fixed shift
HALF_DTYPES = [torch.bfloat16, torch.float16]
UPSTREAM = 1.7
FP32_LOSS = dict(atol=1e-6, rtol=1e-5)
FP32_GRAD = dict(atol=1e-5, rtol=1e-4)
HALF_FLOOR = 1e-6


class Device(NamedTuple):
    """Where the kernel runs: the interpreter on CPU tensors, or the compiled kernels on CUDA tensors."""

    name: str
    kernels: object  # the fastclr.kernels.nt_xent module to call
    torch_device: str
    # Tolerances of fp32 results (precision="ieee", and "tf32" against the tf32 oracle).
    fp32_loss: dict
    fp32_grad: dict


INTERPRETER = Device("interpreter", K, "cpu", FP32_LOSS, FP32_GRAD)


@functools.cache
def _compiled_kernels():
    """kernels/nt_xent.py imported a second time with the interpreter off: its kernels compile for the GPU, while this
    process (TRITON_INTERPRET=1, set before triton was imported) interprets ``K``."""
    import triton

    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False
        spec = importlib.util.spec_from_file_location("fastclr.kernels._nt_xent_cuda", K.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.fixture(
    params=[
        "interpreter",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(),
                reason="no CUDA device (tests/test_nt_xent_launch.py compiles the GPU kernels without one)",
            ),
        ),
    ]
)
def device(request):
    """Every kernel test runs in the interpreter, and compiled on a GPU when there is one. GPU tolerances: fp32 sums the
    products in another order than NumPy (10x the interpreter's bounds); bf16/fp16 keep the 2 x reference-error bound
    (it is relative to the dtype); tf32 is held to the fp32 bounds against an oracle on tf32-rounded rows."""
    if request.param == "interpreter":
        yield INTERPRETER
        return
    import triton

    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False  # compiling (not interpreting) while the test runs
        loss_tol, grad_tol = dict(atol=1e-5, rtol=1e-4), dict(atol=1e-4, rtol=1e-3)
        yield Device("cuda", _compiled_kernels(), "cuda", loss_tol, grad_tol)


def assert_close(actual, expected, atol, rtol, what):
    """allclose that says where and by how much it failed."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if not bool((err <= bound).all()):
        worst = int((err - bound).flatten().argmax())
        raise AssertionError(
            f"{what}: max |err| {err.max().item():.3e}; worst at flat index {worst}: "
            f"{actual.flatten()[worst].item():.8g} vs {expected.flatten()[worst].item():.8g} "
            f"(bound {bound.flatten()[worst].item():.3e})"
        )


def pair(n, d, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z_b = z_a + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z_a.to(dtype).to(device), z_b.to(dtype).to(device)


def loss_and_grads(fn, z_a, z_b, tau, upstream=UPSTREAM):
    a = z_a.detach().clone().requires_grad_()
    b = z_b.detach().clone().requires_grad_()
    loss = fn(a, b, tau)
    (loss * upstream).backward()
    return loss.detach(), a.grad, b.grad


def triton_ieee(config=None):
    return lambda a, b, tau: K.nt_xent_triton(a, b, tau, precision="ieee", config=config)


def check_fp32(n, d, tau, config=None, device=INTERPRETER, splits=None):
    z_a, z_b = pair(n, d, torch.float32, device=device.torch_device)
    kernel = device.kernels.nt_xent_triton
    got = loss_and_grads(
        lambda a, b, t: kernel(a, b, t, precision="ieee", config=config, splits=splits),
        z_a,
        z_b,
        tau,
    )
    want = loss_and_grads(nt_xent_reference, z_a.double().cpu(), z_b.double().cpu(), tau)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close(got[0], want[0], **device.fp32_loss, what=f"loss n={n} d={d} tau={tau}")
    assert_close(got[1], want[1], **device.fp32_grad, what=f"dz_a n={n} d={d} tau={tau}")
    assert_close(got[2], want[2], **device.fp32_grad, what=f"dz_b n={n} d={d} tau={tau}")


def check_half(n, d, tau, dtype, config=None, device=INTERPRETER, splits=None):
    z_a, z_b = pair(n, d, dtype, device=device.torch_device)
    kernel = device.kernels.nt_xent_triton
    got = loss_and_grads(
        lambda a, b, t: kernel(a, b, t, config=config, splits=splits), z_a, z_b, tau
    )
    got = tuple(x.cpu() for x in got)
    z_a, z_b = z_a.cpu(), z_b.cpu()
    ref = loss_and_grads(nt_xent_reference, z_a, z_b, tau)
    truth = loss_and_grads(nt_xent_reference, z_a.double(), z_b.double(), tau)
    for name, g, r, t in zip(("loss", "dz_a", "dz_b"), got, ref, truth, strict=True):
        assert g.dtype == dtype, f"{name} came back as {g.dtype}"
        assert bool(torch.isfinite(g).all()), f"{name}: NaN/Inf in the kernel's output"
        err = (g.double() - t).abs().max().item()
        ref_err = (r.double() - t).abs().max().item()
        # No implementation returning `dtype` can beat rounding the exact answer to it: that error joins the floor.
        rounding = (t.to(dtype).double() - t).abs().max().item()
        # The kernel accumulates in fp32: rounding S/tau (relative eps/tau) reaches a gradient through its 1/(2N tau)
        # prefactor. Where the exact gradient underflows the dtype (tiny tau), that noise is all that is left to compare.
        noise = 0.0 if name == "loss" else 4 * torch.finfo(torch.float32).eps / (2 * n * tau**2)
        assert err <= 2 * ref_err + rounding + noise + HALF_FLOOR, (
            f"{name} n={n} d={d} tau={tau} {dtype}: kernel error {err:.3e} > 2 x reference error {ref_err:.3e}"
            f" + rounding {rounding:.3e}"
        )


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_fp32_matches_reference(n, d, tau, device):
    check_fp32(n, d, tau, device=device)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,d", SHAPES)
def test_half_no_worse_than_reference_in_same_dtype(n, d, tau, dtype, device):
    check_half(n, d, tau, dtype, device=device)


@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_big_shape_fp32(tau, device):
    check_fp32(*BIG_SHAPE, tau, device=device)


@pytest.mark.parametrize("tau", [0.01, 0.5])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_big_shape_half(dtype, tau, device):
    check_half(*BIG_SHAPE, tau, dtype, device=device)


@pytest.mark.parametrize("config", K.list_configs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_config_gives_the_same_result(config, dtype, device):
    # 2N = 192: several row and column blocks for every tile size, and a ragged last block for 128.
    if dtype == torch.float32:
        check_fp32(96, 40, 0.1, config=config, device=device)
    else:
        check_half(96, 40, 0.1, dtype, config=config, device=device)


# 2N = 80 rows, D = 24 in 64 x 32 tiles: 2 row blocks x 3 column blocks. splits = 5 leaves two splits empty (they
# happen when the split count was chosen for another tile width).
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_column_splits_match_reference(splits, tau, device):
    check_fp32(40, 24, tau, config="BM64_BN32_W4_S2", device=device, splits=splits)


def test_column_splits_half(device):
    check_half(40, 24, 0.1, torch.bfloat16, config="BM64_BN32_W4_S2", device=device, splits=3)


def test_column_splits_are_deterministic():
    """The splits' partials are combined in split order (forward) and added in split order (backward): bitwise the same
    on every run, however the programs finish."""
    z_a, z_b = pair(40, 24, torch.float32)
    fn = triton_ieee(config="BM64_BN32_W4_S2")
    runs = [
        loss_and_grads(lambda a, b, t: K.nt_xent_triton(a, b, t, precision="ieee", config="BM64_BN32_W4_S2",
                                                        splits=3), z_a, z_b, 0.2)
        for _ in range(2)
    ]  # fmt: skip
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)
    # Splitting only regroups fp32 sums: the one-split result agrees to rounding.
    single = loss_and_grads(fn, z_a, z_b, 0.2)
    for x, y in zip(runs[0], single, strict=True):
        assert_close(x, y, 1e-6, 1e-5, "3 splits vs 1")


# The wide backward (D > MAX_BLOCK_D) in column super-blocks of 128 (WIDE_W_BYTES shrunk): 2N = 200 makes two, the last
# ragged, and in 64 x 32 tiles two blocks where boundary runs overlap (visited twice, their W stored once).
@pytest.mark.parametrize("splits,tau", [(1, 0.01), (3, 0.5)])
def test_wide_backward_in_super_blocks_matches_reference(splits, tau, monkeypatch):
    monkeypatch.setattr(K, "WIDE_W_BYTES", 200 * 4 * 128)
    assert K.wide_columns(200, 200, 4) == 128
    check_fp32(100, 300, tau, config="BM64_BN32_W4_S2", splits=splits)


def test_wide_backward_half_and_deterministic(monkeypatch):
    monkeypatch.setattr(K, "WIDE_W_BYTES", 140 * 2 * 128)  # 2N = 140: two super-blocks
    check_half(70, 264, 0.2, torch.bfloat16, config="BM64_BN32_W4_S2", splits=2)
    z_a, z_b = pair(70, 264, torch.float32)
    runs = [loss_and_grads(triton_ieee("BM64_BN32_W4_S2"), z_a, z_b, 0.2) for _ in range(2)]
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


def test_wide_backward_computes_s_once_per_tile(monkeypatch):
    """Counted under the interpreter (2N = 200, D = 300, 64 x 32 tiles, super-blocks of 128 columns): the weight pass
    computes every (row block, column block) tile of S once over all of D (those where boundary runs overlap twice),
    where a fused backward would compute it once per output chunk of D, except the diagonal squares' tiles, whose S it
    loads from the upper-triangle forward; the GEMM runs once per super-block."""
    monkeypatch.setattr(K, "WIDE_W_BYTES", 200 * 4 * 128)
    tiles, gemms = [], []
    bwd_tile, gemm = K._bwd_tile, K._nt_xent_bwd_gemm_kernel

    def counting(*args):
        tiles.append((args[3].handle.data.item(), args[5].handle.data.item()))
        return bwd_tile(*args)

    class Counting:
        def __getitem__(self, grid):
            gemms.append(grid)
            return gemm[grid]

    monkeypatch.setattr(K, "_bwd_tile", counting)
    monkeypatch.setattr(K, "_nt_xent_bwd_gemm_kernel", Counting())
    z_a, z_b = pair(100, 300, torch.float32)
    opts = dict(precision="ieee", config="BM64_BN32_W4_S2", splits=2)
    loss, state = K.nt_xent_forward(z_a, z_b, 0.5, **opts)
    K.nt_xent_backward(torch.ones(()), z_a, z_b, state, 0.5, **opts)
    every = {(r0, c0) for r0 in range(0, 200, 64) for c0 in range(0, 200, 32)}
    square = square_tiles(200, 64, 32, 64)
    assert len(square) == K.square_visits(200, 64, 32, 64) == 4 * 2 - 1  # the last square is ragged
    assert set(tiles) | square == every
    want = len(every) + K.boundary_overlaps(200, 200, 64, 32, square=64) - len(square)
    assert len(tiles) == want
    assert len(gemms) == 2


def test_no_squares_where_positives_fall_inside_them(monkeypatch):
    """N < BLOCK_M: the squares hold positives, so the upper-triangle forward keeps none and the backward computes
    them (and ``executed_macs`` counts them); the running-max path and gathered columns keep none either."""
    z_a, z_b = pair(40, 24, torch.float32)
    _, state = K.nt_xent_forward(z_a, z_b, 0.3, precision="ieee", config="BM64_BN32_W4_S2")
    assert state.square is None and K.diagonal_square(80, 32, 4, "ieee", "BM64_BN32_W4_S2") == 0
    _, state = K.nt_xent_forward(z_a, z_b, 0.3, precision="ieee", config="BM32_BN32_W8_S2")
    assert state.square.shape == (96, 32)
    _, state = K.nt_xent_forward(z_a, z_b, 0.01, precision="ieee", config="BM32_BN32_W8_S2")
    assert state.square is None
    _fake_two_ranks(monkeypatch)
    opts = dict(group=object(), precision="ieee", config="BM32_BN32_W8_S2")
    _, state = K.nt_xent_forward(z_a, z_b, 0.3, **opts)
    assert state.square is None and state.cols.shape[0] == 2 * 80
    macs = K.executed_macs(80, 32, config="BM64_BN32_W4_S2", itemsize=4, precision="ieee")
    general = K.executed_macs(
        80, 32, config="BM64_BN32_W4_S2", itemsize=4, precision="ieee", symmetric=False
    )
    assert macs["bwd"] == general["bwd"]


def square_tiles(a, block_m, block_n, square):
    """(row block start, column block start) of the tiles a backward of these tiles loads from the forward's diagonal
    squares of width ``square``, from ``K.boundary_runs``."""
    runs = K.boundary_runs(a, a, block_m, block_n, square=square)
    return {(b * block_m, t * block_n) for b, row in enumerate(runs) for t in row[0]}


# (forward config, backward config): the backward reads the forward's diagonal squares when its tiles divide them
# (BLOCK_M 64 against squares of 64, or 32 against 64 with wider columns than the forward's: zeros where the forward
# wrote nothing) and computes them otherwise (64-row blocks against squares of 32).
SQUARE_CASES = [
    ("BM64_BN32_W4_S2", "BM64_BN32_W4_S2", True),
    ("BM64_BN32_W4_S2", "BM64_BN64_W4_S3", True),
    ("BM64_BN64_W4_S3", "BM32_BN32_W8_S2", True),
    ("BM32_BN32_W8_S2", "BM64_BN32_W4_S2", False),
]


@pytest.mark.parametrize("exclude_pos", [False, True])
@pytest.mark.parametrize("n", [70, 100])
@pytest.mark.parametrize("fwd_config,bwd_config,reads", SQUARE_CASES)
def test_backward_loads_the_forward_diagonal_squares(
    n, fwd_config, bwd_config, reads, exclude_pos, monkeypatch
):
    """The upper-triangle forward keeps S of its diagonal squares (A padded to BLOCK_M, BLOCK_M); a backward whose
    tiles divide them computes every other tile once and loads those (``square_visits`` of them, what
    ``executed_macs`` leaves out), with the gradient of a backward that computes them all, and the reference's (NT-Xent
    and DCL, whose positives left out of the denominator lie outside the squares)."""
    tiles = []
    bwd_tile = K._bwd_tile

    def counting(*args):
        tiles.append((args[3].handle.data.item(), args[5].handle.data.item()))
        return bwd_tile(*args)

    monkeypatch.setattr(K, "_bwd_tile", counting)
    z_a, z_b = pair(n, 24, torch.float32)
    a, tau, fwd, bwd = 2 * n, 0.3, K.CONFIGS[fwd_config], K.CONFIGS[bwd_config]
    loss, state = K.nt_xent_forward(
        z_a, z_b, tau, precision="ieee", config=fwd_config, splits=3, exclude_pos=exclude_pos
    )
    assert state.square.shape == (-(-a // fwd.block_m) * fwd.block_m, fwd.block_m)
    opts = dict(precision="ieee", config=bwd_config, splits=2, exclude_pos=exclude_pos)
    grads = K.nt_xent_backward(torch.tensor(UPSTREAM), z_a, z_b, state, tau, **opts)
    assert K.reads_square(fwd.block_m, bwd.block_m, bwd.block_n) == reads
    square = square_tiles(a, bwd.block_m, bwd.block_n, fwd.block_m) if reads else set()
    every = {(r0, c0) for r0 in range(0, a, bwd.block_m) for c0 in range(0, a, bwd.block_n)}
    assert set(tiles) | square == every
    sq = fwd.block_m if reads else 0
    twice = K.boundary_overlaps(a, a, bwd.block_m, bwd.block_n, square=sq)
    assert len(tiles) == len(every) + twice - K.square_visits(a, bwd.block_m, bwd.block_n, sq)
    before = len(tiles)
    computed = K.nt_xent_backward(
        torch.tensor(UPSTREAM), z_a, z_b, state._replace(square=None), tau, **opts
    )
    # Without the squares the backward computes every tile.
    assert len(tiles) - before == len(every) + K.boundary_overlaps(a, a, bwd.block_m, bwd.block_n)
    reference = dcl_reference if exclude_pos else nt_xent_reference
    want = loss_and_grads(lambda x, y, t: reference(x, y, t), z_a.double(), z_b.double(), tau)
    for got, same, ref, name in zip(grads, computed, want[1:], ("dz_a", "dz_b"), strict=True):
        assert_close(got, same, 1e-6, 1e-5, f"{name} loading the squares vs computing them")
        assert_close(got, ref, **FP32_GRAD, what=f"{name} vs the reference")


# The upper-triangle forward (one process, tau >= 0.025): 2N = 74, 120 and 200 are ragged in every tile size; BM64_BN32 puts
# R = 2 column blocks in a diagonal square, BM32_BN32 one; an odd number of row blocks leaves the middle one unpaired;
# 7 splits of 3 or 4 blocks leave some empty. SYM_MAX_SLOTS = 2 runs one row-block pair per launch (the chunked
# workspace), folding the column sums of each chunk into a running sum.
SYM_CASES = [
    (37, 24, "BM64_BN32_W4_S2", 1, None),  # 2 row blocks: one pair
    (37, 24, "BM32_BN32_W8_S2", 7, 2),  # 3 row blocks: a pair and the middle one, in 2 launches
    (100, 20, "BM64_BN32_W4_S2", 3, 2),  # 4 row blocks: 2 pairs in 2 launches
    (60, 20, "BM32_BN32_W8_S2", 2, None),  # 4 row blocks: 2 pairs in one launch
    (100, 20, "BM64_BN64_W4_S3", 2, 2),
]


@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("n,d,config,splits,slots", SYM_CASES)
def test_symmetric_forward_matches_reference(n, d, config, splits, slots, tau, monkeypatch):
    """Loss and gradients (the backward reads the upper-triangle forward's stats) against the reference, and the stats
    against the row blocks x column splits forward's to fp32 rounding."""
    if slots is not None:
        monkeypatch.setattr(K, "SYM_MAX_SLOTS", slots)
    taken = []
    sym_forward = K._symmetric_forward
    monkeypatch.setattr(
        K, "_symmetric_forward", lambda *a, **k: taken.append(1) or sym_forward(*a, **k)
    )
    check_fp32(n, d, tau, config=config, splits=splits)
    assert taken, "the upper-triangle forward did not run"
    z_a, z_b = pair(n, d, torch.float32)
    opts = dict(precision="ieee", config=config, splits=splits)
    loss, state = K.nt_xent_forward(z_a, z_b, tau, **opts)
    general, want = K.nt_xent_forward(z_a, z_b, tau, symmetric=False, **opts)
    assert torch.equal(state.stats[:, 0], torch.ones(2 * n))  # m_i = 1: the fixed shift
    assert_close(state.stats, want.stats, 1e-6, 1e-6, "stats vs the general forward")
    assert_close(loss, general, 1e-6, 1e-6, "loss vs the general forward")


def test_running_max_path_keeps_the_general_forward(monkeypatch):
    """tau < 0.025 (online logsumexp) and gathered columns never take the upper-triangle forward."""
    taken = []
    monkeypatch.setattr(K, "_symmetric_forward", lambda *a, **k: taken.append(1))
    z_a, z_b = pair(20, 16, torch.float32)
    loss, _ = K.nt_xent_forward(z_a, z_b, 0.01, precision="ieee")
    assert_close(
        loss, nt_xent_reference(z_a.double(), z_b.double(), 0.01), **FP32_LOSS, what="loss"
    )
    _fake_two_ranks(monkeypatch)
    K.nt_xent_forward(z_a, z_b, 0.5, group=object(), precision="ieee")
    assert not taken


@pytest.mark.parametrize(
    "n,config,slots", [(100, "BM64_BN32_W4_S2", None), (37, "BM32_BN32_W8_S2", 2)]
)
def test_symmetric_forward_computes_only_upper_triangle_tiles(n, config, slots, monkeypatch):
    """Every tile the upper-triangle forward computes starts at or right of its row block's diagonal (column block
    start >= row block start), each exactly once, and their number is what ``executed_macs`` counts."""
    if slots is not None:
        monkeypatch.setattr(K, "SYM_MAX_SLOTS", slots)
    tiles = []
    logits_tile = K._logits_tile

    def counting(*args):
        r0, c0, trans = args[3].handle.data.item(), args[5].handle.data.item(), args[-1]
        assert trans, "the upper-triangle forward computes its tiles transposed"
        tiles.append((r0, c0))
        return logits_tile(*args)

    monkeypatch.setattr(K, "_logits_tile", counting)
    z_a, z_b = pair(n, 24, torch.float32)
    K.nt_xent_forward(z_a, z_b, 0.5, precision="ieee", config=config, splits=3)
    cfg = K.CONFIGS[config]
    a = 2 * n
    upper = {
        (r0, c0) for r0 in range(0, a, cfg.block_m) for c0 in range(0, a, cfg.block_n) if c0 >= r0
    }
    assert sorted(tiles) == sorted(upper), "a tile missing, repeated or below the diagonal"
    assert len(tiles) == K.symmetric_visits(a, cfg.block_m, cfg.block_n)
    w = K.padded_width(24)
    macs = K.executed_macs(a, w, config=config, itemsize=4, precision="ieee")
    assert (
        macs["fwd"]
        == len(tiles) * cfg.block_m * cfg.block_n * K.d_tiling(w, exact=True).d_blocks * 32
    )


@pytest.fixture
def reversed_programs(monkeypatch):
    """The interpreter runs every launch's programs in reverse order (the last program id first): a result that
    depended on the order in which programs finish (float atomics, arrival-order sums) would change its bits."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_grid_idx = builder.set_grid_idx

    def reverse(x, y, z):
        gx, gy, gz = builder.grid_dim
        set_grid_idx(gx - 1 - x, gy - 1 - y, gz - 1 - z)

    monkeypatch.setattr(builder, "set_grid_idx", reverse)


def test_symmetric_forward_is_deterministic(monkeypatch, request):
    """Row sums, the chunks' column sums and the loss are added in a fixed order: bitwise the same on every run, also
    when the programs run in the opposite order."""
    monkeypatch.setattr(K, "SYM_MAX_SLOTS", 2)
    z_a, z_b = pair(60, 20, torch.float32)
    opts = dict(precision="ieee", config="BM32_BN32_W8_S2", splits=3)

    def run():
        _, state = K.nt_xent_forward(z_a, z_b, 0.2, **opts)
        grads = loss_and_grads(lambda a, b, t: K.nt_xent_triton(a, b, t, **opts), z_a, z_b, 0.2)
        return (state.stats, *grads)

    first, again = run(), run()
    request.getfixturevalue("reversed_programs")
    backwards = run()
    for name, x, y, z in zip(
        ("stats", "loss", "dz_a", "dz_b"), first, again, backwards, strict=True
    ):
        assert torch.equal(x, y), name
        assert torch.equal(x, z), f"{name} changed with the order of the programs"


WORLD = 2


def _fake_two_ranks(monkeypatch):
    """Rank 1 of a two-rank group whose other rank holds the same rows: the gathers concatenate two copies, so the
    kernels see M = 2A columns with this rank's at OFFSET = A (rows != columns) without torch.distributed."""

    def rows(x, group):
        return (torch.cat([x] * WORLD), (WORLD - 1) * x.shape[0]) if group is not None else (x, 0)

    def scalar(x, group):
        return rows(x.reshape(1), group)[0]

    monkeypatch.setattr(K, "all_gather_rows", rows)
    monkeypatch.setattr(K, "all_gather_scalar", scalar)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_gathered_columns_with_splits_match_reference(splits, tau, monkeypatch):
    """Rows != columns: each rank's loss is the mean over its rows of the logsumexp over every rank's rows, and its
    gradient is that of the sum of all ranks' g-weighted losses with respect to its own rows. Both ranks holding the
    same rows, that is the reference on the batch repeated WORLD times (the same loss; WORLD x its gradient for one
    copy)."""
    _fake_two_ranks(monkeypatch)
    n, d = 20, 24
    z_a, z_b = pair(n, d, torch.float32)
    got = loss_and_grads(
        lambda a, b, t: K.nt_xent_triton(
            a, b, t, group=object(), precision="ieee", config="BM32_BN32_W8_S2", splits=splits
        ),
        z_a, z_b, tau,
    )  # fmt: skip
    full = loss_and_grads(
        nt_xent_reference, z_a.double().repeat(WORLD, 1), z_b.double().repeat(WORLD, 1), tau
    )
    assert_close(got[0], full[0], **FP32_LOSS, what="loss")
    assert_close(got[1], WORLD * full[1][-n:], **FP32_GRAD, what="dz_a")
    assert_close(got[2], WORLD * full[2][-n:], **FP32_GRAD, what="dz_b")


@pytest.mark.parametrize("sms", [108, 132])
@pytest.mark.parametrize("a,m", [(1024, 8192), (512, 4096), (4096, 8192), (8192, 8192)])
def test_grid_fills_the_gpu_at_ddp_shapes(a, m, sms):
    """At least PROGRAMS_PER_SM x the SM count programs in both GEMM kernels (bf16, D = 128), with the default config;
    one GPU (a = m) runs the upper-triangle forward."""
    for kernel in ("sym_fwd" if a == m else "fwd", "bwd"):
        grid = K.launch_grid(kernel, a, 128, m, sms=sms)
        programs = math.prod(grid)
        assert programs >= K.PROGRAMS_PER_SM * sms, (kernel, a, m, sms, grid)
        # No gratuitous splitting.
        assert programs <= 4 * K.PROGRAMS_PER_SM * sms, (kernel, a, m, sms, grid)


def test_column_splits_are_the_fewest_that_fill_the_gpu():
    for rows in (1, 3, 8, 16, 64, 300):
        for blocks in (1, 2, 5, 64, 128, 129):
            for programs in (4, 216, 264):
                splits = K.column_splits(rows, blocks, programs)
                per = -(-blocks // splits)
                assert 1 <= splits <= blocks
                assert (splits - 1) * per < blocks, "an empty split"
                case = (rows, blocks, programs, splits)
                assert rows * splits >= programs or splits == blocks, case
                for fewer in range(1, splits):
                    even = -(-blocks // -(-blocks // fewer)) == fewer  # no split left empty
                    assert not even or rows * fewer < programs, (case, fewer)
    # Many rows: one split, the kernels' old grid.
    assert K.launch_grid("fwd", 262144, 128, sms=132) == (2048, 1)
    # The upper-triangle forward: 2048 row blocks of 128 make 1024 pairs, in chunks of SYM_MAX_SLOTS / 2 per launch.
    assert K.launch_grid("sym_fwd", 262144, 128, sms=132) == (K.SYM_MAX_SLOTS // 2, 3)
    with pytest.raises(ValueError, match="m = a"):
        K.launch_grid("sym_fwd", 1024, 128, 8192)


def loss_of_rows(rows: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent in float64 of rows taken as they are (no normalisation): the oracle for given dot operands."""
    rows = rows.double().cpu()
    a = rows.shape[0]
    s = rows @ rows.T / tau
    s.fill_diagonal_(float("-inf"))
    pos = s[torch.arange(a), (torch.arange(a) + a // 2) % a]
    return (torch.logsumexp(s, 1) - pos).mean()


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_tf32_operands_are_rounded_to_nearest(tau, device):
    """precision="tf32" (fp32's default): the forward stores z_hat rounded to the nearest tf32 value (cvt.rna.tf32.f32 on
    a GPU, asserted on the PTX by tests/test_kernel_report.py; the same on the bits here), so S is a sum of exact
    products of tf32 values and the loss is the float64 loss of those rows to fp32 accuracy. The tensor cores' own
    handling of raw fp32 truncates: that oracle is missed by far more than the tolerance."""
    z_a, z_b = pair(64, 100, torch.float32, device=device.torch_device)
    loss, state = device.kernels.nt_xent_forward(z_a, z_b, tau)
    zhat = state.zhat.cpu()
    low_bits = int((zhat.view(torch.int32) & 0x1FFF).count_nonzero())
    assert low_bits == 0, f"{low_bits} z_hat entries are not tf32 values"
    z = torch.cat([z_a, z_b]).cpu()
    bits = (z / torch.linalg.vector_norm(z, dim=1, keepdim=True)).view(torch.int32)
    nearest = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    truncated = (bits & ~0x1FFF).view(torch.float32)
    # The kernel's norm sums in another order: an fp32 ulp can move a tie to the neighbouring tf32 value.
    assert_close(zhat, nearest, 0.0, 2.0**-10, "z_hat vs fp32 rows rounded to nearest tf32")
    assert_close(loss, loss_of_rows(zhat, tau), **device.fp32_loss, what="loss vs tf32 oracle")
    miss = (loss_of_rows(truncated, tau) - loss.double().cpu()).abs().item()
    bound = device.fp32_loss["atol"] + device.fp32_loss["rtol"] * abs(loss.item())
    assert miss > 10 * bound, f"truncated operands would pass too: {miss:.2e} vs bound {bound:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 5, 40])
def test_identical_embeddings_give_log_2n_minus_1(n, dtype, device):
    z = torch.randn(1, 24).expand(n, 24).to(dtype).to(device.torch_device)
    for tau in (0.01, 0.5):
        loss = device.kernels.nt_xent_triton(z, z, tau, precision="ieee")
        expected = torch.tensor(math.log(2 * n - 1), dtype=torch.float64)
        ulp = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert_close(loss, expected, atol=1e-6, rtol=ulp, what=f"n={n} tau={tau} {dtype}")


def test_non_contiguous_inputs():
    base_a, base_b = pair(40, 70, torch.float32)
    z_a = base_a[::2]  # row stride 2 D: read in place
    z_b = base_b[:20].t().contiguous().t()  # column-major: copied to unit stride
    assert not z_a.is_contiguous() and not z_b.is_contiguous()
    got = loss_and_grads(triton_ieee(), z_a, z_b, 0.2)
    want = loss_and_grads(nt_xent_reference, z_a.double(), z_b.double(), 0.2)
    for name, g, w in zip(("loss", "dz_a", "dz_b"), got, want, strict=True):
        assert_close(g, w, **FP32_GRAD, what=name)


def test_zero_rows_and_tiny_norms_match_reference():
    z_a, z_b = pair(6, 16, torch.float32)
    z_a[1] = 0.0
    z_b[3] *= 1e-13  # below eps: normalised as z / eps
    got = loss_and_grads(triton_ieee(), z_a, z_b, 0.5)
    want = loss_and_grads(nt_xent_reference, z_a.double(), z_b.double(), 0.5)
    assert_close(got[0], want[0], **FP32_LOSS, what="loss")
    assert_close(got[1], want[1], **FP32_GRAD, what="dz_a")
    assert_close(got[2] * 1e-13, want[2] * 1e-13, **FP32_GRAD, what="dz_b (scaled)")


def test_symmetric_in_views_and_invariant_to_scale():
    z_a, z_b = pair(33, 20, torch.float32)
    loss = K.nt_xent_triton(z_a, z_b, 0.1, precision="ieee")
    assert_close(K.nt_xent_triton(z_b, z_a, 0.1, precision="ieee"), loss, 1e-6, 1e-6, "swap")
    assert_close(
        K.nt_xent_triton(z_a * 300, z_b * 1e-3, 0.1, precision="ieee"), loss, 1e-6, 1e-5, "scale"
    )


@pytest.mark.parametrize("upstream", [2.0**14, 2.0**15, 65504.0])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gradscaler_upstream_gradient_stays_finite(impl, dtype, upstream):
    """An fp16 GradScaler's scale reaches the backward as the upstream gradient g (up to 2^15; 65504 is fp16's max).
    The gradient is g times the g = 1 gradient, and here that fits fp16 (|dz| <= 5.3e3 at g = 65504, the tiled path's
    fp32 math shows it), so every path must return it finite. The Triton backward once folded g into W (|W_pos| -> 2g)
    before rounding W to fp16: non-finite dz from g = 2^15 on, a skipped step each time the scaler grew back to 2^15."""
    gen = torch.Generator().manual_seed(0)
    # Unrelated views at tau = 0.05: the positives are far from confident, so |W_pos| is close to 2g.
    z_a = torch.randn(64, 16, generator=gen).to(dtype)
    z_b = torch.randn(64, 16, generator=gen).to(dtype)

    def grads(g):
        a, b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
        loss = fastclr.nt_xent(a, b, 0.05, impl=impl)
        return torch.autograd.grad(loss, [a, b], grad_outputs=torch.tensor(g, dtype=dtype))

    eps = torch.finfo(dtype).eps
    for name, unit, scaled in zip(("dz_a", "dz_b"), grads(1.0), grads(upstream), strict=True):
        bad = int((~torch.isfinite(scaled)).sum())
        assert bad == 0, f"{impl} {dtype} g={upstream:g}: {bad} non-finite entries in {name}"
        scale = unit.double().abs().max().item()
        assert_close(
            scaled.double() / upstream, unit, 2 * eps * scale, 2 * eps, f"{name} / g vs g = 1"
        )


def test_forward_state_is_linear_in_batch():
    z_a, z_b = pair(10, 12, torch.bfloat16)
    loss, state = K.nt_xent_forward(z_a, z_b, 0.5)
    assert loss.shape == () and loss.dtype == torch.bfloat16
    assert state.zhat.shape == (20, 12) and state.zhat.dtype == torch.bfloat16
    assert state.norm.shape == (20,) and state.stats.shape == (20, 2)
    assert state.cols is state.zhat and state.offset == 0
    z = torch.cat([z_a, z_b]).float()
    norms = torch.linalg.vector_norm(z, dim=1)
    assert_close(state.norm, norms, 1e-6, 1e-5, "norms")
    # z_hat is rounded to nearest even like a GPU's cvt.rn (the interpreter's own bf16 cast truncates).
    assert torch.equal(state.zhat, (z / state.norm[:, None]).to(torch.bfloat16))


def test_launch_counts_tolerate_reuse():
    # The forward's arrival counter is re-armed by its last program: running twice gives the same loss.
    z_a, z_b = pair(70, 16, torch.float32)
    first = K.nt_xent_triton(z_a, z_b, 0.3, config="BM64_BN32_W4_S2")
    second = K.nt_xent_triton(z_a, z_b, 0.3, config="BM64_BN32_W4_S2")
    assert first.item() == second.item()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(precision="fp16"), ValueError, "precision"),
        (dict(config="BM7"), ValueError, "unknown kernel config"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(dtype=torch.float64), TypeError, "fp32/bf16/fp16"),
        (dict(shape_b=(4, 7)), ValueError, "shape"),
    ],
)
def test_bad_input_raises(kwargs, exc, match):
    """Each bad input is refused where it is checked: the embeddings and the temperature at the public boundary
    (``fastclr.nt_xent``, which asks the kernel's ``check_supported`` about the dtype), the precision by
    ``check_supported``, the config by its lookup."""
    dtype = kwargs.pop("dtype", torch.float32)
    z_a = torch.randn(4, 8, dtype=dtype)
    z_b = torch.randn(*kwargs.pop("shape_b", (4, 8)), dtype=dtype)
    tau = kwargs.pop("temperature", 0.5)
    with pytest.raises(exc, match=match):
        if "precision" in kwargs:
            K.check_supported(z_a, **kwargs)
        elif "config" in kwargs:
            K.nt_xent_triton(z_a, z_b, tau, **kwargs)
        else:
            fastclr.nt_xent(z_a, z_b, tau, impl="triton")


# ---------------------------------------------------------------------------------------------------------------------
# Work: MACs executed, counted from grid x loop trips.


@pytest.mark.parametrize("two_n", [8192, 16384, 32768, 65536, 262144])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_macs_within_three_gemms_at_sizes_that_matter(two_n, d):
    for itemsize in (2, 4):
        for kernel in K.KERNELS:
            for cfg in K.candidate_configs(kernel, two_n, d, itemsize):
                macs = K.executed_macs(two_n, d, config=cfg.name)
                assert macs["ratio"] <= 3.0 * 1.03, (two_n, d, cfg.name, macs)
        default = K.executed_macs(two_n, d, itemsize=itemsize)
        assert default["ratio"] <= 3.0 * 1.03, default


def test_macs_count_padding_and_d_chunks():
    # The running-max path (shift=False) visits every block once. 2N = 514 pads to 576 rows (64-row blocks) and 544
    # columns (32-column blocks); D = 130 pads to one 256 block.
    macs = K.executed_macs(514, 130, config="BM64_BN32_W4_S2", shift=False)
    assert macs["fwd"] == 576 * 544 * 256
    assert macs["bwd"] == 2 * 576 * 544 * 256
    assert macs["ideal"] == 3 * 514 * 514 * 130
    # D = 2048: the forward loops over D; the wide backward computes S once (the weight pass) and multiplies W into the
    # columns with one GEMM over its one super-block of 4096 columns (bf16: 8 MiB of W): two GEMMs, not 16 + 1.
    wide = K.executed_macs(4096, 2048, config="BM64_BN64_W4_S3", shift=False)
    assert wide["fwd"] == 4096 * 4096 * 2048
    assert wide["bwd"] == 2 * 4096 * 4096 * 2048
    # 2N = 32768: eight super-blocks of 4096 columns (256 MiB of bf16 W each), the same two GEMMs less the weight
    # pass's diagonal squares (loaded from the upper-triangle forward); 2.5 GEMM-equivalents in all (the bound was 4).
    assert K.wide_columns(32768, 32768, 2) == 4096
    macs = K.executed_macs(32768, 2048)
    block_m = K.diagonal_square(32768, 2048, 2)
    assert macs["bwd"] == (2 * 32768 - block_m) * 32768 * 2048
    assert macs["total"] <= 2.5 * 32768 * 32768 * 2048


def test_macs_count_boundary_blocks_once():
    """The fixed-shift path (row blocks x column splits) runs each row block's boundary blocks with masks in a second
    loop, and its main loop skips them: every block once, a block where boundary runs overlap once per run. 2N = 256
    in 64 x 32 tiles: every row block has a diagonal run of 2 blocks and one run of positives of 2 (N = 128 is a
    multiple of the tiles, and nothing is ragged): 4 row blocks x 4 boundary visits, no overlap."""
    assert K.boundary_visits(256, 256, 64, 32) == 16
    assert K.boundary_overlaps(256, 256, 64, 32) == 0
    macs = K.executed_macs(256, 128, config="BM64_BN32_W4_S2", symmetric=False)
    assert macs["fwd"] == 256 * 256 * 128
    assert macs["bwd"] == 2 * macs["fwd"]
    # 2N = 200: runs of positives straddle blocks, and the ragged last block (192..200) is a boundary block of every
    # row block. Per row block: diagonal + positives (two runs) + last block; row block 1's positives and row block
    # 3's diagonal include the last block.
    per_row_block = [2 + 3 + 0 + 1, 2 + 2 + 1 + 1, 2 + 0 + 3 + 1, 1 + 0 + 2 + 1]
    assert K.boundary_visits(200, 200, 64, 32) == sum(per_row_block)
    assert K.boundary_overlaps(200, 200, 64, 32) == 2
    # Gathered columns: rank 1 of 2 (offset A) has its diagonal and positives among the columns A.. 2A.
    assert K.boundary_visits(256, 512, 64, 32, offset=256) == 16


def test_fixed_shift_kernels_visit_each_block_once(monkeypatch):
    """Counted under the interpreter (2N = 200, 64 x 32 tiles, 3 splits): the row blocks x column splits forward and
    the backward compute every (row block, column block) tile once, and the two where boundary runs overlap twice."""
    tiles = {"fwd": [], "bwd": []}
    logits_tile, bwd_tile = K._logits_tile, K._bwd_tile

    def fwd_counting(*args):
        tiles["fwd"].append((args[3].handle.data.item(), args[5].handle.data.item()))
        return logits_tile(*args)

    def bwd_counting(*args):
        tiles["bwd"].append((args[3].handle.data.item(), args[5].handle.data.item()))
        return bwd_tile(*args)

    monkeypatch.setattr(K, "_logits_tile", fwd_counting)
    monkeypatch.setattr(K, "_bwd_tile", bwd_counting)
    z_a, z_b = pair(100, 24, torch.float32)
    opts = dict(precision="ieee", config="BM64_BN32_W4_S2", splits=3)
    loss, state = K.nt_xent_forward(z_a, z_b, 0.5, symmetric=False, **opts)
    K.nt_xent_backward(torch.ones(()), z_a, z_b, state, 0.5, **opts)
    every = {(r0, c0) for r0 in range(0, 200, 64) for c0 in range(0, 200, 32)}
    for kernel, got in tiles.items():
        assert set(got) == every, kernel
        assert len(got) == len(every) + K.boundary_overlaps(200, 200, 64, 32), kernel


def test_macs_symmetric_forward_halves_the_forward():
    """One process with the fixed shift: the upper-triangle forward visits each row block's diagonal square and the
    blocks right of it once. 2N = 256 in 64 x 32 tiles: 8 + 6 + 4 + 2 blocks; 2N = 200: 7 + 5 + 3 + 1 (the last row
    block's square is one ragged block). The backward loads the squares' S instead of computing it: 2 of its 8 blocks
    per row block at 2N = 256. At 2N = 32768, D = 128 (bf16 default tiles) the forward is half a GEMM plus half the
    diagonal squares (2N x BLOCK_M / 2), the backward two GEMMs less the squares (2N x BLOCK_M): 2.5 - 0.2% in all."""
    assert K.symmetric_visits(256, 64, 32) == 20
    assert K.symmetric_visits(200, 64, 32) == 16
    macs = K.executed_macs(256, 128, config="BM64_BN32_W4_S2")
    assert macs["fwd"] == 20 * 64 * 32 * 128
    general = K.executed_macs(256, 128, config="BM64_BN32_W4_S2", symmetric=False)["bwd"]
    assert K.square_visits(256, 64, 32, 64) == 4 * 2
    assert macs["bwd"] == general - 4 * 2 * 64 * 32 * 128
    a, d = 32768, 128
    macs = K.executed_macs(a, d)
    block_m = K.resolve_config("sym_fwd", a, d, None).block_m
    assert K.diagonal_square(a, d, 2) == block_m
    assert macs["fwd"] == (a * a + a * block_m) // 2 * d
    assert macs["bwd"] == (2 * a * a - a * block_m) * d
    assert macs["total"] == (5 * a * a - a * block_m) // 2 * d <= 2.5 * a * a * d, macs
    # Every dtype and precision whose backward takes the fixed-shift form stays within 2.5 GEMM-equivalents.
    for itemsize, precision in ((2, "tf32"), (4, "tf32"), (4, "ieee")):
        for two_n, width in ((8192, 128), (32768, 128), (4096, 64), (8192, 2048)):
            ratio = K.executed_macs(two_n, width, itemsize=itemsize, precision=precision)["total"]
            assert ratio <= 2.5 * two_n * two_n * width, (itemsize, precision, two_n, width)
    # Gathered columns and the running max keep the full forward.
    assert K.executed_macs(a, d, m=2 * a, offset=a)["fwd"] >= 2 * a * a * d
    assert K.executed_macs(a, d, shift=False)["fwd"] == a * a * d


def test_candidates_cover_every_d_and_small_batches():
    for d in (1, 16, 100, 128, 129, 256, 257, 2048):
        for kernel in K.KERNELS:
            for a in (2, 64, 200, 1 << 20):
                for itemsize in (2, 4):
                    cands = K.candidate_configs(kernel, a, d, itemsize)
                    # the wide backward's GEMM runs only where the backward is wide
                    assert bool(cands) == (kernel != "bwd_gemm" or K.wide_backward(d)), (
                        kernel,
                        a,
                        d,
                    )
                    assert all(c.name in K.CONFIGS for c in cands)
    with pytest.raises(ValueError, match="itemsize"):
        K.candidate_configs("fwd", 64, 128, itemsize=8)
    # Tiny batches get the smallest listed tiles, large ones the first (preferred) entry.
    assert K.candidate_configs("fwd", 2, 128)[0].block_m == 64
    assert K.candidate_configs("fwd", 1 << 20, 128)[0].name == "BM128_BN128_W8_S2"


@pytest.fixture
def allow_tf32():
    """PyTorch's switch for TF32 matmuls turned on for one test, then restored."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision = before


def _loss_and_grads(fn, z_a, z_b):
    z_a, z_b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    loss = fn(z_a, z_b)
    loss.backward()
    return loss.detach(), z_a.grad, z_b.grad


@pytest.mark.parametrize("module", [False, True], ids=["nt_xent", "NTXentLoss"])
def test_fp32_precision_follows_torch_tf32_switch(module, request):
    """fp32 inputs: exact (ieee) dots under PyTorch's default, tf32 once torch.backends.cuda.matmul allows TF32."""
    z_a, z_b = torch.randn(24, 40, generator=torch.Generator().manual_seed(3)).chunk(2)
    public = fastclr.NTXentLoss(0.1, impl="triton") if module else None

    def call(a, b):
        return public(a, b) if module else fastclr.nt_xent(a, b, 0.1, impl="triton")

    def kernel(precision):
        return _loss_and_grads(
            lambda a, b: K.nt_xent_triton(a, b, 0.1, precision=precision), z_a, z_b
        )

    ieee, tf32 = kernel("ieee"), kernel("tf32")
    assert not torch.equal(ieee[1], tf32[1]), (
        "the two precisions must differ for this test to mean anything"
    )
    for got, want in zip(_loss_and_grads(call, z_a, z_b), ieee, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    request.getfixturevalue("allow_tf32")
    for got, want in zip(_loss_and_grads(call, z_a, z_b), tf32, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

"""The fused memory-bank logsumexp kernel (kernels/memory_bank.py): under TRITON_INTERPRET=1 on CPU tensors against a
float64 oracle, and compiled ahead of time for sm_80 / sm_90 through ``fastclr.kernels.stub_driver``.

Oracle: torch.logsumexp over the materialised (A, K) logits in float64, on the inputs rounded to the tested dtype, and
autograd for the gradient of sum_i r_i lse_i with random r. fp32 runs with precision="ieee" (the interpreter's fp32 dot
is exact); tf32 against the oracle on operands rounded to tf32 as the kernel rounds them. For bf16/fp16 the kernel's
error must be at most twice that of the oracle evaluated in the same dtype (plus the rounding of the exact answer to
the dtype and a tiny floor), as tests/test_nt_xent_triton.py states it.

Compile checks run in a child process without the interpreter (this file as a script: ``python
tests/test_memory_bank_triton.py 90 CASE...`` prints one JSON record per launch): the host function launched on CPU
tensors under the stub driver, so the kernel is specialised on the real arguments and compiled as a launch would be;
registers and spills from ``cuobjdump -res-usage``. ``-m slow`` compiles every candidate config at D = 100, 128, 256,
300 and 2048 for every dtype, with and without the gradient, and runs a larger interpreted shape.
"""

from __future__ import annotations

import json
import os
import sys

# Before triton is imported: run the kernels on CPU tensors (the compile child sets TRITON_INTERPRET=0).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F
from compile_child import json_records, param
from test_nt_xent_triton import assert_close

from fastclr.kernels import memory_bank as MB

# (A, K, D): single rows and columns, ragged blocks, D = 1 (every cosine is +-1: ties), D > MAX_BLOCK_D (the D loop and
# output chunks of U).
SHAPES = [(1, 1, 1), (3, 5, 3), (1, 300, 130), (257, 5, 1), (3, 300, 300)]
BIG_SHAPE = (257, 300, 130)  # several row and column blocks, ragged in A, K and D
TAUS = [1e-3, 0.07, 0.5, 2.0]
HALF_DTYPES = [torch.bfloat16, torch.float16]
HALF_SHAPES = [(3, 5, 3), (1, 300, 130), (257, 5, 300)]
HALF_TAUS = [1e-3, 0.07, 2.0]
FP32 = dict(atol=1e-6, rtol=1e-5)
HALF_FLOOR = 1e-6


def bank(a, k, d, dtype, seed=0):
    """Unit anchors x (A, D), unit bank rows q (K, D), and upstream gradients r (A,) in float64."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(a, d, generator=gen, dtype=torch.float64), dim=1)
    q = F.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1)
    r = torch.randn(a, generator=gen, dtype=torch.float64)
    return x.to(dtype), q.to(dtype), r


def oracle(x, q, tau, r):
    """lse_i = logsumexp_k <x_i, q_k>/tau in x's dtype, and the gradient of sum_i r_i lse_i."""
    x = x.detach().clone().requires_grad_()
    lse = torch.logsumexp(x @ q.T / tau, dim=1)
    (lse * r.to(lse.dtype)).sum().backward()
    return lse.detach(), x.grad


def kernel(x, q, tau, r, **options):
    """The kernel's lse = shift + log_sum (float64 sum of the fp32 pair) and gradient of sum_i r_i lse_i."""
    x = x.detach().clone().requires_grad_()
    shift, log_sum = MB.bank_lse_triton(x, q, tau, **options)
    assert shift.dtype == log_sum.dtype == torch.float32
    assert not shift.requires_grad and log_sum.requires_grad
    # The caller's order: shift is a constant for autograd, the gradient flows through log_sum.
    ((shift.detach() + log_sum) * r.float()).sum().backward()
    return shift.double() + log_sum.detach().double(), x.grad


def round_tf32(t):
    """fp32 -> the nearest tf32 value, ties away from zero (cvt.rna; the kernel's rounding of tf32 dot operands)."""
    bits = t.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def check_fp32(a, k, d, tau, **options):
    x, q, r = bank(a, k, d, torch.float32, seed=a + k + d)
    lse, grad = kernel(x, q, tau, r, precision="ieee", **options)
    want_lse, want_grad = oracle(x.double(), q.double(), tau, r)
    assert grad.dtype == torch.float32
    assert_close(lse, want_lse, **FP32, what=f"lse a={a} k={k} d={d} tau={tau}")
    # The gradient c V / tau is of size 1/tau: the absolute floor scales with it. And fp32 resolves a logit s/tau only
    # to ~eps |s| / tau, which P = exp(t - lse) turns into a relative error (2.5e-5 at tau = 1e-3): no fp32 computation
    # does better, so the bound also admits twice the error of the oracle evaluated in fp32.
    _, fp32_grad = oracle(x, q, tau, r)
    fp32_err = (fp32_grad.double() - want_grad).abs().max().item()
    scale = want_grad.abs().max().item()
    atol = FP32["atol"] * scale + 2 * fp32_err
    assert_close(grad, want_grad, atol, FP32["rtol"], f"dx a={a} k={k} d={d} tau={tau}")


def check_half(a, k, d, tau, dtype):
    x, q, r = bank(a, k, d, dtype, seed=a + k + d)
    got = kernel(x, q, tau, r)
    ref = oracle(x, q, tau, r)
    truth = oracle(x.double(), q.double(), tau, r)
    assert got[1].dtype == dtype
    for name, g, rf, t in zip(("lse", "dx"), got, ref, truth, strict=True):
        assert bool(torch.isfinite(g).all()), f"{name}: NaN/Inf in the kernel's output"
        err = (g.double() - t).abs().max().item()
        ref_err = (rf.double() - t).abs().max().item()
        # No implementation returning `dtype` can beat rounding the exact answer to it (lse comes back in fp32).
        rounding = 0.0 if name == "lse" else (t.to(dtype).double() - t).abs().max().item()
        assert err <= 2 * ref_err + rounding + HALF_FLOOR, (
            f"{name} a={a} k={k} d={d} tau={tau} {dtype}: kernel error {err:.3e} > 2 x reference error "
            f"{ref_err:.3e} + rounding {rounding:.3e}"
        )


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("a,k,d", SHAPES)
def test_fp32_matches_oracle(a, k, d, tau):
    check_fp32(a, k, d, tau)


@pytest.mark.parametrize("tau", [1e-3, 0.5])
def test_big_shape_fp32(tau):
    check_fp32(*BIG_SHAPE, tau)


@pytest.mark.parametrize("tau", HALF_TAUS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("a,k,d", HALF_SHAPES)
def test_half_no_worse_than_oracle_in_same_dtype(a, k, d, dtype, tau):
    check_half(a, k, d, tau, dtype)


@pytest.mark.parametrize("a,k,d", [(20, 70, 40), (5, 40, 130), (3, 300, 300)])
def test_tf32_rounds_operands_to_nearest(a, k, d):
    """tf32 dots on x and q rounded to nearest (the tensor cores alone would truncate, a bias of ~2^-12 relative on
    every product: 1e-3 on lse at these sizes). lse is tight against the oracle on rounded operands; the gradient also
    carries P rounded to tf32 (2^-11 relative)."""
    tau = 0.07
    x, q, r = bank(a, k, d, torch.float32, seed=1)
    lse, grad = kernel(x, q, tau, r, precision="tf32")
    want_lse, want_grad = oracle(round_tf32(x).double(), round_tf32(q).double(), tau, r)
    assert_close(lse, want_lse, **FP32, what=f"tf32 lse a={a} k={k} d={d}")
    scale = want_grad.abs().max().item()
    assert_close(grad, want_grad, 2e-3 * scale, 2e-3, f"tf32 dx a={a} k={k} d={d}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [40, 300])
def test_no_grad_forward_gives_the_same_stats_bitwise(d, dtype):
    """Without the gradient the kernel drops U and its GEMM (and at D = 300 the output chunks: grid (rows, 1, splits)
    against (rows, 3, splits)); the stats are the same bits."""
    x, q, _ = bank(70, 200, d, dtype)
    with_grad, v = MB.bank_forward(x, q, 0.07, with_grad=True, precision="ieee")
    without, none = MB.bank_forward(x, q, 0.07, with_grad=False, precision="ieee")
    assert v is not None and v.shape == (70, d) and v.dtype == torch.float32 and none is None
    assert with_grad.shape == (70, 2) and with_grad.dtype == torch.float32
    assert torch.equal(with_grad, without)
    # Without a gradient to compute, the autograd entry point takes the no-gradient forward.
    shift, log_sum = MB.bank_lse_triton(x, q, 0.07, precision="ieee")
    assert torch.equal(torch.stack((shift, log_sum), 1), without) and not log_sum.requires_grad


def test_results_are_deterministic_and_splits_only_regroup():
    """Partials are combined in split order: bitwise the same on every run; other split counts agree to fp32 rounding
    (7 splits of 10 column blocks deal them in runs of 2, leaving two splits empty)."""
    x, q, r = bank(40, 300, 24, torch.float32)
    options = dict(precision="ieee", config="BM32_BN32_W8_S2")
    runs = [kernel(x, q, 0.05, r, splits=3, **options) for _ in range(2)]
    for u, v in zip(*runs, strict=True):
        assert torch.equal(u, v)
    for splits in (1, 7, 10):
        other = kernel(x, q, 0.05, r, splits=splits, **options)
        for u, v, what in zip(runs[0], other, ("lse", "dx"), strict=True):
            assert_close(u, v, 1e-6 * v.abs().max().item(), 1e-5, f"{what}: 3 splits vs {splits}")


def test_non_contiguous_inputs():
    """Strided rows (a slice of a wider buffer, every other row), a column-strided view and a transposed bank give the
    contiguous inputs' results bit for bit."""
    x, q, r = bank(30, 90, 40, torch.float32)
    want = kernel(x, q, 0.1, r, precision="ieee")
    wide = torch.zeros(60, 56)
    wide[::2, :40] = x
    rows_strided = wide[::2, :40]  # row stride 112
    cols_strided = torch.zeros(30, 80)
    cols_strided[:, ::2] = x
    q_t = q.T.contiguous().T  # column-major
    assert not rows_strided.is_contiguous() and not q_t.is_contiguous()
    for xs, qs in ((rows_strided, q), (cols_strided[:, ::2], q_t)):
        got = kernel(xs, qs, 0.1, r, precision="ieee")
        for u, v in zip(got, want, strict=True):
            assert torch.equal(u, v)


def test_log_sum_carries_the_gradient_shift_does_not():
    """d lse/dx flows through log_sum alone; an upstream gradient on log_sum c gives dx = c V / tau."""
    x, q, _ = bank(5, 7, 16, torch.float32)
    xg = x.clone().requires_grad_()
    shift, log_sum = MB.bank_lse_triton(xg, q, 0.2, precision="ieee")
    (log_sum * 3.0).sum().backward()
    stats, v = MB.bank_forward(x, q, 0.2, with_grad=True, precision="ieee")
    assert torch.equal(xg.grad, 3.0 / 0.2 * v)
    assert torch.equal(shift, stats[:, 0]) and torch.equal(log_sum.detach(), stats[:, 1])


def test_executed_macs():
    """Two GEMMs with the gradient at D <= MAX_BLOCK_D (one without); above, each output chunk of 128 recomputes S."""
    work = MB.executed_macs(4096, 65536, 128)
    assert (work["logits"], work["pv"], work["ratio"]) == (4096 * 65536 * 128,) * 2 + (1.0,)
    assert MB.executed_macs(4096, 65536, 128, with_grad=False)["ratio"] == 1.0
    wide = MB.executed_macs(4096, 65536, 2048)
    assert wide["logits"] == 16 * 4096 * 65536 * 2048 and wide["pv"] == 4096 * 65536 * 2048
    assert wide["ratio"] == 8.5
    # Padding: 3 rows in a 64-row block (bf16, D = 3 in a block of 16).
    assert MB.executed_macs(3, 5, 3)["total"] == 2 * 64 * 64 * 16


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_big_wide_shape(dtype):
    if dtype == torch.float32:
        check_fp32(257, 300, 300, 0.07)
    else:
        check_half(257, 300, 300, 0.07, dtype)


# --------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (child process, stub driver)
# --------------------------------------------------------------------------------------------------------------------

# dtype, precision, A, K, D, with_grad, config (None: the autotuner's pick). A DDP rank's 2N = 512 anchors against
# MoCo's K = 65536 bank: few row blocks, many column splits.
CASES = {
    "bf16-D128-grad": ("bfloat16", "tf32", 512, 65536, 128, True, None),
    "bf16-D128-nograd": ("bfloat16", "tf32", 512, 65536, 128, False, None),
    "fp32-tf32-D128-grad": ("float32", "tf32", 512, 16384, 128, True, None),
    "fp16-D300-grad": ("float16", "tf32", 256, 4096, 300, True, None),
}
SM80_CASES = ("bf16-D128-grad", "fp32-tf32-D128-grad")
CI_CASES = {90: tuple(CASES), 80: SM80_CASES}  # what CI compiles per architecture
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def sweep_cases() -> dict:
    """Every candidate config, D in (100, 128, 256, 300, 2048), every dtype and precision, with and without the
    gradient."""
    out = {}
    for dtype, precision in (
        ("bfloat16", "tf32"),
        ("float16", "tf32"),
        ("float32", "tf32"),
        ("float32", "ieee"),
    ):
        for d in (100, 128, 256, 300, 2048):
            itemsize = 4 if dtype == "float32" else 2
            for cfg in MB.candidate_configs(4096, d, itemsize, precision):
                for grad in (True, False):
                    name = f"{DTYPE_NAMES[dtype]}-{precision}-D{d}-{cfg.name}-{'grad' if grad else 'nograd'}"
                    out[name] = (dtype, precision, 4096, 8192, d, grad, cfg.name)
    return out


def child(arch: int, cases: dict) -> list[dict]:
    """Launch each case under the stub driver for sm_{arch}; one record per launch, with the compiled resources."""
    from fastclr.kernels import report as R
    from fastclr.kernels.stub_driver import stub_driver

    records = []
    for name, (dtype, precision, a, k, d, grad, config) in cases.items():
        dt = getattr(torch, dtype)
        x, q = torch.randn(a, d).to(dt), torch.randn(k, d).to(dt)
        with stub_driver(arch) as drv:
            MB.bank_forward(x, q, 0.07, with_grad=grad, precision=precision, config=config)
        for launch in drv.launches:
            compiled = launch.compiled()
            res = R.resource_usage(compiled.asm["cubin"])
            records.append(
                dict(
                    case=name, kernel=launch.name, arch=compiled.metadata.target.arch, grid=launch.grid,
                    config=R.config_name(launch), constexprs={k: str(v) for k, v in launch.constexprs.items()},
                    attrs=sorted(launch.attrs), scalars=launch.scalars,
                    shared=compiled.metadata.shared + res["static_shared_bytes"],
                    dots=R.dot_layouts(compiled.asm["ttgir"]),
                    tf32_roundings=compiled.asm["ptx"].count(R.TF32_ROUNDING), **res,
                )
            )  # fmt: skip
    return records


def child_args(arch: int, names, sweep: bool = False) -> list[str]:
    return [__file__, str(arch), *(["--sweep"] if sweep else []), *names]


def launches(arch: int, cache: str, names, sweep: bool = False) -> list[dict]:
    return json_records(child_args(arch, names, sweep), cache, 3000)


def compile_children(item) -> list[list[str]]:
    """The child an item runs (conftest starts it early)."""
    arch = param(item, "arch_launches")
    return [] if arch is None else [child_args(arch, CI_CASES[arch])]


def assert_clean(r: dict) -> None:
    """Spill-free, within the register file and shared memory, every dot on the tensor cores unless exact fp32."""
    from fastclr.kernels.stub_driver import MAX_SHARED_PER_BLOCK

    where = f"sm_{r['arch']} {r['case']} {r['config']}"
    assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, (where, r)
    assert r["registers"] <= 255 and r["shared"] <= MAX_SHARED_PER_BLOCK[r["arch"]], (where, r)
    exact = r["constexprs"]["INPUT_PRECISION"] == "ieee" and "fp32" in r["case"]
    want_dots = 2 if r["constexprs"]["WITH_GRAD"] == "True" else 1
    assert len(r["dots"]) == want_dots, (where, r["dots"])
    assert exact or all(layout.startswith("mma") for layout in r["dots"]), (where, r["dots"])
    if r["constexprs"]["INPUT_PRECISION"] == "tf32":
        assert r["tf32_roundings"] > 0, (where, "tf32 operands truncated")


@pytest.fixture(scope="session", params=[90, 80], ids=["sm90", "sm80"])
def arch_launches(request, triton_cache):
    arch = request.param
    names = CI_CASES[arch]
    return arch, launches(arch, triton_cache, names)


def test_kernel_compiles_spill_free_with_the_launch_specialisation(arch_launches):
    from fastclr.kernels import nt_xent as NT
    from fastclr.kernels.stub_driver import SM_COUNT

    arch, records = arch_launches
    assert [r["case"] for r in records] == list(CI_CASES[arch])
    for r in records:
        dtype, precision, a, k, d, grad, _ = CASES[r["case"]]
        itemsize = 4 if dtype == "float32" else 2
        assert r["kernel"] == "_bank_fwd_kernel" and r["arch"] == arch, r["case"]
        assert_clean(r)
        # The autotuner pruned to the candidates and kept the best guess (the stub's timings are all equal).
        assert r["config"] == MB.candidate_configs(a, d, itemsize, precision)[0].name, r["case"]
        grid = MB.launch_grid(
            a, k, d, with_grad=grad, itemsize=itemsize, precision=precision, sms=SM_COUNT[arch]
        )
        assert tuple(r["grid"]) == grid, (r["case"], r["grid"], grid)
        tiling = NT.d_tiling(d)
        got = tuple(int(r["constexprs"][c]) for c in ("BLOCK_D", "D_BLOCKS", "BLOCK_DO"))
        assert got == tiling and r["constexprs"]["WITH_GRAD"] == str(grad), r["case"]
        # 16-byte-aligned pointers, and row strides divisible by 16 where D is: vector loads and cp.async.
        aligned = {"x_ptr", "q_ptr"} | ({"stride_x", "stride_q", "D"} if d % 16 == 0 else set())
        assert aligned <= set(r["attrs"]) and ("D" in r["attrs"]) == (d % 16 == 0), (
            r["case"],
            r["attrs"],
        )
        assert (r["scalars"]["A"], r["scalars"]["K"], r["scalars"]["D"]) == (a, k, d), r["case"]
    assert any(
        r["grid"][2] > 1 for r in records
    )  # 512 anchors against 65536 bank rows: column splits


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("arch", [90, 80])
def test_every_candidate_compiles_spill_free(arch, triton_cache):
    records = launches(arch, triton_cache, [], sweep=True)
    assert {r["case"] for r in records} == set(sweep_cases())
    for r in records:
        assert_clean(r)


if __name__ == "__main__":
    arch, args = int(sys.argv[1]), sys.argv[2:]
    cases = sweep_cases() if args[:1] == ["--sweep"] else {name: CASES[name] for name in args}
    print(json.dumps(child(arch, cases)))

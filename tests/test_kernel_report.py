"""Static properties of the compiled NT-Xent kernels, checked without a GPU by ahead-of-time compilation for sm_80 and
sm_90 of exactly what a launch compiles (the report launches the host functions through ``fastclr.kernels.stub_driver``):
no register spills (LOCAL 0 and no spill stack in cuobjdump -res-usage), <= 255 registers, shared memory within the
per-block limit, every tl.dot on the tensor cores (mma.sync on sm_80, wgmma on sm_90; exact fp32 runs on FMA by design).

The report runs as its own process (``python -m fastclr.kernels.report``): the test session interprets the kernels
(TRITON_INTERPRET=1), and interpreted kernels cannot be compiled. CI compiles the ``--quick`` set for both
architectures; ``-m slow`` compiles every shipped variant. The parity test runs this file as a script in a child
process: ``python tests/test_kernel_report.py 90`` prints the compile keys of the report's builds and of the public
entry point's launches for the same arguments.
"""

from __future__ import annotations

import json
import sys

import pytest
from compile_child import failure, json_records, param, run_compiling

from fastclr.kernels import nt_xent as K
from fastclr.kernels import report as R

TC_OPS = {80: "mma.sync", 90: "wgmma.mma_async"}


def report_args(*args: str) -> list[str]:
    return ["-m", "fastclr.kernels.report", "--json", *args]


def run_report(cache: str, *args: str) -> tuple[int, dict]:
    proc = run_compiling(report_args(*args), cache, timeout=3600)
    assert proc.stdout, failure(proc)
    return proc.returncode, json.loads(proc.stdout)


def compile_children(item) -> list[list[str]]:
    """The child an item runs (conftest starts it early)."""
    arch = param(item, "arch")
    if arch is None:
        return []
    arch, name = str(arch), item.originalname
    return {
        "test_quick_report_compiles_cleanly": [report_args("--arch", arch, "--quick")],
        "test_report_compiles_what_the_launch_compiles": [[__file__, arch]],
        "test_every_shipped_variant_compiles_cleanly": [report_args("--arch", arch)],
    }.get(name, [])


def assert_clean(report: dict) -> None:
    fields = ("kernel", "loss", "config", "d", "dtype", "path")
    bad = {
        " ".join(str(r[k]) for k in fields): r["problems"]
        for r in report["variants"]
        if r["problems"]
    }
    assert not bad, f"sm_{report['arch']}: {bad}"


@pytest.mark.parametrize("arch", [80, 90])
def test_quick_report_compiles_cleanly(arch, triton_cache):
    code, report = run_report(triton_cache, "--arch", str(arch), "--quick")
    assert report["arch"] == arch
    assert_clean(report)
    assert code == 0
    rows = report["variants"]
    assert {r["kernel"] for r in rows} == {
        "fwd", "sym_fwd", "bwd", "norm_fwd", "sym_combine", "col_terms", "norm_bwd",
    }  # fmt: skip
    assert {r["dtype"] for r in rows} == {
        "bf16",
        "fp32",
    }  # fp32 goes through tf32 tensor cores by default
    assert {r["d"] for r in rows} == {100, 128}  # unaligned and aligned D
    for r in rows:
        assert r["arch"] == arch and r["local_bytes"] == 0 and r["stack_bytes"] == 0
        assert 0 < r["occupancy"] <= 1 and r["blocks_per_sm"] >= 1
        if r["kernel"] in R.ELEMENTWISE:
            assert r["num_stages"] == 3  # what a launch without num_stages compiles with
        if r["kernel"] in K.KERNELS:
            itemsize = R.ITEMSIZE[r["dtype"]]
            # Each kernel's first candidate, and the configs the grid table's shapes launch.
            first = K.candidate_configs(r["kernel"], 1 << 20, r["d"], itemsize)[0].name
            grid_configs = {v.config for v in R.grid_variants(arch) if v.kernel == r["kernel"]}
            assert r["config"] == first or r["config"] in grid_configs, r
            assert r["tensor_core_op"] == TC_OPS[arch] and r["tensor_core_instructions"] > 0, r
            assert r["dots"] == r["mma_dots"] >= 1, r
            # Launch-time specialisation: aligned pointers, and the width of z_hat's zero-padded rows (a multiple of 16
            # at any D, K.padded_width), so the tiles load through cp.async also at an unaligned D.
            pointers = {"zhat_ptr"} if r["kernel"] == "sym_fwd" else {"zhat_ptr", "cols_ptr"}
            assert pointers | {"A", "M", "D"} <= set(r["specialised"]), r
            assert r["cp_async"], r
        if r["kernel"] == "norm_fwd":
            assert "stride_zhat" in r["specialised"], r
        if r["dtype"] == "fp32" and r["kernel"] in ("norm_fwd", "bwd"):
            assert r["tf32_roundings"] > 0, (
                r
            )  # cvt.rna.tf32.f32: tf32 dot operands rounded to nearest
    assert (32768, 128) in {(line["two_n"], line["d"]) for line in report["roofline"]}
    # What the GEMM kernels' main loops issue besides the MMAs, per S element.
    for r in rows:
        if r["kernel"] in K.KERNELS:
            assert r["loop_instructions"] > 0 and r["mma_per_element"] > 0, r
            assert 0 < r["non_mma_per_element"] < 100, r
    # The named DDP shapes fill the GPU: >= 2 programs per SM in both GEMM kernels; one process (rows = columns) takes
    # the upper-triangle forward.
    grids = report["grids"]
    assert {(g["rows"], g["cols"]) for g in grids} == set(R.GRID_SHAPES)
    for g in grids:
        assert g["ok"] and g["programs"] >= K.PROGRAMS_PER_SM * R.SM_COUNT[arch], g
        assert g["blocks_per_sm"] >= 1 and g["waves"] > 0, g
        if g["kernel"] != "bwd":
            assert (g["kernel"] == "sym_fwd") == (g["rows"] == g["cols"]), g
    if arch == 90:
        assert all(line["issue_ms"] > 0 for line in report["roofline"] if line["d"] == R.GRID_D)
    # Executed work in GEMM-equivalents: half a forward, two backward GEMMs, also at D = 2048 (the wide backward;
    # the issue's bound there is 4), under 2.5 by half the diagonal squares (the forward computes them whole, the
    # backward loads their S).
    for w in report["work"]:
        assert 2.5 - 128 / (2 * w["two_n"]) - 1e-9 <= w["total"] <= 2.5, w


# (D, dtype, precision, tau): aligned and unaligned D, both paths, tf32 and a half dtype.
PARITY_CASES = [(128, "bf16", "tf32", 0.5), (100, "fp32", "tf32", 0.5), (100, "fp16", "tf32", 0.01)]


def parity_records(arch: int) -> list[dict]:
    """Child process: for each parity case, the compile key of every kernel the public entry point launched (default
    config, so through the autotuner) and of the report's build of the same variant."""
    import torch

    import fastclr
    from fastclr.kernels.stub_driver import stub_driver

    out = []
    for d, dtype, precision, tau in PARITY_CASES:
        n = R.REPORT_ROWS // 2
        gen = torch.Generator().manual_seed(1)
        z_a = torch.randn(n, d, generator=gen).to(R.TORCH_DTYPES[dtype]).requires_grad_()
        z_b = torch.randn(n, d, generator=gen).to(R.TORCH_DTYPES[dtype]).requires_grad_()
        # fastclr.nt_xent takes fp32's precision from PyTorch's switch (fastclr.nt_xent_spec.fp32_dot_precision).
        torch.backends.cuda.matmul.fp32_precision = precision
        with stub_driver(arch) as drv:
            fastclr.nt_xent(z_a, z_b, tau, impl="triton").backward()
        shift = tau >= K.SHIFT_MIN_TEMPERATURE
        for launch in drv.launches:
            kernel = {v: k for k, v in R.KERNEL_NAMES.items()}[launch.name]
            config = R.config_name(launch) if kernel in K.KERNELS else "elementwise"
            variant = R.Variant(kernel, config, d, dtype, shift, precision)
            report = R.launch_variants([variant], arch)[variant]
            out.append(
                {
                    "variant": variant.label,
                    **{side: key_of(x) for side, x in (("launch", launch), ("report", report))},
                }
            )
    return out


def key_of(launch) -> dict:
    """What Triton's compile cache keys on: signature, constexprs, specialisation attrs, options, and the hash."""
    return dict(
        signature=dict(launch.src.signature),
        constexprs={k: repr(v) for k, v in launch.constexprs.items()},
        attrs={k: repr(v) for k, v in launch.attrs.items()},
        options=launch.options(),
        hash=launch.metadata.hash,
    )


@pytest.mark.parametrize("arch", [90, pytest.param(80, marks=pytest.mark.slow)])
def test_report_compiles_what_the_launch_compiles(arch, triton_cache):
    records = json_records([__file__, str(arch)], triton_cache, timeout=1200)
    # Six launches on the upper-triangle path (one process, tau >= 0.025), five on the running max.
    assert len(records) == sum(
        6 if tau >= K.SHIFT_MIN_TEMPERATURE else 5 for *_, tau in PARITY_CASES
    )
    for r in records:
        for part in ("signature", "constexprs", "attrs", "options", "hash"):
            assert r["report"][part] == r["launch"][part], (
                r["variant"],
                part,
                r["report"][part],
                r["launch"][part],
            )


def test_report_refuses_interpreted_kernels():
    if not K.INTERPRET:
        pytest.skip(
            "this process compiles kernels for real; the refusal only applies under TRITON_INTERPRET=1"
        )
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        R.compile_variant(R.Variant("fwd", "BM64_BN64_W4_S3", 128), 90)


def test_check_row_flags_each_broken_promise():
    good = dict(
        kernel="bwd", arch=90, local_bytes=0, stack_bytes=0, registers=255, shared_bytes=1024,
        tensor_core_op="wgmma.mma_async", tensor_core_instructions=4, dots=2, mma_dots=2, exact_fp32=False,
    )  # fmt: skip
    assert R.check_row(good) == []
    assert "spills" in R.check_row({**good, "stack_bytes": 8})[0]
    assert "spills" in R.check_row({**good, "local_bytes": 8})[0]
    assert "registers" in R.check_row({**good, "registers": 256})[0]
    assert "shared" in R.check_row({**good, "shared_bytes": 228 * 1024})[0]
    assert "wgmma" in R.check_row({**good, "tensor_core_instructions": 0})[-1]
    # One of two dots on FMA is caught although the PTX still has wgmma instructions.
    assert R.check_row({**good, "mma_dots": 1}) == ["1 of 2 dots off the tensor cores"]
    # fp32 tf32 operands must be rounded to nearest where the kernels write them.
    tf32 = dict(good, dtype="fp32", precision="tf32", tf32_roundings=0)
    assert "tf32 operands truncated" in R.check_row(tf32)[0]
    assert R.check_row({**tf32, "tf32_roundings": 16}) == []
    assert R.check_row({**tf32, "kernel": "norm_bwd", "exact_fp32": False}) == []
    # Exact fp32 multiplies on the FMA units by design.
    assert (
        R.check_row({**good, "mma_dots": 0, "tensor_core_instructions": 0, "exact_fp32": True})
        == []
    )


def test_dot_layouts_read_every_dot_of_the_ttgir():
    ttgir = """
    %s_92 = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32} : !ttg.memdesc<64x128xbf16> -> tensor<64x32xf32, #mma>
    %s_93 = tt.dot %t, %u, %cst : tensor<64x128xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> -> tensor<64x32xf32, #blocked>
    %s_94 = tt.dot %t, %u, %cst : tensor<64x128xf32, #ttg.dot_op<{opIdx = 0, parent = #mma}>> -> tensor<64x32xf32, #mma1>
    """
    assert R.dot_layouts(ttgir) == ["mma", "blocked", "mma1"]


def test_occupancy_follows_the_tightest_limit():
    # 255 registers x 32 threads round up to 8192 per warp: 2 blocks of 4 warps fill the 64 K registers.
    assert R.occupancy(90, 255, 128, 34 * 1024)["blocks_per_sm"] == 2
    # Shared memory bound: 100 KB per block leaves room for 2 on sm_90 (228 KB) and 1 on sm_80 (164 KB).
    assert R.occupancy(90, 64, 128, 100 * 1024)["blocks_per_sm"] == 2
    assert R.occupancy(80, 64, 128, 100 * 1024)["blocks_per_sm"] == 1
    # Thread bound: 2048 threads per SM.
    assert R.occupancy(90, 32, 256, 0)["blocks_per_sm"] == 8


def test_roofline_uses_the_executed_gemm_count():
    line = R.roofline(32768, 128)
    # The upper-triangle forward (half a GEMM, its diagonal squares whole: 0.1% here) and the backward's two less those
    # squares: 2.5 GEMMs of 2 (2N)^2 D FLOPs, less 0.1%. No padding at this size.
    flops = 5.0 * 32768**2 * 128
    assert line.gemm_flops == 2 * K.executed_macs(32768, 128)["total"]
    assert 0.999 * flops < line.gemm_flops < flops
    assert line.tensor_core_ms == pytest.approx(line.gemm_flops / (R.H100_BF16_TFLOPS * 1e12) * 1e3)
    assert line.issue_ms is None
    assert line.bound_ms == max(line.tensor_core_ms, line.sfu_ms, line.hbm_ms)
    assert line.tensor_core_ms < 1.5  # the issue's 2N = 32768 target is reachable at >= 55% of peak


def test_roofline_bounds_share_the_clock_of_the_bf16_peak():
    # 989 TFLOP/s dense bf16 = 132 SMs x 4096 FLOP/clock x 1.83 GHz; the exp and issue bounds run at that clock.
    assert abs(R.H100_CLOCK_GHZ - 1.829) < 1e-3
    line = R.roofline(32768, 128, instructions_per_element=32.0)
    clock = R.H100_CLOCK_GHZ * 1e9
    # An exp2 per element the upper-triangle forward computes (half of S and its diagonal squares), one per element
    # in the backward.
    assert line.exp2_count == pytest.approx((1.5 + 0.5 * 128 / 32768) * 32768**2)
    assert line.sfu_ms == pytest.approx(line.exp2_count / (16 * 132 * clock) * 1e3)
    # 32 instructions per element = one warp instruction per element; 4 issue per clock per SM.
    assert line.issue_ms == pytest.approx(32768**2 / (4 * 132 * clock) * 1e3)
    assert line.bound_ms == max(line.tensor_core_ms, line.sfu_ms, line.hbm_ms, line.issue_ms)
    assert line.serial_ms == pytest.approx(
        line.tensor_core_ms + line.sfu_ms + line.hbm_ms + line.issue_ms
    )


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   BRA 0x60 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0040*/                   FFMA R2, R24, R3, -R3 ;
        /*0050*/                   MUFU.EX2 R4, R2 ;
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0070*/                   FADD R5, R4, R5 ;
        /*0080*/               @P0 BRA 0x30 ;
        /*0090*/                   FADD R6, R6, R7 ;
        /*00a0*/               @P1 BRA 0x90 ;
        /*00b0*/                   EXIT ;
"""


def test_main_loop_counts_non_mma_instructions():
    """The main loop is the backward branch's span that holds MMAs (not the later loop without), counted per element:
    4 non-MMA instructions (FFMA, MUFU, FADD and the branch) x 128 threads / (64 x 64)."""
    body = R.main_loop(R.sass_instructions(SASS))
    assert [x.split()[0] for x in body] == [
        "HGMMA.64x64x16.F32.BF16", "FFMA", "MUFU.EX2", "HGMMA.64x64x16.F32.BF16", "FADD", "BRA",
    ]  # fmt: skip
    counts = R.loop_counts(SASS, 64, 64, 128)
    assert counts["loop_instructions"] == 6
    assert counts["non_mma_per_element"] == pytest.approx(4 * 128 / 4096)
    assert counts["mufu_per_element"] == pytest.approx(128 / 4096)
    assert counts["mma_per_element"] == pytest.approx(2 * 128 / 4096)
    assert R.main_loop(R.sass_instructions(SASS.replace("HGMMA", "FMUL"))) == []


@pytest.mark.slow
# every variant, NT-Xent's and DCL's: about 10 minutes per architecture on 2 idle cores
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("arch", [80, 90])
def test_every_shipped_variant_compiles_cleanly(arch, triton_cache):
    code, report = run_report(triton_cache, "--arch", str(arch))
    assert_clean(report)
    assert code == 0


if __name__ == "__main__":
    print(json.dumps(parity_records(int(sys.argv[1]))))

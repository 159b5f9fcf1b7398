"""Static properties of the compiled NT-Xent kernels, checked without a GPU by ahead-of-time compilation for sm_80 and
sm_90: no register spills (LOCAL 0 and no spill stack in cuobjdump -res-usage), <= 255 registers, shared memory within
the per-block limit, tensor-core instructions in the PTX (mma.sync on sm_80, wgmma on sm_90).

The report runs as its own process (``python -m fastclr.kernels.report``): the test session interprets the kernels
(TRITON_INTERPRET=1), and interpreted kernels cannot be compiled. CI compiles the ``--quick`` set for both
architectures; ``-m slow`` compiles every shipped variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastclr.kernels import nt_xent as K
from fastclr.kernels import report as R

TC_OPS = {80: "mma.sync", 90: "wgmma.mma_async"}


def run_report(*args: str) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastclr.kernels.report", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def assert_clean(report: dict) -> None:
    bad = {
        f"{r['kernel']} {r['config']} D={r['d']} {r['dtype']} {r['path']}": r["problems"]
        for r in report["variants"]
        if r["problems"]
    }
    assert not bad, f"sm_{report['arch']}: {bad}"


@pytest.mark.parametrize("arch", [80, 90])
def test_quick_report_compiles_cleanly(arch):
    code, report = run_report("--arch", str(arch), "--quick")
    assert report["arch"] == arch
    assert_clean(report)
    assert code == 0
    rows = report["variants"]
    assert {r["kernel"] for r in rows} == {"fwd", "bwd", "norm_fwd", "norm_bwd"}
    assert {r["dtype"] for r in rows} == {
        "bf16",
        "fp32",
    }  # fp32 goes through tf32 tensor cores by default
    for r in rows:
        assert r["arch"] == arch and r["local_bytes"] == 0 and r["stack_bytes"] == 0
        assert 0 < r["occupancy"] <= 1 and r["blocks_per_sm"] >= 1
        if r["kernel"] in K.KERNELS:
            itemsize = R.ITEMSIZE[r["dtype"]]
            assert r["config"] == K.candidate_configs(r["kernel"], 1 << 20, 128, itemsize)[0].name
            assert r["tensor_core_op"] == TC_OPS[arch] and r["tensor_core_instructions"] > 0, r
    assert (32768, 128) in {(line["two_n"], line["d"]) for line in report["roofline"]}


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
        tensor_core_op="wgmma.mma_async", tensor_core_instructions=4,
    )  # fmt: skip
    assert R.check_row(good) == []
    assert "spills" in R.check_row({**good, "stack_bytes": 8})[0]
    assert "spills" in R.check_row({**good, "local_bytes": 8})[0]
    assert "registers" in R.check_row({**good, "registers": 256})[0]
    assert "shared" in R.check_row({**good, "shared_bytes": 228 * 1024})[0]
    assert "wgmma" in R.check_row({**good, "tensor_core_instructions": 0})[0]


def test_occupancy_follows_the_tightest_limit():
    # 255 registers x 32 threads round up to 8192 per warp: 2 blocks of 4 warps fill the 64 K registers.
    assert R.occupancy(90, 255, 128, 34 * 1024)["blocks_per_sm"] == 2
    # Shared memory bound: 100 KB per block leaves room for 2 on sm_90 (228 KB) and 1 on sm_80 (164 KB).
    assert R.occupancy(90, 64, 128, 100 * 1024)["blocks_per_sm"] == 2
    assert R.occupancy(80, 64, 128, 100 * 1024)["blocks_per_sm"] == 1
    # Thread bound: 2048 threads per SM.
    assert R.occupancy(90, 32, 256, 0)["blocks_per_sm"] == 8


def test_roofline_uses_the_three_gemm_count():
    line = R.roofline(32768, 128)
    flops = 6.0 * 32768**2 * 128
    assert line.gemm_flops == flops  # no padding at this size
    assert line.tensor_core_ms == pytest.approx(flops / (R.H100_BF16_TFLOPS * 1e12) * 1e3)
    assert line.bound_ms == max(line.tensor_core_ms, line.sfu_ms, line.hbm_ms)
    assert line.tensor_core_ms < 1.5  # the 2N = 32768 target is reachable at >= 55% of peak


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_shipped_variant_compiles_cleanly(arch):
    code, report = run_report("--arch", str(arch))
    assert_clean(report)
    assert code == 0

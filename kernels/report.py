"""Ahead-of-time compile report for the NT-Xent kernels: what an sm_80 / sm_90 GPU would get, without a GPU.

    python -m fastclr.kernels.report --arch 90            # every shipped kernel x config, a table and a roofline
    python -m fastclr.kernels.report --arch 80 --json     # the same as JSON

Each variant is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; registers, stack
(spill) and local memory come from ``cuobjdump -res-usage`` on the cubin (the cuobjdump that triton ships), shared memory
from the compiled metadata (dynamic) plus the cubin's static shared memory, tensor-core use from the PTX (mma.sync on
sm_80, wgmma on sm_90). Occupancy follows from registers, shared memory and threads per block.

Roofline (H100 SXM, stated constants below): forward + backward = three (2N)x(2N)xD GEMMs, 6 (2N)^2 D FLOPs, against
the dense tensor-core peak; HBM bytes are the O(2N D) passes of the four launches. The exponentials run on the SFUs
(16 per clock per SM), which the tensor cores do not help with: the report shows that bound too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastclr.kernels import nt_xent as K

# H100 SXM5 (NVIDIA datasheet): dense (no sparsity) tensor-core peaks, HBM3 bandwidth, 132 SMs at 1.98 GHz boost.
H100_BF16_TFLOPS = 989.0
H100_TF32_TFLOPS = 494.7
H100_HBM_TBPS = 3.35
H100_SMS = 132
H100_CLOCK_GHZ = 1.98
SFU_EXP2_PER_CLOCK_PER_SM = 16
ROOFLINE_SIZES = ((8192, 128), (32768, 128), (262144, 128))

# Per-SM limits (CUDA occupancy tables): registers, threads, blocks, shared memory available to blocks.
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, blocks=32, smem=164 * 1024, smem_block=163 * 1024),
    90: dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024, smem_block=227 * 1024),
}
MAX_REGISTERS = 255
TENSOR_CORE_OPS = {80: "mma.sync", 90: "wgmma.mma_async"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
D_CASES = (128, 256, 2048)  # one block of 128, one block of 256, the D loop with chunked backward


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation: kernel, tile config, embedding width D, input dtype, fixed-shift path or not."""

    kernel: str
    config: str
    d: int
    dtype: str = "bf16"
    shift: bool = True

    @property
    def label(self) -> str:
        path = "shift" if self.shift else "max"
        return f"{self.kernel} {self.config} D={self.d} {self.dtype} {path}"


def shipped_variants(d_cases=D_CASES, dtypes=("bf16", "fp32"), quick=False) -> list[Variant]:
    """Every (kernel, config) the autotuner may launch for these D on both logsumexp paths, and the elementwise kernels.

    quick: only each kernel's first candidate, on the fixed-shift path.
    """
    out = []
    for d in d_cases:
        for dtype in dtypes:
            for kernel in K.KERNELS:
                configs = K.candidate_configs(kernel, 1 << 20, d, ITEMSIZE[dtype])
                for cfg in configs[:1] if quick else configs:
                    for shift in (True,) if quick else (True, False):
                        out.append(Variant(kernel, cfg.name, d, dtype, shift))
            for kernel in ("norm_fwd", "norm_bwd"):
                out.append(Variant(kernel, "elementwise", d, dtype))
    return out


def _signature(fn, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    return {
        name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names
    }


def _source(v: Variant) -> tuple[ASTSource, dict]:
    """The ASTSource of a variant and its compile options (num_warps, num_stages)."""
    tiling = K.d_tiling(v.d)
    elem = "*" + v.dtype
    if v.kernel in ("norm_fwd", "norm_bwd"):
        fn = K._nt_xent_norm_fwd_kernel if v.kernel == "norm_fwd" else K._nt_xent_norm_bwd_kernel
        consts = dict(
            EPS_=K.EPS,
            BLOCK_R=K.ELEMENTWISE_BLOCK_R,
            BLOCK_D=min(triton.next_power_of_2(v.d), K.ELEMENTWISE_BLOCK_D),
            INTERPRETER=False,
        )
        types = {
            "za_ptr": elem,
            "zb_ptr": elem,
            "zhat_ptr": elem,
            "dza_ptr": elem,
            "dzb_ptr": elem,
            "norm_ptr": "*fp32",
            "acc_ptr": "*fp32",
            "count_ptr": "*i32",
            "grad_scale": "fp32",
        }
        return ASTSource(fn, _signature(fn, types, consts), consts), dict(num_warps=4, num_stages=2)
    cfg = K.CONFIGS[v.config]
    fn = K._nt_xent_fwd_kernel if v.kernel == "fwd" else K._nt_xent_bwd_kernel
    consts = dict(
        SHIFT=v.shift,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=tiling.block_d,
        D_BLOCKS=tiling.d_blocks,
        INPUT_PRECISION="tf32" if v.dtype == "fp32" else "ieee",
        INTERPRETER=False,
    )
    if v.kernel == "fwd":
        consts["BLOCK_R"] = K.REDUCE_BLOCK
    else:
        consts["BLOCK_DO"] = tiling.block_do
    types = {
        "zhat_ptr": elem,
        "cols_ptr": elem,
        "loss_ptr": elem,
        "count_ptr": "*i32",
        "QK_SCALE": "fp32",
        "inv_t": "fp32",
        "inv_a": "fp32",
    }
    for name in fn.arg_names:
        if name.endswith("_ptr") and name not in types:
            types[name] = "*fp32"
    src = ASTSource(fn, _signature(fn, types, consts), consts)
    return src, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def cuobjdump_path() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"cuobjdump not found at {path} (it ships with triton's NVIDIA backend)"
        )
    return path


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's one function, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump_path(), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{out}")
    reg, stack, shared, local = (int(x) for x in found.groups())
    return dict(registers=reg, stack_bytes=stack, static_shared_bytes=shared, local_bytes=local)


def occupancy(arch: int, registers: int, threads: int, shared: int) -> dict[str, float]:
    """Resident blocks and warps per SM (registers allocated per warp in units of 256, per thread rounded up to 8)."""
    lim = SM_LIMITS[arch]
    warps = threads // 32
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * warps)
    by_smem = lim["smem"] // shared if shared else lim["blocks"]
    blocks = min(by_regs, by_smem, lim["threads"] // threads, lim["blocks"])
    return dict(
        blocks_per_sm=blocks,
        warps_per_sm=blocks * warps,
        occupancy=blocks * warps / (lim["threads"] // 32),
    )


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile one variant for sm_{arch} and return its static properties (see the module docstring)."""
    if K.INTERPRET:
        raise RuntimeError(
            "TRITON_INTERPRET=1 turned the kernels into interpreted functions, which cannot be compiled ahead of "
            "time: run the report in a process without it (TRITON_INTERPRET=0 python -m fastclr.kernels.report)"
        )
    src, options = _source(v)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    res = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    shared = compiled.metadata.shared + res["static_shared_bytes"]
    threads = options["num_warps"] * 32
    tc_op = TENSOR_CORE_OPS[arch]
    row = dict(
        kernel=v.kernel,
        config=v.config,
        d=v.d,
        dtype=v.dtype,
        path="shift" if v.shift else "max",
        arch=arch,
        num_warps=options["num_warps"],
        num_stages=options["num_stages"],
        registers=res["registers"],
        stack_bytes=res["stack_bytes"],
        local_bytes=res["local_bytes"],
        shared_bytes=shared,
        tensor_core_op=tc_op,
        tensor_core_instructions=ptx.count(tc_op),
    )
    row.update(occupancy(arch, res["registers"], threads, shared))
    return row


def check_row(row: dict) -> list[str]:
    """The static promises a compiled variant must keep; returns what it breaks (empty when fine)."""
    problems = []
    if row["local_bytes"] or row["stack_bytes"]:
        problems.append(f"spills (LOCAL {row['local_bytes']}, STACK {row['stack_bytes']})")
    if row["registers"] > MAX_REGISTERS:
        problems.append(f"{row['registers']} registers")
    if row["shared_bytes"] > SM_LIMITS[row["arch"]]["smem_block"]:
        problems.append(f"{row['shared_bytes']} B shared memory")
    if row["kernel"] in K.KERNELS and row["tensor_core_instructions"] == 0:
        problems.append(f"no {row['tensor_core_op']} in the PTX")
    return problems


@dataclass(frozen=True)
class Roofline:
    """Forward + backward on an H100 SXM for one (2N, D): the tensor-core, SFU and HBM bounds, in milliseconds."""

    two_n: int
    d: int
    dtype: str
    gemm_flops: float
    hbm_bytes: float
    exp2_count: float
    tensor_core_ms: float
    sfu_ms: float
    hbm_ms: float
    bound_ms: float
    serial_ms: float


def roofline(two_n: int, d: int, dtype: str = "bf16", config: str | None = None) -> Roofline:
    """Lower bounds from the three-GEMM count (padding included via ``executed_macs``), the exp2s and the HBM passes.

    bound_ms: max of the three (perfect overlap); serial_ms: tensor cores + SFU one after the other (no overlap).
    """
    b = 4 if dtype == "fp32" else 2
    a = two_n
    macs = K.executed_macs(a, d, config=config)["total"]
    flops = 2.0 * macs
    peak = (H100_TF32_TFLOPS if dtype == "fp32" else H100_BF16_TFLOPS) * 1e12
    # exp2 per (row, column): one in the forward, one in the backward's shift form.
    exp2_count = 2.0 * a * a
    # HBM: z read twice and z_hat written (norm fwd); z_hat read (fwd, its columns stay in L2); z_hat read, fp32 acc
    # written (bwd); acc and z read, dz written (norm bwd).
    hbm_bytes = a * d * (2 * b + b + b + b + 4 + 4 + b + b) + a * 8 * 3
    tc_ms = flops / peak * 1e3
    sfu_ms = exp2_count / (SFU_EXP2_PER_CLOCK_PER_SM * H100_SMS * H100_CLOCK_GHZ * 1e9) * 1e3
    hbm_ms = hbm_bytes / (H100_HBM_TBPS * 1e12) * 1e3
    return Roofline(
        two_n, d, dtype, flops, hbm_bytes, exp2_count, tc_ms, sfu_ms, hbm_ms,
        max(tc_ms, sfu_ms, hbm_ms), tc_ms + sfu_ms + hbm_ms,
    )  # fmt: skip


def build_report(arch: int, variants: list[Variant] | None = None) -> dict:
    """Compile every variant for sm_{arch}; returns {"arch", "variants": [rows with "problems"], "roofline": [...]}."""
    rows = []
    for v in variants if variants is not None else shipped_variants():
        row = compile_variant(v, arch)
        row["problems"] = check_row(row)
        rows.append(row)
    lines = [asdict(roofline(two_n, d)) for two_n, d in ROOFLINE_SIZES]
    return dict(arch=arch, triton=triton.__version__, variants=rows, roofline=lines)


def format_report(report: dict) -> str:
    head = (
        f"{'kernel':8} {'config':17} {'D':>5} {'dtype':5} {'path':5} {'regs':>4} {'spill':>5} "
        f"{'smem KB':>7} {'tc instr':>12} {'blk/SM':>6} {'occ':>5}  status"
    )
    lines = [f"sm_{report['arch']} (triton {report['triton']})", head, "-" * len(head)]
    for r in report["variants"]:
        spill = r["stack_bytes"] + r["local_bytes"]
        gemm = r["kernel"] in K.KERNELS
        tc = f"{r['tensor_core_instructions']} {r['tensor_core_op'].split('.')[0]}" if gemm else "-"
        status = "ok" if not r["problems"] else "; ".join(r["problems"])
        lines.append(
            f"{r['kernel']:8} {r['config']:17} {r['d']:>5} {r['dtype']:5} {r['path'] if gemm else '-':5} "
            f"{r['registers']:>4} "
            f"{spill:>5} {r['shared_bytes'] / 1024:>7.1f} {tc:>12} {r['blocks_per_sm']:>6} "
            f"{r['occupancy']:>5.2f}  {status}"
        )
    lines += [
        "",
        f"Roofline, forward + backward on an H100 SXM ({H100_BF16_TFLOPS:g} TFLOP/s dense bf16, "
        f"{H100_HBM_TBPS:g} TB/s HBM, {SFU_EXP2_PER_CLOCK_PER_SM} exp2/clk/SM x {H100_SMS} SMs @ "
        f"{H100_CLOCK_GHZ:g} GHz):",
        f"{'2N':>7} {'D':>4} {'GFLOP':>8} {'MB HBM':>7} {'TC ms':>7} {'SFU ms':>7} {'HBM ms':>7} "
        f"{'max ms':>7} {'TC+SFU+HBM':>10}",
    ]
    for r in report["roofline"]:
        lines.append(
            f"{r['two_n']:>7} {r['d']:>4} {r['gemm_flops'] / 1e9:>8.1f} {r['hbm_bytes'] / 1e6:>7.1f} "
            f"{r['tensor_core_ms']:>7.3f} {r['sfu_ms']:>7.3f} {r['hbm_ms']:>7.3f} {r['bound_ms']:>7.3f} "
            f"{r['serial_ms']:>10.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastclr.kernels.report",
        description="Compile every NT-Xent kernel config ahead of time (no GPU needed) and report its resources.",
    )
    parser.add_argument(
        "--arch", type=int, choices=sorted(SM_LIMITS), default=90, help="compute capability x 10"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only D = 128 and each kernel's first config on the fixed-shift path (seconds, not minutes)",
    )
    args = parser.parse_args(argv)
    variants = shipped_variants((128,), quick=True) if args.quick else None
    report = build_report(args.arch, variants)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 1 if any(r["problems"] for r in report["variants"]) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Ahead-of-time compile report for the NT-Xent kernels: what an sm_80 / sm_90 GPU would get, without a GPU.

    python -m fastclr.kernels.report --arch 90            # every shipped kernel x config, a table and a roofline
    python -m fastclr.kernels.report --arch 80 --json     # the same as JSON

The report compiles what a launch compiles. Each variant is launched through the host functions
(``nt_xent_forward`` / ``nt_xent_backward``) on CPU tensors of 2N = REPORT_ROWS rows with Triton's driver replaced by
``fastclr.kernels.stub_driver`` (target ``GPUTarget("cuda", arch, 32)``): Triton's JIT specialises on those arguments
(16-byte-aligned pointers and integers divisible by 16 get ``tt.divisibility``, which decides vector loads and the
cp.async pipeline) and picks the options a launch gets, and the report reads the kernel that launch compiled. Registers,
stack (spill) and local memory come from ``cuobjdump -res-usage`` on the cubin (the cuobjdump that triton ships), shared
memory from the compiled metadata (dynamic) plus the cubin's static shared memory. Tensor-core use is counted per
``tl.dot``: every dot of the TTGIR whose result has an MMA layout (``mma.sync`` on sm_80, ``wgmma`` on sm_90) against
every dot, so one dot falling back to FMA shows; the PTX's MMA instruction count is reported beside it. fp32 with
precision="ieee" multiplies exactly in fp32 on the FMA units by design (in D steps of ``EXACT_BLOCK_D``, its own
candidates). Occupancy follows from registers, shared memory and threads per block.

Instruction issue: the SASS of each GEMM kernel (``cuobjdump -sass``) is cut at its main loop (the outermost loop that
holds tensor-core instructions, one column tile per trip) and its non-MMA instructions are counted per S element, i.e.
per thread and trip x threads / (BLOCK_M x BLOCK_N): what the warp schedulers issue besides the MMAs for each logit.
It is a static count of the loop body, so an instruction under a predicate or a rarely taken branch counts in full.
The upper-triangle forward (``sym_fwd``: one process, fixed shift) computes each element of S once for E_ij and E_ji:
its count is per computed element, and the roofline charges it for the elements it computes (about half of (2N)^2).

Grids: for named (rows, columns) shapes the report prints each GEMM kernel's launch grid (``launch_grid``: row blocks x
D chunks x column splits for the architecture's SM count) and the waves it takes at the compiled occupancy.

Roofline (H100 SXM, stated constants below): forward + backward = the MACs ``executed_macs`` counts (the upper-triangle
forward: about half a (2N)x(2N)xD GEMM, the backward two less the diagonal squares it loads), against the dense
tensor-core peak; HBM bytes are the O(2N D) passes of the launches, the forward's column-sum workspace and the
diagonal squares' S (written once, read once). Every bound uses the clock the dense
bf16 peak implies (989 TFLOP/s = 132 SMs x 4096 FLOP/clock x 1.83 GHz). The exponentials run on the SFUs (16 per clock
per SM), which the tensor cores do not help with, and the non-MMA instructions issue at 4 warp instructions per clock
per SM (one per scheduler): the report shows both bounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton

from fastclr.kernels import nt_xent as K
from fastclr.kernels.stub_driver import Launch, stub_driver

# H100 SXM5 (NVIDIA datasheet): dense (no sparsity) tensor-core peaks, HBM3 bandwidth, 132 SMs. The clock is the one
# the dense bf16 peak is quoted at (4096 bf16 FLOP per clock per SM), not the 1.98 GHz boost: every bound uses it.
H100_BF16_TFLOPS = 989.0
H100_TF32_TFLOPS = 494.7
H100_HBM_TBPS = 3.35
H100_SMS = 132
BF16_FLOP_PER_CLOCK_PER_SM = 4096
H100_CLOCK_GHZ = H100_BF16_TFLOPS * 1e3 / (H100_SMS * BF16_FLOP_PER_CLOCK_PER_SM)  # 1.83
SFU_EXP2_PER_CLOCK_PER_SM = 16
ISSUE_PER_CLOCK_PER_SM = 4  # warp instructions: one per scheduler
ROOFLINE_SIZES = ((8192, 128), (32768, 128), (262144, 128), (32768, 2048))
# (2N, D) of the work table: executed MACs in GEMM-equivalents ((2N)^2 D), one process, bf16 default tiles.
WORK_SIZES = ((8192, 128), (32768, 128), (262144, 128), (8192, 2048), (32768, 2048))
# SMs per architecture's data-centre part (A100, H100 SXM), as the stub driver reports them to the launch.
SM_COUNT = {80: 108, 90: 132}
# (rows, columns) the grid table shows at D = 128 bf16: DDP ranks of ImageNet batch 4096 on 8 GPUs (1024 x 8192),
# smaller and larger rank batches, and one GPU at 2N = 8192.
GRID_SHAPES = ((1024, 8192), (512, 4096), (4096, 8192), (8192, 8192))
GRID_D = 128
MMA_OPCODES = ("HGMMA", "HMMA")

# Per-SM limits (CUDA occupancy tables): registers, threads, blocks, shared memory available to blocks.
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, blocks=32, smem=164 * 1024, smem_block=163 * 1024),
    90: dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024, smem_block=227 * 1024),
}
MAX_REGISTERS = 255
TENSOR_CORE_OPS = {80: "mma.sync", 90: "wgmma.mma_async"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# D: unaligned (the norm kernels' masks; the GEMM kernels read z_hat's rows padded to 112), one block of 128, one block
# of 256, the D loop with chunked backward.
D_CASES = (100, 128, 256, 2048)
QUICK_D_CASES = (100, 128)
# The batch each variant is specialised for: 2N divisible by 16, as any batch worth a GPU is.
REPORT_ROWS = 4096
ELEMENTWISE = ("norm_fwd", "sym_combine", "col_terms", "norm_bwd")
KERNEL_NAMES = {
    "norm_fwd": "_nt_xent_norm_fwd_kernel",
    "fwd": "_nt_xent_fwd_kernel",
    "sym_fwd": "_nt_xent_sym_fwd_kernel",
    "sym_combine": "_nt_xent_sym_combine_kernel",
    "col_terms": "_nt_xent_col_terms_kernel",
    "bwd": "_nt_xent_bwd_kernel",
    "bwd_gemm": "_nt_xent_bwd_gemm_kernel",
    "norm_bwd": "_nt_xent_norm_bwd_kernel",
}
# Temperatures that take each logsumexp path (the fixed shift from SHIFT_MIN_TEMPERATURE = 0.025 up).
SHIFT_TAU, MAX_TAU = 0.5, 0.01
# The kernels that write tf32 dot operands: z_hat (norm_fwd) and W (bwd) must round them to nearest (cvt.rna).
TF32_ROUNDING = "cvt.rna.tf32.f32"
TF32_OPERAND_WRITERS = ("norm_fwd", "bwd")
# The GEMM kernels DCL compiles with EXCLUDE_POS (the wide backward's GEMM has no positives).
DCL_KERNELS = ("fwd", "sym_fwd", "bwd")
_DOT_RE = re.compile(r"= (?:tt\.dot|ttng\.warp_group_dot) .*-> tensor<[^>]*, #(\w+)>")


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation: kernel, tile config, embedding width D, input dtype, fixed-shift path or not, and
    the fp32 dot precision ("tf32" or "ieee"; bf16/fp16 always multiply exactly). On the fixed-shift path "fwd" is the
    row blocks x column splits forward that gathered columns take (built with ``symmetric=False``), "sym_fwd" and
    "sym_combine" the upper-triangle forward of one process."""

    kernel: str
    config: str
    d: int
    dtype: str = "bf16"
    shift: bool = True
    precision: str = "tf32"
    loss: str = "ntxent"  # "dcl": the positive left out of the denominator (EXCLUDE_POS)

    @property
    def label(self) -> str:
        path = "shift" if self.shift else "max"
        loss = "" if self.loss == "ntxent" else f" {self.loss}"
        return f"{self.kernel}{loss} {self.config} D={self.d} {self.dtype} {self.precision_label} {path}"

    @property
    def precision_label(self) -> str:
        return self.precision if self.dtype == "fp32" else "-"


def precisions_for(dtype: str) -> tuple[str, ...]:
    """The public precisions that compile differently for this dtype (only fp32 has a choice)."""
    return K.PRECISIONS if dtype == "fp32" else ("tf32",)


def shipped_variants(
    d_cases=D_CASES, dtypes=("bf16", "fp16", "fp32"), quick=False, precisions=None
) -> list[Variant]:
    """Every (kernel, config) the autotuner may launch for these D on both logsumexp paths (the upper-triangle forward
    on the fixed-shift path only) and every public precision, and the elementwise kernels; the GEMM kernels also as
    DCL compiles them (``DCL_KERNELS``, the positive left out of the denominator).

    quick: only each kernel's first candidate, on the fixed-shift path, default precision (DCL: bf16 at GRID_D only).
    """
    out = []
    for d in d_cases:
        for dtype in dtypes:
            precs = precisions_for(dtype) if precisions is None else precisions
            for precision in precs[:1] if quick else precs:
                losses = (
                    ("ntxent", "dcl")
                    if not quick or (d, dtype) == (GRID_D, "bf16")
                    else ("ntxent",)
                )
                for kernel in K.KERNELS:
                    configs = launchable_configs(kernel, d, ITEMSIZE[dtype], precision)
                    for cfg in configs[:1] if quick else configs:
                        for shift in (
                            (True,) if quick or kernel in ("sym_fwd", "bwd_gemm") else (True, False)
                        ):
                            for loss in losses if kernel in DCL_KERNELS else ("ntxent",):
                                out.append(
                                    Variant(kernel, cfg.name, d, dtype, shift, precision, loss)
                                )
                for kernel in ELEMENTWISE:
                    out.append(Variant(kernel, "elementwise", d, dtype, True, precision))
                if not quick:  # the running-max path's column terms (g_j / g_max only)
                    out.append(Variant("col_terms", "elementwise", d, dtype, False, precision))
    return out


def launchable_configs(kernel: str, d: int, itemsize: int, precision: str) -> list:
    """The candidates of a large batch (first: the default) and then those only small batches take (the upper-triangle
    forward keeps one BLOCK_M per batch, 64 below 2N = 128)."""
    opts = {"precision": precision} if itemsize == 4 else {}
    out = K.candidate_configs(kernel, 1 << 20, d, itemsize, **opts)
    return out + [c for c in K.candidate_configs(kernel, 64, d, itemsize, **opts) if c not in out]


def launch_variants(variants: list[Variant], arch: int) -> dict[Variant, Launch]:
    """Launch every variant through the host functions under the stub driver for sm_{arch}; the launch of each.

    Variants that share (D, dtype, path, precision) share one set of CPU tensors; the backward runs on the state of a
    forward with the default config. The elementwise kernels are launched along the way. The fixed-shift "fwd" is
    built as the gathered path launches it, with ``symmetric=False``.
    """
    if K.INTERPRET:
        raise RuntimeError(
            "TRITON_INTERPRET=1 turned the kernels into interpreted functions, which cannot be compiled ahead of "
            "time: run the report in a process without it (TRITON_INTERPRET=0 python -m fastclr.kernels.report)"
        )
    groups: dict[tuple, list[Variant]] = {}
    for v in variants:
        groups.setdefault((v.d, v.dtype, v.shift, v.precision, v.loss), []).append(v)
    out = {}
    for (d, dtype, shift, precision, loss), group in groups.items():
        gen = torch.Generator().manual_seed(0)
        n = REPORT_ROWS // 2
        z_a = torch.randn(n, d, generator=gen).to(TORCH_DTYPES[dtype])
        z_b = torch.randn(n, d, generator=gen).to(TORCH_DTYPES[dtype])
        tau = SHIFT_TAU if shift else MAX_TAU
        opts = dict(precision=precision, exclude_pos=loss == "dcl")
        by_kernel = {k: [v for v in group if v.kernel == k] for k in KERNEL_NAMES}
        with stub_driver(arch) as drv:
            _, state = K.nt_xent_forward(z_a, z_b, tau, **opts)
            for v in by_kernel["fwd"]:
                K.nt_xent_forward(z_a, z_b, tau, config=v.config, symmetric=False, **opts)
            for v in by_kernel["sym_fwd"]:
                K.nt_xent_forward(z_a, z_b, tau, config=v.config, **opts)
            for v in by_kernel["bwd"] + ([None] if not by_kernel["bwd"] else []):
                K.nt_xent_backward(
                    torch.ones(()), z_a, z_b, state, tau, config=v and v.config, **opts
                )
            for v in by_kernel["bwd_gemm"]:  # D > MAX_BLOCK_D: the wide backward's GEMM
                K.nt_xent_backward(
                    torch.ones(()), z_a, z_b, state, tau, gemm_config=v.config, **opts
                )
        launched = {}
        gemm_names = {KERNEL_NAMES[k] for k in K.KERNELS}
        for launch in drv.launches:
            if launch.name in gemm_names:
                launched[(launch.name, config_name(launch))] = launch
            else:
                launched[(launch.name, "elementwise")] = launch
        for v in group:
            out[v] = launched[(KERNEL_NAMES[v.kernel], v.config)]
    return out


def config_name(launch: Launch) -> str:
    """The KernelConfig name of a GEMM kernel's launch (tiles from its constexprs, warps and stages from its options)."""
    c = launch.constexprs
    cfg = K.KernelConfig(
        c["BLOCK_M"], c["BLOCK_N"], launch.metadata.num_warps, launch.metadata.num_stages
    )
    return cfg.name


def dot_layouts(ttgir: str) -> list[str]:
    """The result layout of every dot in the TTGIR, in order: "mma..." on the tensor cores, "blocked..." on FMA."""
    return _DOT_RE.findall(ttgir)


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


_SASS_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH_RE = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`?\(?\s*)?(0x[0-9a-f]+)")


def sass(cubin: bytes) -> str:
    """The cubin's SASS (``cuobjdump -sass``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [cuobjdump_path(), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout


def sass_instructions(text: str) -> list[tuple[int, str]]:
    """(address, instruction without its predicate) of every SASS instruction, in address order."""
    out = []
    for addr, ins in _SASS_RE.findall(text):
        ins = ins.strip()
        if ins.startswith("@"):
            ins = ins.split(None, 1)[1] if " " in ins else ""
        if ins:
            out.append((int(addr, 16), ins))
    return out


def main_loop(instructions: list[tuple[int, str]]) -> list[str]:
    """The body of the first outermost loop holding tensor-core instructions (a loop: from a backward branch's target to
    the branch). The GEMM kernels put their main loop first: the interior column blocks on the fixed-shift path, every
    block on the running-max path; the boundary blocks' loop follows. Empty when there is none."""
    loops = []
    for i, (addr, ins) in enumerate(instructions):
        found = _BRANCH_RE.search(ins)
        if not found or int(found.group(1), 16) >= addr:
            continue
        target = int(found.group(1), 16)
        body = [x for a, x in instructions[: i + 1] if a >= target]
        if any(x.split()[0].split(".")[0] in MMA_OPCODES for x in body):
            loops.append((target, addr, body))
    outer = [
        (t, a, body)
        for t, a, body in loops
        if not any(t2 <= t and a <= a2 and (t2, a2) != (t, a) for t2, a2, _ in loops)
    ]
    return min(outer, key=lambda loop: loop[0])[2] if outer else []


def loop_counts(text: str, block_m: int, block_n: int, threads: int) -> dict[str, float]:
    """Per S element of the main loop (see the module docstring): non-MMA instructions, MUFU (SFU) instructions among
    them, and MMA instructions; and the loop's length in instructions."""
    body = main_loop(sass_instructions(text))
    ops = [x.split()[0].split(".")[0] for x in body]
    per_element = threads / (block_m * block_n)
    mma = sum(op in MMA_OPCODES for op in ops)
    return dict(
        loop_instructions=len(body),
        non_mma_per_element=(len(body) - mma) * per_element,
        mufu_per_element=sum(op == "MUFU" for op in ops) * per_element,
        mma_per_element=mma * per_element,
    )


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
    """Compile one variant for sm_{arch} as a launch would and return its static properties (see the module docstring)."""
    return launch_row(v, launch_variants([v], arch)[v], arch)


def launch_row(v: Variant, launch: Launch, arch: int) -> dict:
    """The static properties of the kernel a launch compiled."""
    compiled = launch.compiled()
    res = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    shared = compiled.metadata.shared + res["static_shared_bytes"]
    num_warps = compiled.metadata.num_warps
    tc_op = TENSOR_CORE_OPS[arch]
    layouts = dot_layouts(compiled.asm["ttgir"])
    row = dict(
        kernel=v.kernel,
        loss=v.loss,
        config=v.config,
        d=v.d,
        dtype=v.dtype,
        precision=v.precision_label,
        path="shift" if v.shift else "max",
        arch=arch,
        num_warps=num_warps,
        num_stages=compiled.metadata.num_stages,
        registers=res["registers"],
        stack_bytes=res["stack_bytes"],
        local_bytes=res["local_bytes"],
        shared_bytes=shared,
        tensor_core_op=tc_op,
        tensor_core_instructions=ptx.count(tc_op),
        dots=len(layouts),
        mma_dots=sum(layout.startswith("mma") for layout in layouts),
        exact_fp32=v.dtype == "fp32" and v.precision == "ieee",
        tf32_roundings=ptx.count(TF32_ROUNDING),
        cp_async=ptx.count("cp.async") > 0,
        specialised=sorted(launch.attrs),
        compile_hash=compiled.hash,
    )
    row.update(occupancy(arch, res["registers"], num_warps * 32, shared))
    if v.kernel in K.KERNELS:
        cfg = K.CONFIGS[v.config]
        row.update(
            loop_counts(sass(compiled.asm["cubin"]), cfg.block_m, cfg.block_n, num_warps * 32)
        )
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
    if row["kernel"] in K.KERNELS and not row["exact_fp32"]:
        if row["dots"] == 0 or row["mma_dots"] < row["dots"]:
            problems.append(
                f"{row['dots'] - row['mma_dots']} of {row['dots']} dots off the tensor cores"
            )
        if row["tensor_core_instructions"] == 0:
            problems.append(f"no {row['tensor_core_op']} in the PTX")
    tf32 = row.get("dtype") == "fp32" and row.get("precision") == "tf32"
    if tf32 and row["kernel"] in TF32_OPERAND_WRITERS and not row["tf32_roundings"]:
        problems.append(f"tf32 operands truncated (no {TF32_ROUNDING} in the PTX)")
    return problems


@dataclass(frozen=True)
class Roofline:
    """Forward + backward on an H100 SXM for one (2N, D): the tensor-core, SFU, instruction-issue and HBM bounds, in
    milliseconds (issue_ms None without instruction counts)."""

    two_n: int
    d: int
    dtype: str
    gemm_flops: float
    hbm_bytes: float
    exp2_count: float
    tensor_core_ms: float
    sfu_ms: float
    issue_ms: float | None
    hbm_ms: float
    bound_ms: float
    serial_ms: float


def roofline(
    two_n: int,
    d: int,
    dtype: str = "bf16",
    config: str | None = None,
    instructions_per_element: float | None = None,
) -> Roofline:
    """Lower bounds from the executed MACs (padding included, ``executed_macs``: the upper-triangle forward), the exp2s,
    the non-MMA instructions (forward + backward per element of the (2N)^2 S, from the SASS: see
    ``instructions_per_element``) and the HBM passes, all at H100_CLOCK_GHZ.

    bound_ms: max of the bounds (perfect overlap); serial_ms: their sum (no overlap at all).
    """
    b = 4 if dtype == "fp32" else 2
    a = two_n
    executed = K.executed_macs(a, d, config=config)
    macs = executed["total"]
    flops = 2.0 * macs
    peak = (H100_TF32_TFLOPS if dtype == "fp32" else H100_BF16_TFLOPS) * 1e12
    clock = H100_CLOCK_GHZ * 1e9
    # exp2: one per element the forward computes (about half of S), one per element in the backward's shift form.
    tiling = K.d_tiling(d)
    exp2_count = executed["fwd"] / (tiling.d_blocks * tiling.block_d) + 1.0 * a * a
    # HBM: z read twice and z_hat written (norm fwd); z_hat read (fwd, its columns stay in L2); z_hat read, fp32 acc
    # written (bwd); acc and z read, dz written (norm bwd). With the backward's column splits (on an H100's SMs) the
    # acc partials are written and read once per split, and their sum written back and read again.
    splits = K.launch_grid("bwd", a, d, sms=H100_SMS)[-1]
    acc_passes = 2 if splits == 1 else 2 * splits + 2
    if K.wide_backward(d):
        # The wide backward: acc zeroed, then read and written once per column super-block; W (a x m in the input
        # dtype) written by the weight pass and read once by the GEMM (its other D tiles' reads hit L2).
        acc_passes = 1 + 2 * triton.cdiv(a, K.wide_columns(a, a, b)) + 2
    w_bytes = 2 * a * a * b if K.wide_backward(d) else 0
    # The upper-triangle forward's workspace, fp32 written and read once: each row block's column sums right of its
    # diagonal square (a (nB - 1) / 2 in all) and the row sums per split.
    sym = K.resolve_config("sym_fwd", a, d, config)
    sym_splits = K.launch_grid("sym_fwd", a, d, config=config, sms=H100_SMS)[-1]
    workspace = 2 * 4 * (a * (triton.cdiv(a, sym.block_m) - 1) / 2 + sym_splits * a)
    # The diagonal squares' S, fp32: written by the forward, read by the backward (``diagonal_square``).
    square = K.diagonal_square(a, d, b, config=config)
    workspace += 2 * 4 * math.prod(K.square_shape(a, square)) if square else 0
    hbm_bytes = (
        a * d * (2 * b + b + b + b + 4 * acc_passes + b + b) + a * 8 * 3 + workspace + w_bytes
    )
    tc_ms = flops / peak * 1e3
    sfu_ms = exp2_count / (SFU_EXP2_PER_CLOCK_PER_SM * H100_SMS * clock) * 1e3
    issue_ms = None
    if instructions_per_element is not None:
        warp_instructions = a * a * instructions_per_element / 32
        issue_ms = warp_instructions / (ISSUE_PER_CLOCK_PER_SM * H100_SMS * clock) * 1e3
    hbm_ms = hbm_bytes / (H100_HBM_TBPS * 1e12) * 1e3
    bounds = [tc_ms, sfu_ms, hbm_ms] + ([issue_ms] if issue_ms is not None else [])
    return Roofline(
        two_n, d, dtype, flops, hbm_bytes, exp2_count, tc_ms, sfu_ms, issue_ms, hbm_ms, max(bounds), sum(bounds),
    )  # fmt: skip


def _default_row(rows: list[dict], kernel: str, config: str, d: int = GRID_D) -> dict | None:
    """The compiled bf16 fixed-shift NT-Xent row of this kernel, config and D, if the report built it."""
    for r in rows:
        if (r["kernel"], r["loss"], r["config"], r["d"], r["dtype"], r["path"]) == (
            kernel,
            "ntxent",
            config,
            d,
            "bf16",
            "shift",
        ):
            return r
    return None


def grid_kernels(a: int, m: int) -> tuple[str, str]:
    """The GEMM kernels a fixed-shift launch of a rows against m columns takes: one process (m = a) the upper-triangle
    forward, gathered columns the row blocks x column splits one."""
    return ("sym_fwd" if m == a else "fwd", "bwd")


def grid_variants(arch: int) -> list[Variant]:
    """The bf16 fixed-shift D = GRID_D variants that the named shapes launch on sm_{arch}."""
    programs = K.PROGRAMS_PER_SM * SM_COUNT[arch]
    out = []
    for a, m in GRID_SHAPES:
        for kernel in grid_kernels(a, m):
            cfg = K.resolve_config(kernel, a, GRID_D, None, 2, "tf32", m, programs)
            v = Variant(kernel, cfg.name, GRID_D)
            if v not in out:
                out.append(v)
    return out


def grid_rows(arch: int, rows: list[dict]) -> list[dict]:
    """Launch grid, programs and waves (programs / (SMs x resident blocks per SM)) of each GEMM kernel at the named
    shapes, D = GRID_D, bf16, for sm_{arch}'s SM count; "ok" when the grid has >= PROGRAMS_PER_SM x SMs programs."""
    sms = SM_COUNT[arch]
    programs = K.PROGRAMS_PER_SM * sms
    out = []
    for a, m in GRID_SHAPES:
        for kernel in grid_kernels(a, m):
            cfg = K.resolve_config(kernel, a, GRID_D, None, 2, "tf32", m, programs)
            grid = K.launch_grid(kernel, a, GRID_D, m, sms=sms)
            count = 1
            for g in grid:
                count *= g
            row = _default_row(rows, kernel, cfg.name)
            per_sm = row["blocks_per_sm"] if row else None
            out.append(
                dict(
                    rows=a, cols=m, kernel=kernel, config=cfg.name, grid=list(grid), programs=count, sms=sms,
                    blocks_per_sm=per_sm, waves=count / (sms * per_sm) if per_sm else None, ok=count >= programs,
                )
            )  # fmt: skip
    return out


def instructions_per_element(rows: list[dict]) -> float | None:
    """Forward + backward non-MMA instructions per element of the (2N)^2 S, for one process: the default bf16 D = 128
    variants (first candidates at a large batch) of the upper-triangle forward, which computes half of S (its count
    per computed element halved), and of the backward; None unless the report compiled both."""
    total = 0.0
    for kernel, weight in (("sym_fwd", 0.5), ("bwd", 1.0)):
        cfg = K.candidate_configs(kernel, 1 << 20, 128)[0]
        row = _default_row(rows, kernel, cfg.name, 128)
        if row is None or "non_mma_per_element" not in row:
            return None
        total += weight * row["non_mma_per_element"]
    return total


def work_rows() -> list[dict]:
    """Executed MACs (``executed_macs``, one process, fixed shift, bf16 default tiles) at WORK_SIZES, in GEMM-equivalents
    of (2N)^2 D MACs: forward, backward, total."""
    out = []
    for a, d in WORK_SIZES:
        macs = K.executed_macs(a, d)
        unit = a * a * d
        out.append(
            dict(
                two_n=a,
                d=d,
                fwd=macs["fwd"] / unit,
                bwd=macs["bwd"] / unit,
                total=macs["total"] / unit,
            )
        )
    return out


def build_report(arch: int, variants: list[Variant] | None = None) -> dict:
    """Compile every variant (and the named shapes' grid variants) for sm_{arch}; returns {"arch", "variants": [rows
    with "problems"], "grids": [...], "roofline": [...]}."""
    variants = list(variants if variants is not None else shipped_variants())
    variants += [v for v in grid_variants(arch) if v not in variants]
    launches = launch_variants(variants, arch)
    rows = []
    for v in variants:
        row = launch_row(v, launches[v], arch)
        row["problems"] = check_row(row)
        rows.append(row)
    per_element = instructions_per_element(rows) if arch == 90 else None
    # The instruction counts are the D = GRID_D variants' (per S element, D-independent only for one block of D).
    lines = [
        asdict(roofline(two_n, d, instructions_per_element=per_element if d == GRID_D else None))
        for two_n, d in ROOFLINE_SIZES
    ]
    return dict(
        arch=arch,
        triton=triton.__version__,
        variants=rows,
        grids=grid_rows(arch, rows),
        work=work_rows(),
        roofline=lines,
    )


def _fmt(x, spec: str) -> str:
    """x formatted, or "-" as wide as the spec asks."""
    width = re.match(r">?(\d*)", spec).group(1)
    return format("-", f">{width}") if x is None else format(x, spec)


def format_report(report: dict) -> str:
    head = (
        f"{'kernel':11} {'config':17} {'D':>5} {'dtype':5} {'prec':4} {'path':5} {'regs':>4} {'spill':>5} "
        f"{'smem KB':>7} {'tc dots':>7} {'tc instr':>12} {'blk/SM':>6} {'occ':>5} {'instr/el':>8} {'mufu/el':>7}  "
        "status"
    )
    lines = [f"sm_{report['arch']} (triton {report['triton']})", head, "-" * len(head)]
    for r in report["variants"]:
        spill = r["stack_bytes"] + r["local_bytes"]
        gemm = r["kernel"] in K.KERNELS
        tc = f"{r['tensor_core_instructions']} {r['tensor_core_op'].split('.')[0]}" if gemm else "-"
        dots = f"{r['mma_dots']}/{r['dots']}" if gemm else "-"
        status = "ok" if not r["problems"] else "; ".join(r["problems"])
        kernel = r["kernel"] if r["loss"] == "ntxent" else f"{r['kernel']}/{r['loss']}"
        lines.append(
            f"{kernel:11} {r['config']:17} {r['d']:>5} {r['dtype']:5} {r['precision']:4} "
            f"{r['path'] if gemm else '-':5} {r['registers']:>4} "
            f"{spill:>5} {r['shared_bytes'] / 1024:>7.1f} {dots:>7} {tc:>12} {r['blocks_per_sm']:>6} "
            f"{r['occupancy']:>5.2f} {_fmt(r.get('non_mma_per_element'), '8.2f')} "
            f"{_fmt(r.get('mufu_per_element'), '7.2f')}  {status}"
        )
    lines += [
        "instr/el, mufu/el: per S element the main loop computes; sym_fwd computes each once for S_ij and S_ji (per "
        "element of S: half).",
        "",
        f"Grids at D = {GRID_D}, bf16 (>= {K.PROGRAMS_PER_SM} x {report['grids'][0]['sms']} SMs programs wanted):",
        f"{'rows':>6} {'cols':>6} {'kernel':7} {'config':17} {'grid':>14} {'programs':>8} {'blk/SM':>6} "
        f"{'waves':>6}  status",
    ]
    for g in report["grids"]:
        grid = "x".join(str(x) for x in g["grid"])
        lines.append(
            f"{g['rows']:>6} {g['cols']:>6} {g['kernel']:7} {g['config']:17} {grid:>14} {g['programs']:>8} "
            f"{_fmt(g['blocks_per_sm'], '>6')} {_fmt(g['waves'], '6.2f')}  {'ok' if g['ok'] else 'grid too small'}"
        )
    lines += [
        "",
        "Executed MACs in GEMM-equivalents ((2N)^2 D MACs), one process, fixed shift, bf16 default tiles:",
        f"{'2N':>7} {'D':>5} {'fwd':>6} {'bwd':>6} {'total':>6}",
    ]
    for w in report["work"]:
        lines.append(
            f"{w['two_n']:>7} {w['d']:>5} {w['fwd']:>6.3f} {w['bwd']:>6.3f} {w['total']:>6.4f}"
        )
    lines += [
        "",
        f"Roofline, forward + backward on an H100 SXM ({H100_BF16_TFLOPS:g} TFLOP/s dense bf16, "
        f"{H100_HBM_TBPS:g} TB/s HBM, {SFU_EXP2_PER_CLOCK_PER_SM} exp2/clk/SM and {ISSUE_PER_CLOCK_PER_SM} warp "
        f"instructions/clk/SM x {H100_SMS} SMs @ {H100_CLOCK_GHZ:.2f} GHz; issue from the sm_90 SASS counts):",
        f"{'2N':>7} {'D':>4} {'GFLOP':>8} {'MB HBM':>7} {'TC ms':>7} {'SFU ms':>7} {'issue ms':>8} {'HBM ms':>7} "
        f"{'max ms':>7} {'sum ms':>7}",
    ]
    for r in report["roofline"]:
        lines.append(
            f"{r['two_n']:>7} {r['d']:>4} {r['gemm_flops'] / 1e9:>8.1f} {r['hbm_bytes'] / 1e6:>7.1f} "
            f"{r['tensor_core_ms']:>7.3f} {r['sfu_ms']:>7.3f} {_fmt(r['issue_ms'], '8.3f')} {r['hbm_ms']:>7.3f} "
            f"{r['bound_ms']:>7.3f} {r['serial_ms']:>7.3f}"
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
        help="only D = 100 and 128, bf16 and fp32, each kernel's first config on the fixed-shift path (seconds)",
    )
    args = parser.parse_args(argv)
    variants = shipped_variants(QUICK_D_CASES, ("bf16", "fp32"), quick=True) if args.quick else None
    report = build_report(args.arch, variants)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    broken = any(r["problems"] for r in report["variants"]) or not all(
        g["ok"] for g in report["grids"]
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

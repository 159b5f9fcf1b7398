"""The Triton NT-Xent kernel's real launch path, without a GPU: every public entry point on CPU tensors through
``fastclr.kernels.stub_driver`` (Triton's autotuner and its pruning, the JIT's specialisation on the real arguments,
compilation for sm_90 and sm_80; launches recorded, never run).

Under TRITON_INTERPRET=1 (set for the test process by conftest) ``_launch`` takes the heuristic branch and no kernel is
compiled, so the cases run in a child process: this file as a script, ``python tests/test_nt_xent_launch.py 90``, which
prints one JSON record per launch. One child per architecture, shared by the tests below; Triton's cache lives in the
session's temporary directory. ``-m slow`` adds more cases at D = 256 and beyond.
"""

from __future__ import annotations

import json
import sys

import pytest
from compile_child import json_records, param

# Entry point, dtype, precision, N, D, tau (>= 0.025 takes the fixed shift, below the running max), distributed.
# Batches of 2N <= 64 keep the autotuner's candidates to 64-row tiles, which compile fastest; the report compiles the
# large-batch defaults (tests/test_kernel_report.py).
CASES = {
    "nt_xent-bf16-D128-shift": ("nt_xent", "bfloat16", "tf32", 32, 128, 0.5, False),
    "nt_xent-fp32-tf32-D100-shift": ("nt_xent", "float32", "tf32", 32, 100, 0.5, False),
    "gather-fp16-D100-max": ("nt_xent_gather", "float16", "tf32", 24, 100, 0.01, True),
    "triton-fp32-ieee-D128-max": ("nt_xent_triton", "float32", "ieee", 24, 128, 0.01, False),
    # D > MAX_BLOCK_D: the D loop, the wide backward's weight pass and its GEMM
    "triton-bf16-D300-shift": ("nt_xent_triton", "bfloat16", "tf32", 32, 300, 0.5, False),
}
# CI compiles every case for sm_90 and these for sm_80 (the quick report covers fp32 there); -m slow all of them.
SM80_CASES = ("nt_xent-bf16-D128-shift", "gather-fp16-D100-max")
SLOW_CASES = {
    "gather-fp16-D520-max": ("nt_xent_gather", "float16", "tf32", 40, 520, 0.01, True),
    "gather-fp32-D256-max": ("nt_xent_gather", "float32", "tf32", 40, 256, 0.01, True),
}
KERNEL_ORDER = [
    "_nt_xent_norm_fwd_kernel",
    "_nt_xent_fwd_kernel",
    "_nt_xent_col_terms_kernel",
    "_nt_xent_bwd_kernel",
    "_nt_xent_norm_bwd_kernel",
]
# One process on the fixed-shift path: the upper-triangle forward and its combine.
SYM_KERNEL_ORDER = [
    "_nt_xent_norm_fwd_kernel",
    "_nt_xent_sym_fwd_kernel",
    "_nt_xent_sym_combine_kernel",
    "_nt_xent_col_terms_kernel",
    "_nt_xent_bwd_kernel",
    "_nt_xent_norm_bwd_kernel",
]
WORLD, RANK = 2, 1  # the distributed cases run as rank 1 of a fake two-rank group


def symmetric(case) -> bool:
    """Whether a case takes the upper-triangle forward: one process and tau >= 0.025."""
    *_, tau, distributed = case
    return tau >= 0.025 and not distributed


def wide(case) -> bool:
    """Whether a case takes the wide backward (D > MAX_BLOCK_D): the weight pass, then its GEMM (one column super-block
    at these batches)."""
    from fastclr.kernels import nt_xent as K

    return K.wide_backward(case[4])


def kernel_order(case) -> list[str]:
    order = list(SYM_KERNEL_ORDER if symmetric(case) else KERNEL_ORDER)
    if wide(case):
        order.insert(order.index("_nt_xent_bwd_kernel") + 1, "_nt_xent_bwd_gemm_kernel")
    return order


def gemm_records(rs: list[dict]) -> tuple[dict, dict]:
    """The forward GEMM kernel's launch (either forward) and the backward's."""
    by_name = {r["kernel"]: r for r in rs}
    fwd = by_name.get("_nt_xent_sym_fwd_kernel") or by_name["_nt_xent_fwd_kernel"]
    return fwd, by_name["_nt_xent_bwd_kernel"]


def run_case(entry, dtype, precision, n, d, tau, distributed) -> None:
    """Forward and backward of one case on CPU tensors (the active driver is the stub)."""
    import torch

    import fastclr
    from fastclr.kernels import nt_xent as K

    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    z_a = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    z_b = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    # The public entry points take fp32's precision from PyTorch's switch (fastclr.nt_xent_spec.fp32_dot_precision).
    torch.backends.cuda.matmul.fp32_precision = precision
    if entry == "nt_xent":
        loss = fastclr.nt_xent(z_a, z_b, tau, impl="triton")
    elif entry == "nt_xent_gather":
        loss = fastclr.NTXentLoss(tau, impl="triton", gather_distributed=True)(z_a, z_b)
    else:
        loss = K.nt_xent_triton(z_a, z_b, tau, precision=precision)
    loss.backward()


def child(arch: int, cases: dict) -> list[dict]:
    """Run the cases under the stub driver for sm_{arch}; one record per launch."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fastclr.kernels.stub_driver import stub_driver

    # A two-rank group whose all_gather copies the local tensor: the gathered path, M = 2A columns at OFFSET = A.
    dist.init_process_group("fake", rank=RANK, world_size=WORLD, store=FakeStore())
    records = []
    for name, case in cases.items():
        with stub_driver(arch) as drv:
            run_case(*case)
        for launch in drv.launches:
            meta = launch.metadata
            records.append(
                dict(
                    case=name, kernel=launch.name, grid=launch.grid, arch=meta.target.arch,
                    constexprs={k: str(v) for k, v in launch.constexprs.items()},
                    attrs=sorted(launch.attrs), signature=dict(launch.src.signature),
                    scalars=launch.scalars, num_warps=meta.num_warps, num_stages=meta.num_stages, shared=meta.shared, hash=meta.hash,
                )
            )  # fmt: skip
    return records


def child_args(arch: int, names) -> list[str]:
    return [__file__, str(arch), *names]


def launches(arch: int, cache: str, names) -> list[dict]:
    return json_records(child_args(arch, names), cache, timeout=1200)


CI_CASES = {90: tuple(CASES), 80: SM80_CASES}


def compile_children(item) -> list[list[str]]:
    """The child an item runs (conftest starts it early)."""
    arch = param(item, "arch_launches")
    return [] if arch is None else [child_args(arch, CI_CASES[arch])]


@pytest.fixture(scope="session", params=[90, 80], ids=["sm90", "sm80"])
def arch_launches(request, triton_cache) -> tuple[int, list[dict]]:
    arch = request.param
    return arch, launches(arch, triton_cache, CI_CASES[arch])


def by_case(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["case"], []).append(r)
    return out


def test_every_entry_point_compiles_and_launches(arch_launches):
    arch, records = arch_launches
    cases = by_case(records)
    assert set(cases) == set(CI_CASES[arch])
    for name, rs in cases.items():
        assert [r["kernel"] for r in rs] == kernel_order(CASES[name]), name
        assert all(r["arch"] == arch for r in rs), name


def test_autotuner_prunes_and_keeps_the_best_guess(arch_launches):
    from fastclr.kernels import nt_xent as K

    _, records = arch_launches
    for name, rs in by_case(records).items():
        _, dtype, precision, n, d, _, _ = CASES[name]
        itemsize = 4 if dtype == "float32" else 2
        fwd, bwd = gemm_records(rs)
        fwd_kernel = "sym_fwd" if symmetric(CASES[name]) else "fwd"
        for r, kernel in ((fwd, fwd_kernel), (bwd, "bwd")):
            want = K.candidate_configs(kernel, 2 * n, d, itemsize, precision)[0]
            got = (
                int(r["constexprs"]["BLOCK_M"]),
                int(r["constexprs"]["BLOCK_N"]),
                r["num_warps"],
                r["num_stages"],
            )
            assert got == (want.block_m, want.block_n, want.num_warps, want.num_stages), (
                name,
                kernel,
                got,
            )
        if wide(CASES[name]):
            gemm = next(r for r in rs if r["kernel"] == "_nt_xent_bwd_gemm_kernel")
            want = K.candidate_configs("bwd_gemm", 2 * n, d, itemsize, precision)[0]
            assert int(gemm["constexprs"]["BLOCK_K"]) == K.GEMM_BLOCK_K[itemsize], name
            assert (int(gemm["constexprs"]["BLOCK_M"]), int(gemm["constexprs"]["BLOCK_N"])) == (
                want.block_m,
                want.block_n,
            ), name


def test_launch_specialises_on_the_arguments(arch_launches):
    from fastclr.kernels import nt_xent as K

    _, records = arch_launches
    cases = by_case(records)
    for name, rs in cases.items():
        entry, dtype, precision, n, d, tau, distributed = CASES[name]
        norm_fwd, (fwd, bwd) = rs[0], gemm_records(rs)
        # Exact fp32 loops over D in EXACT_BLOCK_D steps (FMA dots), every other launch takes the tensor-core tiling.
        exact = dtype == "float32" and precision == "ieee"
        width = d if distributed else K.padded_width(d)
        tiling = K.d_tiling(d, exact)
        assert (tiling.block_d == K.EXACT_BLOCK_D) == exact, name
        for r, blocks in (
            (fwd, ("BLOCK_D", "D_BLOCKS")),
            (bwd, ("BLOCK_D", "D_BLOCKS", "BLOCK_DO")),
        ):
            got = tuple(int(r["constexprs"][b]) for b in blocks)
            assert got == tiling[: len(blocks)], (name, r["kernel"], got, tiling)
        # The upper-triangle forward is the fixed-shift path (it has no SHIFT).
        assert (fwd["kernel"] == "_nt_xent_sym_fwd_kernel") == symmetric(CASES[name]), name
        for r in (fwd, bwd):
            assert r["constexprs"].get("SHIFT", "True") == str(tau >= 0.025), name
            want = precision if dtype == "float32" else "ieee"
            assert r["constexprs"]["INPUT_PRECISION"] == want, name
            # Pointers from torch are 16-byte aligned. One process: the GEMM kernels read z_hat's zero-padded rows,
            # whose width is a multiple of 16 at any D (tt.divisibility, vector loads also at D = 100); gathered rows
            # keep width D.
            pointers = {"zhat_ptr", "cols_ptr"} & set(
                r["signature"]
            )  # the upper-triangle forward reads z_hat alone
            assert "zhat_ptr" in pointers and pointers <= set(r["attrs"]), (name, r["attrs"])
            assert r["scalars"]["D"] == width, (name, r["scalars"])
            assert ("D" in r["attrs"]) == (width % 16 == 0), (name, r["attrs"])
        # The norm kernel writes those rows: the true D, the row stride.
        assert (norm_fwd["scalars"]["D"], norm_fwd["scalars"]["stride_zhat"]) == (d, width), name
        assert ("stride_zhat" in norm_fwd["attrs"]) == (width % 16 == 0), (name, norm_fwd["attrs"])
        # Rank 1 of 2: the columns are both ranks' rows, this rank's start at OFFSET = A.
        a = 2 * n
        want_m, want_offset = (WORLD * a, RANK * a) if distributed else (a, 0)
        for r in (fwd, bwd):
            scalars = (r["scalars"]["A"], r["scalars"]["M"], r["scalars"].get("OFFSET", 0))
            assert scalars == (a, want_m, want_offset), name


def test_grid_is_the_launch_grid_for_the_architecture(arch_launches):
    """The GEMM kernels launch ``launch_grid``'s grid for the stub's SM count (108 on sm_80, 132 on sm_90): forward (row
    blocks, splits; the upper-triangle forward: row-block pairs, splits), backward (row blocks, D chunks, splits), and
    the normalisation backward adds that many splits. At these small batches every column block is its own split (a
    pair's blocks, for the upper-triangle forward), and the gathered case has several."""
    from fastclr.kernels import nt_xent as K
    from fastclr.kernels.stub_driver import SM_COUNT

    arch, records = arch_launches
    split_counts = []
    for name, rs in by_case(records).items():
        _, dtype, precision, n, d, _, distributed = CASES[name]
        itemsize = 4 if dtype == "float32" else 2
        (fwd, bwd), norm_bwd = gemm_records(rs), rs[-1]
        a, m, w = fwd["scalars"]["A"], fwd["scalars"]["M"], fwd["scalars"]["D"]
        opts = dict(itemsize=itemsize, precision=precision, sms=SM_COUNT[arch])
        sym = symmetric(CASES[name])
        want_fwd = K.launch_grid("sym_fwd" if sym else "fwd", a, w, m, **opts)
        want_bwd = K.launch_grid("bwd", a, w, m, **opts)
        assert tuple(fwd["grid"]) == (*want_fwd, 1), (name, fwd["grid"], want_fwd)
        assert tuple(bwd["grid"]) == want_bwd, (name, bwd["grid"], want_bwd)
        assert norm_bwd["kernel"] == "_nt_xent_norm_bwd_kernel", name
        # The wide backward's GEMM sums the super-blocks into one accumulator.
        assert norm_bwd["scalars"]["n_splits"] == (1 if K.wide_backward(w) else want_bwd[-1]), name
        if K.wide_backward(w):
            gemm = next(r for r in rs if r["kernel"] == "_nt_xent_bwd_gemm_kernel")
            assert tuple(gemm["grid"]) == (*K.launch_grid("bwd_gemm", a, w, m, **opts), 1), name
        block_m, block_n = int(fwd["constexprs"]["BLOCK_M"]), int(fwd["constexprs"]["BLOCK_N"])
        if sym:
            # One pair of row blocks (2N <= BLOCK_M: the diagonal square alone), its blocks one split each.
            assert -(-a // block_m) == 1 and want_fwd == (1, -(-a // block_n)), (name, want_fwd)
        else:
            assert want_fwd[-1] == -(-m // block_n), (name, want_fwd)
        split_counts.append(want_fwd[-1])
    assert max(split_counts) > 1, split_counts


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_case_compiles_and_launches(arch, triton_cache):
    cases = by_case(launches(arch, triton_cache, ALL_CASES))
    assert set(cases) == set(ALL_CASES)
    for name, rs in cases.items():
        assert [r["kernel"] for r in rs] == kernel_order(ALL_CASES[name]), name


ALL_CASES = {**CASES, **SLOW_CASES}

if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]), {name: ALL_CASES[name] for name in sys.argv[2:]})))

"""The fused Triton NT-Xent kernel under TRITON_INTERPRET=1 (CPU tensors) against the reference loss.

Oracle: ``nt_xent_reference`` in float64 on the inputs rounded to the tested dtype. fp32 runs with precision="ieee"
(the interpreter's fp32 dot is exact, a GPU's tf32 is not). For bf16/fp16 the kernel's error against that oracle must be
at most twice the error of the reference run in the same dtype (plus a tiny absolute floor). Interpreted tl.dot costs
about 20 ns per MAC here, so sizes are chosen to keep the whole file well under two minutes on one core.
"""

from __future__ import annotations

import math
import os

# Before triton is imported: run the kernels on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from fastclr.kernels import nt_xent as K
from fastclr.losses.reference import nt_xent_reference

# (20, 300): D > MAX_BLOCK_D loops over D and chunks the backward.
SHAPES = [(1, 8), (3, 5), (64, 128), (20, 300)]
BIG_SHAPE = (257, 130)  # several row and column blocks, ragged in N and D
TAUS = [0.01, 0.05, 0.1, 0.5]  # 0.01 takes the running-max path, the others the fixed shift
HALF_DTYPES = [torch.bfloat16, torch.float16]
UPSTREAM = 1.7
FP32_LOSS = dict(atol=1e-6, rtol=1e-5)
FP32_GRAD = dict(atol=1e-5, rtol=1e-4)
HALF_FLOOR = 1e-6


def assert_close(actual, expected, atol, rtol, what):
    """allclose that says where and by how much it failed."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if not bool((err <= bound).all()):
        worst = int((err - bound).flatten().argmax())
        raise AssertionError(
            f"{what}: max |err| {err.max().item():.3e}; worst at flat index {worst}: "
            f"{actual.flatten()[worst].item():.8g} vs {expected.flatten()[worst].item():.8g} "
            f"(bound {bound.flatten()[worst].item():.3e})"
        )


def pair(n, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z_b = z_a + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z_a.to(dtype), z_b.to(dtype)


def loss_and_grads(fn, z_a, z_b, tau, upstream=UPSTREAM):
    a = z_a.detach().clone().requires_grad_()
    b = z_b.detach().clone().requires_grad_()
    loss = fn(a, b, tau)
    (loss * upstream).backward()
    return loss.detach(), a.grad, b.grad


def triton_ieee(config=None):
    return lambda a, b, tau: K.nt_xent_triton(a, b, tau, precision="ieee", config=config)


def check_fp32(n, d, tau, config=None):
    z_a, z_b = pair(n, d, torch.float32)
    got = loss_and_grads(triton_ieee(config), z_a, z_b, tau)
    want = loss_and_grads(nt_xent_reference, z_a.double(), z_b.double(), tau)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close(got[0], want[0], **FP32_LOSS, what=f"loss n={n} d={d} tau={tau}")
    assert_close(got[1], want[1], **FP32_GRAD, what=f"dz_a n={n} d={d} tau={tau}")
    assert_close(got[2], want[2], **FP32_GRAD, what=f"dz_b n={n} d={d} tau={tau}")


def check_half(n, d, tau, dtype, config=None):
    z_a, z_b = pair(n, d, dtype)
    got = loss_and_grads(lambda a, b, t: K.nt_xent_triton(a, b, t, config=config), z_a, z_b, tau)
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
def test_fp32_matches_reference(n, d, tau):
    check_fp32(n, d, tau)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,d", SHAPES)
def test_half_no_worse_than_reference_in_same_dtype(n, d, tau, dtype):
    check_half(n, d, tau, dtype)


@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_big_shape_fp32(tau):
    check_fp32(*BIG_SHAPE, tau)


@pytest.mark.parametrize("tau", [0.01, 0.5])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_big_shape_half(dtype, tau):
    check_half(*BIG_SHAPE, tau, dtype)


@pytest.mark.parametrize("config", K.list_configs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_config_gives_the_same_result(config, dtype):
    # 2N = 192: several row and column blocks for every tile size, and a ragged last block for 128.
    if dtype == torch.float32:
        check_fp32(96, 40, 0.1, config=config)
    else:
        check_half(96, 40, 0.1, dtype, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 5, 40])
def test_identical_embeddings_give_log_2n_minus_1(n, dtype):
    z = torch.randn(1, 24).expand(n, 24).to(dtype)
    for tau in (0.01, 0.5):
        loss = K.nt_xent_triton(z, z, tau, precision="ieee")
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
    dtype = kwargs.pop("dtype", torch.float32)
    z_a = torch.randn(4, 8, dtype=dtype)
    z_b = torch.randn(*kwargs.pop("shape_b", (4, 8)), dtype=dtype)
    tau = kwargs.pop("temperature", 0.5)
    with pytest.raises(exc, match=match):
        K.nt_xent_triton(z_a, z_b, tau, **kwargs)


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
    # 2N = 514 pads to 576 rows (64-row blocks) and 544 columns (32-column blocks); D = 130 pads to one 256 block.
    macs = K.executed_macs(514, 130, config="BM64_BN32_W4_S2")
    assert macs["fwd"] == 576 * 544 * 256
    assert macs["bwd"] == 2 * 576 * 544 * 256
    assert macs["ideal"] == 3 * 514 * 514 * 130
    # D = 2048: the forward loops over D, the backward recomputes S for each of its 16 output chunks of 128.
    wide = K.executed_macs(4096, 2048, config="BM64_BN64_W4_S3")
    assert wide["fwd"] == 4096 * 4096 * 2048
    assert wide["bwd"] == 16 * 4096 * 4096 * 2048 + 4096 * 4096 * 2048


def test_candidates_cover_every_d_and_small_batches():
    for d in (1, 16, 100, 128, 129, 256, 257, 2048):
        for kernel in K.KERNELS:
            for a in (2, 64, 200, 1 << 20):
                for itemsize in (2, 4):
                    cands = K.candidate_configs(kernel, a, d, itemsize)
                    assert cands, (kernel, a, d, itemsize)
                    assert all(c.name in K.CONFIGS for c in cands)
    with pytest.raises(ValueError, match="itemsize"):
        K.candidate_configs("fwd", 64, 128, itemsize=8)
    # Tiny batches get the smallest listed tiles, large ones the first (preferred) entry.
    assert K.candidate_configs("fwd", 2, 128)[0].block_m == 64
    assert K.candidate_configs("fwd", 1 << 20, 128)[0].name == "BM128_BN64_W8_S3"

"""NT-Xent oracle chain: NumPy float64 loop (SimCLR Algorithm 1) -> reference -> tiled torch path; API checks."""

import math

import numpy as np
import pytest
import torch

import fastclr
from fastclr.losses.reference import nt_xent_reference
from fastclr.losses.tiled import NTXentTiledFunction, nt_xent_tiled


def numpy_oracle(z_a: np.ndarray, z_b: np.ndarray, tau: float) -> float:
    """SimCLR Algorithm 1, written with explicit loops in float64."""
    n = z_a.shape[0]
    z = np.concatenate([z_a, z_b]).astype(np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    def sim(i, j):
        return float(z[i] @ z[j])

    def ell(i, j):
        denom = sum(math.exp(sim(i, k) / tau) for k in range(2 * n) if k != i)
        return -math.log(math.exp(sim(i, j) / tau) / denom)

    return sum(ell(k, k + n) + ell(k + n, k) for k in range(n)) / (2 * n)


def assert_close(actual, expected, atol, rtol, what=""):
    """allclose that says where and by how much."""
    actual, expected = actual.detach().double(), expected.detach().double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0]) if err.ndim else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"max abs err {err.max().item():.3e}; first at {idx}: got {actual[idx].item():.8g}, "
            f"expected {expected[idx].item():.8g}"
        )


def pair(n, d, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    b = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    return a.requires_grad_(), b.requires_grad_()


def loss_and_grads(fn, a, b, upstream=1.0):
    loss = fn(a, b)
    ga, gb = torch.autograd.grad(loss * upstream, [a, b])
    return loss.detach(), ga, gb


@pytest.mark.parametrize("n,d", [(1, 3), (3, 5), (8, 16)])
@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0])
def test_reference_matches_numpy_oracle(n, d, tau):
    a, b = pair(n, d, torch.float64)
    expected = numpy_oracle(a.detach().numpy(), b.detach().numpy(), tau)
    got = nt_xent_reference(a, b, tau).item()
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n,d", [(1, 1), (1, 8), (3, 3), (3, 5), (64, 128), (257, 130), (40, 1)])
@pytest.mark.parametrize("tau", [0.01, 0.05, 0.5])
def test_torch_matches_reference_fp32(n, d, tau):
    a, b = pair(n, d)
    ref = loss_and_grads(lambda x, y: nt_xent_reference(x, y, tau), a, b, upstream=1.7)
    got = loss_and_grads(lambda x, y: fastclr.nt_xent(x, y, tau, impl="torch"), a, b, upstream=1.7)
    assert_close(got[0], ref[0], 1e-5, 1e-5, "loss")
    # Gradients at 1e-5 of their scale, judged against float64 truth. fp32 rounding of S/tau (relative eps/tau) reaches the
    # gradient through its 1/(2N tau) prefactor; where that noise dominates (tiny tau, N = 1, D = 1 where the true gradient
    # is 0) the tiled path must stay within it or within twice the reference's own fp32 error.
    noise = 4 * torch.finfo(torch.float32).eps / (2 * n * tau**2)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    exact = loss_and_grads(lambda x, y: nt_xent_reference(x, y, tau), a64, b64, upstream=1.7)
    scale = max(exact[1].abs().max().item(), exact[2].abs().max().item())
    for g, r, e, what in zip(got[1:], ref[1:], exact[1:], ("grad z_a", "grad z_b"), strict=True):
        err_fast = (g.double() - e).abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        assert err_fast <= max(2 * err_ref, 1e-5 * scale, noise), (
            f"{what}: tiled err {err_fast:.3e}, reference err {err_ref:.3e}, scale {scale:.3e}"
        )


@pytest.mark.parametrize("block_rows,block_cols", [(1, 1), (7, 5), (64, 16), (1000, 1000), (5, 74)])
@pytest.mark.parametrize("tau", [0.2, 0.01])
def test_torch_tile_size_does_not_change_result(block_rows, block_cols, tau):
    a, b = pair(37, 19, torch.float64)
    ref = loss_and_grads(lambda x, y: nt_xent_reference(x, y, tau), a, b)
    got = loss_and_grads(
        lambda x, y: nt_xent_tiled(x, y, tau, block_rows=block_rows, block_cols=block_cols), a, b
    )
    for g, r, what in zip(got, ref, ("loss", "grad z_a", "grad z_b"), strict=True):
        assert_close(g, r, 1e-12, 1e-10, what)


@pytest.mark.parametrize("tau", [0.3, 0.01])  # shifted-exp path and max-subtracted path
def test_gradcheck_float64(tau):
    a, b = pair(5, 7, torch.float64, seed=3)
    assert torch.autograd.gradcheck(
        lambda x, y: NTXentTiledFunction.apply(x, y, tau, 2, 3, None), (a, b)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 1.0])
def test_half_precision_no_worse_than_reference_in_same_dtype(dtype, tau):
    a64, b64 = pair(50, 64, torch.float64, seed=1)
    exact = loss_and_grads(lambda x, y: nt_xent_reference(x, y, tau), a64, b64)
    a, b = (t.detach().to(dtype).requires_grad_() for t in (a64, b64))
    ref = loss_and_grads(lambda x, y: nt_xent_reference(x, y, tau), a, b)
    got = loss_and_grads(lambda x, y: fastclr.nt_xent(x, y, tau, impl="torch"), a, b)
    for g, r, e, what in zip(got, ref, exact, ("loss", "grad z_a", "grad z_b"), strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all(), what
        err_fast = (g.double() - e).abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        floor = 1e-3 * max(e.abs().max().item(), 1e-6)
        assert err_fast <= 2 * err_ref + floor, (
            f"{what}: fast err {err_fast:.3e} vs reference err {err_ref:.3e}"
        )


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("n", [1, 3, 100])
def test_identical_embeddings_give_log_2n_minus_1(impl, n):
    z = torch.randn(1, 16).expand(n, 16)
    loss = fastclr.nt_xent(z, z.clone(), 0.5, impl=impl)
    assert loss.item() == pytest.approx(math.log(2 * n - 1), abs=1e-6)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_symmetric_in_views_and_invariant_to_scale(impl):
    a, b = pair(20, 9, torch.float64)
    ab = fastclr.nt_xent(a, b, 0.3, impl=impl)
    ba = fastclr.nt_xent(b, a, 0.3, impl=impl)
    scaled = fastclr.nt_xent(a * 1e3, b * 1e-3, 0.3, impl=impl)
    assert ab.item() == pytest.approx(ba.item(), rel=1e-12)
    assert ab.item() == pytest.approx(scaled.item(), rel=1e-12)


def test_non_contiguous_inputs():
    base_a, base_b = pair(30, 40)
    a, b = base_a[:, ::2], base_b.T.contiguous().T[:, 1::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    ref = torch.autograd.grad(nt_xent_reference(a, b, 0.5), [base_a, base_b])
    got = torch.autograd.grad(fastclr.nt_xent(a, b, 0.5, impl="torch"), [base_a, base_b])
    for g, r in zip(got, ref, strict=True):
        assert_close(g, r, 1e-6, 1e-4, "grad through a strided view")


def test_zero_rows_match_reference():
    a, b = pair(6, 8, torch.float64)
    with torch.no_grad():
        a[2] = 0.0
        b[4] = 0.0
    ref = loss_and_grads(lambda x, y: nt_xent_reference(x, y, 0.5), a, b)
    got = loss_and_grads(lambda x, y: fastclr.nt_xent(x, y, 0.5, impl="torch"), a, b)
    for g, r, what in zip(got, ref, ("loss", "grad z_a", "grad z_b"), strict=True):
        assert torch.isfinite(g).all()
        assert_close(g, r, 1e-9, 1e-9, what)


def test_matches_lightly():
    lightly_loss = pytest.importorskip("lightly.loss").NTXentLoss
    a, b = pair(33, 24)
    for tau in (0.1, 0.5):
        expected = lightly_loss(temperature=tau)(a, b)
        got = fastclr.NTXentLoss(temperature=tau)(a, b)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_module_and_auto_impl():
    a, b = pair(10, 4)
    crit = fastclr.NTXentLoss(temperature=0.2)
    assert "temperature=0.2" in repr(crit)
    assert crit(a, b).item() == pytest.approx(nt_xent_reference(a, b, 0.2).item(), rel=1e-6)
    assert fastclr.losses.nt_xent.resolve_impl("auto", torch.device("cpu")) == "torch"


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import sys, fastclr; print('triton' in sys.modules, 'nvidia.dali' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize(
    "a,b,tau,exc,match",
    [
        (torch.randn(4), torch.randn(4), 0.5, ValueError, "2-D"),
        (torch.randn(4, 3), torch.randn(5, 3), 0.5, ValueError, "same shape"),
        (torch.randn(0, 3), torch.randn(0, 3), 0.5, ValueError, "N = 0"),
        (torch.randn(4, 3), torch.randn(4, 3), 0.0, ValueError, "temperature"),
        (torch.randn(4, 3), torch.randn(4, 3), -1.0, ValueError, "temperature"),
        (torch.randn(4, 3), torch.randn(4, 3), float("nan"), ValueError, "temperature"),
        (torch.randn(4, 3), torch.randn(4, 3), float("inf"), ValueError, "temperature"),
        (torch.randn(4, 3), torch.randn(4, 3).double(), 0.5, TypeError, "dtype"),
        (
            torch.ones(4, 3, dtype=torch.int64),
            torch.ones(4, 3, dtype=torch.int64),
            0.5,
            TypeError,
            "floating",
        ),
        (torch.randn(4, 3), torch.randn(4, 3, device="meta"), 0.5, ValueError, "device"),
        ([[1.0]], torch.randn(1, 1), 0.5, TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_bad_input_raises(a, b, tau, exc, match, impl):
    with pytest.raises(exc, match=match):
        fastclr.nt_xent(a, b, tau, impl=impl)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="impl"):
        fastclr.NTXentLoss(impl="cuda")
    with pytest.raises(ValueError, match="temperature"):
        fastclr.NTXentLoss(temperature=0)
    with pytest.raises(TypeError, match="temperature"):
        fastclr.NTXentLoss(temperature="0.5")


def test_fp32_precision_is_a_constant_to_torch_compile():
    """fp32_dot_precision reads a C getter dynamo cannot trace; it carries the mark torch.compiler's own
    assume_constant_result sets, so a fullgraph trace takes its value as a constant."""
    from fastclr.nt_xent_spec import fp32_dot_precision

    def probe():
        return None

    assert torch.compiler.assume_constant_result(probe) is probe
    marks = {k: v for k, v in vars(probe).items()}
    assert marks == {"_dynamo_marked_constant": True}, marks
    assert all(getattr(fp32_dot_precision, k) == v for k, v in marks.items())

    def scaled(x):
        return x * (2.0 if fp32_dot_precision() == "tf32" else 3.0)

    out = torch.compile(scaled, fullgraph=True, backend="eager")(torch.ones(2))
    assert torch.equal(out, torch.full((2,), 3.0))


@pytest.mark.parametrize("tau,expected", [(0.2, "upper"), (0.01, "full")])
def test_torch_one_process_computes_only_the_upper_triangle(monkeypatch, tau, expected):
    """One process with the fixed shift: forward and backward each compute the upper-triangle tiles of S only (half
    the logits of the row schedule, which a small tau still takes)."""
    from fastclr.losses import tiled

    computed = []
    real = tiled._logits_tile

    def counting(buf, rows, cols, inv_t, shift):
        computed.append(rows.shape[0] * cols.shape[0])
        return real(buf, rows, cols, inv_t, shift)

    monkeypatch.setattr(tiled, "_logits_tile", counting)
    n, block = 64, 16
    a, b = pair(n, 8, torch.float32)
    loss_and_grads(lambda x, y: nt_xent_tiled(x, y, tau, block_rows=block, block_cols=block), a, b)
    a2, tiles = (2 * n) ** 2, 2 * n // block
    upper = tiles * (tiles + 1) // 2 * block * block  # the diagonal tiles are computed whole
    assert sum(computed) == (2 * upper if expected == "upper" else 2 * a2), (sum(computed), a2)

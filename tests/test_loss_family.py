"""The contrastive-loss family: NT-Xent with a memory bank, DCL, DCLW, SupCon.

Oracle chain: NumPy float64 loops written from the papers -> the materialised references -> the tiled torch path, in
values and gradients; lightly 1.6.0 (NTXentLoss with a bank over several steps, DCLLoss, DCLWLoss); SupCon with
distinct labels is NT-Xent; gradcheck in float64; hypothesis fuzzing over labels, N, D, tau and dtypes; DDP over gloo
(W = 2 and 3) against the single-process full-batch gradients; bad input.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fastclr
from fastclr.losses import tiled
from fastclr.losses.reference import (
    dcl_reference,
    nt_xent_bank_reference,
    supcon_reference,
)
from fastclr.testing.distributed import spawn_world

LOSSES = ("dcl", "dclw", "dcl-weighted", "supcon", "bank")
IMPLS = ("reference", "torch")
SIGMA = 0.5


# ---------------------------------------------------------------------------------------------------------------------
# NumPy float64 oracles, straight from the papers' formulas


def unit(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def numpy_dcl(z_a, z_b, tau, weights=None):
    """Yeh et al. 2022, eq. 6, summed over both views: -w_i <z_i, z_pos>/tau + log sum_{k != i, pos} exp(<z_i, z_k>/tau)."""
    n = len(z_a)
    z = unit(np.concatenate([z_a, z_b]))
    w = np.ones(2 * n) if weights is None else weights
    total = 0.0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        negatives = sum(math.exp(z[i] @ z[k] / tau) for k in range(2 * n) if k not in (i, p))
        total += -w[i] * (z[i] @ z[p]) / tau + math.log(negatives)
    return total / (2 * n)


def numpy_dclw_weights(z_a, z_b, sigma):
    """The paper's negative von Mises-Fisher weights w_i = 2 - exp(<u_i, v_i>/sigma) / E_j[exp(<u_j, v_j>/sigma)]."""
    a, b = unit(z_a), unit(z_b)
    e = np.array([math.exp(a[i] @ b[i] / sigma) for i in range(len(a))])
    w = 2 - e / e.mean()
    return np.concatenate([w, w])


def numpy_supcon(z_a, z_b, labels, tau):
    """Khosla et al. 2020, L_out: -1/|P(i)| sum_{p in P(i)} log(exp(s_ip/tau) / sum_{a != i} exp(s_ia/tau)), mean over i."""
    n = len(z_a)
    z = unit(np.concatenate([z_a, z_b]))
    y = np.concatenate([labels, labels])
    total = 0.0
    for i in range(2 * n):
        denominator = sum(math.exp(z[i] @ z[a] / tau) for a in range(2 * n) if a != i)
        positives = [p for p in range(2 * n) if p != i and y[p] == y[i]]
        total += -sum(math.log(math.exp(z[i] @ z[p] / tau) / denominator) for p in positives) / len(
            positives
        )
    return total / (2 * n)


def numpy_bank(z_a, z_b, bank, tau):
    """InfoNCE of MoCo: anchor a_i, positive b_i, negatives the bank rows q_k."""
    a, b = unit(z_a), unit(z_b)
    total = 0.0
    for i in range(len(a)):
        pos = math.exp(a[i] @ b[i] / tau)
        total += -math.log(pos / (pos + sum(math.exp(a[i] @ q / tau) for q in bank)))
    return total / len(a)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def assert_close(actual, expected, atol, rtol, what=""):
    """allclose that says where and by how much."""
    actual, expected = actual.detach().double(), expected.detach().double()
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0]) if err.ndim else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"max abs err {err.max().item():.3e}; first at {idx}: got {actual[idx].item():.10g}, "
            f"expected {expected[idx].item():.10g}"
        )


def pair(n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = a + torch.randn(n, d, generator=g, dtype=torch.float64)
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


def some_labels(n, classes, seed=0):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def some_bank(k, d, seed=0):
    return F.normalize(
        torch.randn(k, d, generator=torch.Generator().manual_seed(seed + 100)), dim=1
    )


def squared_distance(u, v):
    """A differentiable custom weight function (lightly's docstring example)."""
    return ((u - v) ** 2).sum(dim=1)


def loss_fn(loss, impl, tau, labels=None, bank=None):
    """(z_a, z_b) -> 0-d loss of ``loss`` through its public functional form."""
    if loss == "dcl":
        return lambda a, b: fastclr.dcl(a, b, tau, impl=impl)
    if loss == "dclw":
        return lambda a, b: fastclr.dclw(a, b, tau, SIGMA, impl=impl)
    if loss == "dcl-weighted":
        return lambda a, b: fastclr.dcl(a, b, tau, weight_fn=squared_distance, impl=impl)
    if loss == "supcon":
        return lambda a, b: fastclr.supcon(a, b, labels, tau, impl=impl)
    return lambda a, b: fastclr.nt_xent_bank(a, b, bank.to(a.dtype), tau, impl=impl)


def loss_and_grads(fn, a, b, upstream=1.7):
    loss = fn(a, b)
    ga, gb = torch.autograd.grad(loss * upstream, [a, b])
    return loss.detach(), ga, gb


def small_tiles(monkeypatch, blocks):
    """Tile sizes ``blocks`` (rows, cols) instead of the defaults: many tiles, ragged edges."""
    if blocks is not None:
        monkeypatch.setattr(tiled, "DEFAULT_BLOCK_ROWS", blocks[0])
        monkeypatch.setattr(tiled, "DEFAULT_BLOCK_COLS", blocks[1])


# ---------------------------------------------------------------------------------------------------------------------
# Oracle chain


@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("n,d", [(2, 3), (5, 4)])
def test_references_match_numpy_oracles(n, d, tau):
    a, b = pair(n, d)
    an, bn = a.detach().numpy(), b.detach().numpy()
    labels = some_labels(n, 2)
    bank = some_bank(7, d).double()
    ref = lambda f: pytest.approx(f, rel=1e-12, abs=1e-12)  # noqa: E731
    assert dcl_reference(a, b, tau).item() == ref(numpy_dcl(an, bn, tau))
    dclw = fastclr.dclw(a, b, tau, SIGMA, impl="reference").item()
    assert dclw == ref(numpy_dcl(an, bn, tau, numpy_dclw_weights(an, bn, SIGMA)))
    assert supcon_reference(a, b, labels, tau).item() == ref(
        numpy_supcon(an, bn, labels.numpy(), tau)
    )
    assert nt_xent_bank_reference(a, b, bank, tau).item() == ref(
        numpy_bank(an, bn, bank.numpy(), tau)
    )


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("tau", [0.3, 0.01])  # the fixed-shift path and the running-max path
@pytest.mark.parametrize("n,d,blocks", [(2, 3, None), (21, 19, None), (21, 19, (8, 6))])
def test_torch_matches_reference_float64(loss, tau, n, d, blocks, monkeypatch):
    small_tiles(monkeypatch, blocks)
    a, b = pair(n, d, seed=n)
    labels, bank = some_labels(n, 3, seed=n), some_bank(23, d, seed=n).double()
    ref = loss_and_grads(loss_fn(loss, "reference", tau, labels, bank), a, b)
    got = loss_and_grads(loss_fn(loss, "torch", tau, labels, bank), a, b)
    for g, r, what in zip(got, ref, ("loss", "grad z_a", "grad z_b"), strict=True):
        assert g.dtype == torch.float64
        assert_close(g, r, 1e-12, 1e-10, f"{loss} {what}")


@pytest.mark.parametrize("loss", LOSSES)
def test_fp32_and_half_no_worse_than_reference_in_same_dtype(loss):
    a64, b64 = pair(40, 32, seed=1)
    labels, bank = some_labels(40, 4), some_bank(50, 32)
    tau = 0.1
    exact = loss_and_grads(loss_fn(loss, "reference", tau, labels, bank.double()), a64, b64)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (t.detach().to(dtype).requires_grad_() for t in (a64, b64))
        ref = loss_and_grads(loss_fn(loss, "reference", tau, labels, bank), a, b)
        got = loss_and_grads(loss_fn(loss, "torch", tau, labels, bank), a, b)
        for g, r, e, what in zip(got, ref, exact, ("loss", "grad z_a", "grad z_b"), strict=True):
            assert g.dtype == dtype and torch.isfinite(g).all(), what
            err_fast = (g.double() - e).abs().max().item()
            err_ref = (r.double() - e).abs().max().item()
            floor = 1e-5 * max(e.abs().max().item(), 1e-6)
            assert err_fast <= 2 * err_ref + floor, (
                f"{loss} {dtype} {what}: {err_fast:.3e} vs {err_ref:.3e}"
            )


@pytest.mark.parametrize("impl", IMPLS)
def test_supcon_with_distinct_labels_is_nt_xent(impl):
    a, b = pair(23, 9)
    distinct = torch.randperm(23, generator=torch.Generator().manual_seed(0)) * 7 - 50
    got = loss_and_grads(lambda x, y: fastclr.supcon(x, y, distinct, 0.2, impl=impl), a, b)
    want = loss_and_grads(lambda x, y: fastclr.nt_xent(x, y, 0.2, impl=impl), a, b)
    for g, w, what in zip(got, want, ("loss", "grad z_a", "grad z_b"), strict=True):
        assert_close(g, w, 1e-12, 1e-10, what)


@pytest.mark.parametrize("tau", [0.2, 1e-4])
def test_supcon_with_distinct_labels_is_the_nt_xent_kernel_bitwise(tau):
    """Through the kernel, with distinct labels (also at a tiny tau, where the class sums' rounding would show), SupCon
    is NT-Xent's kernel exactly: every row's only positive is its pair, whose term is exactly 0."""
    a, b = pair(23, 9, dtype=torch.float32)
    distinct = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    got = loss_and_grads(lambda x, y: fastclr.supcon(x, y, distinct, tau, impl="triton"), a, b)
    want = loss_and_grads(lambda x, y: fastclr.nt_xent(x, y, tau, impl="triton"), a, b)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_supcon_with_one_label_averages_over_every_other_view(impl):
    """All labels equal: P(i) is every k != i, so L_i = lse_i - mean_{k != i} s_ik / tau."""
    a, b = pair(6, 5)
    z = F.normalize(torch.cat([a, b]).detach(), dim=1)
    logits = z @ z.T / 0.4
    off = ~torch.eye(12, dtype=torch.bool)
    expected = (
        logits.masked_fill(~off, -math.inf).logsumexp(1) - (logits * off).sum(1) / 11
    ).mean()
    got = fastclr.supcon(a, b, torch.zeros(6, dtype=torch.int32), 0.4, impl=impl)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("tau", [0.3, 0.01])
@pytest.mark.parametrize(
    "loss", [loss for loss in LOSSES if loss != "dclw"]
)  # DCLW's weights are constants
def test_gradcheck_float64(loss, tau, monkeypatch):
    small_tiles(monkeypatch, (3, 4))
    a, b = pair(3, 4, seed=3)
    labels, bank = torch.tensor([0, 1, 0]), some_bank(5, 4).double()
    assert torch.autograd.gradcheck(loss_fn(loss, "torch", tau, labels, bank), (a, b))


# The fused kernel under the interpreter (fp32, exact dots: PyTorch's default fp32 matmul precision), against the
# float64 reference: DCL's denominator without the positive in the upper-triangle forward (tau >= 0.025), the row
# blocks x column splits forward (tau < 0.025) and the backward; DCLW's and a custom weight_fn's term in torch;
# SupCon's label positives from per-class sums in torch (n = 1: the pair alone; labels from 3 classes otherwise).
@pytest.mark.parametrize("loss", ["dcl", "dclw", "dcl-weighted", "supcon", "bank"])
@pytest.mark.parametrize("tau", [0.3, 0.01])
@pytest.mark.parametrize("n,d", [(2, 3), (37, 19)])
def test_triton_family_matches_reference(loss, tau, n, d):
    """Within fp32 rounding of the float64 reference: no more than twice the error of the reference run in fp32 (at
    tau = 0.01 the weights' term s/tau scales the rounding of s by 100), plus a floor of 2e-6 of the largest entry.
    SupCon takes its log-sum-exp's gradient from the NT-Xent kernel, whose own error on the same rows (the rounding of
    S log2(e)/tau in its exp2, ~1e-7/tau relative) it may have too: the label terms add none."""
    a, b = pair(n, d, seed=n)
    labels, bank = some_labels(n, 3, seed=n), some_bank(23, d, seed=n)
    exact = loss_and_grads(loss_fn(loss, "reference", tau, labels, bank.double()), a, b)
    a32, b32 = (t.detach().float().requires_grad_() for t in (a, b))
    ref = loss_and_grads(loss_fn(loss, "reference", tau, labels, bank), a32, b32)
    got = loss_and_grads(loss_fn(loss, "triton", tau, labels, bank), a32, b32)
    kernel_err = [0.0] * 3
    if loss == "supcon":

        def ntxent(impl):
            return lambda u, v: fastclr.nt_xent(u, v, tau, impl=impl)

        nt_exact = loss_and_grads(ntxent("reference"), a, b)
        nt_got = loss_and_grads(ntxent("triton"), a32, b32)
        kernel_err = [
            (x.double() - e).abs().max().item() for x, e in zip(nt_got, nt_exact, strict=True)
        ]
    for g, r, e, k_err, what in zip(
        got, ref, exact, kernel_err, ("loss", "grad z_a", "grad z_b"), strict=True
    ):
        assert g.dtype == torch.float32
        err_fast, err_ref = ((x.double() - e).abs().max().item() for x in (g, r))
        err_ref = max(err_ref, k_err)
        floor = 2e-6 * max(e.abs().max().item(), 1.0)
        assert err_fast <= 2 * err_ref + floor, (
            f"{loss} tau={tau} {what}: {err_fast:.3e} vs {err_ref:.3e}"
        )


@pytest.mark.parametrize("loss", ["dclw", "supcon", "bank"])
def test_triton_family_in_half_precision_and_the_config_check(loss):
    """bf16 through the kernel: no worse than the reference in bf16; and the trainer accepts --loss-impl triton for
    the loss."""
    from fastclr.train.config import PretrainConfig

    a64, b64 = pair(40, 32, seed=1)
    labels, bank = some_labels(40, 5, seed=1), some_bank(70, 32, seed=1)
    exact = loss_and_grads(loss_fn(loss, "reference", 0.1, labels, bank.double()), a64, b64)
    a, b = (t.detach().bfloat16().requires_grad_() for t in (a64, b64))
    ref = loss_and_grads(loss_fn(loss, "reference", 0.1, labels, bank), a, b)
    got = loss_and_grads(loss_fn(loss, "triton", 0.1, labels, bank), a, b)
    for g, r, e, what in zip(got, ref, exact, ("loss", "grad z_a", "grad z_b"), strict=True):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all(), what
        err_fast, err_ref = ((x.double() - e).abs().max().item() for x in (g, r))
        assert err_fast <= 2 * err_ref + 1e-5 * e.abs().max().item(), (what, err_fast, err_ref)
    settings = {"loss": "ntxent", "memory_bank_size": 64} if loss == "bank" else {"loss": loss}
    PretrainConfig.from_dict({"loss": {**settings, "loss_impl": "triton"}}).validate()


def test_identical_embeddings():
    """Every similarity is 1: DCL gives log(2N - 2), SupCon log(2N - 1), the bank loss log(1 + K)."""
    z = torch.randn(1, 8, dtype=torch.float64).expand(5, 8)
    tau = 0.5
    for impl in IMPLS:
        assert fastclr.dcl(z, z.clone(), tau, impl=impl).item() == pytest.approx(math.log(8))
        labels = torch.tensor([0, 1, 0, 1, 2])
        assert fastclr.supcon(z, z.clone(), labels, tau, impl=impl).item() == pytest.approx(
            math.log(9)
        )
        bank = F.normalize(z[:3], dim=1)
        assert fastclr.nt_xent_bank(z, z.clone(), bank, tau, impl=impl).item() == pytest.approx(
            math.log(4)
        )


# ---------------------------------------------------------------------------------------------------------------------
# lightly 1.6.0


def lightly_grads(module, a, b):
    a, b = (t.detach().clone().requires_grad_() for t in (a, b))
    loss = module(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("impl", [*IMPLS, "triton"])
@pytest.mark.parametrize("loss", ["dcl", "dclw", "dcl-weighted"])
def test_dcl_matches_lightly(loss, impl):
    lightly_loss = pytest.importorskip("lightly.loss")
    a, b = pair(33, 24, torch.float32)
    for tau in (0.1, 0.5):
        if loss == "dclw":
            theirs, ours = (
                lightly_loss.DCLWLoss(tau, sigma=0.3),
                fastclr.DCLWLoss(tau, sigma=0.3, impl=impl),
            )
        else:
            weight_fn = squared_distance if loss == "dcl-weighted" else None
            theirs = lightly_loss.DCLLoss(tau, weight_fn=weight_fn)
            ours = fastclr.DCLLoss(tau, weight_fn=weight_fn, impl=impl)
        with (
            warnings.catch_warnings()
        ):  # lightly's DCLW copies its weights with torch.tensor(), which warns
            warnings.simplefilter("ignore", UserWarning)
            want = lightly_grads(theirs, a, b)
        got = lightly_grads(ours, a, b)
        for g, w, what in zip(got, want, ("loss", "grad z_a", "grad z_b"), strict=True):
            assert_close(
                g, w, 1e-6 * max(w.abs().max().item(), 1.0), 1e-5, f"{loss} tau={tau} {what}"
            )


@pytest.mark.parametrize("impl", [*IMPLS, "triton"])
def test_memory_bank_matches_lightly_step_after_step(impl):
    """Same seed, same bank; then training steps (one that wraps the bank and drops the rest of its batch, one larger
    than the bank) and evaluation steps that must leave it alone: equal losses, gradients, bank and pointer."""
    lightly_loss = pytest.importorskip("lightly.loss")
    k, d, tau = 16, 12, 0.2
    torch.manual_seed(7)
    theirs = lightly_loss.NTXentLoss(tau, memory_bank_size=(k, d))
    torch.manual_seed(7)
    ours = fastclr.NTXentLoss(tau, memory_bank_size=(k, d), impl=impl)
    assert torch.equal(ours.memory_bank.bank, theirs.memory_bank.bank)
    assert "memory_bank.bank" not in ours.state_dict()  # non-persistent, as lightly's
    steps = [
        (6, "train"),
        (6, "train"),
        (5, "no_grad"),
        (9, "train"),
        (3, "detached"),
        (20, "train"),
        (4, "train"),
    ]
    for step, (n, mode) in enumerate(steps):
        a, b = pair(n, d, torch.float32, seed=step)
        if mode == "train":
            want, got = lightly_grads(theirs, a, b), lightly_grads(ours, a, b)
        elif mode == "no_grad":  # inputs that require a gradient, evaluated under no_grad
            with torch.no_grad():
                want, got = (theirs(a, b),), (ours(a, b),)
        else:
            a, b = a.detach(), b.detach()
            want, got = (theirs(a, b),), (ours(a, b),)
        for g, w, what in zip(got, want, ("loss", "grad z_a", "grad z_b"), strict=False):
            assert_close(
                g, w, 1e-6 * max(w.abs().max().item(), 1.0), 1e-5, f"step {step} ({mode}) {what}"
            )
        assert_close(
            ours.memory_bank.bank, theirs.memory_bank.bank, 1e-6, 0.0, f"bank after step {step}"
        )
        assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr), (
            f"pointer after step {step}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Hypothesis fuzzing against the float64 reference


ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The losses the fused kernel covers, and its dtypes.
TRITON_LOSSES = ("dcl", "dclw", "supcon", "bank")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@st.composite
def family_inputs(draw, losses=("dcl", "dclw", "supcon", "bank"), dtypes=ALL_DTYPES):
    loss = draw(st.sampled_from(losses))
    n = draw(st.integers(2 if loss.startswith("dcl") else 1, 40))
    d = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(dtypes))
    tau = draw(
        st.one_of(
            st.sampled_from([0.01, 0.05, 0.5, 10.0]), st.floats(-2.0, 1.0).map(lambda e: 10.0**e)
        )
    )
    mode = draw(st.sampled_from(("equal", "distinct", "random")))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * n, d, generator=g, dtype=torch.float64) * 10.0 ** draw(st.floats(-2.0, 2.0))
    labels = {
        "equal": torch.full((n,), 3),
        "distinct": torch.randperm(n, generator=g),
        "random": torch.randint(0, draw(st.integers(1, 5)), (n,), generator=g),
    }[mode]
    bank = F.normalize(
        torch.randn(draw(st.integers(1, 50)), d, generator=g, dtype=torch.float64), dim=1
    )
    z = z.to(dtype)
    desc = f"{loss} N={n} D={d} {dtype} tau={tau:.4g} labels={mode} seed={seed}"
    return loss, z[:n], z[n:], tau, labels, bank.to(dtype), desc


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(family_inputs())
def test_fuzz_torch_against_float64_reference(case):
    check_against_float64_reference("torch", case)


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(family_inputs(TRITON_LOSSES, TRITON_DTYPES))
def test_fuzz_triton_against_float64_reference(case):
    """The fused kernel under the interpreter, within the same bounds as the tiled path."""
    check_against_float64_reference("triton", case)


def check_against_float64_reference(impl, case):
    """The loss and gradients of ``impl`` within twice the error of the reference in the inputs' dtype, plus the
    logits' rounding carried to the outputs."""
    loss, z_a, z_b, tau, labels, bank, desc = case
    acc = torch.float64 if z_a.dtype == torch.float64 else torch.float32
    u_acc, u_out = torch.finfo(acc).eps / 2, torch.finfo(z_a.dtype).eps / 2

    def run(impl, a, b, bank_):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        return loss_and_grads(loss_fn(loss, impl, tau, labels, bank_), a, b, upstream=1.0)

    exact = run("reference", z_a.double(), z_b.double(), bank.double())
    ref = run("reference", z_a, z_b, bank)
    got = run(impl, z_a, z_b, bank)
    for g, r, e, what in zip(got, ref, exact, ("loss", "grad z_a", "grad z_b"), strict=True):
        assert g.dtype == z_a.dtype and torch.isfinite(g).all(), f"{what} not finite; {desc}"
        scale = e.abs().max().item()
        err_fast = (g.double() - e).abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        norms = torch.cat([z_a, z_b]).double().norm(dim=1).min().item()
        # the logits' rounding u (sqrt(D) + 2)/tau reaches the gradient through 1/(tau ||z||)
        noise = 64 * u_acc * (math.sqrt(z_a.shape[1]) + 2) * (1 / tau + 1)
        floor = (
            noise * (1.0 if what == "loss" else 1 / (tau * max(norms, 1e-12))) + 4 * u_out * scale
        )
        allowed = floor + (2 * err_ref if math.isfinite(err_ref) else 0.0)
        assert err_fast <= allowed, (
            f"{what}: err {err_fast:.3e} > {allowed:.3e} (reference {err_ref:.3e}); {desc}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# API, impl choice and bad input


def test_auto_is_the_tiled_path_for_cpu_tensors():
    """ "auto" is the tiled path for CPU tensors (the kernels for CUDA ones): bitwise the "torch" result."""
    a, b = pair(5, 4)
    labels, bank = some_labels(5, 2), some_bank(3, 4).double()
    for loss in ("dcl", "dclw", "supcon", "bank"):
        auto = loss_and_grads(loss_fn(loss, "auto", 0.2, labels, bank), a, b)
        tiled_ = loss_and_grads(loss_fn(loss, "torch", 0.2, labels, bank), a, b)
        assert all(torch.equal(x, y) for x, y in zip(auto, tiled_, strict=True)), loss


def test_auto_picks_the_kernels_where_they_run(monkeypatch):
    """With the CPU counted as a kernel device (the interpreter runs the kernels), "auto" is the triton path for fp32,
    bf16 and fp16 rows of every loss, bitwise; fp64 rows, and a bank wider than KERNEL_MAX_D, take the tiled path."""
    from fastclr.losses import backends, memory_bank

    monkeypatch.setattr(backends, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))

    def tiled_path_taken(*args, **kwargs):
        raise AssertionError("the tiled path")

    labels, bank = some_labels(5, 2), some_bank(3, 4)
    for loss in ("dcl", "dclw", "supcon", "bank"):
        for dtype in (torch.float32, torch.bfloat16):
            a, b = pair(5, 4, dtype=dtype)
            want = loss_and_grads(loss_fn(loss, "triton", 0.2, labels, bank), a, b)
            with monkeypatch.context() as m:
                m.setattr(tiled, "row_terms", tiled_path_taken)
                got = loss_and_grads(loss_fn(loss, "auto", 0.2, labels, bank), a, b)
                assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True)), loss
                with pytest.raises(AssertionError, match="the tiled path"):
                    a64, b64 = pair(5, 4)
                    loss_fn(loss, "auto", 0.2, labels, bank)(a64, b64)
    monkeypatch.setattr(memory_bank, "KERNEL_MAX_D", 3)
    monkeypatch.setattr(tiled, "row_terms", tiled_path_taken)
    a, b = pair(5, 4, dtype=torch.float32)
    with pytest.raises(AssertionError, match="the tiled path"):
        loss_fn("bank", "auto", 0.2, labels, bank)(a, b)


def test_modules_equal_functionals():
    a, b = pair(9, 6)
    labels = some_labels(9, 3)
    assert fastclr.DCLLoss(0.2)(a, b).item() == fastclr.dcl(a, b, 0.2).item()
    assert fastclr.DCLWLoss(0.2, sigma=0.7)(a, b).item() == fastclr.dclw(a, b, 0.2, 0.7).item()
    assert fastclr.SupConLoss(0.2)(a, b, labels).item() == fastclr.supcon(a, b, labels, 0.2).item()
    assert "temperature=0.2" in repr(fastclr.SupConLoss(0.2)) and "sigma=0.7" in repr(
        fastclr.DCLWLoss(sigma=0.7)
    )


@pytest.mark.parametrize(
    "labels,exc,match",
    [
        (torch.zeros(4, dtype=torch.long), ValueError, r"shape \(N,\) = \(5,\)"),
        (torch.zeros(5, 1, dtype=torch.long), ValueError, "shape"),
        (torch.zeros(5), TypeError, "integer dtype"),
        (torch.zeros(5, dtype=torch.bool), TypeError, "integer dtype"),
        (torch.zeros(5, dtype=torch.long, device="meta"), ValueError, "device"),
        ([0, 1, 2, 3, 4], TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_labels_raise(labels, exc, match, impl):
    a, b = pair(5, 3)
    with pytest.raises(exc, match=match):
        fastclr.supcon(a, b, labels, impl=impl)
    with pytest.raises(exc, match=match):
        fastclr.SupConLoss(impl=impl)(a, b, labels)


@pytest.mark.parametrize(
    "size,exc,match",
    [
        (-1, ValueError, "non-negative"),
        (
            128,
            ValueError,
            r"does not give the feature dimension: pass memory_bank_size=\(128, dim\)",
        ),
        ((-4, 8), ValueError, "non-negative"),
        ((4, -8), ValueError, "non-negative"),
        ((4, 8, 2), ValueError, r"\(num_negatives, dim\) pair"),
        ((4, 0), ValueError, "feature dimension must be positive"),
        ((4.0, 8), ValueError, "pair of ints"),
        (4.5, TypeError, "memory_bank_size"),
        (True, TypeError, "memory_bank_size"),
    ],
)
def test_bad_memory_bank_size_raises(size, exc, match):
    with pytest.raises(exc, match=match):
        fastclr.NTXentLoss(memory_bank_size=size)


def test_tile_label_sums_are_refused_with_the_fixed_shift():
    """With tau >= SHIFT_MIN_TEMPERATURE the label sums have one home, the per-class sums (``_label_terms``)."""
    z = tiled.normalized(torch.randn(8, 4))
    y = torch.arange(8) % 3
    with pytest.raises(ValueError, match="label sums come from _label_terms"):
        tiled.row_stats(z, z, 0.5, 0, 4, labels=(y, y))
    assert tiled.row_stats(z, z, 0.01, 0, 4, labels=(y, y)).labelled.shape == (8, 2)


def test_a_str_memory_bank_size_names_the_impl_keyword():
    """``NTXentLoss(0.5, "torch")`` puts the impl where lightly's signature has memory_bank_size."""
    with pytest.raises(
        TypeError,
        match=r"memory_bank_size must be 0 or a \(K, D\) pair, got 'torch'; impl is a keyword argument",
    ):
        fastclr.NTXentLoss(0.5, "torch")


def test_lightly_rejects_what_we_reject():
    lightly_loss = pytest.importorskip("lightly.loss")
    for size in (-1, 128, (4, 8, 2), (-4, 8)):
        with pytest.raises(ValueError):
            lightly_loss.NTXentLoss(memory_bank_size=size)
        with pytest.raises(ValueError):
            fastclr.NTXentLoss(memory_bank_size=size)
    for size in (0, (0, 8), [0, 8]):  # no bank, in both
        assert fastclr.NTXentLoss(memory_bank_size=size).memory_bank is None


@pytest.mark.parametrize("impl", IMPLS)
def test_bank_dimension_mismatch_raises_before_any_update(impl):
    crit = fastclr.NTXentLoss(memory_bank_size=(8, 4), impl=impl)
    before = crit.memory_bank.bank.clone()
    a, b = pair(3, 5, torch.float32)
    with pytest.raises(
        ValueError, match=r"memory_bank_size is \(8, 4\) but the embeddings have D = 5"
    ):
        crit(a, b)
    assert torch.equal(crit.memory_bank.bank, before)
    with pytest.raises(ValueError, match="D = 4 features"):
        fastclr.nt_xent_bank(a, b, torch.randn(8, 4), impl=impl)
    with pytest.raises(ValueError, match="non-empty"):
        fastclr.nt_xent_bank(a, b, torch.randn(0, 5), impl=impl)


def test_other_bad_arguments_raise():
    a, b = pair(4, 3)
    with pytest.raises(ValueError, match="sigma must be a positive"):
        fastclr.DCLWLoss(sigma=0.0)
    with pytest.raises(TypeError, match="temperature"):
        fastclr.DCLLoss(temperature="0.1")
    with pytest.raises(TypeError, match="weight_fn must be None or a callable"):
        fastclr.DCLLoss(weight_fn=3)
    with pytest.raises(ValueError, match=r"weight_fn must return \(N,\) = \(4,\) weights"):
        fastclr.dcl(a, b, weight_fn=lambda u, v: u)
    with pytest.raises(ValueError, match="N = 1: DCL"):
        fastclr.dcl(a[:1], b[:1])
    with pytest.raises(ValueError, match="impl must be one of"):
        fastclr.SupConLoss(impl="cuda")
    with pytest.raises(ValueError, match="same shape"):
        fastclr.dcl(a, b[:3])


# ---------------------------------------------------------------------------------------------------------------------
# DDP over gloo: W ranks give the single-process full-batch gradients

N_RANK, D_IN, D_OUT, TAU, BANK = 3, 6, 5, 0.3, 16
DDP_LOSSES = ("bank", "dcl", "dclw", "supcon")
SCALED_LOSSES = ("dcl", "supcon")  # their columns' gradients cross ranks


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, D_OUT)).double()


def make_criterion(loss, impl, gather):
    torch.manual_seed(1)  # the bank's draw
    if loss == "bank":
        return fastclr.NTXentLoss(
            TAU, memory_bank_size=(BANK, D_OUT), gather_distributed=gather, impl=impl
        )
    if loss == "dcl":
        return fastclr.DCLLoss(TAU, gather_distributed=gather, impl=impl)
    if loss == "dclw":
        return fastclr.DCLWLoss(TAU, sigma=SIGMA, gather_distributed=gather, impl=impl)
    return fastclr.SupConLoss(TAU, gather_distributed=gather, impl=impl)


def full_batch(world_size, step):
    """(x_a, x_b, labels) of all ranks at a step: rank r holds rows r*N .. (r+1)*N - 1."""
    g = torch.Generator().manual_seed(100 * world_size + step)
    x_a = torch.randn(N_RANK * world_size, D_IN, generator=g, dtype=torch.float64)
    x_b = x_a + 0.3 * torch.randn(N_RANK * world_size, D_IN, generator=g, dtype=torch.float64)
    return x_a, x_b, torch.randint(0, 3, (N_RANK * world_size,), generator=g)


def train_steps(loss, impl, world_size, rank=None, scale=1.0, dtype=torch.float64):
    """Per step (loss, parameter gradients of loss * scale) on this rank's rows (all rows with rank None), then the
    bank if any; two steps for the bank, which changes between them, one for the others.

    Under a process group the gradients are averaged over the ranks as DDP averages them (an all_reduce, then / W;
    ``tests/test_distributed.py`` runs the DDP wrapper itself, whose construction alone takes seconds here)."""
    import torch.distributed as dist

    model = make_model().to(dtype)
    criterion = make_criterion(loss, impl, gather=rank is not None)
    out = []
    for step in range(2 if loss == "bank" else 1):
        x_a, x_b, labels = full_batch(world_size, step)
        if rank is not None:
            rows = slice(rank * N_RANK, (rank + 1) * N_RANK)
            x_a, x_b, labels = x_a[rows], x_b[rows], labels[rows]
        model.zero_grad(set_to_none=True)
        z_a, z_b = model(torch.cat([x_a, x_b]).to(dtype)).chunk(2)
        value = criterion(z_a, z_b, labels) if loss == "supcon" else criterion(z_a, z_b)
        (value * scale).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        if rank is not None:
            for g in grads.values():
                dist.all_reduce(g)
                g /= world_size
        out.append((value.item(), grads))
    bank = criterion.memory_bank.bank.clone() if loss == "bank" else None
    return out, bank


def ddp_worker(rank: int, world_size: int) -> dict:
    import traceback

    results = {}
    for loss in DDP_LOSSES:
        for impl in IMPLS:
            try:
                results[loss, impl] = train_steps(loss, impl, world_size, rank)
                if loss in SCALED_LOSSES:
                    results[loss, f"{impl}-scaled"] = train_steps(
                        loss, impl, world_size, rank, scale=rank + 1.0
                    )
            except Exception:
                results[loss, impl] = traceback.format_exc()
    return {f"{k[0]}/{k[1]}": v for k, v in results.items()}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"W{w}")
def ddp_world(request):
    return request.param, spawn_world(ddp_worker, request.param, timeout_s=240.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", DDP_LOSSES)
def test_ddp_gradients_equal_full_batch(ddp_world, loss, impl):
    world_size, ranks = ddp_world
    single, single_bank = train_steps(loss, impl, world_size)
    for rank, res in enumerate(ranks):
        got = res[f"{loss}/{impl}"]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        steps, bank = got
        for step, ((_, grads), (_, want)) in enumerate(zip(steps, single, strict=True)):
            for name in want:
                assert_close(
                    grads[name],
                    want[name],
                    1e-12,
                    1e-9,
                    f"W={world_size} rank {rank} step {step} {name}",
                )
        if loss == "bank":
            # equal up to the rounding of the model's forward on N or N*W rows
            assert_close(bank, single_bank, 1e-7, 0.0, f"W={world_size} rank {rank} bank")
    # the full-batch loss is the mean of the rank losses
    for step in range(len(single)):
        mean = sum(res[f"{loss}/{impl}"][0][step][0] for res in ranks) / world_size
        assert mean == pytest.approx(single[step][0], rel=1e-10)


def triton_family_worker(rank: int, world_size: int) -> dict:
    return {
        loss: train_steps(loss, "triton", world_size, rank, dtype=torch.float32)
        for loss in DDP_LOSSES
    }


@pytest.mark.parametrize("world_size", [2, 3])
def test_triton_family_ddp_gradients_equal_full_batch(world_size):
    """W gloo ranks through the kernels (fp32, the interpreter) give the single-process full-batch gradients to fp32
    rounding: NT-Xent's kernel gathering negatives (the row blocks x column splits forward, rows != columns) against
    its upper-triangle forward on one process; the bank kernel over two steps, every rank's rows enqueued."""
    ranks = spawn_world(
        triton_family_worker, world_size, env={"TRITON_INTERPRET": "1"}, timeout_s=240.0
    )
    for loss in DDP_LOSSES:
        single, single_bank = train_steps(loss, "triton", world_size, dtype=torch.float32)
        for step, (value, want) in enumerate(single):
            mean = sum(r[loss][0][step][0] for r in ranks) / world_size
            assert mean == pytest.approx(value, rel=1e-5), f"{loss} step {step}"
            for rank, res in enumerate(ranks):
                for name in want:
                    grads = res[loss][0][step][1]
                    assert_close(
                        grads[name],
                        want[name],
                        1e-6,
                        1e-4,
                        f"{loss} step {step} rank {rank} {name}",
                    )
        if loss == "bank":
            for rank, res in enumerate(ranks):
                assert_close(res[loss][1], single_bank, 1e-6, 0.0, f"rank {rank} bank")


def per_anchor_losses(loss, z_a, z_b, labels):
    """(2M,) losses of the anchors [z_a; z_b] of one batch over its materialised logits, float64."""
    m = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    logits = z @ z.T / TAU
    rows = torch.arange(2 * m)
    pos = (rows + m) % (2 * m)
    excluded = torch.eye(2 * m, dtype=torch.bool)
    if loss == "dcl":
        excluded[rows, pos] = True
        return logits.masked_fill(excluded, -math.inf).logsumexp(1) - logits[rows, pos]
    y = torch.cat([labels, labels])
    log_prob = logits - logits.masked_fill(excluded, -math.inf).logsumexp(1, keepdim=True)
    positive = (y[:, None] == y[None, :]) & ~excluded
    return -(log_prob * positive).sum(1) / positive.sum(1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", SCALED_LOSSES)
def test_ddp_rank_scaled_upstream_gradient(ddp_world, loss, impl):
    """loss * (rank + 1) on each rank: every column's gradient must be weighted by the upstream gradient of the row
    it belongs to, which for SupCon's label positives and DCL's negatives lives on another rank."""
    world_size, ranks = ddp_world
    model = make_model()
    x_a, x_b, labels = full_batch(world_size, 0)
    z_a, z_b = model(torch.cat([x_a, x_b])).chunk(2)
    losses = per_anchor_losses(loss, z_a, z_b, labels)
    owner = torch.arange(N_RANK * world_size) // N_RANK
    rank_losses = [losses[torch.cat([owner == r, owner == r])].mean() for r in range(world_size)]
    (sum((r + 1.0) * rank_losses[r] for r in range(world_size)) / world_size).backward()
    for rank, res in enumerate(ranks):
        got = res.get(f"{loss}/{impl}-scaled", res[f"{loss}/{impl}"])  # a failure's traceback
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        (value, grads), _ = got[0][0], got[1]
        assert value == pytest.approx(rank_losses[rank].item(), rel=1e-10)
        for name, p in model.named_parameters():
            assert_close(grads[name], p.grad, 1e-12, 1e-9, f"W={world_size} rank {rank} {name}")


# ---------------------------------------------------------------------------------------------------------------------
# fastclr pretrain --loss, --memory-bank-size


def test_pretrain_flags_build_the_loss():
    from fastclr.cli import _parser
    from fastclr.train.build import build_loss
    from fastclr.train.config_io import config_from_args
    from fastclr.train.dist import DistInfo

    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    built = {}
    for argv in (
        [],
        ["--loss", "dcl", "--temperature", "0.2"],
        ["--loss", "dclw"],
        ["--loss", "supcon"],
        ["--memory-bank-size", "64", "--proj-dim", "32"],
    ):
        cfg = config_from_args(_parser().parse_args(["pretrain", *argv]))
        cfg.validate()
        built[" ".join(argv)] = build_loss(cfg, cpu)
    assert type(built[""]) is fastclr.NTXentLoss and built[""].memory_bank is None
    assert type(built["--loss dcl --temperature 0.2"]) is fastclr.DCLLoss
    assert built["--loss dcl --temperature 0.2"].temperature == 0.2
    assert type(built["--loss dclw"]) is fastclr.DCLWLoss
    assert type(built["--loss supcon"]) is fastclr.SupConLoss
    assert built["--memory-bank-size 64 --proj-dim 32"].memory_bank.bank.shape == (64, 32)


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"loss": "dcl", "memory_bank_size": 8}, "--memory-bank-size applies to --loss ntxent"),
        ({"loss": "moco"}, "loss must be one of"),
        ({"memory_bank_size": -1}, "memory_bank_size must be"),
    ],
)
def test_pretrain_loss_settings_are_checked(settings, match):
    from fastclr.train.config import ConfigError, PretrainConfig

    cfg = PretrainConfig.from_dict({"loss": settings})
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_supcon_pretraining_on_unlabelled_data_is_a_config_error(tmp_path):
    from PIL import Image

    from fastclr.train.build import build_train_loader
    from fastclr.train.config import ConfigError, PretrainConfig
    from fastclr.train.dist import DistInfo

    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.jpg")
    cfg = PretrainConfig.from_dict(
        {"loss": {"loss": "supcon"}, "data": {"data": str(tmp_path), "backend": "torch", "size": 8,
                                              "workers": 0}, "optim": {"batch_size": 2}}
    )  # fmt: skip
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="--loss supcon takes its positives from the labels"):
        build_train_loader(cfg, cpu, torch.float32)

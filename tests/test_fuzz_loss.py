"""Property-based fuzzing of every NT-Xent impl against the float64 reference (hypothesis).

Inputs: N 1..300, D 1..300, fp32 / fp16 / bf16 / fp64, tau 0.01..10 (log-uniform plus the end points), value scales
1e-6..1e4 with per-row spread, all-zero rows and rows copied onto other rows (a row equal to one of its negatives, or
to its positive). The truth is the reference evaluated in float64 on the inputs *after* rounding to the tested dtype,
so input rounding is not counted as error.

Tolerance (the documented one, see ``tolerance``): an impl's error may be twice the reference impl's own error in the
same dtype plus a small floor, the floor being the rounding noise of the impl's accumulation dtype (fp32 for
fp32/fp16/bf16 inputs, fp64 for fp64) carried through 1/tau, plus the rounding of the result into the output dtype.
The reference's own error only widens that bound while the reference is itself within ``sanity_bound`` of the truth;
where it is not finite or not sane (fp16 rows whose norm overflows fp16 or is 0, see ``test_reference_fp16_*``),
impls are judged against float64 with the floor and the sanity bound alone. So no impl may return a finite number
farther from the truth than the dtype allows.

Gradients are compared row by row (a row's gradient scales with 1/||z_i||, so zero rows and tiny rows have their own
scale) and are required to be finite only where the true gradient fits the dtype (fp16 inputs of scale 1e-6 have true
gradients above the fp16 maximum; no finite answer exists there).

CI runs a modest profile (``FUZZ_EXAMPLES`` cases per impl, fewer and smaller for the interpreted Triton kernel);
``-m slow`` runs a larger one.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastclr
from fastclr.losses.reference import nt_xent_reference
from fastclr.losses.tiled import nt_xent_tiled

FUZZ_EXAMPLES = {"reference": 20, "torch": 40, "triton": 6}
SLOW_EXAMPLES = {"reference": 300, "torch": 400, "triton": 40}
MAX_SIZE = {"reference": (300, 300), "torch": (300, 300), "triton": (40, 72)}
DTYPES = {
    "reference": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "torch": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    # The fused kernel takes fp32/fp16/bf16 only; fp64 is refused with a TypeError (test_triton_refuses_fp64).
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
HALF = (torch.float16, torch.bfloat16)
EPS = 1e-12  # the normalisation clamp of every impl (as F.normalize)


def fuzz_settings(examples: int) -> settings:
    # derandomize: the same cases on every run and machine; database=None: nothing written into the work tree.
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def loss_inputs(draw, max_n: int, max_d: int, dtypes: tuple[torch.dtype, ...]):
    """(z_a (N, D), z_b (N, D), tau, description) with z_a, z_b already rounded to the drawn dtype."""
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    dtype = draw(st.sampled_from(dtypes))
    tau = draw(
        st.one_of(
            st.sampled_from([0.01, 0.05, 0.5, 10.0]),
            st.floats(-2.0, 1.0).map(lambda e: 10.0**e),
        )
    )
    log_scale = draw(st.floats(-6.0, 4.0))
    row_spread = draw(
        st.sampled_from([0.0, 0.0, 1.0, 3.0])
    )  # per-row scales 10**U(-spread, spread)
    seed = draw(st.integers(0, 2**31 - 1))
    rows = st.integers(0, 2 * n - 1)
    zero_rows = draw(st.lists(rows, max_size=3))
    copies = draw(st.lists(st.tuples(rows, rows), max_size=3))  # (source, destination)

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * n, d, generator=g, dtype=torch.float64).clamp_(-6.0, 6.0)
    z *= 10.0 ** (
        log_scale + row_spread * (2 * torch.rand(2 * n, 1, generator=g, dtype=torch.float64) - 1)
    )
    z.clamp_(-6e4, 6e4)  # stays finite in fp16 (max 65504)
    for src, dst in copies:
        z[dst] = z[src]
    z[zero_rows] = 0.0
    z = z.to(dtype)
    desc = (
        f"N={n} D={d} dtype={dtype} tau={tau:.4g} scale=1e{log_scale:.2f} spread={row_spread} seed={seed} "
        f"zero_rows={zero_rows} copies={copies}"
    )
    return z[:n], z[n:], tau, desc


# ---------------------------------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------------------------------


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def subnormal_step(dtype: torch.dtype) -> float:
    """Absolute spacing of the dtype near 0: fp16 gradients of ~1e-5 live there and round to a multiple of it."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_floor(dtype: torch.dtype, tau: float, n: int, d: int, exact: float) -> float:
    """Rounding noise every impl is allowed on the loss: S has error ~ u*(sqrt(D)+2) (a dot product of unit rows),
    the logits u*(sqrt(D)+2)/tau, the 2N-term sums u*log2(2N); then the result is rounded to the output dtype."""
    u = unit_roundoff(accumulation_dtype(dtype))
    out = 2 * unit_roundoff(dtype) * abs(exact) + subnormal_step(dtype)
    return 8 * u * ((math.sqrt(d) + 2) / tau + math.log2(2 * n) + abs(exact)) + out


def sanity_bound(dtype: torch.dtype, tau: float, exact: float) -> float:
    """The most a correct impl can be off in ``dtype`` even with its rows rounded to ``dtype`` (the fused kernel's
    tensor-core inputs, the reference's own arithmetic): S off by a few units of the dtype, divided by tau."""
    u = unit_roundoff(dtype)
    return 16 * u * (1.0 / tau + 1.0 + abs(exact)) + subnormal_step(dtype)


def row_grad_floor(dtype, tau, n, d, norms, exact_rows_max):
    """Per-row gradient noise: dL/dz_hat_i = 1/(2N tau) [sum (P_ij + P_ji) z_hat_j - 2 z_hat_pos(i)], P relatively off
    by the logit error u(sqrt(D)+2)/tau; the chain rule divides by ||z_i|| (clamped at EPS)."""
    u = unit_roundoff(accumulation_dtype(dtype))
    dz_hat_noise = 8 * u * (math.sqrt(d) + 2) * (1.0 / tau + 1.0) / (2 * n * tau)
    out = 2 * unit_roundoff(dtype) * exact_rows_max + subnormal_step(dtype)
    return dz_hat_noise / norms.clamp_min(EPS) + out


def row_grad_sanity(dtype, tau, n, norms, exact_rows_max):
    u = unit_roundoff(dtype)
    noise = 16 * u * (1.0 / tau + 1.0) / (n * tau) / norms.clamp_min(EPS)
    return noise + 16 * u * exact_rows_max + subnormal_step(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------------


def run(impl: str, z_a: torch.Tensor, z_b: torch.Tensor, tau: float):
    """(loss, grad z_a, grad z_b) of impl, gradients of the loss itself (upstream 1)."""
    a, b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    fn = (
        nt_xent_reference
        if impl == "reference"
        else (lambda x, y, t: fastclr.nt_xent(x, y, t, impl=impl))
    )
    loss = fn(a, b, tau)
    ga, gb = torch.autograd.grad(loss, [a, b])
    return loss.detach(), ga, gb


def allowed_error(impl: str, err_ref: torch.Tensor, floor, sane) -> torch.Tensor:
    """Twice the reference's own error in the dtype plus the floor, capped at the sanity bound. Where the reference
    in the dtype is not finite or not sane, the impl is judged against float64 with the sanity bound alone; the
    reference itself is always judged that way."""
    floor, sane = (
        torch.as_tensor(floor, dtype=torch.float64),
        torch.as_tensor(sane, dtype=torch.float64),
    )
    usable = torch.isfinite(err_ref) & (err_ref <= sane)
    relative = torch.minimum(2 * torch.where(usable, err_ref, 0.0) + floor, sane)
    bound = sane if impl == "reference" else torch.where(usable, relative, sane)
    return torch.maximum(torch.broadcast_to(bound, floor.shape), floor)


def check_against_truth(
    impl: str, z_a: torch.Tensor, z_b: torch.Tensor, tau: float, desc: str
) -> None:
    n, d = z_a.shape
    dtype = z_a.dtype
    exact = run("reference", z_a.double(), z_b.double(), tau)
    same_dtype_ref = run("reference", z_a, z_b, tau)
    got = same_dtype_ref if impl == "reference" else run(impl, z_a, z_b, tau)

    # Loss: finite (inputs are finite) and within the bound.
    true_loss = exact[0].item()
    loss = got[0]
    assert loss.dtype == dtype, f"{impl}: loss dtype {loss.dtype} for {dtype} inputs; {desc}"
    assert torch.isfinite(loss), (
        f"{impl}: non-finite loss {loss.item()} (truth {true_loss}); {desc}"
    )
    err_ref = (same_dtype_ref[0].double() - true_loss).abs()
    err = abs(loss.double().item() - true_loss)
    bound = allowed_error(
        impl, err_ref, loss_floor(dtype, tau, n, d, true_loss), sanity_bound(dtype, tau, true_loss)
    ).item()
    assert err <= bound, (
        f"{impl}: loss {loss.item():.10g} vs truth {true_loss:.10g} (err {err:.3e}, bound {bound:.3e}, "
        f"reference-in-dtype err {err_ref.item():.3e}); {desc}"
    )

    # Gradients, row by row.
    norms = torch.linalg.vector_norm(torch.cat([z_a, z_b]).double(), dim=1)
    e = torch.cat(exact[1:])
    r = torch.cat(same_dtype_ref[1:]).double()
    g = torch.cat(got[1:])
    assert g.dtype == dtype, f"{impl}: gradient dtype {g.dtype}; {desc}"
    g = g.double()
    e_max = e.abs().amax(dim=1)
    representable = e_max <= torch.finfo(dtype).max / 4
    finite = torch.isfinite(g).all(dim=1)
    bad = representable & ~finite
    assert not bad.any(), (
        f"{impl}: non-finite gradient in rows {torch.nonzero(bad).flatten().tolist()[:8]} whose true gradient "
        f"(max {e_max[bad].max().item():.3e}) fits {dtype}; {desc}"
    )
    floor = row_grad_floor(dtype, tau, n, d, norms, e_max)
    sane = row_grad_sanity(dtype, tau, n, norms, e_max)
    err_ref_rows = (r - e).abs().amax(dim=1)
    err_rows = (g - e).abs().amax(dim=1)
    bound_rows = allowed_error(impl, err_ref_rows, floor, sane)
    wrong = representable & (err_rows > bound_rows)
    if wrong.any():
        i = int(torch.nonzero(wrong)[0])
        raise AssertionError(
            f"{impl}: {int(wrong.sum())}/{2 * n} gradient rows out of bound; row {i}: err {err_rows[i]:.3e}, "
            f"bound {bound_rows[i]:.3e}, true row max {e_max[i]:.3e}, reference-in-dtype err {err_ref_rows[i]:.3e}, "
            f"||z_i|| {norms[i]:.3e}; {desc}"
        )


def fuzz_test(impl: str, examples: int):
    max_n, max_d = MAX_SIZE[impl]

    @fuzz_settings(examples)
    @given(case=loss_inputs(max_n, max_d, DTYPES[impl]))
    def body(case):
        z_a, z_b, tau, desc = case
        check_against_truth(impl, z_a, z_b, tau, desc)

    body()


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_fuzz_matches_float64_reference(impl):
    fuzz_test(impl, FUZZ_EXAMPLES[impl])


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_fuzz_matches_float64_reference_large(impl):
    fuzz_test(impl, SLOW_EXAMPLES[impl])


def extreme_fp16_pair(n: int = 16, d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 rows with norms between 0.5x and 0.97x the fp16 maximum (65504); row 1 of z_a duplicates its negative
    z_a[0], z_b[2] duplicates the negative z_a[3], z_b[5] duplicates its own anchor's positive side z_a[5]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    target = 65504 * (0.5 + 0.47 * torch.rand(2 * n, 1, generator=g, dtype=torch.float64))
    z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True) * target
    z[1], z[n + 2], z[n + 5] = z[0], z[3], z[5]
    z = z.to(torch.float16)
    assert torch.isfinite(z).all() and (torch.linalg.vector_norm(z.double(), dim=1) < 65504).all()
    return z[:n], z[n:]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
def test_fp16_norms_near_max_with_duplicate_negatives(impl, tau):
    z_a, z_b = extreme_fp16_pair()
    check_against_truth(impl, z_a, z_b, tau, f"fp16 norms near 65504, tau={tau}")


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tau_001_exact_duplicates_of_negatives(impl, dtype):
    """tau = 0.01 puts logits at +-100; every anchor has a negative identical to itself (S = 1, logit 100 = the max)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 10, generator=g, dtype=torch.float64)
    z_a = torch.cat([base, base]).to(
        dtype
    )  # rows i and i+6 of z_a are duplicates: each is the other's negative
    z_b = torch.cat([base.flip(0), base]).to(dtype)
    check_against_truth(impl, z_a, z_b, 0.01, f"tau=0.01 duplicated negatives, {dtype}")
    loss = fastclr.nt_xent(z_a, z_b, 0.01, impl=impl)
    assert (
        loss.item() > 0.5
    )  # a duplicated negative ties with or beats the positive: a large loss, not ~0


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_never_gives_a_finite_loss(impl, bad):
    """A NaN/inf embedding has no defined loss: a finite number would be a wrong one."""
    z_a, z_b = torch.randn(5, 8), torch.randn(5, 8)
    z_a[2, 3] = bad
    assert not torch.isfinite(fastclr.nt_xent(z_a, z_b, 0.5, impl=impl))


def test_triton_refuses_fp64():
    z = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="fp32/bf16/fp16"):
        fastclr.nt_xent(z, z.clone(), 0.5, impl="triton")


# Regression cases for defects the fuzzing above found (each failed before its fix).


def test_reference_fp16_norm_overflow():
    z_a, z_b = extreme_fp16_pair(
        d=300
    )  # fp16 rows whose norm fits, but whose squares summed in fp16 do not
    z_a, z_b = z_a * 1, z_b.clone()
    big = torch.full((4, 300), 1e4, dtype=torch.float16)  # norm 1.7e5 > 65504
    check_against_truth(
        "reference", torch.cat([z_a[:4], big]), torch.cat([z_b[:4], big.flip(1)]), 0.1, "fp16"
    )


def test_reference_fp16_zero_row():
    g = torch.Generator().manual_seed(2)
    z_a, z_b = torch.randn(8, 16, generator=g).half(), torch.randn(8, 16, generator=g).half()
    z_a[3] = 0.0
    check_against_truth("reference", z_a, z_b, 0.5, "fp16 with an all-zero row")


def test_triton_fp16_zero_row_single_pair():
    z_a, z_b = torch.zeros(1, 1, dtype=torch.float16), torch.full((1, 1), 0.3, dtype=torch.float16)
    check_against_truth("triton", z_a, z_b, 0.05, "N=1 D=1 zero row")


def rows_at_norm(norm: float, dtype: torch.dtype, n: int = 6, d: int = 70, seed: int = 3):
    """(z_a, z_b) whose row norms are spread within 10x around ``norm``, with an all-zero row, and rows whose largest
    entries sit in the last columns (past the kernel's first 64-wide D block, so its running max must rescale)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    z[1::3, 64:] *= 1e3
    z *= norm / torch.linalg.vector_norm(z, dim=1, keepdim=True)
    z *= 10 ** (torch.rand(2 * n, 1, generator=g, dtype=torch.float64) - 0.5)
    z[n + 2] = 0.0
    z = z.to(dtype)
    assert torch.isfinite(z).all()
    return z[:n], z[n:]


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize(
    ("norm", "dtype"),
    [
        (1e19, torch.float32),  # squares overflow fp32 from ~1.8e19
        (1e30, torch.float32),
        (1e30, torch.bfloat16),
        (1e-10, torch.float32),  # tiny but above the clamp: squares 1e-22 are still normal fp32
        (
            1e-30,
            torch.float32,
        ),  # below the clamp (EPS = 1e-12): z_hat = z / EPS; squares underflow fp32
    ],
)
def test_huge_and_tiny_norms_match_float64(impl, norm, dtype):
    """fp32 rows of norm >= 1e19 were normalised as zero vectors (their squares overflow: z / inf = 0), giving the
    loss log(2N - 1) and a zero gradient in every impl. Rows are now scaled by their largest |z| before squaring."""
    z_a, z_b = rows_at_norm(norm, dtype)
    check_against_truth(impl, z_a, z_b, 0.2, f"norms ~{norm:g}, {dtype}")
    if norm > 1:  # the loss is scale-invariant: the same directions at norm ~1 give the same loss
        loss = fastclr.nt_xent(z_a, z_b, 0.2, impl=impl)
        ref = fastclr.nt_xent(
            (z_a.double() / norm).to(dtype), (z_b.double() / norm).to(dtype), 0.2, impl=impl
        )
        assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item()), (loss.item(), ref.item())
        assert abs(loss.item() - math.log(2 * z_a.shape[0] - 1)) > 1e-2  # not the zero-vector loss


@pytest.mark.parametrize("tau", [0.02, 1e-3, 1e-5, 1e-8, 1e-12, 1e-20, 1e-30])
@pytest.mark.parametrize("blocks", [(16, 24), (512, 512)], ids=["tiles", "one-tile"])
def test_tiled_gradients_accurate_at_tiny_temperatures(tau, blocks):
    """The tiled path keeps the reference's accuracy however small tau: its per-row statistics are (m_i, log l_i), never
    lse_i ~ 1/tau rounded to fp32, and P_ji meets S_ji as row j computed it (a GEMM is not bitwise symmetric). Before
    that, the fp32 gradient was off by ~1e-8/tau relative (7% at tau = 1e-6, NaN at 1e-10).

    Random rows in D = 48: the gaps between a row's largest similarities are far above fp32's rounding of S, so fp32
    and float64 agree on which terms of each softmax dominate, and the fp32 reference meets the same bound."""
    g = torch.Generator().manual_seed(int(-math.log10(tau) * 7) + blocks[0])
    z_a = torch.randn(40, 48, generator=g)
    z_b = z_a + 1.5 * torch.randn(40, 48, generator=g)
    grads = {}
    for name, dtype in (
        ("exact", torch.float64),
        ("reference", torch.float32),
        ("torch", torch.float32),
    ):
        a, b = (z.to(dtype, copy=True).requires_grad_() for z in (z_a, z_b))
        if name == "torch":
            loss = nt_xent_tiled(a, b, tau, block_rows=blocks[0], block_cols=blocks[1])
        else:
            loss = fastclr.nt_xent(a, b, tau, impl="reference")
        loss.backward()
        assert torch.isfinite(loss), (name, loss)
        grads[name] = (loss.double(), torch.cat([a.grad, b.grad]).double())
    loss64, grad64 = grads["exact"]
    for name in ("reference", "torch"):
        loss, grad = grads[name]
        assert abs(loss - loss64) <= 1e-5 * max(1.0, abs(loss64)), (name, tau, loss, loss64)
        err, size = (grad - grad64).norm().item(), grad64.norm().item()
        assert err <= 1e-5 * size, f"{name} tau={tau:g}: gradient error {err:.3g}, norm {size:.3g}"


def test_temperature_below_the_documented_bound_is_refused():
    from fastclr.nt_xent_spec import MIN_TEMPERATURE

    z = torch.randn(4, 8)
    assert torch.isfinite(fastclr.nt_xent(z, z.flip(0), MIN_TEMPERATURE, impl="torch"))
    with pytest.raises(ValueError, match=r"temperature must be at least 1e-30, got 1e-31"):
        fastclr.nt_xent(z, z.flip(0), 1e-31)

"""The GPU check's loss sections: the Triton NT-Xent against the float64 reference, and the losses' speed.

``check_correctness`` compares ``nt_xent_triton``'s loss and gradients with ``nt_xent_reference`` in float64 on the same
rounded inputs, per dtype (``DTYPE_CASES``, with their tolerances), and runs the kernel twice: the column splits'
partials are combined in a fixed order, so a second run must be bitwise the same; the family's kernels
(``FAMILY_CASES``) are compared with their references the same way. ``time_loss`` times forward + backward of each
NT-Xent implementation and rates it against the device's tensor-core peak (``PEAK_TFLOPS``), then the family's kernels
beside their tiled path and the materialising comparison (``FAMILY_TIMED``). Both take the check's context
(device, sizes, time budget) from ``gpu_check.py``, which runs them; kernels are imported lazily, after a dry run has
set TRITON_INTERPRET.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    loss_rtol: float  # |loss - ref| <= loss_rtol * max(|ref|, 1)
    grad_rtol: float  # max |grad - ref| <= grad_rtol * max |ref|


# name: (dtype, fp32 dot precision, tolerance against float64 on the same rounded inputs). tf32 rounds S to ~1e-3; bf16
# and fp16 also store z_hat and the gradients in their own precision (8 and 11 mantissa bits).
DTYPE_CASES = {
    "fp32-tf32": ("float32", "tf32", Tolerance(5e-3, 2e-2)),
    "fp32-ieee": ("float32", "ieee", Tolerance(1e-4, 1e-3)),
    "bf16": ("bfloat16", "tf32", Tolerance(2e-2, 5e-2)),
    "fp16": ("float16", "tf32", Tolerance(5e-3, 2e-2)),
}
# The family through the kernels, in these of DTYPE_CASES, against its reference: DCL (``exclude_pos``) at 2N >= 4 (one
# pair has no negative), SupCon (labels from 3 classes), NT-Xent against a bank of K = 2N unit rows (the bank kernel);
# fp32 "ieee" is PyTorch's default TF32 switch, which SupCon and the bank follow.
FAMILY_CASES = {
    "dcl": ("fp32-ieee", "bf16"),
    "supcon": ("fp32-ieee", "bf16"),
    "bank": ("fp32-ieee", "bf16"),
}
# Dense tensor-core TFLOP/s (no sparsity) by a substring of the CUDA device name, most specific first: (bf16, tf32).
PEAK_TFLOPS = {
    "H100 PCIe": (756.0, 378.0),
    "H100 NVL": (835.0, 418.0),
    "H200 NVL": (835.0, 418.0),
    "H100": (989.4, 494.7),
    "H200": (989.4, 494.7),
    "A100": (312.0, 156.0),
}


def peak_tflops(device_name: str, dtype: str) -> float | None:
    for key, (half, tf32) in PEAK_TFLOPS.items():
        if key in device_name:
            return tf32 if dtype == "float32" else half
    return None


def gemm_tflop(two_n: int, d: int) -> float:
    """The three (2N x D) @ (D x 2N) GEMMs of forward + backward, in TFLOP."""
    return 3 * two_n * two_n * d * 2 / 1e12


# ----------------------------------------------------------------------------------------------------------------------
# correctness


def loss_and_grads(fn, z_a, z_b, upstream: float = 1.7):
    """(loss, dz_a, dz_b) of ``fn`` with ``upstream`` as the loss's gradient."""
    a, b = z_a.detach().requires_grad_(), z_b.detach().requires_grad_()
    loss = fn(a, b)
    (loss * upstream).backward()
    return loss.detach(), a.grad, b.grad


def compare(got, want, tol: Tolerance) -> dict:
    """Errors of (loss, dz_a, dz_b) against the float64 ones, scaled as ``Tolerance`` says, and where the worst is."""
    loss_err = abs(got[0].double().item() - want[0].item()) / max(abs(want[0].item()), 1.0)
    grad_err, where = 0.0, "-"
    for name, g, w in zip(("dz_a", "dz_b"), got[1:], want[1:], strict=True):
        diff = (g.double() - w).abs()
        err = diff.max().item() / max(w.abs().max().item(), 1e-12)
        if err > grad_err:
            row, col = divmod(int(diff.argmax()), diff.shape[1])
            grad_err, where = (
                err,
                f"{name}[{row}, {col}]: {g[row, col].item():.4g} vs {w[row, col].item():.4g}",
            )
    ok = loss_err <= tol.loss_rtol and grad_err <= tol.grad_rtol
    return {
        "loss_err": loss_err,
        "grad_err": grad_err,
        "worst": where,
        "status": "ok" if ok else "MISMATCH",
    }


def check_correctness(ctx) -> list[dict]:
    import torch

    cases = [(name, "ntxent") for name in DTYPE_CASES]
    cases += [(name, loss) for loss, names in FAMILY_CASES.items() for name in names]
    rows = []
    for name, loss in cases:
        dtype, precision, tol = DTYPE_CASES[name]
        case = name if loss == "ntxent" else f"{loss}-{name}"
        for d in ctx.sizes.correctness_d:
            for two_n in ctx.sizes.correctness_two_n:
                if loss == "dcl" and two_n < 4:
                    continue
                row = {
                    "case": case,
                    "two_n": two_n,
                    "d": d,
                    "loss_rtol": tol.loss_rtol,
                    "grad_rtol": tol.grad_rtol,
                }
                if not ctx.budget.allows(f"correctness {case} 2N={two_n} D={d}", 3):
                    rows.append(row | {"status": "skipped: time budget"})
                    continue
                gen = torch.Generator().manual_seed(two_n + d)
                z = torch.randn(2, two_n // 2, d, generator=gen).to(
                    ctx.device, getattr(torch, dtype)
                )
                labels = torch.randint(0, 3, (two_n // 2,), generator=gen).to(ctx.device)
                bank = torch.nn.functional.normalize(torch.randn(two_n, d, generator=gen), dim=1)
                fast, reference = loss_pair(loss, precision, ctx.tau, labels, bank.to(ctx.device))
                try:
                    got, again = (loss_and_grads(fast, *z) for _ in range(2))
                    want = loss_and_grads(reference, *z.double())
                    result = compare(got, want, tol)
                    if not all(torch.equal(x, y) for x, y in zip(got, again, strict=True)):
                        result |= {
                            "status": "MISMATCH",
                            "worst": "a second run is not bitwise equal",
                        }
                    rows.append(row | result)
                except RuntimeError as exc:  # a compile error, or no memory for the float64 logits
                    rows.append(row | {"status": f"failed: {str(exc).splitlines()[0][:120]}"})
    return rows


def with_fp32_precision(precision: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) with PyTorch's fp32 matmul switch set to ``precision`` ("tf32" | "ieee"), which the public
    losses follow for fp32 kernel inputs (``fastclr.nt_xent_spec.fp32_dot_precision``), and set back after."""
    import torch

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        return fn(*args, **kwargs)
    finally:
        matmul.fp32_precision = before


def loss_pair(loss: str, precision: str, tau: float, labels, bank):
    """(kernel, reference): two callables (z_a, z_b) -> 0-d loss of ``loss`` ("ntxent" or a FAMILY_CASES key); labels
    (N,) for SupCon, bank (K, D) unit rows for the bank (cast to the embeddings' dtype)."""
    import fastclr
    from fastclr.kernels.nt_xent import nt_xent_triton
    from fastclr.losses import reference

    if loss == "bank":
        return (
            lambda a, b: with_fp32_precision(
                precision, fastclr.nt_xent_bank, a, b, bank.to(a.dtype), tau, impl="triton"
            ),
            lambda a, b: reference.nt_xent_bank_reference(a, b, bank.to(a.dtype), tau),
        )
    if loss == "supcon":
        return (
            lambda a, b: with_fp32_precision(
                precision, fastclr.supcon, a, b, labels, tau, impl="triton"
            ),
            lambda a, b: reference.supcon_reference(a, b, labels, tau),
        )
    dcl = loss == "dcl"
    ref = reference.dcl_reference if dcl else reference.nt_xent_reference
    return (
        lambda a, b: nt_xent_triton(a, b, tau, precision=precision, exclude_pos=dcl),
        lambda a, b: ref(a, b, tau),
    )


# ----------------------------------------------------------------------------------------------------------------------
# loss timing


def time_ms(step, cuda: bool) -> tuple[float, float, float]:
    """(median, 20%, 80%) milliseconds of ``step`` after a warm-up (CPU, the dry run: median, min, max of two)."""
    if cuda:
        import triton.testing

        return tuple(triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8], rep=200))
    samples = []
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples), min(samples), max(samples)


def loss_provider(impl: str, ctx):
    """A callable (z_a, z_b) -> loss; RuntimeError('skipped: ...') where the provider cannot run."""
    import torch

    from fastclr.bench.bench_loss import make_loss_fn
    from fastclr.kernels.nt_xent import nt_xent_triton
    from fastclr.losses.reference import nt_xent_reference

    if impl == "triton":
        return lambda a, b: nt_xent_triton(a, b, ctx.tau)
    if impl == "compile":
        backend = "eager" if ctx.dry_run else "inductor"
        return torch.compile(lambda a, b: nt_xent_reference(a, b, ctx.tau), backend=backend)
    return make_loss_fn(impl, ctx.tau)  # reference, lightly


# The family's timed providers: its kernel, the tiled path, and the materialising comparison (bench_loss's); lightly's
# bank is float32, and its product with bf16 embeddings fails.
FAMILY_TIMED = {
    "dcl": ("triton", "torch", "lightly"),
    "supcon": ("triton", "torch", "materialised"),
    "ntxent-bank": ("triton", "torch"),
}


def family_provider(loss: str, impl: str, ctx, two_n: int, d: int, labels):
    """A callable (z_a, z_b) -> loss of a family loss (K = 2N for the bank, ``labels`` (N,) for SupCon): bench_loss's
    provider, the kernels walked under the interpreter in the dry run."""
    from fastclr.bench.bench_loss import make_family_loss_fn

    fn = make_family_loss_fn(
        loss, impl, ctx.tau, two_n, d, device=ctx.device, interpret=ctx.dry_run
    )
    return lambda a, b: fn(a, b, labels)


def time_one(impl: str, z_a, z_b, ctx, fn=None) -> dict:
    """Time forward + backward of ``fn`` (default: NT-Xent's provider ``impl``)."""
    import torch

    ntxent = fn is None
    fn = loss_provider(impl, ctx) if ntxent else fn

    def step():
        loss = fn(z_a, z_b)
        loss.backward()
        z_a.grad = z_b.grad = None
        return loss

    loss = step()  # warm-up: autotuning, compilation
    row = {}
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["peak_mem_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    row["ms"], row["ms_p20"], row["ms_p80"] = time_ms(step, ctx.cuda)
    if impl == "triton" and ntxent and z_a.shape[0] * 2 <= 32768:
        # The autotuned kernel's loss against float64 (the correctness section runs the same configs per size).
        ref = _reference_loss(z_a, z_b, ctx.tau)
        row["loss_err"] = abs(loss.double().item() - ref) / max(abs(ref), 1.0)
        tol = DTYPE_CASES["bf16" if z_a.dtype == torch.bfloat16 else "fp32-tf32"][2]
        if row["loss_err"] > tol.loss_rtol:
            row["status"] = "MISMATCH"
    return row


def _reference_loss(z_a, z_b, tau: float) -> float:
    import torch

    from fastclr.losses.reference import nt_xent_reference

    with torch.no_grad():
        return nt_xent_reference(z_a.double(), z_b.double(), tau).item()


def time_loss(ctx) -> list[dict]:
    import torch

    rows = []
    plan = [("ntxent", dtype, two_n, impl) for dtype in ("bfloat16", "float32") for two_n in ctx.sizes.loss_two_n
            for impl in ("triton", "reference", "compile", "lightly")]  # fmt: skip
    plan += [
        ("ntxent", dtype, ctx.sizes.loss_big_two_n, "triton") for dtype in ("bfloat16", "float32")
    ]
    # The family at the smallest size, bf16: its kernels beside the tiled path and the materialising comparison.
    plan += [(loss, "bfloat16", ctx.sizes.loss_two_n[0], impl) for loss, impls in FAMILY_TIMED.items()
             for impl in impls]  # fmt: skip
    for loss, dtype, two_n, impl in plan:
        d = 128
        row = {"loss": loss, "impl": impl, "two_n": two_n, "d": d, "dtype": dtype}
        if not ctx.budget.allows(
            f"loss {loss} {impl} {dtype} 2N={two_n}", 45 if impl == "compile" else 15
        ):
            rows.append(row | {"status": "skipped: time budget"})
            continue
        gen = torch.Generator().manual_seed(two_n)
        z = torch.randn(2, two_n // 2, d, generator=gen).to(ctx.device, getattr(torch, dtype))
        z_a, z_b = (x.requires_grad_() for x in z)
        labels = torch.randint(0, 100, (two_n // 2,), generator=gen).to(ctx.device)
        try:
            fn = None if loss == "ntxent" else family_provider(loss, impl, ctx, two_n, d, labels)
            row |= {"status": "ok"} | time_one(impl, z_a, z_b, ctx, fn)
        except RuntimeError as exc:  # a skipped provider or (torch.cuda.OutOfMemoryError) no memory
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            row["status"] = message if message.startswith("skipped") else f"failed: {message[:120]}"
        if row.get("ms") and loss == "ntxent":  # the rate on NT-Xent's three GEMMs
            row["tflops"] = gemm_tflop(two_n, d) / (row["ms"] / 1e3)
            peak = peak_tflops(ctx.device_name, dtype)
            row["peak_fraction"] = row["tflops"] / peak if peak else None
        rows.append(row)
    return rows

"""Peak memory of forward+backward grows linearly in 2N for the tiled path (super-linearly, quadratically in the limit, for the reference).

Measured as each child process's peak RSS above its baseline (``bench/bench_loss.py``'s machinery): 2N = 2048 ... 16384
for the tiled path, 1024 ... 8192 for the materialising ones. A first step's RSS varies by up to ~1.6x between runs at
the small sizes (allocator arenas and thread pools), so the slope bound for the linear paths leaves room for that noise,
and the largest size must also stay far below one (2N)^2 fp32 matrix, which every quadratic path exceeds.
The family losses run on the same tiled engine: SupCon (labels compared inside the tiles, and the materialising SupCon
for contrast), DCL, DCLW and NT-Xent against a bank of K = 2N negatives are checked with ``-m slow``.
"""

import math

import pytest

from fastclr.bench.bench_loss import run_one

# the materialising paths: 2N = 8192 is already 256 MiB per (2N)^2 matrix
SIZES = (1024, 2048, 4096, 8192)
LINEAR_SIZES = (2048, 4096, 8192, 16384)
# linear is 1.0; run-to-run RSS noise adds up to ~0.3; quadratic paths measure 1.5 ... 2.3
LINEAR_SLOPE = 1.35


def loglog_slope(xs, ys):
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def peak_mb(impl, two_n, loss="ntxent"):
    spec = {"impl": impl, "two_n": two_n, "d": 128, "dtype": "float32", "device": "cpu",
            "temperature": 0.5, "repeats": 1, "budget_s": 0.0, "loss": loss}  # fmt: skip
    res = run_one(spec, mem_limit_gb=8, timeout_s=300)
    assert res["status"] == "ok", f"{loss} {impl} at 2N={two_n}: {res['status']}"
    return res["peak_extra_mb"]


# The reference carries a fixed overhead at small sizes: its fitted slope is ~1.6 here, ~2 between the two largest.
@pytest.mark.parametrize(
    "loss,impl,lo,hi",
    [
        ("ntxent", "torch", 0.0, LINEAR_SLOPE),
        ("ntxent", "reference", 1.5, 2.3),
        # ~70 s on 2 busy cores
        pytest.param("supcon", "torch", 0.0, LINEAR_SLOPE, marks=pytest.mark.slow),
        pytest.param("dcl", "torch", 0.0, LINEAR_SLOPE, marks=pytest.mark.slow),
        pytest.param("dclw", "torch", 0.0, LINEAR_SLOPE, marks=pytest.mark.slow),
        pytest.param("ntxent-bank", "torch", 0.0, LINEAR_SLOPE, marks=pytest.mark.slow),
        pytest.param("supcon", "materialised", 1.5, 2.3, marks=pytest.mark.slow),
    ],
)
def test_peak_memory_slope(loss, impl, lo, hi):
    linear = hi <= LINEAR_SLOPE
    sizes = LINEAR_SIZES if linear else SIZES
    peaks = [peak_mb(impl, n, loss) for n in sizes]
    assert all(p > 0 for p in peaks), (
        f"{loss} {impl}: no memory above the baseline measured: {peaks}"
    )
    slope = loglog_slope(sizes, peaks)
    shown = f"peaks {[round(p, 1) for p in peaks]} MiB at 2N = {sizes}"
    assert lo <= slope <= hi, f"{loss} {impl}: log-log slope {slope:.2f} of {shown}"
    if linear:
        matrix_mb = sizes[-1] ** 2 * 4 / 2**20
        assert peaks[-1] < matrix_mb / 4, (
            f"{loss} {impl}: {peaks[-1]:.0f} MiB at 2N = {sizes[-1]}, not far below one "
            f"(2N)^2 fp32 matrix ({matrix_mb:.0f} MiB): {shown}"
        )

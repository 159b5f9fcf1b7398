"""Peak memory of forward+backward grows linearly in 2N for the tiled path (super-linearly, quadratically in the limit, for the reference).

Measured as each child process's peak RSS above its baseline (``bench/bench_loss.py``'s machinery), 2N = 1024 ... 8192.
"""

import math

import pytest

from fastclr.bench.bench_loss import run_one

SIZES = (1024, 2048, 4096, 8192)


def loglog_slope(xs, ys):
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def peak_mb(impl, two_n):
    spec = {"impl": impl, "two_n": two_n, "d": 128, "dtype": "float32", "device": "cpu",
            "temperature": 0.5, "repeats": 1, "budget_s": 0.0}  # fmt: skip
    res = run_one(spec, mem_limit_gb=8, timeout_s=300)
    assert res["status"] == "ok", f"{impl} at 2N={two_n}: {res['status']}"
    return res["peak_extra_mb"]


# The reference carries a fixed overhead at small sizes: its fitted slope is ~1.6 here, ~2 between the two largest.
@pytest.mark.parametrize("impl,lo,hi", [("torch", 0.0, 1.05), ("reference", 1.5, 2.3)])
def test_peak_memory_slope(impl, lo, hi):
    peaks = [peak_mb(impl, n) for n in SIZES]
    assert all(p > 0 for p in peaks), f"{impl}: no memory above the baseline measured: {peaks}"
    slope = loglog_slope(SIZES, peaks)
    assert lo <= slope <= hi, (
        f"{impl}: log-log slope {slope:.2f} of peaks {[round(p, 1) for p in peaks]} MiB"
    )

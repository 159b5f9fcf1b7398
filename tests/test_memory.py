"""Peak memory of forward+backward grows linearly in 2N for the tiled path (super-linearly, quadratically in the limit, for the reference).

Measured as each child process's peak RSS above its baseline (``bench/bench_loss.py``'s machinery), 2N = 1024 ... 8192.
The family losses run on the same tiled engine: SupCon (labels compared inside the tiles, and the materialising SupCon
for contrast), DCL, DCLW and NT-Xent against a bank of K = 2N negatives are checked with ``-m slow``.
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
        ("ntxent", "torch", 0.0, 1.05),
        ("ntxent", "reference", 1.5, 2.3),
        pytest.param("supcon", "torch", 0.0, 1.05, marks=pytest.mark.slow),  # ~70 s on 2 busy cores
        pytest.param("dcl", "torch", 0.0, 1.05, marks=pytest.mark.slow),
        pytest.param("dclw", "torch", 0.0, 1.05, marks=pytest.mark.slow),
        pytest.param("ntxent-bank", "torch", 0.0, 1.05, marks=pytest.mark.slow),
        pytest.param("supcon", "materialised", 1.5, 2.3, marks=pytest.mark.slow),
    ],
)
def test_peak_memory_slope(loss, impl, lo, hi):
    peaks = [peak_mb(impl, n, loss) for n in SIZES]
    assert all(p > 0 for p in peaks), (
        f"{loss} {impl}: no memory above the baseline measured: {peaks}"
    )
    slope = loglog_slope(SIZES, peaks)
    assert lo <= slope <= hi, (
        f"{loss} {impl}: log-log slope {slope:.2f} of peaks {[round(p, 1) for p in peaks]} MiB"
    )

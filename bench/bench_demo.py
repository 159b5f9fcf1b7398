"""The demo as a new user runs it, over several seeds: kNN top-1 before and after, and the run's total time.

    python bench/bench_demo.py                      # `fastclr pretrain` (the cpu-demo preset) with seeds 0-4
    python bench/bench_demo.py --seeds 0 --out DIR  # one seed; rows appended to DIR/bench_demo.csv

Each seed runs ``fastclr pretrain --seed S`` in its own process (what ``make demo`` runs, seed 0 being the default),
reads the summary line ``kNN top-1 (k=…): random init X% -> trained Y% (±Z points)`` and the total time from its
output, and appends one row per seed with the machine's environment and its load average at the start.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastclr.bench.harness import add_out_argument, append_csv, environment, print_table

COLUMNS = (
    "date",
    "device",
    "cpu",
    "cpu_threads",
    "load_avg",
    "torch",
    "dali",
    "fastclr",
    "seed",
    "knn_k",
    "knn_init",
    "knn_trained",
    "gain_points",
    "steps",
    "images_per_s",
    "total_s",
)
SUMMARY = re.compile(
    r"kNN top-1 \(k=(\d+)\): random init ([\d.]+)% -> trained ([\d.]+)% \(([+-][\d.]+) points\)"
)
COMPLETED = re.compile(r"^\w+ at step (\d+) \(epoch \d+\), (\d+) images/s", re.M)


def run_demo(seed: int, extra: list[str]) -> dict:
    """One ``fastclr pretrain`` with ``seed`` in a fresh process and output folder: the parsed summary."""
    with tempfile.TemporaryDirectory(prefix="fastclr-demo-") as out:
        cmd = [sys.executable, "-m", "fastclr", "pretrain", "--seed", str(seed), "--out", out]
        start = time.perf_counter()
        done = subprocess.run(cmd + extra, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"seed {seed}: fastclr pretrain failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
        )
    summary, completed = SUMMARY.search(done.stdout), COMPLETED.search(done.stdout)
    if summary is None or completed is None:
        raise SystemExit(f"seed {seed}: no summary line in the output:\n{done.stdout[-2000:]}")
    k, init, trained, gain = summary.groups()
    return {
        "seed": seed,
        "knn_k": int(k),
        "knn_init": float(init),
        "knn_trained": float(trained),
        "gain_points": float(gain),
        "steps": int(completed.group(1)),
        "images_per_s": int(completed.group(2)),
        "total_s": round(wall, 1),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    add_out_argument(parser)
    args, extra = parser.parse_known_args(argv)
    rows = []
    for seed in args.seeds:
        env = environment()  # its load average is the one at this seed's start
        rows.append(
            {
                key: value
                for key, value in {**env, **run_demo(seed, extra)}.items()
                if key in COLUMNS
            }
        )
        print_table(
            rows[-1:], ["seed", "knn_init", "knn_trained", "gain_points", "total_s", "load_avg"]
        )
    print_table(
        rows, ["seed", "knn_init", "knn_trained", "gain_points", "steps", "images_per_s", "total_s"]
    )
    append_csv(Path(args.out) / "bench_demo.csv", rows)
    return rows


if __name__ == "__main__":
    main()

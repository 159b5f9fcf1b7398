"""Per-view cost of each CPU augmentation op: the numba op against DALI's own CPU operators.

Both run on one thread over the same photo-like uint8 views (``--size`` px, default 224). The
numba column times :func:`~fastclr.pipelines.dali.cpu_augment.augment_pixels` with one op switched
on (its planar load and store included). The DALI column runs a one-thread CPU pipeline of
``--batch`` views through the op and subtracts the same pipeline without it, so what remains is
the op alone. Milliseconds per view, best of ``--repeats``.

    python bench/bench_cpu_augment.py
    python bench/bench_cpu_augment.py --size 32

A table goes to stdout and rows are appended to ``bench_cpu_augment.csv`` in ``--out`` (default ``bench/results/`` in
a source checkout, else ``./fastclr-bench``; ``--csv FILE`` names the file instead).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fastclr.bench.harness import add_out_argument, append_csv, environment, print_table

CSV_NAME = "bench_cpu_augment.csv"
# The columns of bench/results/bench_cpu_augment.csv.
CSV_COLUMNS = ("date", "device", "load_avg", "size", "op", "numba_ms", "dali_ms", "ratio")


def views(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)
    return [np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in coarse]


def ops(size: int) -> dict:
    """name -> (numba params, DALI graph img -> img), the same strengths for both."""
    from nvidia.dali import fn

    from fastclr.pipelines.augment import SimCLRAugment
    from fastclr.pipelines.dali import cpu_augment as ca
    from fastclr.pipelines.dali import graph

    window = SimCLRAugment(size).blur_kernel

    params = ca.param_vector
    strengths = dict(brightness=1.3, contrast=0.7, saturation=1.4, hue=20.0)

    def jitter(img):  # contrast, brightness, saturation + hue, as params((1, 0, 2)) orders them
        for op in (1, 0, 2):
            img = graph.jitter_step(img, op, *strengths.values())
        return img

    table = {
        "colour jitter (3 steps)": (params((1, 0, 2), **strengths), jitter),
        "grayscale": (params(gray=1), graph.grayscale),
        "solarize": (params(solarize=1), graph.solarize),
    }
    for sigma in (0.5, 1.0, 2.0):
        w = min(2 * int(np.ceil(3 * sigma)) + 1, window)
        table[f"blur sigma {sigma}"] = (
            params(blur=1, sigma=sigma, window=window),
            lambda img, s=sigma, w=w: fn.gaussian_blur(img, window_size=w, sigma=s),
        )
    return table


def time_numba(images, p, repeats: int) -> float:
    from fastclr.pipelines.dali.cpu_augment import augment_pixels

    h, w, _ = images[0].shape
    flat = [img.reshape(-1) for img in images]
    augment_pixels(flat[0].copy(), h, w, p)  # compile / load from cache
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for x in flat:
            augment_pixels(x.copy(), h, w, p)
        best = min(best, (time.perf_counter() - t) / len(flat))
    return best * 1e3


def time_dali(images, graph, repeats: int, runs: int = 8) -> float:
    from nvidia.dali import fn, pipeline_def

    def build(with_op: bool):
        @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=0)
        def pipe():
            img = fn.external_source(source=lambda: images, batch=True, layout="HWC")
            return graph(img) if with_op else img

        p = pipe()
        p.build()
        p.run()
        return p

    def best(p):
        out = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(runs):
                p.run()
            out = min(out, (time.perf_counter() - t) / (runs * len(images)))
        return out

    return max(best(build(True)) - best(build(False)), 0.0) * 1e3


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=224, help="view side in px")
    p.add_argument("--batch", type=int, default=32, help="views per timed batch")
    p.add_argument("--repeats", type=int, default=5)
    add_out_argument(p)
    p.add_argument("--csv", type=Path, help=f"CSV to append results to (default: OUT/{CSV_NAME})")
    args = p.parse_args(argv)
    if args.size < 1 or args.batch < 1 or args.repeats < 1:
        raise SystemExit("--size, --batch and --repeats must be positive")

    images = views(args.batch, args.size)
    rows = []
    for name, (params, graph) in ops(args.size).items():
        numba_ms = time_numba(images, params, args.repeats)
        dali_ms = time_dali(images, graph, args.repeats)
        rows.append(dict(op=name, numba_ms=numba_ms, dali_ms=dali_ms, ratio=dali_ms / numba_ms))

    env = environment()
    print(f"\n{env['device']} (load {env['load_avg']}), {args.size}-px views, one thread, ms/view")
    print_table(rows, ["op", "numba_ms", "dali_ms", "ratio"])
    path = append_csv(
        args.csv or args.out / CSV_NAME,
        [{key: (env | r | {"size": args.size})[key] for key in CSV_COLUMNS} for r in rows],
    )
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()

"""Throughput of the DALI SimCLR pipeline against its torchvision twin, side by side.

Both read the same JPEGs, produce the same output (two augmented views per image, float32,
normalised, channels_last) with the same number of DALI threads / DataLoader worker processes.
Throughput is pairs of views per second: ``timed batches * batch_size / seconds``, timed over
each epoch after ``--warmup`` batches (pipeline build and worker start-up excluded), median and
range over ``--repeats`` epochs.

    python bench/bench_pipeline.py                     # synthetic: 224 px from ~300-500 px JPEGs,
                                                       #            32 px from 32 px JPEGs
    python bench/bench_pipeline.py --data DIR --size 32  # an ImageFolder directory
    fastclr bench pipeline --data DIR

A table goes to stdout and rows are appended to ``bench/results/bench_pipeline.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from fastclr.pipelines import SimCLRLoader, TorchSimCLRLoader, dali_available
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results" / "bench_pipeline.csv"
BACKENDS = {"dali": SimCLRLoader, "torchvision": TorchSimCLRLoader}


def make_jpegs(root: Path, count: int, min_side: int, max_side: int, seed: int = 0) -> Path:
    """Write ``count`` photo-like JPEGs (smooth colour fields + grain) into ``root/<class>/``.

    Pure noise would compress badly and decode unrealistically slowly; upsampled low-frequency
    fields with mild grain land near the file size of real photos of the same resolution.
    """
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        coarse = rng.integers(0, 256, size=(max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 8, size=(h, w, 3))
        pixels = np.clip(field + grain, 0, 255).astype(np.uint8)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def measure(loader, warmup: int, repeats: int) -> list[float]:
    """Pairs of views per second for ``repeats`` epochs, skipping ``warmup`` batches of each."""
    rates = []
    for _ in range(repeats):
        start, timed = None, 0
        for b, (view_a, _) in enumerate(loader):
            if b == warmup - 1 or (warmup == 0 and start is None):
                start = time.perf_counter()
                continue
            if start is not None:
                timed += view_a.shape[0]
        rates.append(timed / (time.perf_counter() - start))
    return rates


def run_size(data: Path, size: int, args) -> list[dict]:
    rows = []
    for name, cls in BACKENDS.items():
        if name == "dali" and not dali_available():
            print("DALI is not importable: skipping its rows")
            continue
        with cls(data, args.batch_size, size, num_threads=args.threads, seed=0) as loader:
            if len(loader) <= args.warmup:
                raise SystemExit(
                    f"{data} gives {len(loader)} batches of {args.batch_size}; need more than "
                    f"--warmup {args.warmup}: add images or lower --batch-size"
                )
            rates = measure(loader, args.warmup, args.repeats)
            n_images = len(loader.files)
        rows.append(
            dict(
                backend=name,
                size=size,
                median=statistics.median(rates),
                low=min(rates),
                high=max(rates),
                n_images=n_images,
            )
        )
    if len(rows) == 2:
        for row in rows:
            row["speedup"] = row["median"] / rows[1]["median"]
    return rows


def environment() -> dict:
    try:
        from nvidia.dali import __version__ as dali_version
    except ImportError:
        dali_version = "absent"
    return dict(
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        dali=dali_version,
        pillow=PIL.__version__,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="ImageFolder directory (default: synthetic JPEGs)")
    p.add_argument(
        "--size",
        type=int,
        nargs="+",
        help="output side(s) in px (default: 224 32 synthetic, 224 with --data)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    p.add_argument("--images", type=int, default=640, help="synthetic images per size")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches at each epoch start")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per backend")
    p.add_argument("--csv", type=Path, default=RESULTS, help="CSV to append results to")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.data is not None and not args.data.is_dir():
        raise SystemExit(f"--data {args.data} is not a directory")
    sizes = args.size or ([224] if args.data else [224, 32])
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastclr-bench-") as tmp:
        for size in sizes:
            if args.data is not None:
                data, label = args.data, str(args.data)
            else:
                sides = (300, 500) if size > 64 else (32, 32)
                data = make_jpegs(Path(tmp) / f"s{size}", args.images, *sides)
                label = f"synthetic {sides[0]}-{sides[1]} px JPEGs"
            for row in run_size(data, size, args):
                rows.append({**row, "data": label})

    env = environment()
    print(
        f"\n{env['device']} | torch {env['torch']} | DALI {env['dali']} | "
        f"batch {args.batch_size}, {args.threads} threads/workers"
    )
    print(
        f"{'backend':<12} {'size':>5} {'pairs/s (median)':>17} {'range':>17} {'speedup':>8}  data"
    )
    for r in rows:
        spread = f"{r['low']:.0f}-{r['high']:.0f}"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(
            f"{r['backend']:<12} {r['size']:>5} {r['median']:>17.1f} {spread:>17} {speed:>8}  {r['data']}"
        )

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    fields = [
        "date",
        "device",
        "torch",
        "torchvision",
        "dali",
        "pillow",
        "backend",
        "size",
        "data",
        "n_images",
        "batch_size",
        "threads",
        "median",
        "low",
        "high",
        "speedup",
    ]
    new = not args.csv.exists()
    with open(args.csv, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**env, **r, "batch_size": args.batch_size, "threads": args.threads})
    print(f"appended {len(rows)} rows to {args.csv}")
    return rows


if __name__ == "__main__":
    main()

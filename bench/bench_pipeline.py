"""Throughput of the DALI SimCLR pipeline against its torchvision twin, side by side.

All read the same JPEGs, produce the same output (two augmented views per image, float32,
normalised, channels_last) with the same number of DALI threads / DataLoader worker processes.
Backends: ``dali`` (the default CPU pipeline: DALI decode, crop and resize, then colour, grayscale
and blur in one numba-compiled op), ``dali-ops`` (the same graph with DALI's own ops for those, as
on the GPU) and ``torchvision`` (the twin through a ``DataLoader``). The numba op is compiled
once per process, before anything is timed.
Throughput is pairs of views per second: ``timed batches * batch_size / seconds``, timed over
each epoch after ``--warmup`` batches (pipeline build and worker start-up excluded), median and
range over ``--repeats`` epochs.

    python bench/bench_pipeline.py                     # synthetic: 224 px from ~300-500 px JPEGs,
                                                       #            32 px from 32 px JPEGs
    python bench/bench_pipeline.py --data DIR --size 32  # an ImageFolder directory
    python bench/bench_pipeline.py --data DIR --size 32 --shards --max-images 10000 --backend dali torchvision
    fastclr bench pipeline --data DIR

``--shards`` also converts the images (``fastclr shards``, into a temporary folder) and reads them from the tar shards:
a second group of rows, ``data`` ending in "as shards", and a line per backend with the shards/folder ratio of pairs
per second. ``--max-images N`` reads an evenly spaced subset of ``--data`` (through a file list) to keep a run short.

A table goes to stdout and rows are appended to ``bench_pipeline.csv`` in ``--out`` (default ``bench/results/`` in a
source checkout, else ``./fastclr-bench``; ``--csv FILE`` names the file instead). Columns:
``median``/``low``/``high`` pairs per second, ``speedup`` = DALI / torchvision pairs per second,
``cpu_ms`` = CPU milliseconds per pair over whole epochs, ``cpu_speedup`` = torchvision / DALI
``cpu_ms``, which stays meaningful when other processes compete for the cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from fastclr.bench.harness import add_out_argument, append_csv, environment, print_table
from fastclr.pipelines import (
    SimCLRLoader,
    TorchSimCLRLoader,
    dali_available,
    list_images,
    write_shards,
)

CSV_NAME = "bench_pipeline.csv"
# The columns of bench/results/bench_pipeline.csv: the environment, then the run's settings and rates.
CSV_COLUMNS = ("date", "device", "torch", "torchvision", "dali", "pillow", "load_avg", "backend", "aug", "size", "data",
               "n_images", "batch_size", "threads", "median", "low", "high", "speedup", "cpu_ms", "cpu_speedup")  # fmt: skip
BACKENDS = {
    "dali": partial(SimCLRLoader, augment_impl="numba"),
    "dali-ops": partial(SimCLRLoader, augment_impl="dali"),
    "torchvision": TorchSimCLRLoader,
}
BASELINE = "torchvision"
# "simclr": the full default augmentation; "crop": random resized crop + flip only, which
# isolates decoding and resizing from the colour and blur ops.
AUGMENTATIONS = {"simclr": {}, "crop": dict(color_p=0.0, gray_p=0.0, blur_p=0.0)}


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


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished, reaped child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(loader, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Per epoch: pairs of views per second of wall time after ``warmup`` batches, and CPU
    milliseconds per pair over the whole epoch (start-up included; DataLoader workers are
    counted once they exit at the end of the epoch)."""
    rates, cpu_ms = [], []
    for _ in range(repeats):
        start, timed, total = None, 0, 0
        cpu0 = cpu_seconds()
        for b, (view_a, _) in enumerate(loader):
            total += view_a.shape[0]
            if b == max(warmup, 1) - 1:
                start = time.perf_counter()
            elif start is not None:
                timed += view_a.shape[0]
        rates.append(timed / (time.perf_counter() - start))
        cpu_ms.append(1e3 * (cpu_seconds() - cpu0) / total)
    return rates, cpu_ms


def subset(data: Path, count: int, folder: Path) -> tuple[Path, int]:
    """A file list naming ``count`` evenly spaced images of ``data`` (every class keeps its share), and how many
    images ``data`` holds."""
    files, labels, _ = list_images(data)
    picked = np.linspace(0, len(files) - 1, num=min(count, len(files))).round().astype(int)
    listing = folder / f"{data.name}-{len(picked)}.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{files[i]} {labels[i]}\n" for i in picked))
    return listing, len(files)


def to_shards(data: Path, folder: Path, shard_size: str) -> Path:
    """``data`` written as tar shards into ``folder`` (as ``fastclr shards`` does); prints what it took."""
    start = time.perf_counter()
    manifest = write_shards(data, folder, shard_size, prefix="bench", progress=False, log=None)
    mib = sum(s["bytes"] for s in manifest["shards"]) / 2**20
    print(
        f"converted {manifest['num_samples']} images into {manifest['num_shards']} shards ({mib:.1f} MiB) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return folder


def run_size(data: Path, size: int, args) -> list[dict]:
    rows = []
    for name in args.backend:
        cls = BACKENDS[name]
        if name.startswith("dali"):
            if not dali_available():
                print(f"DALI is not importable: skipping {name}")
                continue
            if name == "dali":
                from fastclr.pipelines.dali.cpu_augment import augment_op

                augment_op()  # the one-off numba compile stays out of the timed epochs
        aug = AUGMENTATIONS[args.aug]
        with cls(data, args.batch_size, size, num_threads=args.threads, seed=0, **aug) as loader:
            if len(loader) <= args.warmup:
                raise SystemExit(
                    f"{data} gives {len(loader)} batches of {args.batch_size}; need more than "
                    f"--warmup {args.warmup}: add images or lower --batch-size"
                )
            rates, cpu_ms = measure(loader, args.warmup, args.repeats)
            n_images = len(loader.files)
        rows.append(
            dict(
                backend=name,
                size=size,
                median=statistics.median(rates),
                low=min(rates),
                high=max(rates),
                cpu_ms=statistics.median(cpu_ms),
                n_images=n_images,
            )
        )
    base = next((r for r in rows if r["backend"] == BASELINE), None)
    if base is not None and len(rows) > 1:
        for row in rows:
            row["speedup"] = row["median"] / base["median"]
            row["cpu_speedup"] = base["cpu_ms"] / row["cpu_ms"]
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: pairs of views per second per output size, one bar per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["size"], r["data"]) for r in rows}, key=lambda g: -g[0])
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(2.5 + 2 * len(groups), 4))
    width = 0.8 / len(backends)
    for k, backend in enumerate(backends):
        for g, group in enumerate(groups):
            for r in rows:
                if (r["size"], r["data"]) == group and r["backend"] == backend:
                    x = g + k * width
                    ax.bar(x, r["median"], width, color=f"C{k}", label=backend if g == 0 else None)
                    ax.errorbar(
                        x,
                        r["median"],
                        [[r["median"] - r["low"]], [r["high"] - r["median"]]],
                        color="k",
                    )
                    if "speedup" in r and r["speedup"] != 1.0:
                        ax.annotate(
                            f"{r['speedup']:.1f}x", (x, r["high"]), ha="center", va="bottom"
                        )
    ax.set_xticks([g + width * (len(backends) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{size} px\n{data}" for size, data in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("pairs of views / s (median, range)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="ImageFolder directory (default: synthetic JPEGs)")
    p.add_argument(
        "--size",
        type=int,
        nargs="+",
        help="output side(s) in px (default: 224 32 synthetic, 224 with --data)",
    )
    p.add_argument("--aug", choices=sorted(AUGMENTATIONS), default="simclr", help="augmentation")
    p.add_argument(
        "--backend",
        nargs="+",
        choices=list(BACKENDS),
        default=list(BACKENDS),
        help="backends to run",
    )
    p.add_argument(
        "--shards",
        action="store_true",
        help="also read the images from tar shards (converted into a temporary folder)",
    )
    p.add_argument(
        "--shard-size", default="1000", help="images (or bytes: 64MB) per shard with --shards"
    )
    p.add_argument(
        "--max-images",
        type=int,
        help="with --data: read only this many of its images, evenly spaced",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    p.add_argument("--images", type=int, default=640, help="synthetic images per size")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches at each epoch start")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per backend")
    add_out_argument(p)
    p.add_argument("--csv", type=Path, help=f"CSV to append results to (default: OUT/{CSV_NAME})")
    p.add_argument("--plot", type=Path, help="also draw pairs/s per backend and size to this PNG")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.data is not None and not args.data.is_dir():
        raise SystemExit(f"--data {args.data} is not a directory")
    if args.max_images is not None and args.max_images < 1:
        raise SystemExit(f"--max-images must be positive, got {args.max_images}")
    sizes = args.size or ([224] if args.data else [224, 32])
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastclr-bench-") as tmp:
        for size in sizes:
            if args.data is not None:
                # The folder and its parent name the data set without machine-specific paths.
                data, label = args.data, f"{args.data.resolve().parent.name}/{args.data.name}"
                if args.max_images:
                    data, total = subset(args.data, args.max_images, Path(tmp) / "lists")
                    label += f" ({min(args.max_images, total)} of {total})"
            else:
                sides = (300, 500) if size > 64 else (32, 32)
                data = make_jpegs(Path(tmp) / f"s{size}", args.images, *sides)
                label = f"synthetic {sides[0]}-{sides[1]} px JPEGs"
            sources = [(data, label)]
            if args.shards:
                shards = to_shards(data, Path(tmp) / f"shards{size}", args.shard_size)
                sources.append((shards, f"{label} as shards"))
            for source, source_label in sources:
                for row in run_size(source, size, args):
                    rows.append({**row, "data": source_label})

    env = environment()
    print(
        f"\n{env['device']} (load average {env['load_avg']}) | torch {env['torch']} | "
        f"DALI {env['dali']} | batch {args.batch_size}, {args.threads} threads/workers, "
        f"{args.aug} augmentation"
    )
    print_table(
        [
            {
                "backend": r["backend"],
                "size": r["size"],
                "pairs/s": round(r["median"], 1),
                "range": f"{r['low']:.0f}-{r['high']:.0f}",
                "speedup": f"{r['speedup']:.2f}x" if "speedup" in r else "-",
                "cpu ms/pair": round(r["cpu_ms"], 2),
                "cpu speedup": f"{r['cpu_speedup']:.2f}x" if "cpu_speedup" in r else "-",
                "data": r["data"],
            }
            for r in rows
        ]
    )
    for r in rows:
        folder = next(
            (f for f in rows if r["data"] == f"{f['data']} as shards" and f["size"] == r["size"]
             and f["backend"] == r["backend"]),
            None,
        )  # fmt: skip
        if folder is not None:
            r["vs_folder"] = r["median"] / folder["median"]
            print(
                f"{r['backend']} {r['size']} px: shards {r['median']:.0f} pairs/s, folder "
                f"{folder['median']:.0f} pairs/s ({r['vs_folder']:.2f}x)"
            )
    settings = dict(aug=args.aug, batch_size=args.batch_size, threads=args.threads)
    path = append_csv(
        args.csv or args.out / CSV_NAME,
        [{key: (env | r | settings).get(key, "") for key in CSV_COLUMNS} for r in rows],
    )
    print(f"appended {len(rows)} rows to {path}")
    if args.plot:
        title = f"{env['device']}, {args.threads} threads/workers, {args.aug} augmentation"
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()

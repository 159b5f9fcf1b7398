"""One-command GPU check: the Triton NT-Xent against the reference, then loss, data-pipeline and training throughput.

    python bench/gpu_check.py --out DIR            # on a GPU: every section, within --budget-s (default 450 s)
    python bench/gpu_check.py --dry-run --out DIR  # on a CPU: every section at tiny sizes (CI runs it)
    fastclr bench gpu ...                          # the same

Sections (``--sections``, in this order):

* correctness: ``nt_xent_triton`` against ``nt_xent_reference`` in float64 on the same (rounded) inputs, loss and both
  gradients under an upstream gradient of 1.7, for fp32 with tf32, fp32 with ``precision="ieee"``, bf16 and fp16, at
  2N in {2, 1024, 8192, 32768} and D in {128, 100, 2048}; DCL (``exclude_pos``) against ``dcl_reference`` in exact
  fp32 and bf16 at 2N >= 4. Pass: |loss - ref| <= rtol * max(|ref|, 1) and
  max |grad - ref| <= rtol * max |ref| with the per-dtype rtol of ``DTYPE_CASES``.
* loss: forward + backward of triton, the eager reference, ``torch.compile``(reference) and lightly at 2N in
  {8192, 32768} (D = 128, bf16 and fp32), triton alone at 2N = 262144: ms (``triton.testing.do_bench``, median and
  20/80% quantiles), TFLOP/s on the three-GEMM count 3 * (2N)^2 * D * 2, the fraction of the device's dense
  tensor-core peak (``PEAK_TFLOPS``: bf16, or tf32 for fp32 inputs), peak memory above the inputs. The triton rows
  also check the autotuned kernel's loss against the float64 reference.
* pipeline: ``SimCLRLoader(device="gpu")`` against the DALI CPU pipeline on the same generated ~400 px JPEGs, 224 px
  views, pairs of views per second.
* train: ResNet-50, channels-last, bf16, batch 256, DALI GPU loader, fused (triton) loss: 50 timed steps of the
  project's trainer (``bench_train.time_steps``), source images/s = batch / median step (the network sees two views
  of each); then the same with torch.compile.

A dry run keeps every code path at tiny sizes on the CPU: triton under TRITON_INTERPRET=1, the DALI CPU pipeline, a
tiny model, and ``torch.compile`` with the "eager" backend (inductor's C++ build would take minutes).
Output: a table per section, ``gpu_check.json`` (``gpu_check_dry_run.json``) and rows appended to
``gpu_check_<section>.csv`` in --out, with device, versions and date. Exit status: 0 all passed, 1 a mismatch or an
error, 2 something was skipped for the time budget. The correctness and loss sections live in ``gpu_check_loss.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastclr.bench.gpu_check_loss import DTYPE_CASES, check_correctness, time_loss
from fastclr.bench.harness import add_out_argument, append_csv, environment, print_table

if TYPE_CHECKING:
    import torch

SECTIONS = ("correctness", "loss", "pipeline", "train")


@dataclass(frozen=True)
class Sizes:
    correctness_two_n: tuple[int, ...]
    correctness_d: tuple[int, ...]
    loss_two_n: tuple[int, ...]
    loss_big_two_n: int
    images: int  # generated JPEGs (distinct ones, then hard links up to pipeline_files)
    pipeline_files: int
    image_side: tuple[int, int]
    view_size: int
    pipeline_batch: int
    train_flags: str  # bench_train's flags for the model and batch
    train_warmup: int


FULL = Sizes(
    correctness_two_n=(2, 1024, 8192, 32768),
    correctness_d=(128, 100, 2048),
    loss_two_n=(8192, 32768),
    loss_big_two_n=262144,
    images=256,
    pipeline_files=4096,
    image_side=(360, 440),
    view_size=224,
    pipeline_batch=256,
    train_flags="--arch resnet50 --no-cifar-stem --size 224 --batch-size 256 --color-strength 1 --min-scale 0.08",
    train_warmup=5,
)
DRY = Sizes(
    correctness_two_n=(2, 8),
    correctness_d=(16, 100, 300),  # one block, a masked block, the D loop (as 128, 100, 2048)
    loss_two_n=(8,),
    loss_big_two_n=16,
    images=24,
    pipeline_files=48,
    image_side=(40, 60),
    view_size=32,
    pipeline_batch=8,
    train_flags="--arch cnn7 --width 4 --size 32 --batch-size 8",
    train_warmup=1,
)


class Budget:
    """Seconds left for the run: an item starts only if its estimate still fits."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()
        self.skipped: list[str] = []

    def allows(self, what: str, estimate_s: float) -> bool:
        left = self.seconds - (time.monotonic() - self.start)
        if estimate_s <= left:
            return True
        self.skipped.append(f"{what} ({left:.0f} s left, needs ~{estimate_s:.0f} s)")
        return False


# ----------------------------------------------------------------------------------------------------------------------
# data pipeline and training


class _Synced:
    """A loader whose batches count as ready only once the GPU has finished producing them."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        import torch

        for batch in self.loader:
            torch.cuda.synchronize()
            yield batch


def make_data(root: Path, sizes: Sizes) -> Path:
    """``sizes.images`` distinct photo-like JPEGs, hard-linked up to ``sizes.pipeline_files`` files (decoding cost is
    per file; generating them is the slow part)."""
    from fastclr.bench.bench_pipeline import make_jpegs

    make_jpegs(root, sizes.images, *sizes.image_side)
    originals = sorted(root.rglob("*.jpg"))
    for i in range(sizes.pipeline_files - len(originals)):
        src = originals[i % len(originals)]
        os.link(src, src.with_name(f"copy{i:05d}.jpg"))
    return root


def time_pipeline(ctx) -> list[dict]:
    from fastclr.bench.bench_pipeline import measure
    from fastclr.pipelines import SimCLRLoader, dali_available

    if not dali_available():
        return [{"pipeline": "dali", "status": "skipped: DALI is not importable"}]
    rows = []
    for device in ("gpu", "cpu") if ctx.cuda else ("cpu",):
        row = {"pipeline": f"dali-{device}", "size": ctx.sizes.view_size, "threads": ctx.threads}
        if not ctx.budget.allows(f"pipeline {device}", 30):
            rows.append(row | {"status": "skipped: time budget"})
            continue
        if device == "cpu":
            from fastclr.pipelines.dali.cpu_augment import augment_op

            augment_op()  # the one-off numba compile stays out of the timed epochs
        kw = dict(device=device, num_threads=ctx.threads, seed=0)
        with SimCLRLoader(ctx.data, ctx.sizes.pipeline_batch, ctx.sizes.view_size, **kw) as loader:
            rates, _ = measure(_Synced(loader) if device == "gpu" else loader, 2, 2)
        rows.append(row | {"status": "ok", "pairs_per_s": round(statistics.median(rates), 1)})
    base = next((r.get("pairs_per_s") for r in rows if r["pipeline"] == "dali-cpu"), None)
    for row in rows:
        if base and row.get("pairs_per_s"):
            row["x_cpu"] = round(row["pairs_per_s"] / base, 2)
    return rows


def time_training(ctx) -> list[dict]:
    import torch

    from fastclr.bench import bench_train
    from fastclr.train.build import build_train_loader
    from fastclr.train.dist import DistInfo

    argv = [
        *ctx.sizes.train_flags.split(),
        "--data",
        str(ctx.data),
        "--precision",
        "bf16",
        "--workers",
        str(ctx.threads),
    ]
    args = bench_train.parse_args([*argv, "--device", ctx.device.type, "--no-progress"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=ctx.device)
    rows = []
    for compiled in (False, True):
        row = {
            "model": f"{args.arch} bf16 channels-last",
            "batch_size": args.batch_size,
            "compile": compiled,
        }
        if not ctx.budget.allows(f"train compile={compiled}", 150 if compiled else 60):
            rows.append(row | {"status": "skipped: time budget"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cfg = bench_train.make_config(args, Path(tmp), backend="dali", impl="triton")
            cfg.data.pipeline_device = "gpu" if ctx.cuda else "cpu"
            # SimCLR's blur (p = 0.5 from 64 px up), which bench_train turns off for CIFAR
            cfg.data.blur_p = None
            cfg.run.compile = compiled
            loader = build_train_loader(cfg, info, torch.float32)
            try:
                with _eager_compile() if ctx.dry_run and compiled else contextlib.nullcontext():
                    warmup = ctx.sizes.train_warmup * (2 if compiled else 1)
                    times = bench_train.time_steps(cfg, loader, ctx.steps, warmup)
            finally:
                loader.close()
        step_s = statistics.median(sum(parts) for parts in zip(*times.values(), strict=True))
        phases = {f"{p}_ms": round(1e3 * statistics.median(t), 1) for p, t in times.items()}
        rows.append(
            row | {"status": "ok", "images_per_s": round(args.batch_size / step_s, 1)} | phases
        )
    return rows


@contextlib.contextmanager
def _eager_compile():
    """torch.compile with the "eager" backend: dynamo traces as on a GPU, no inductor C++ build."""
    import functools

    import torch

    compile_ = torch.compile
    torch.compile = functools.partial(compile_, backend="eager")
    try:
        yield
    finally:
        torch.compile = compile_


# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: torch.device
    device_name: str
    cuda: bool
    dry_run: bool
    sizes: Sizes
    tau: float
    threads: int
    steps: int
    budget: Budget
    data: Path | None = None


# section: (function, the columns of its table and of gpu_check_<section>.csv)
SECTION_FNS = {
    "correctness": (check_correctness, ("case", "two_n", "d", "loss_rtol", "grad_rtol", "loss_err", "grad_err",
                                        "worst", "status")),
    "loss": (time_loss, ("loss", "impl", "two_n", "d", "dtype", "ms", "ms_p20", "ms_p80", "tflops", "peak_fraction",
                         "peak_mem_mb", "loss_err", "status")),
    "pipeline": (time_pipeline, ("pipeline", "size", "threads", "pairs_per_s", "x_cpu", "status")),
    "train": (time_training, ("model", "batch_size", "compile", "images_per_s", "data_ms", "forward_ms", "loss_ms",
                              "backward_ms", "optimiser_ms", "status")),
}  # fmt: skip


def exit_status(results: dict[str, list[dict]], budget: Budget) -> int:
    """0 all passed, 1 a mismatch or a failure, 2 something skipped for the time budget."""
    statuses = [row.get("status", "") for rows in results.values() for row in rows]
    if any(s == "MISMATCH" or s.startswith(("failed", "error")) for s in statuses):
        return 1
    return 2 if budget.skipped else 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastclr bench gpu", description=__doc__.split("\n")[0])
    add_out_argument(p)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU paths (no GPU needed)")
    p.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run"
    )
    p.add_argument(
        "--budget-s", type=float, default=450.0, help="no new item starts past this (seconds)"
    )
    p.add_argument("--temperature", type=float, default=0.1, help="tau of every loss call")
    p.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1), help="DALI threads")
    p.add_argument("--train-steps", type=int, help="timed training steps (default 50; dry run 1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports the kernels
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device: run with --dry-run to check the code paths on the CPU")
    budget = Budget(args.budget_s)
    device = torch.device("cuda" if cuda else "cpu")
    env = environment(device)
    ctx = Context(
        device=device,
        device_name=env["device"],
        cuda=cuda,
        dry_run=args.dry_run,
        sizes=DRY if args.dry_run else FULL,
        tau=args.temperature,
        threads=args.threads,
        steps=args.train_steps or (1 if args.dry_run else 50),
        budget=budget,
    )
    run = "dry-run" if args.dry_run else "gpu"
    print(f"fastclr GPU check ({run}) on {env['device']}: {', '.join(args.sections)}", flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="fastclr-gpu-check-") as tmp:
        if {"pipeline", "train"} & set(args.sections):
            ctx.data = make_data(Path(tmp) / "images", ctx.sizes)
        for section in args.sections:
            fn, columns = SECTION_FNS[section]
            t0 = time.monotonic()
            try:
                rows = fn(ctx)
            except Exception as exc:  # one broken section must not hide the others' results
                traceback.print_exc()
                rows = [{"status": f"error: {type(exc).__name__}: {exc}"[:200]}]
            results[section] = [{c: row.get(c, "") for c in columns} for row in rows]
            print(f"\n== {section} ({time.monotonic() - t0:.0f} s)")
            print_table(results[section])
    status = exit_status(results, budget)
    report = {
        "run": run,
        "status": ("pass", "fail", "incomplete")[status],
        "elapsed_s": round(time.monotonic() - budget.start, 1),
        "skipped_for_budget": budget.skipped,
        "environment": env,
        "settings": {
            "tau": ctx.tau,
            "threads": ctx.threads,
            "steps": ctx.steps,
            **asdict(ctx.sizes),
        },
        "tolerances": {case: asdict(tol) for case, (_, _, tol) in DTYPE_CASES.items()},
        "sections": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    path.write_text(json.dumps(report, indent=2, default=str))
    for section, rows in results.items():
        append_csv(args.out / f"gpu_check_{section}.csv", [env | {"run": run} | r for r in rows])
    print(
        f"\n{report['status']} in {report['elapsed_s']} s: {path}, gpu_check_<section>.csv in {args.out}"
    )
    for item in budget.skipped:
        print(f"  skipped for the time budget: {item}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Full SimCLR training steps: images/s and where the time goes, and fastclr against a plain PyTorch loop.

Two modes, both side by side in one run:

* split (default): for every loader backend x loss implementation, ``--steps`` timed training steps
  after ``--warmup`` untimed ones, each cut into data / forward / loss / backward / optimiser time
  (median per phase; GPU phases are synchronised). Throughput is ``batch_size / median step time``
  in source images per second (each image gives two views, so the network sees twice as many).
* ``--baseline``: the same model trained for the same wall-clock ``--budget`` by (a) a plain PyTorch
  loop (torchvision ImageFolder + DataLoader, the textbook NT-Xent with a full similarity matrix and a
  cross-entropy, SGD with momentum, fp32, contiguous tensors) and (b) fastclr's trainer (its loader,
  the tiled/fused loss, LARS with warm-up + cosine, channels-last; bf16 autocast with
  ``--precision bf16``). Both are scored by the same kNN monitor (k=200, temperature 0.1, train
  split as memory bank) before and after training.

    python bench/bench_train.py                                  # split on synthetic 32 px JPEGs
    python bench/bench_train.py --data cifar10/train --arch resnet18 --width 16
    python bench/bench_train.py --baseline --precision bf16 --data cifar10/train --test-data cifar10/test --budget 1080
    fastclr bench train --baseline ...

A table goes to stdout; rows are appended to ``bench_train.csv`` (split) and ``bench_train_baseline.csv`` (baseline)
in ``--out`` (default ``bench/results/`` in a source checkout, else ``./fastclr-bench``), with device, versions and
date.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from fastclr.bench.harness import add_out_argument, append_csv, environment, print_table

# The environment columns of bench/results/bench_train*.csv.
ENV_COLUMNS = ("date", "device", "cpu_threads", "torch", "torchvision")
PHASES = ("data", "forward", "loss", "backward", "optimiser")


# ----------------------------------------------------------------------------------------------------------------------
# Shared set-up


def make_config(args: argparse.Namespace, out: Path, *, backend="auto", impl="auto", epochs=1):
    """A fastclr PretrainConfig for the benchmarked model, data and recipe."""
    from fastclr.train.config import PretrainConfig

    cfg = PretrainConfig()
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run
    d.data, d.size, d.backend, d.workers = str(args.data), args.size, backend, args.workers
    d.color_strength, d.blur_p, d.min_scale = args.color_strength, 0.0, args.min_scale
    m.arch, m.width, m.cifar_stem = args.arch, args.width, args.cifar_stem
    m.proj_layers, m.proj_dim = args.proj_layers, args.proj_dim
    cfg.loss.temperature, cfg.loss.loss_impl = args.temperature, impl
    # SimCLR warms up for 10 of its 100 epochs; a short budgeted run keeps that fraction.
    warmup = 0.1 * epochs if args.warmup_epochs is None else args.warmup_epochs
    o.batch_size, o.epochs, o.warmup_epochs = args.batch_size, epochs, warmup
    o.lr, o.lr_scaling = args.lr, "linear"
    r.out, r.device, r.precision, r.seed = str(out), args.device, args.precision, args.seed
    r.knn_every, r.progress, r.keep = 0, args.progress, 1
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forever(loader):
    """Batches across epoch boundaries (each ``iter`` of a fastclr loader starts the next epoch)."""
    while True:
        yield from loader


def synthetic_data(root: Path, count: int) -> Path:
    from fastclr.bench.bench_pipeline import make_jpegs

    return make_jpegs(root / "train", count, 32, 40)


# ----------------------------------------------------------------------------------------------------------------------
# Split: time per phase of full training steps


def time_steps(cfg, loader, steps: int, warmup: int) -> dict[str, list[float]]:
    """Run ``warmup + steps`` of fastclr's own ``Trainer.train_step``; seconds per phase of the timed ones."""
    from fastclr.device import resolve_device
    from fastclr.train.dist import DistInfo
    from fastclr.train.trainer import Trainer

    device = resolve_device(cfg.run.device)
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    trainer.setup(loader=loader)
    ends: dict[str, float] = {}

    def phase_ended(phase: str) -> None:
        sync(device)  # a GPU phase ends when its kernels do
        ends[phase] = time.perf_counter()

    trainer.on_phase = phase_ended
    times = {phase: [] for phase in PHASES}
    batches = forever(loader)
    for step in range(warmup + steps):
        start = time.perf_counter()
        # the data phase: waiting for the batch, then copying it to the device
        view_a, view_b = next(batches)
        trainer.train_step(view_a, view_b)
        if step >= warmup:
            for phase in PHASES:
                times[phase].append(ends[phase] - start)
                start = ends[phase]
    return times


def run_split(args: argparse.Namespace, emit) -> list[dict]:
    """Every backend x loss impl; ``emit(rows)`` records each combination as soon as it is timed."""
    from fastclr.device import resolve_device
    from fastclr.losses.nt_xent import resolve_impl
    from fastclr.pipelines import dali_available
    from fastclr.train.build import build_train_loader
    from fastclr.train.dist import DistInfo

    device = resolve_device(args.device)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    backends = [b for b in args.backends.split(",") if b != "dali" or dali_available()]
    env = {key: value for key, value in environment(device).items() if key in ENV_COLUMNS}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            cfg = make_config(args, Path(tmp), backend=backend)
            loader = build_train_loader(cfg, info, torch.float32)
            try:
                for impl in args.impls.split(","):
                    cfg.loss.loss_impl = impl
                    times = time_steps(cfg, loader, args.steps, args.warmup)
                    step_s = [sum(parts) for parts in zip(*times.values(), strict=True)]
                    median = statistics.median(step_s)
                    rows.append(
                        {
                            **env,
                            "arch": f"{args.arch}/w{args.width or 'std'}",
                            "size": args.size,
                            "batch_size": args.batch_size,
                            "loader": "dali" if backend == "dali" else "torchvision",
                            "loss_impl": resolve_impl(impl, device),
                            "images_per_s": round(args.batch_size / median, 1),
                            "step_ms": round(1e3 * median, 1),
                            "step_ms_min": round(1e3 * min(step_s), 1),
                            "step_ms_max": round(1e3 * max(step_s), 1),
                            **{
                                f"{p}_ms": round(1e3 * statistics.median(t), 1)
                                for p, t in times.items()
                            },
                        }
                    )
                    emit(rows[-1:])
            finally:
                loader.close()
    return rows


SPLIT_COLUMNS = ("loader", "loss_impl", "images_per_s", "step_ms", *(f"{p}_ms" for p in PHASES))
BASELINE_COLUMNS = (
    "run",
    "train_s",
    "steps",
    "images_per_s",
    "final_loss",
    "knn_init",
    "knn_final",
    "knn_gain",
)


# ----------------------------------------------------------------------------------------------------------------------
# Baseline: a plain PyTorch loop vs fastclr under the same time budget


def naive_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The textbook NT-Xent: full (2N, 2N) similarity matrix, diagonal masked, cross-entropy."""
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


class TwoViews:
    """ImageFolder transform returning two independently augmented views."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


def plain_loop(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> dict:
    """Train ``model`` the way a minimal SimCLR script does, for ``args.budget`` seconds."""
    from torchvision import transforms as T

    from fastclr.pipelines import IMAGENET_MEAN, IMAGENET_STD

    s = args.color_strength
    augment = T.Compose(
        [
            T.RandomResizedCrop(args.size, scale=(args.min_scale, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(args.data), transform=TwoViews(augment))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    base_lr = args.baseline_lr * args.batch_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    steps, losses, start = 0, [], time.perf_counter()
    elapsed = 0.0
    while elapsed < args.budget:
        for (view_a, view_b), _ in loader:
            # Cosine decay over the wall-clock budget, so the plain loop also ends at a small lr.
            for group in optimizer.param_groups:
                group["lr"] = (
                    base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / args.budget)))
                )
            _, z = model(torch.cat([view_a, view_b]).to(device))
            z_a, z_b = z.chunk(2)
            loss = naive_nt_xent(z_a, z_b, args.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps += 1
            elapsed = time.perf_counter() - start
            if args.progress and steps % 20 == 0:
                print(
                    f"  plain loop: step {steps}, {elapsed:.0f}s, loss {losses[-1]:.4f}", flush=True
                )
            if elapsed >= args.budget:
                break
    return {"steps": steps, "train_s": elapsed, "final_loss": statistics.mean(losses[-10:])}


def knn_top1(args: argparse.Namespace, backbone: torch.nn.Module, device: torch.device) -> float:
    """kNN top-1 on --test-data with the un-augmented --data split as memory bank."""
    from fastclr.eval import extract_features, knn_accuracy
    from fastclr.pipelines import make_loader

    common = dict(batch_size=256, size=args.size, device="cpu", num_threads=args.workers)
    feats = []
    for root in (args.data, args.test_data):
        with make_loader(backend="auto", eval=True, root=str(root), **common) as loader:
            feats.append(extract_features(backbone, loader, device))
    (bank, bank_y), (test, test_y) = feats
    return knn_accuracy(bank, bank_y, test, test_y, k=200, temperature=0.1)


def initial_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The plain loop's model: the same initial weights as fastclr's ``build_model`` with the same seed."""
    from fastclr.train.build import simclr_model

    torch.manual_seed(args.seed)
    return simclr_model(make_config(args, Path(".")).model).to(device)


def run_baseline(args: argparse.Namespace, emit) -> list[dict]:
    """Both runs from the same initial weights; ``emit(rows)`` records each run as soon as it ends."""
    from fastclr.device import resolve_device
    from fastclr.train.build import build_train_loader
    from fastclr.train.dist import DistInfo
    from fastclr.train.trainer import Trainer

    if args.test_data is None:
        raise SystemExit("--baseline needs --test-data (the kNN monitor's held-out split)")
    device = resolve_device(args.device)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    env = {key: value for key, value in environment(device).items() if key in ENV_COLUMNS}
    rows = []

    model = initial_model(args, device)
    knn_init = knn_top1(args, model.backbone, device)
    print(f"random-init encoder: kNN top-1 {100 * knn_init:.2f}%", flush=True)

    if "plain" in args.runs:
        print(f"plain PyTorch loop for {args.budget:.0f}s ...", flush=True)
        plain = plain_loop(args, model, device)
        knn = knn_top1(args, model.backbone, device)
        rows.append(baseline_row(env, args, "plain-pytorch", plain, knn_init, knn))
        emit(rows[-1:])

    if "fastclr" in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            # Pick the number of epochs that fits the budget from a short throughput probe.
            probe_cfg = make_config(args, Path(tmp) / "probe")
            loader = build_train_loader(probe_cfg, info, torch.float32)
            try:
                n_train = len(loader) * args.batch_size
                times = time_steps(probe_cfg, loader, args.probe_steps, warmup=4)
            finally:
                loader.close()
            step_s = statistics.median(sum(parts) for parts in zip(*times.values(), strict=True))
            epochs = max(1, int(args.budget * args.budget_fill / (step_s * len(loader))))
            print(
                f"fastclr: probe {args.batch_size / step_s:.0f} images/s -> {epochs} epochs "
                f"of {n_train} images for a {args.budget:.0f}s budget",
                flush=True,
            )
            cfg = make_config(args, Path(tmp) / "run", epochs=epochs)
            cfg.validate()
            trainer = Trainer(cfg, info)
            trainer.setup()
            try:
                start = time.perf_counter()
                result = trainer.fit()
                train_s = time.perf_counter() - start
            finally:
                trainer.loader.close()
            knn = knn_top1(args, trainer.model.backbone, device)
            fast = {
                "steps": result["step"],
                "train_s": train_s,
                "final_loss": statistics.mean(result["losses"][-10:]),
            }
            rows.append(baseline_row(env, args, "fastclr", fast, knn_init, knn))
            emit(rows[-1:])

    print_table(rows, BASELINE_COLUMNS)
    return rows


def baseline_row(env, args, run: str, r: dict, knn_init: float, knn: float) -> dict:
    return {
        **env,
        "run": run,
        "arch": f"{args.arch}/w{args.width or 'std'}",
        "data": str(args.data),
        "batch_size": args.batch_size,
        "budget_s": args.budget,
        "train_s": round(r["train_s"], 1),
        "steps": r["steps"],
        "images_per_s": round(r["steps"] * args.batch_size / r["train_s"], 1),
        "final_loss": round(r["final_loss"], 4),
        "knn_init": round(100 * knn_init, 2),
        "knn_final": round(100 * knn, 2),
        "knn_gain": round(100 * (knn - knn_init), 2),
        "seed": args.seed,
        "temperature": args.temperature,
        "lr": args.lr if run == "fastclr" else args.baseline_lr,
        "precision": args.precision if run == "fastclr" else "fp32",
    }


# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fastclr bench train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data", type=Path, help="ImageFolder training images (default: synthetic JPEGs)"
    )
    p.add_argument("--test-data", type=Path, help="held-out ImageFolder images (kNN, --baseline)")
    p.add_argument("--baseline", action="store_true", help="plain PyTorch loop vs fastclr")
    p.add_argument("--runs", default="plain,fastclr", help="with --baseline: which runs")
    p.add_argument(
        "--budget", type=float, default=540.0, help="training seconds per --baseline run"
    )
    p.add_argument(
        "--budget-fill",
        type=float,
        default=0.95,
        help="fraction of the budget fastclr's epoch count is sized for (from its probe speed)",
    )
    p.add_argument("--probe-steps", type=int, default=12, help="timed steps of fastclr's probe")
    p.add_argument("--arch", default="cnn7", help="backbone (fastclr.models.ARCHS)")
    p.add_argument("--width", type=int, help="backbone base width (default: the arch's)")
    p.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--proj-layers", type=int, default=2)
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="crop side in pixels")
    p.add_argument("--batch-size", type=int, default=256)
    # tau 0.1 and LARS lr 8 (x B/256) won 5-minute CIFAR-10 trials against tau 0.5/0.2 and lr 1-16 (README, Training).
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--color-strength", type=float, default=0.5)
    p.add_argument("--min-scale", type=float, default=0.2, help="smallest random-crop area")
    p.add_argument("--lr", type=float, default=8.0, help="fastclr LARS base lr (x B/256)")
    p.add_argument(
        "--warmup-epochs", type=float, help="fastclr lr warm-up (default: 10%% of the epochs)"
    )
    p.add_argument("--baseline-lr", type=float, default=0.06, help="plain loop SGD lr (x B/256)")
    p.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader workers")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--backends", default="dali,torch", help="split: loaders to compare")
    p.add_argument("--impls", default="reference,torch", help="split: loss impls to compare")
    p.add_argument("--steps", type=int, default=10, help="split: timed steps per combination")
    p.add_argument("--warmup", type=int, default=3, help="split: untimed steps first")
    p.add_argument("--images", type=int, default=1024, help="synthetic images without --data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    add_out_argument(p)
    p.add_argument(
        "--csv", type=Path, help="CSV to append to (default: bench_train[_baseline].csv in --out)"
    )
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Run the benchmark; returns the result rows (also printed and appended to the CSV)."""
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.data is None:
            if args.baseline:
                raise SystemExit("--baseline needs --data and --test-data")
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            args.data = synthetic_data(tmp, args.images)
        if not Path(args.data).is_dir():
            raise SystemExit(f"--data {args.data}: not a directory")
        name = "bench_train_baseline.csv" if args.baseline else "bench_train.csv"
        columns = BASELINE_COLUMNS if args.baseline else SPLIT_COLUMNS

        def emit(rows: list[dict]) -> None:
            print_table(rows, columns)
            append_csv(args.csv or args.out / name, rows)

        run = run_baseline if args.baseline else run_split
        return run(args, emit)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

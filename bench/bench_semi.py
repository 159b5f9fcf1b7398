"""SimCLR v2's semi-supervised recipe side by side: pretrain, then per label fraction and seed rows (a)-(g).

    python bench/bench_semi.py --data cifar10/train --test-data cifar10/test                 # pretrains first
    python bench/bench_semi.py --pretrained runs/x/checkpoints/ckpt-000001950.pt --data cifar10/train \
        --test-data cifar10/test --fractions 0.01 0.1 --seeds 0 1
    fastclr bench semi ...

1. Pretraining (``--pretrain-epochs``, the training benchmark's cnn7 width 32 at 32 px with v2's 3-layer head), or
   the checkpoint ``--pretrained`` names.
2. For every label fraction and label seed, on the same class-balanced subset (:mod:`fastclr.train.labels`):
   (a) supervised training from random init, (b) linear evaluation of the frozen backbone, (c) fine-tuning from the
   backbone (K = 0), (d) fine-tuning from the first projection-head layer (K = 1).
3. The better of (c) and (d) distilled over every training image into (e) the same architecture and (f) a half-width
   student; (g) the half-width network trained supervised on the subset from random init.

Every row is scored by its test top-1 on ``--test-data``; one row per (fraction, seed, row) with its wall time goes
to ``bench_semi.csv`` in ``--out``, a summary (mean and spread = max - min over the seeds) to stdout, and a bar chart
to ``bench_semi.png``. Fine-tuning uses v2's recipe (LARS, lr 0.005 sqrt(B), no decay or warm-up, 60 epochs below
5% of the labels, else 30) with batch 64 below 5% of the labels and 256 above (CIFAR's 1% is 500 images);
(a) and (g) take the same schedule with ``--supervised-lr``; linear evaluation the same epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from fastclr.bench.harness import add_out_argument, append_csv, environment, print_table

ROWS = {
    "a": "supervised, random init",
    "b": "linear eval, frozen backbone",
    "c": "fine-tune from backbone (K=0)",
    "d": "fine-tune from head layer 1 (K=1)",
    "e": "distilled, same architecture",
    "f": "distilled, half width",
    "g": "supervised, half width, random init",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="labelled training ImageFolder")
    p.add_argument("--test-data", type=Path, required=True, help="labelled test ImageFolder")
    p.add_argument(
        "--pretrained", type=Path, help="reuse this pretraining checkpoint (skips step 1)"
    )
    p.add_argument(
        "--pretrain-epochs", type=int, default=10, help="step 1's epochs (~18 min on 2 cores)"
    )
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="label seeds")
    p.add_argument(
        "--distill-epochs", type=int, default=4, help="epochs of (e) and (f) over every image"
    )
    p.add_argument(
        "--epochs", type=int, help="epochs of (a)-(d) and (g) (default: v2's, 60 or 30 by fraction)"
    )
    p.add_argument("--supervised-lr", type=float, default=0.1, help="(a), (g): LARS lr x sqrt(B)")
    p.add_argument("--linear-lr", type=float, default=0.1, help="(b): SGD lr")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    add_out_argument(p)
    return p.parse_args(argv)


def pretrain_checkpoint(args, work: Path) -> tuple[Path, float]:
    """Step 1: the pretraining checkpoint and the seconds it took (0 when reused)."""
    if args.pretrained is not None:
        return args.pretrained, 0.0
    from fastclr.train.config import PretrainConfig
    from fastclr.train.trainer import pretrain

    cfg = PretrainConfig()
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run
    # the training benchmark's recipe (README, Training), with SimCLR v2's 3-layer head
    d.data, d.size, d.workers, d.color_strength, d.blur_p, d.min_scale = (
        str(args.data),
        args.size,
        args.workers,
        0.5,
        0.0,
        0.2,
    )
    m.arch, m.width, m.cifar_stem, m.proj_layers = "cnn7", 32, True, 3
    cfg.loss.temperature = 0.1
    o.batch_size, o.epochs, o.warmup_epochs, o.lr = (
        256,
        args.pretrain_epochs,
        0.1 * args.pretrain_epochs,
        8.0,
    )
    r.out, r.device, r.precision, r.knn_every, r.progress, r.keep = (
        str(work / "pretrain"),
        args.device,
        args.precision,
        0,
        False,
        1,
    )
    t = time.perf_counter()
    result = pretrain(cfg)
    return Path(result["checkpoint"]), time.perf_counter() - t


def random_checkpoint(pretrained: Path, width: int, path: Path) -> Path:
    """A pretraining-format checkpoint of a freshly initialised network (the pretrained one's, at ``width``)."""
    import torch

    from fastclr.train.build import simclr_model
    from fastclr.train.checkpoint import TrainCheckpoint, save_checkpoint

    cfg = TrainCheckpoint.load(pretrained).config
    cfg.model.width = width
    torch.manual_seed(0)
    state = {"step": 0, "epoch": 0, "batch": 0, "model": simclr_model(cfg.model).state_dict()}
    return save_checkpoint({**state, "config": cfg.to_dict()}, path)


def run_settings(args, out: Path, fraction: float, seed: int, images: int) -> dict:
    """The flat settings every (a)-(g) run shares; ``images``: how many it trains on (a batch is at most that)."""
    settings = dict(
        test_data=str(args.test_data),
        size=args.size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        out=str(out),
        progress=False,
        knn_every=0,  # top-1 at the start and the end only
        keep=1,
        log_every=50,
        seed=seed,
        batch_size=min(64 if fraction < 0.05 else 256, images),
    )
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    return settings


def finetune_row(
    args, ckpt: Path, out: Path, fraction: float, seed: int, k: int, labelled: int, **extra
) -> dict:
    from fastclr.train.finetune import configure, finetune

    t = time.perf_counter()
    cfg, subset = configure(
        ckpt,
        str(args.data),
        label_fraction=fraction,
        label_seed=seed,
        from_head_layer=k,
        overrides={**run_settings(args, out, fraction, seed, labelled), **extra},
    )
    r = finetune(cfg, subset)
    return {
        "top1": r["knn_final"],
        "wall_s": time.perf_counter() - t,
        "checkpoint": r["checkpoint"],
    }


def linear_row(args, ckpt: Path, work: Path, fraction: float, seed: int) -> dict:
    """(b): a linear classifier on the frozen backbone, trained on the subset's crop + flip views."""
    from fastclr.device import resolve_device
    from fastclr.eval import linear_eval
    from fastclr.pipelines import make_loader
    from fastclr.train.evaluate import load_model
    from fastclr.train.finetune import EPOCHS_FEW, EPOCHS_MANY, FEW_LABELS
    from fastclr.train.labels import label_subset, write_file_list

    t = time.perf_counter()
    device = resolve_device(args.device)
    model, _ = load_model(ckpt, device)
    subset = label_subset(args.data, fraction=fraction, seed=seed)
    listing = write_file_list(subset, work / f"linear-{fraction:g}-{seed}.list")
    epochs = args.epochs or (EPOCHS_FEW if subset.fraction < FEW_LABELS else EPOCHS_MANY)
    common = dict(
        size=args.size, device="gpu" if device.type == "cuda" else "cpu", num_threads=args.workers
    )
    batch = run_settings(args, work, fraction, seed, len(subset.files))["batch_size"]
    with (
        make_loader(
            eval=True, augment=True, root=str(listing), batch_size=batch, seed=seed, **common
        ) as train,
        make_loader(eval=True, root=str(args.test_data), batch_size=256, **common) as test,
    ):
        r = linear_eval(
            model.backbone,
            train,
            test,
            num_classes=len(subset.classes),
            epochs=epochs,
            lr=args.linear_lr,
            device=device,
            progress=False,
        )
    return {"top1": r["top1"], "wall_s": time.perf_counter() - t}


def distill_row(args, teacher: str, out: Path, width: int, seed: int, images: int) -> dict:
    from fastclr.train.distill import configure, distill

    t = time.perf_counter()
    settings = run_settings(args, out, 1.0, seed, images)
    settings["epochs"] = args.distill_epochs
    cfg, model, subset, files = configure(
        teacher, str(args.data), student_width=width, overrides=settings
    )
    r = distill(cfg, model, subset, files)
    return {"top1": r["knn_final"], "wall_s": time.perf_counter() - t}


def label_rows(args, ckpt, randoms, width, work, fraction, seed, labelled, total):
    """Rows (a)-(g) of one label fraction and seed: ``(key, result)`` as each finishes. ``randoms``: the randomly
    initialised full- and half-width checkpoints; ``labelled``/``total``: images in the subset / in ``--data``."""
    run = work / f"{fraction:g}-{seed}"
    supervised = dict(lr=args.supervised_lr, weight_decay=1e-6)

    def tune(ckpt_path, name, k, **extra):
        return finetune_row(args, ckpt_path, run / name, fraction, seed, k, labelled, **extra)

    def student(teacher, name, w):
        return distill_row(args, teacher, run / name, w, seed, total)

    yield "a", tune(randoms[0], "a", 0, **supervised)
    yield "b", linear_row(args, ckpt, work, fraction, seed)
    c = tune(ckpt, "c", 0)
    yield "c", c
    d = tune(ckpt, "d", 1)
    yield "d", d
    best = max(c, d, key=lambda r: r["top1"])["checkpoint"]
    yield "e", student(best, "e", width)
    yield "f", student(best, "f", max(1, width // 2))
    yield "g", tune(randoms[1], "g", 0, **supervised)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and spread (max - min) of the test top-1 over the seeds, per fraction and row."""
    out = []
    for fraction in dict.fromkeys(r["fraction"] for r in rows):
        for key, name in ROWS.items():
            got = [r for r in rows if r["fraction"] == fraction and r["row"] == key]
            if not got:
                continue
            top1 = [100 * r["top1"] for r in got]
            out.append(
                {
                    "fraction": fraction,
                    "row": f"({key}) {name}",
                    "top1_mean": round(statistics.fmean(top1), 2),
                    "spread": round(max(top1) - min(top1), 2),
                    "seeds": len(got),
                    "wall_s_mean": round(statistics.fmean(r["wall_s"] for r in got), 1),
                }
            )
    return out


def plot(summary: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = list(dict.fromkeys(s["fraction"] for s in summary))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(ROWS)
    for i, key in enumerate(ROWS):
        xs, ys, errs = [], [], []
        for j, f in enumerate(fractions):
            s = next(
                (s for s in summary if s["fraction"] == f and s["row"].startswith(f"({key})")), None
            )
            if s is not None:
                xs.append(j + (i - len(ROWS) / 2 + 0.5) * width)
                ys.append(s["top1_mean"])
                errs.append(s["spread"] / 2)
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=f"({key}) {ROWS[key]}")
    ax.set_xticks(range(len(fractions)), [f"{100 * f:g}% labels" for f in fractions])
    ax.set(
        ylabel="test top-1 (%)",
        title="SimCLR v2 semi-supervised stages (mean over label seeds, bar = spread)",
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=4)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> list[dict]:
    """Run the benchmark; returns its rows (also appended to ``bench_semi.csv`` in ``--out``)."""
    args = parse_args(argv)
    env = environment(args.device)
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        work = args.work or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fastclr-semi-"))
        )
        work.mkdir(parents=True, exist_ok=True)
        ckpt, pretrain_s = pretrain_checkpoint(args, work)
        print(f"pretraining checkpoint {ckpt} ({pretrain_s / 60:.1f} min)", flush=True)
        from fastclr.train.checkpoint import TrainCheckpoint

        width = TrainCheckpoint.load(ckpt).config.model.width or 32
        randoms = (
            random_checkpoint(ckpt, width, work / "random-full"),
            random_checkpoint(ckpt, max(1, width // 2), work / "random-half"),
        )

        def record(fraction, seed, key, result):
            row = {
                **env,
                "pretrain_s": round(pretrain_s, 1),
                "fraction": fraction,
                "seed": seed,
                "row": key,
                "name": ROWS[key],
                "top1": result["top1"],
                "wall_s": round(result["wall_s"], 1),
            }
            rows.append(row)
            print(
                f"{100 * fraction:g}% labels, seed {seed}, ({key}) {ROWS[key]}: top-1 {100 * result['top1']:.2f}% "
                f"in {result['wall_s']:.0f} s",
                flush=True,
            )
            return result

        from fastclr.train.labels import label_subset

        total = label_subset(args.data, fraction=1.0).total
        for fraction in args.fractions:
            # the subset's size depends on the fraction alone (round(F * n_c) per class), not on the seed
            labelled = len(label_subset(args.data, fraction=fraction).files)
            for seed in args.seeds:
                rows_of = label_rows(
                    args, ckpt, randoms, width, work, fraction, seed, labelled, total
                )
                for key, result in rows_of:
                    record(fraction, seed, key, result)
    summary = summarize(rows)
    print_table(summary)
    append_csv(args.out / "bench_semi.csv", rows)
    print(
        f"rows appended to {args.out / 'bench_semi.csv'}; plot {plot(summary, args.out / 'bench_semi.png')}"
    )
    return rows


if __name__ == "__main__":
    main()

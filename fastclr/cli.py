"""The ``fastclr`` command (also ``python -m fastclr``).

    fastclr pretrain [--data DIR] [--test-data DIR] [--preset NAME | --config FILE] [flags]   # see --help
    fastclr knn --ckpt CKPT [--data DIR --test-data DIR] [--bank-dtype fp16]   # also under torchrun: sharded
    fastclr linear --ckpt CKPT [--data DIR --test-data DIR] [--epochs 10 --lr 0.1]
    fastclr export --ckpt CKPT --out FILE [--format pt|safetensors] [--with-head K]
    fastclr finetune --ckpt CKPT --data DIR --test-data DIR (--label-fraction F | --labels-file FILE) [--from-head-layer K]
    fastclr distill --teacher CKPT --data DIR [--student-arch A --student-width W] [--temperature 1.0]
    fastclr shards DIR OUT [--shard-size 1000|500MB] [--verify]   # an ImageFolder as tar shards for --data
    fastclr bench loss|pipeline|cpu_augment|train|dist|gpu|demo|semi [benchmark flags]   # gpu: bench/gpu_check.py
    fastclr info

Bad input (missing data, impossible settings, unreadable checkpoints) ends with one ``fastclr: error: ...`` line on
stderr and exit status 1; set ``FASTCLR_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from collections.abc import Sequence

# command name -> module in fastclr.bench (bench/)
BENCHMARKS = {
    "loss": "bench_loss",
    "pipeline": "bench_pipeline",
    "cpu_augment": "bench_cpu_augment",
    "train": "bench_train",
    "dist": "bench_dist",
    "gpu": "gpu_check",
    "demo": "bench_demo",
    "semi": "bench_semi",
}


def _parser() -> argparse.ArgumentParser:
    from fastclr import __version__
    from fastclr.device import DEVICE_CHOICES
    from fastclr.train.config_io import add_config_flags

    parser = argparse.ArgumentParser(
        prog="fastclr", description="Fast SimCLR pretraining and evaluation."
    )
    parser.add_argument("--version", action="version", version=f"fastclr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = sub.add_parser(
        "pretrain",
        help="SimCLR pretraining (no --data: the embedded shapes demo)",
        description="SimCLR pretraining. Without --data it trains on the embedded shapes data set with the cpu-demo "
        "preset. Flags override the preset/config file, which overrides the defaults. Under torchrun the same "
        "command trains with DDP.",
    )
    add_config_flags(pre)

    def eval_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ckpt", required=True, help="checkpoint written by fastclr pretrain")
        p.add_argument("--data", help="training images (default: the checkpoint's --data)")
        p.add_argument("--test-data", help="test images (default: the checkpoint's --test-data)")
        p.add_argument(
            "--batch-size", type=int, default=256, help="images per batch (default: 256)"
        )
        p.add_argument("--size", type=int, help="image side in px (default: the checkpoint's)")
        p.add_argument(
            "--workers",
            type=int,
            default=2,
            help="decoding threads / worker processes (default: 2)",
        )
        p.add_argument(
            "--backend",
            choices=("auto", "dali", "torch"),
            default="auto",
            help="data loader (default: auto)",
        )
        p.add_argument(
            "--device",
            choices=DEVICE_CHOICES,
            default="auto",
            help="compute device (default: auto)",
        )
        p.add_argument(
            "--dist-timeout",
            type=float,
            default=60.0,
            metavar="MINUTES",
            help="under torchrun: minutes a rank waits in a collective before failing (default: 60)",
        )

    knn = sub.add_parser(
        "knn",
        help="kNN top-1/top-5 of a checkpoint's backbone",
        description="Weighted kNN (cosine) evaluation of a checkpoint. Under torchrun every rank extracts and "
        "classifies its shard; the result equals one process's.",
    )
    eval_flags(knn)
    knn.add_argument("--k", type=int, default=200, help="neighbours (default: 200)")
    knn.add_argument(
        "--temperature", type=float, default=0.1, help="vote temperature (default: 0.1)"
    )
    knn.add_argument(
        "--bank-dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="how every rank holds the gathered feature bank: fp16 halves its memory, each similarity moves by "
        "at most 2^-11 (default: fp32)",
    )

    lin = sub.add_parser(
        "linear",
        help="linear evaluation of a checkpoint's frozen backbone",
        description="Linear evaluation: frozen backbone, linear classifier, crop+flip augmentation only.",
    )
    eval_flags(lin)
    lin.add_argument(
        "--epochs", type=int, default=10, help="classifier training epochs (default: 10)"
    )
    lin.add_argument(
        "--lr", type=float, default=0.1, help="classifier learning rate (default: 0.1)"
    )
    lin.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )

    exp = sub.add_parser(
        "export",
        help="write a checkpoint's backbone as a plain state_dict (torch.save or safetensors)",
    )
    exp.add_argument("--ckpt", required=True, help="checkpoint written by fastclr pretrain")
    exp.add_argument(
        "--out",
        required=True,
        help="output file: the backbone's state_dict, and OUT.json with the line that loads it",
    )
    exp.add_argument(
        "--format",
        choices=("pt", "safetensors"),
        help="torch.save (pt) or safetensors (default: safetensors for a .safetensors OUT, else pt)",
    )
    exp.add_argument(
        "--with-head",
        type=int,
        metavar="K",
        help="also keep the first K projection-head layers (a fine-tuned or distilled checkpoint exports its "
        "whole classifier, head layers included, without this flag)",
    )

    from fastclr.train.stage_flags import add_distill_flags, add_finetune_flags  # argparse only

    ft = sub.add_parser(
        "finetune",
        help="SimCLR v2 fine-tuning of a pretrained network on a few labels",
        description="Fine-tune the whole pretrained network plus a linear classifier on a label subset (SimCLR v2 "
        "defaults: LARS, lr 0.005*sqrt(B), no weight decay or warm-up, crop+flip). Under torchrun: DDP.",
    )
    add_finetune_flags(ft)
    dis = sub.add_parser(
        "distill",
        help="SimCLR v2 distillation of a fine-tuned teacher into a student",
        description="Train a student (the teacher's architecture or a smaller one) to match the teacher's tempered "
        "predictions on the unlabelled images, optionally plus the cross-entropy on labelled ones.",
    )
    add_distill_flags(dis)

    shards = sub.add_parser(
        "shards",
        help="write an image folder as tar shards (webdataset layout) for --data",
        description="Write an ImageFolder (or flat folder, or file list) DIR as tar shards in OUT: OUT/<prefix>-"
        "000000.tar, ... with <key>.<ext> and <key>.cls members, and OUT/manifest.json (classes, sha256 of every "
        "shard). Resumable: run the same command again after an interruption. Read the result with --data OUT.",
    )
    shards.add_argument(
        "source", metavar="DIR", help="ImageFolder, flat folder of images or file list"
    )
    shards.add_argument(
        "out", metavar="OUT", help="folder for the shards (new, empty, or this conversion's)"
    )
    shards.add_argument(
        "--shard-size",
        default="1000",
        help="images per shard (e.g. 1000) or bytes per shard (e.g. 500MB, 1GiB) (default: 1000)",
    )
    shards.add_argument("--prefix", help="shard file name prefix (default: DIR's name)")
    shards.add_argument(
        "--on-corrupt",
        choices=("error", "skip"),
        default="error",
        help="a bad image stops the conversion (error) or is left out (skip) (default: error)",
    )
    shards.add_argument(
        "--verify",
        action="store_true",
        help="re-hash shards already written (sha256) before keeping them",
    )
    shards.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )

    bench = sub.add_parser(
        "bench", help="run a benchmark: " + ", ".join(BENCHMARKS), add_help=False
    )
    bench.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark")
    bench.add_argument(
        "args", nargs=argparse.REMAINDER, help="flags passed on to the benchmark (see its --help)"
    )

    sub.add_parser("info", help="versions, devices, and what 'auto' picks here")
    return parser


def _pretrain(args: argparse.Namespace) -> int:
    from fastclr.train.config_io import config_from_args
    from fastclr.train.trainer import pretrain

    demo = getattr(args, "data", None) is None
    if demo and args.preset is None and args.config is None:
        # The demo: the embedded shapes want the small CPU recipe, not the ImageNet defaults.
        args.preset = "cpu-demo"
    cfg = config_from_args(args)
    if demo and "out" not in vars(args) and cfg.run.resume is None:
        # running the demo again starts a new run beside the old one
        cfg.run.out = _unused_run_dir(cfg.run.out)
    result = pretrain(cfg)
    return 0 if result["status"] in ("completed", "stopped", "max_steps") else 1


def _unused_run_dir(out: str) -> str:
    """``out``, or ``out-2``, ``out-3``, ... : the first that holds no checkpoints yet."""
    from fastclr.train.checkpoint import list_checkpoints

    candidate, n = out, 1
    while list_checkpoints(os.path.join(candidate, "checkpoints")):
        n += 1
        candidate = f"{out}-{n}"
    return candidate


def _knn(args: argparse.Namespace) -> int:
    from fastclr.train.evaluate import run_knn

    r = run_knn(
        args.ckpt,
        args.data,
        args.test_data,
        k=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
        size=args.size,
        workers=args.workers,
        backend=args.backend,
        device=args.device,
        bank_dtype=args.bank_dtype,
        dist_timeout=args.dist_timeout,
    )
    if r["rank"] == 0:
        print(
            f"kNN top-1 (k={r['k']}): {100 * r['knn_top1']:.2f}%, top-5 {100 * r['knn_top5']:.2f}%  ({r['train_images']} bank images from {r['train']}, {r['test_images']} test images from {r['test']})"
        )
    return 0


def _linear(args: argparse.Namespace) -> int:
    from fastclr.train.evaluate import run_linear

    r = run_linear(
        args.ckpt,
        args.data,
        args.test_data,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        size=args.size,
        workers=args.workers,
        backend=args.backend,
        device=args.device,
        progress=args.progress,
        dist_timeout=args.dist_timeout,
    )
    if r["rank"] == 0:
        print(
            f"linear evaluation: top-1 {100 * r['top1']:.2f}%, top-5 {100 * r['top5']:.2f}%  (train {r['train']}, test {r['test']})"
        )
    return 0


def _stage(name: str, args: argparse.Namespace) -> int:
    module = importlib.import_module(f"fastclr.train.{name}")
    return module.main(args)


def _export(args: argparse.Namespace) -> int:
    from fastclr.train.evaluate import export_backbone

    r = export_backbone(args.ckpt, args.out, args.format, args.with_head)
    what = f"{r['arch']} backbone"
    if r.get("head_layers"):
        what += f" + {r['head_layers']} projection-head layer(s)"
    if r.get("num_classes"):
        what += f" + a {r['num_classes']}-class linear classifier"
    print(
        f"wrote {r['out']} ({r['format']}): {what}, {r['tensors']} tensors, {r['feat_dim']}-d features"
    )
    print(f"load it with (also in {r['info']}):")
    print(r["load"])
    return 0


def _shards(args: argparse.Namespace) -> int:
    from fastclr.pipelines.shard_writer import write_shards

    write_shards(
        args.source,
        args.out,
        args.shard_size,
        prefix=args.prefix,
        on_corrupt=args.on_corrupt,
        verify=args.verify,
        progress=args.progress,
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"fastclr.bench.{BENCHMARKS[args.benchmark]}")
    result = module.main(args.args)
    # gpu_check returns its exit status; the others return their rows
    return result if isinstance(result, int) else 0


def info_lines() -> list[str]:
    """What ``fastclr info`` prints: versions, devices, and the choices ``auto`` makes on this machine, with reasons."""
    import numpy
    import torch
    import torchvision

    from fastclr import __version__
    from fastclr.device import native_cpu_bf16
    from fastclr.losses.nt_xent import resolve_impl, triton_available
    from fastclr.pipelines import dali_available
    from fastclr.pipelines.dali import resolve_augment_impl
    from fastclr.train.build import describe_precision

    def version(module: str) -> str:
        try:
            return importlib.import_module(module).__version__
        except ImportError:
            return "not installed"

    cuda = torch.cuda.is_available()
    lines = [
        f"fastclr {__version__}, python {platform.python_version()} ({platform.platform()})",
        f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}), torchvision {torchvision.__version__}, numpy {numpy.__version__}",
        f"triton {version('triton')}, nvidia-dali {version('nvidia.dali')}, numba {version('numba')}",
        f"CPU: {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads, "
        f"bf16 {'native (AVX512-BF16 or AMX)' if native_cpu_bf16() else 'emulated (no AVX512-BF16 or AMX)'}",
    ]
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}"
            )
    else:
        lines.append("GPU: none (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if cuda else "cpu")
    impl = resolve_impl("auto", device)
    why = (
        "CUDA tensors and triton imports"
        if impl == "triton"
        else (
            "no CUDA device, so tensors live on the CPU" if not cuda else "triton does not import"
        )
    )
    lines.append(
        f"loss impl 'auto' -> {impl} ({why}; triton {'importable' if triton_available() else 'not importable'})"
    )
    dali = dali_available()
    lines.append(
        f"data backend 'auto' -> {'dali' if dali else 'torch (torchvision twin)'} ({'nvidia.dali imports' if dali else 'nvidia.dali does not import'})"
    )
    lines.append(
        f"pipeline device 'auto' -> {'gpu' if cuda else 'cpu'} ({'CUDA is available: nvJPEG decode + GPU augmentation' if cuda else 'no CUDA device: DALI CPU decoder'})"
    )
    augment = resolve_augment_impl("auto", "gpu" if cuda else "cpu")
    lines.append(
        f"pipeline augment_impl 'auto' -> {augment} ({'one numba-compiled op per view' if augment == 'numba' else 'DALI operators'})"
    )
    lines.append(f"precision 'auto' -> {describe_precision('auto', device)}")
    lines.append(
        "--compile: torch.compile of the model, except under multi-GPU DDP, where it is skipped with a notice "
        f"(SyncBatchNorm layers, at each of which torch {torch.__version__}'s dynamo breaks the graph)"
    )
    return lines


def _info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


COMMANDS = {
    "pretrain": _pretrain,
    "knn": _knn,
    "linear": _linear,
    "export": _export,
    "finetune": lambda args: _stage("finetune", args),
    "distill": lambda args: _stage("distill", args),
    "shards": _shards,
    "bench": _bench,
    "info": _info,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastclr`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("fastclr: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        if os.environ.get("FASTCLR_DEBUG"):
            raise
        rank = os.environ.get("RANK", "0")
        prefix = "fastclr: error: " if rank == "0" else f"fastclr [rank {rank}]: error: "
        # one line, whatever the exception text holds
        message = " ".join(str(e).split()) or type(e).__name__
        from fastclr.train.trainer import TrainingError

        expected = (ValueError, TypeError, OSError, TrainingError)
        hint = (
            ""
            if isinstance(e, expected)
            else f" ({type(e).__name__}; FASTCLR_DEBUG=1 shows the traceback)"
        )
        print(prefix + message + hint, file=sys.stderr)
        return 1

"""The flags of ``fastclr finetune`` and ``fastclr distill``, and the defaults their help names.

Only :mod:`argparse` here: ``fastclr --help`` and every other command build these flags without importing torch's
training stack (:mod:`fastclr.train.finetune` and :mod:`fastclr.train.distill` import this module, not the reverse).
"""

from __future__ import annotations

import argparse
from typing import Any

# fine-tuning (fastclr.train.finetune): v2, section 4 and the README's fine-tuning command: lr 0.005 x sqrt(1024) =
# 0.16, batch 1024, no decay, no warm-up
DEFAULT_BATCH = 1024
DEFAULT_LR, DEFAULT_SCALING = 0.005, "sqrt"
FEW_LABELS = (
    0.05  # below this share of the labels 60 epochs (v2's 1%), from it on 30 (v2's 10% and 100%)
)
EPOCHS_FEW, EPOCHS_MANY = 60, 30

# distillation (fastclr.train.distill)
DEFAULT_EPOCHS = 400  # v2, section 4
# v2 distils with pretraining's 10 warm-up epochs over 400 epochs: the default warm-up is that share of a shorter run
# (pretraining's 10 epochs would be the whole of a 10-epoch run, which would never reach its peak learning rate)
WARMUP_SHARE = 10 / DEFAULT_EPOCHS

# Command-line flags shared by the stages: the pretraining settings a stage run uses, by (flag, type, help)

_RUN_FLAGS: dict[str, tuple[type, str]] = {
    "data": (str, "training images: an ImageFolder dir root/<class>/<img>"),
    "test_data": (str, "held-out ImageFolder for the top-1 monitor (none: no monitor)"),
    "out": (str, "run directory: checkpoints, label list, metrics, resolved config, curves"),
    "resume": (
        str,
        "'auto' = continue from the newest valid checkpoint in OUT, or a checkpoint path",
    ),
    "epochs": (int, "training epochs"),
    "batch_size": (int, "global batch size (images per step over all ranks)"),
    "lr": (float, "base learning rate before --lr-scaling"),
    "lr_scaling": (str, "peak lr = lr*B/256 (linear), lr*sqrt(B) (sqrt) or lr (none)"),
    "weight_decay": (
        float,
        "weight decay (not on biases, normalisation parameters or the classifier)",
    ),
    "warmup_epochs": (float, "linear learning-rate warm-up, in epochs"),
    "momentum": (float, "LARS momentum"),
    "size": (int, "side of the square crops in pixels"),
    "backend": (str, "data loader: dali, torch or auto"),
    "workers": (int, "decoding threads (DALI) or worker processes (torchvision) per rank"),
    "pipeline_device": (str, "where DALI decodes: cpu, gpu or auto"),
    "on_corrupt": (str, "unreadable images: error or skip"),
    "seed": (int, "random seed (data order, augmentation, initialisation)"),
    "device": (str, "compute device: auto, cuda or cpu"),
    "precision": (str, "autocast precision: auto, bf16, fp16 or fp32"),
    "compile": (bool, "torch.compile the model"),
    "ckpt_every": (int, "also checkpoint every N steps (0 = at the end of each epoch only)"),
    "keep": (int, "number of most recent checkpoints kept"),
    "knn_every": (int, "top-1 on --test-data every N epochs (0 = at the start and the end only)"),
    "max_steps": (int, "stop (with a checkpoint) after this many steps in total"),
    "log_every": (int, "read the losses back and write a metrics row every N steps"),
    "skip_nonfinite": (
        bool,
        "skip steps whose loss is NaN/inf and count them, instead of stopping",
    ),
    "progress": (bool, "show a progress bar"),
    "dist_timeout": (float, "minutes a rank waits in a collective before failing"),
}
_FLAG_NAMES = {"knn_every": "--eval-every"}


def add_run_flags(parser: argparse.ArgumentParser, defaults: dict[str, str]) -> None:
    """The pretraining settings a stage takes as flags (``defaults``: the help's note on each default)."""
    group = parser.add_argument_group("run settings (as fastclr pretrain's)")
    for key, (kind, help_text) in _RUN_FLAGS.items():
        flag = _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))
        # argparse expands %-formats in help: a literal % (e.g. "5% of the labels") is written %%
        note = f" (default: {defaults[key]})".replace("%", "%%") if key in defaults else ""
        if kind is bool:
            group.add_argument(
                flag,
                dest=key,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text + note,
            )
        else:
            group.add_argument(flag, dest=key, type=kind, default=None, help=help_text + note)


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The run flags given, as flat settings (``{"epochs": 5}``) for ``PretrainConfig.update(..., COMMAND_LINE)``,
    which checks and coerces them as pretraining's flags."""
    return {key: getattr(args, key) for key in _RUN_FLAGS if getattr(args, key, None) is not None}


def add_finetune_flags(parser: argparse.ArgumentParser) -> None:
    """``fastclr finetune``'s flags."""
    parser.add_argument("--ckpt", required=True, help="pretraining checkpoint (fastclr pretrain)")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument(
        "--label-fraction",
        type=float,
        metavar="F",
        help="label a class-balanced share F in (0, 1] of --data (e.g. 0.01, 0.1), drawn with --label-seed",
    )
    labels.add_argument(
        "--labels-file",
        metavar="FILE",
        help="the labelled images: one path (relative to --data) or file name (e.g. google-research/simclr's "
        "1percent.txt) per line; a run's OUT/labels.txt",
    )
    parser.add_argument(
        "--label-seed", type=int, default=0, help="seed of the --label-fraction draw (default: 0)"
    )
    parser.add_argument(
        "--from-head-layer",
        type=int,
        default=1,
        metavar="K",
        help="projection-head layers under the classifier: 0 = the backbone (v1), 1 = v2's default, up to the "
        "head's depth (default: 1)",
    )
    add_run_flags(
        parser,
        {
            "epochs": f"{EPOCHS_FEW} below {FEW_LABELS:.0%} of the labels, else {EPOCHS_MANY}",
            "batch_size": f"{DEFAULT_BATCH}, or the subset's size when smaller",
            "lr": f"{DEFAULT_LR} with sqrt scaling: 0.16 at batch 1024",
            "lr_scaling": DEFAULT_SCALING,
            "weight_decay": "0",
            "warmup_epochs": "0",
            "out": "runs/finetune",
            "size": "the pretraining run's",
            "knn_every": "1",
        },
    )


def add_distill_flags(parser: argparse.ArgumentParser) -> None:
    """``fastclr distill``'s flags."""
    parser.add_argument(
        "--teacher",
        required=True,
        help="fine-tuned checkpoint (fastclr finetune, or an earlier distill)",
    )
    parser.add_argument(
        "--student-arch", help="the student's backbone (default: the teacher's: self-distillation)"
    )
    parser.add_argument(
        "--student-width",
        type=int,
        help="the student's base width (default: the teacher's, or the standard one of another --student-arch)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="tau of both softmaxes (default: 1.0; v2 uses 0.1 for self-distillation)",
    )
    parser.add_argument(
        "--labels-file",
        metavar="FILE",
        help="labelled images whose cross-entropy is added (e.g. the teacher run's OUT/labels.txt)",
    )
    parser.add_argument(
        "--label-weight",
        type=float,
        metavar="ALPHA",
        help="weight of that cross-entropy (default: 1 with --labels-file, else 0)",
    )
    add_run_flags(
        parser,
        {
            "epochs": str(DEFAULT_EPOCHS),
            "warmup_epochs": f"10, at most {WARMUP_SHARE:.1%} of --epochs",
            "out": "runs/distill",
            "size": "the teacher's",
            "batch_size": "256",
            "knn_every": "1",
        },
    )

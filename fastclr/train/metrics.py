"""Run metrics: CSV + JSONL files (and TensorBoard scalars with ``--tensorboard``) on the main rank, and the end-of-run PNG.

Files under the run directory:
    metrics.csv    one row per logged training step (step, epoch, loss, lr, contrastive top-1, images/s, timings)
    knn.csv        one row per kNN evaluation (step, epoch, knn_top1); fine-tuning and distillation write test.csv
                   (step, epoch, test_top1) instead, and train_top1 / teacher_agreement for contrastive_top1
                   (:class:`MetricNames`)
    metrics.jsonl  every record of both kinds, with a "kind" field
    curves.png     loss and kNN top-1 curves (written by :func:`plot_curves`)
    tensorboard/   TensorBoard event files (``--tensorboard``): train/loss, train/lr, train/images_per_s,
                   train/contrastive_top1 and knn/knn_top1 against the step
A run appends to them. At its start it first drops the rows of the steps it is about to train again (those after the
checkpoint it resumed from; every row when it starts from scratch), so each step keeps one row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastclr.train.checkpoint import atomic_write
from fastclr.train.config import TENSORBOARD_MISSING

TRAIN_FIELDS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "contrastive_top1",
    "images_per_s",
    "data_s",
    "step_s",
    "elapsed_s",
)
KNN_FIELDS = ("step", "epoch", "knn_top1")
# what --tensorboard plots; the timings stay in the CSV
TENSORBOARD_SCALARS = {
    "train": ("loss", "lr", "images_per_s", "contrastive_top1"),
    "knn": ("knn_top1",),
}


@dataclasses.dataclass(frozen=True)
class MetricNames:
    """What a run's files call its numbers: pretraining's by default. Callers log rows with pretraining's keys
    (``"knn"`` rows with ``knn_top1``, ``"train"`` rows with ``contrastive_top1``); :class:`MetricsLog` writes them
    under these names, so fine-tuning and distillation (:mod:`fastclr.train.stage`) name their own numbers."""

    batch_top1: str = "contrastive_top1"  # metrics.csv: the top-1 of each logged training batch
    held_out: str = "knn"  # the held-out evaluation: <held_out>.csv and the "kind" of its records
    held_out_top1: str = "knn_top1"
    loss_title: str = "NT-Xent loss"  # curves.png
    held_out_title: str = "kNN top-1 on the held-out split"

    def rename(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with pretraining's keys replaced by these names."""
        keys = {"contrastive_top1": self.batch_top1, "knn_top1": self.held_out_top1}
        return {keys.get(k, k): v for k, v in row.items()}

    def fields(self, kind: str) -> tuple[str, ...]:
        return tuple(self.rename(dict.fromkeys({"train": TRAIN_FIELDS, "knn": KNN_FIELDS}[kind])))

    def csv_name(self, kind: str) -> str:
        return "metrics.csv" if kind == "train" else f"{self.held_out}.csv"


PRETRAIN_NAMES = MetricNames()


class MetricsLog:
    """Append-only metric files; a disabled log (non-main ranks) accepts calls and writes nothing.

    ``start_step``: the step the run starts from (0: from scratch); the rows after it, which the run will log again,
    are removed first (:func:`truncate_after`), and TensorBoard purges its scalars after it. None leaves the files as
    they are. ``tensorboard=True`` also writes the rows as TensorBoard scalars to ``out_dir/tensorboard``; it needs the
    optional ``tensorboard`` package (``pip install 'fastclr[tensorboard]'``), and without it raises ImportError
    saying so.
    """

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = False,
        *,
        start_step: int | None = None,
        names: MetricNames = PRETRAIN_NAMES,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.names = names
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # from scratch nothing is kept, not even step 0 (the kNN of the random init is measured again)
        last_kept = None if start_step is None else (start_step if start_step > 0 else -1)
        if last_kept is not None:
            truncate_after(self.out_dir, last_kept, names)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError(TENSORBOARD_MISSING) from None
            purge = None if last_kept is None else last_kept + 1
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge)

    def log(self, kind: str, row: dict[str, Any]) -> None:
        """Record ``row`` as a ``"train"`` or ``"knn"`` metric."""
        if not self.enabled:
            return
        fields, path = self.names.fields(kind), self.out_dir / self.names.csv_name(kind)
        tb_keys = tuple(self.names.rename(dict.fromkeys(TENSORBOARD_SCALARS[kind])))
        row, kind = self.names.rename(row), kind if kind == "train" else self.names.held_out
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        with (self.out_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"kind": kind, **row}) + "\n")
        if self._tb is not None:
            for key in tb_keys:
                if row.get(key) is not None:
                    self._tb.add_scalar(f"{kind}/{key}", row[key], row["step"])
            self._tb.flush()  # a killed run keeps its scalars up to its last row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _rewrite(path: Path, keep: Callable[[str], bool], header: bool) -> None:
    """Atomically replace ``path`` by its lines that ``keep`` accepts (and its first line when ``header``); a line
    without its newline (a write cut short by kill -9) is dropped too."""
    if not path.is_file():
        return
    with path.open(newline="") as f:  # keep the csv module's \r\n
        lines = f.read().splitlines(keepends=True)
    head, body = (lines[:1], lines[1:]) if header else ([], lines)
    kept = head + [line for line in body if line.endswith("\n") and keep(line)]
    if kept == lines:
        return
    atomic_write(path, lambda f: f.write("".join(kept).encode()))


def _step_at_most(last: int, read_step: Callable[[str], Any]) -> Callable[[str], bool]:
    def keep(line: str) -> bool:
        try:
            return int(read_step(line)) <= last
        except (ValueError, TypeError, KeyError, IndexError):
            return False  # a damaged row

    return keep


def truncate_after(out_dir: Path, last: int, names: MetricNames = PRETRAIN_NAMES) -> None:
    """Remove the rows of steps after ``last`` from metrics.csv, knn.csv (``names.held_out``) and metrics.jsonl,
    each atomically."""
    csv_step = _step_at_most(last, lambda line: next(csv.reader([line]))[0])
    for name in ("metrics.csv", names.csv_name("knn")):
        _rewrite(out_dir / name, csv_step, header=True)
    _rewrite(
        out_dir / "metrics.jsonl",
        _step_at_most(last, lambda line: json.loads(line)["step"]),
        header=False,
    )


def read_curve(path: Path, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of column ``key`` in a metrics CSV, the last row winning for a repeated step."""
    if not path.is_file():
        return [], []
    by_step: dict[int, float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                by_step[int(row["step"])] = float(row[key])
            except (KeyError, TypeError, ValueError):
                continue
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(out_dir: str | Path, names: MetricNames = PRETRAIN_NAMES) -> Path | None:
    """Write ``curves.png`` (loss per step, kNN top-1 per evaluation); None when nothing was logged."""
    out_dir = Path(out_dir)
    loss_steps, losses = read_curve(out_dir / "metrics.csv", "loss")
    knn_steps, knn = read_curve(out_dir / names.csv_name("knn"), names.held_out_top1)
    if not losses and not knn:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 3.8))
    finite = [(s, v) for s, v in zip(loss_steps, losses, strict=True) if math.isfinite(v)]
    if finite:
        ax_loss.plot(*zip(*finite, strict=True), lw=1)
    ax_loss.set(xlabel="step", ylabel=names.loss_title, title="training loss")
    if knn:
        ax_knn.plot(knn_steps, [100 * v for v in knn], marker="o")
    ax_knn.set(xlabel="step", ylabel="top-1 (%)", title=names.held_out_title)
    for ax in (ax_loss, ax_knn):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

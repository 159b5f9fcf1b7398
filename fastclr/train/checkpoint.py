"""Atomic, self-describing training checkpoints.

A checkpoint is a dict saved with ``torch.save`` under ``<dir>/ckpt-<step:09d>.pt``::

    {"format": "fastclr-checkpoint", "version": 1, "step": int, "epoch": int, "batch": int, "world_size": int,
     "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "rng": [{...} per rank], "config": {section: {key: value}}, "loss": {buffer name: tensor} (a memory bank),
     "extra": {"knn_init": ..., "knn_history": [[step, top1], ...], "nonfinite_skipped": int, "elapsed_s": float}}

``epoch``/``batch`` is the data position: the next batch to train is batch ``batch`` of epoch ``epoch``.
:class:`TrainCheckpoint` is that dict by name: the trainer packs and unpacks checkpoints only through it.
Writes go to a temporary file in the same directory, which is fsync'ed, renamed over the final name and followed by an
fsync of the directory, so a crash at any moment leaves either the old set of checkpoints or the new one, never a
half-written file under a checkpoint name. Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code.
Pruning keeps the newest ``keep`` checkpoints that load: a file under a checkpoint name that does not load never
counts towards ``keep``, so it can never cost a loadable one.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch

from fastclr.train.config import PretrainConfig

FORMAT = "fastclr-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, not a fastclr checkpoint, or from an incompatible configuration."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:09d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest (lowest step) first; [] if the directory does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(e: BaseException, directory: Path) -> OSError | None:
    """The OS error behind a failed write: ``e`` itself, the OSError torch's zip writer swallowed (it re-raises
    ``[enforce fail at inline_container.cc] unexpected pos ...``), or, with none recorded, ENOSPC on a full disk and
    EIO otherwise. None when ``e`` is not an I/O failure (e.g. an object that cannot be pickled)."""
    if isinstance(e, OSError):
        return e
    if not (
        isinstance(e, RuntimeError) and re.search(r"inline_container|PytorchStreamWriter", str(e))
    ):
        return None
    cause = e.__cause__ or e.__context__
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause
        cause = cause.__cause__ or cause.__context__
    with_space = shutil.disk_usage(directory).free > 0
    code = errno.EIO if with_space else errno.ENOSPC
    return OSError(code, os.strerror(code))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """``write(f)`` to ``path`` through a fsync'ed temporary file and a rename; the directory is created if needed.

    Raises:
        OSError: the write failed (disk full, I/O error, permission denied); its message names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # Never leave a partial file behind, not even a temporary one (e.g. disk full, KeyboardInterrupt).
        Path(tmp).unlink(missing_ok=True)
        failure = _os_error(e, path.parent)
        if failure is not None:
            # ENOSPC/EIO carry no file name: say which file could not be written.
            raise OSError(
                failure.errno, f"cannot write {path}: {failure.strerror or failure}"
            ) from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def loads(path: Path) -> bool:
    """Does ``path`` load as a checkpoint? Only the pickle is read; the tensors are memory-mapped, not copied."""
    try:
        load_checkpoint(path, mmap=True)
    except (CheckpointError, OSError):
        return False
    return True


def prune(directory: str | Path, newest: Path, keep: int) -> None:
    """Delete the checkpoints older than the ``keep`` newest loadable ones up to ``newest`` (just written, so
    loadable). Files of later steps (another run's, which this one replaces as it gets there) and files that do not
    load are never counted, so no loadable checkpoint is removed to keep an unloadable one."""
    step = int(_NAME.match(newest.name).group(1))
    older = [p for p in list_checkpoints(directory) if int(_NAME.match(p.name).group(1)) < step]
    kept = 1
    while older and kept < keep:
        kept += loads(older.pop())
    for old in older:
        old.unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], directory: str | Path, *, keep: int = 3) -> Path:
    """Write ``state`` (must hold ``step``) atomically as ``ckpt-<step>.pt`` and keep the newest ``keep`` that load
    (see :func:`prune`)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    payload = {"format": FORMAT, "version": VERSION, **state}
    path = atomic_save(payload, checkpoint_path(directory, int(state["step"])))
    prune(directory, path, keep)
    # Temporary files of writes killed before their rename (kill -9, power loss): one writer per directory (the
    # run holds the lock on its output folder), so any left now is garbage the size of a checkpoint.
    for stale in Path(directory).glob(".ckpt-*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    """One line for a file ``torch.load(weights_only=True)`` refused. torch's own text advises loading with
    ``weights_only=False``, i.e. running whatever code the file holds: never passed on."""
    if isinstance(e, pickle.UnpicklingError):
        why = "it holds Python objects other than tensors and plain data, which fastclr never loads"
    else:  # zip, EOF and stream errors: a truncated or damaged file; the first clause of torch's text says which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = first.split(". ")[0].rstrip(".")
        if "weights_only" in why:
            why = type(e).__name__
    return CheckpointError(
        f"cannot read checkpoint {path}: not a fastclr checkpoint, or corrupt ({why})"
    )


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """Load and sanity-check a checkpoint written by :func:`save_checkpoint` (``mmap``: map the tensors, not read them).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file cannot be unpickled safely or is not a fastclr checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (
        Exception
    ) as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...) for bad files
        raise _unreadable(path, e) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastclr checkpoint (no '{FORMAT}' marker)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: unsupported checkpoint version {ckpt.get('version')!r} (expected {VERSION})"
        )
    missing = [k for k in ("step", "epoch", "batch", "model", "config") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


class Latest(NamedTuple):
    """What :func:`latest_loadable` found: the newest checkpoint that loads (None if none does) and the errors of
    the newer ones that do not, newest first."""

    path: Path | None
    unreadable: list[CheckpointError]


def latest_loadable(directory: str | Path) -> Latest:
    """The newest checkpoint in ``directory`` that loads, and why each newer one does not."""
    unreadable = []
    for path in reversed(list_checkpoints(directory)):
        try:
            load_checkpoint(path, mmap=True)  # a probe: map the tensors, do not read them
        except CheckpointError as e:
            unreadable.append(e)
            continue
        return Latest(path, unreadable)
    return Latest(None, unreadable)


def find_latest_valid(directory: str | Path) -> Path | None:
    """The newest checkpoint in ``directory`` that loads; unreadable ones are reported with a warning and skipped."""
    latest = latest_loadable(directory)
    for e in latest.unreadable:
        warnings.warn(f"skipping {e}", stacklevel=2)
    return latest.path


def check_config(
    saved: dict[str, Any],
    current: dict[str, Any],
    *,
    ignore: frozenset[str] = frozenset(),
    path: str | Path = "checkpoint",
) -> None:
    """Raise CheckpointError naming every ``section.key`` whose value differs between two nested config dicts."""
    flat_saved = {
        f"{s}.{k}": v for s, sec in saved.items() if isinstance(sec, dict) for k, v in sec.items()
    }
    flat_now = {f"{s}.{k}": v for s, sec in current.items() for k, v in sec.items()}
    keys = sorted((set(flat_saved) | set(flat_now)) - ignore)
    diff = [k for k in keys if flat_saved.get(k, "<absent>") != flat_now.get(k, "<absent>")]
    if diff:
        detail = ", ".join(
            f"{k} (checkpoint {flat_saved.get(k, '<absent>')!r}, now {flat_now.get(k, '<absent>')!r})"
            for k in diff
        )
        raise CheckpointError(f"{path} was written with a different config: {detail}")


def rng_state() -> dict[str, Any]:
    """Every RNG state a run depends on, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state` (CUDA states only where the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------------------------------------------------
# The training checkpoint, by name


@dataclass
class RunState:
    """Where a run stands: optimiser steps taken, the data position and the monitors' history."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # data position: the next batch is batch `batch` of epoch `epoch`
    batch: int = 0
    knn_init: float | None = None
    knn_history: list[tuple[int, float]] = field(default_factory=list)
    nonfinite_skipped: int = 0
    elapsed_s: float = 0.0  # training wall time up to this state, over every resume


@dataclass
class TrainCheckpoint:
    """Everything a pretraining checkpoint holds; the one place that maps it to and from the file's dict.

    ``optimizer``, ``scheduler`` and ``rng`` are None/empty in a weights-only checkpoint (hand-made or exported),
    which evaluation can read but a run cannot resume from.
    """

    state: RunState
    model: dict[str, torch.Tensor]
    config: PretrainConfig
    world_size: int = 1
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: list[dict[str, Any]] = field(default_factory=list)  # one rng_state() per rank
    # the loss module's buffers, persistent or not (a memory bank and its pointer); None in older checkpoints
    loss: dict[str, torch.Tensor] | None = None

    def save(self, directory: str | Path, *, keep: int = 3) -> Path:
        """Write atomically as ``checkpoint_path(directory, step)``, keeping the newest ``keep``."""
        s = self.state
        return save_checkpoint(
            {
                "step": s.step,
                "epoch": s.epoch,
                "batch": s.batch,
                "world_size": self.world_size,
                "model": self.model,
                "optimizer": self.optimizer,
                "scheduler": self.scheduler,
                "scaler": self.scaler,
                "rng": self.rng,
                "loss": self.loss,
                "config": self.config.to_dict(),
                "extra": {
                    "knn_init": s.knn_init,
                    "knn_history": s.knn_history,
                    "nonfinite_skipped": s.nonfinite_skipped,
                    "elapsed_s": s.elapsed_s,
                },
            },
            directory,
            keep=keep,
        )

    @classmethod
    def load(
        cls, path: str | Path, config_type: type[PretrainConfig] = PretrainConfig
    ) -> TrainCheckpoint:
        """Read and check ``path`` (see :func:`load_checkpoint`), every tensor on the CPU; its config is read as a
        ``config_type`` (fine-tuning and distillation checkpoints have their own, see :mod:`fastclr.train.stage`).

        Callers move what belongs on a device there themselves (``load_state_dict`` copies into the model's and the
        optimiser's tensors wherever they are); the RNG states must stay on the CPU, where numpy reads them.
        """
        ckpt = load_checkpoint(path)
        extra = ckpt.get("extra", {})
        state = RunState(
            step=ckpt["step"],
            epoch=ckpt["epoch"],
            batch=ckpt["batch"],
            knn_init=extra.get("knn_init"),
            knn_history=[tuple(x) for x in extra.get("knn_history", [])],
            nonfinite_skipped=extra.get("nonfinite_skipped", 0),
            elapsed_s=extra.get("elapsed_s", 0.0),
        )
        return cls(
            state=state,
            model=ckpt["model"],
            config=config_type.from_dict(ckpt["config"]),
            world_size=ckpt.get("world_size", 1),
            optimizer=ckpt.get("optimizer"),
            scheduler=ckpt.get("scheduler"),
            scaler=ckpt.get("scaler"),
            rng=ckpt.get("rng", []),
            loss=ckpt.get("loss"),
        )

    def restore_loss(self, loss: torch.nn.Module, path: str | Path = "checkpoint") -> None:
        """Copy the saved loss state into ``loss``'s buffers, wherever they are (nothing to do for a checkpoint
        written without it).

        Raises:
            CheckpointError: the saved buffers are not the loss's (names or shapes differ).
        """
        if self.loss is None:
            return
        live = dict(loss.named_buffers())
        shapes = {name: tuple(t.shape) for name, t in live.items()}
        saved = {name: tuple(t.shape) for name, t in self.loss.items()}
        if shapes != saved:
            raise CheckpointError(
                f"{path}: the loss state {saved} does not fit this run's loss {shapes}"
            )
        with torch.no_grad():
            for name, t in live.items():
                t.copy_(self.loss[name])

    def rng_for(self, rank: int, world_size: int) -> dict[str, Any]:
        """The RNG state rank ``rank`` resumes with: its own when the world size is unchanged, else rank 0's."""
        return self.rng[rank] if len(self.rng) == world_size else self.rng[0]

"""Where a run continues from: the checkpoint ``--resume`` picks, and whether its data position fits the data now.

``--resume auto`` takes the newest checkpoint in the run's folder that loads (saying which unreadable ones it
skipped), ``--resume FILE`` that file, and no ``--resume`` refuses a folder that holds an earlier run's checkpoints
rather than overwrite them. The trainer calls :func:`pick_checkpoint` on the main rank only.
"""

from __future__ import annotations

from pathlib import Path

from fastclr.train.checkpoint import CheckpointError, RunState, latest_loadable, list_checkpoints
from fastclr.train.config import PretrainConfig
from fastclr.train.monitor import say


def pick_checkpoint(resume: str | None, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start fresh (``resume`` is the ``--resume`` value)."""
    if resume == "auto":
        latest = latest_loadable(ckpt_dir)
        if latest.path is None and latest.unreadable:
            # starting over would train on and, at that step, overwrite it: let the user decide
            raise CheckpointError(
                f"--resume auto: no checkpoint in {ckpt_dir} loads; the newest: {latest.unreadable[0]}. "
                "Move the unreadable file(s) away to start from scratch, or pass --resume FILE"
            )
        for e in latest.unreadable:
            say(f"--resume auto: skipping {e}")
        if latest.unreadable:
            say(
                f"--resume auto: falling back to the newest checkpoint that loads, {latest.path.name}"
            )
        if latest.path is None:
            say(f"--resume auto: no checkpoint in {ckpt_dir}; starting from scratch")
        return latest.path
    if resume is not None:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"--resume {resume}: checkpoint not found")
        return Path(resume)
    if existing := list_checkpoints(ckpt_dir):
        newest = existing[-1].name
        raise ValueError(
            f"{ckpt_dir} already holds checkpoints of an earlier run (newest {newest}); "
            "continue it with --resume auto, or pick another --out"
        )
    return None


def check_position(
    s: RunState, path: Path, cfg: PretrainConfig, steps_per_epoch: int, images_per_rank: int
) -> None:
    """Refuse a checkpoint whose data position does not fit the data now (steps = epoch * steps/epoch + batch):
    the data set changed size, and its schedule, epochs and position would silently mean something else."""
    if s.step == s.epoch * steps_per_epoch + s.batch:
        return
    then = f"{(s.step - s.batch) // s.epoch}" if s.epoch else f"more than {s.batch}"
    raise CheckpointError(
        f"{path} is at step {s.step} (epoch {s.epoch}, batch {s.batch}) of a run with {then} steps per epoch, but "
        f"--data {cfg.data.data} now gives {steps_per_epoch} ({images_per_rank} images per rank, batch "
        f"{cfg.optim.batch_size}): the data set changed. Resume with the data it was trained on, or start "
        "a new run with another --out"
    )

"""The SimCLR pretraining loop: data -> two views -> encoder + head -> NT-Xent -> LARS, with checkpoints and monitors.

Run it:

    # one process, CPU or one GPU; without --data it trains on the embedded shapes demo in a few minutes
    fastclr pretrain
    python -m fastclr pretrain --preset cifar10-r18 --data cifar10/train --test-data cifar10/test

    # 8 GPUs on one node (the same flags; batch_size stays the global batch)
    torchrun --nproc_per_node=8 -m fastclr pretrain --preset imagenet-r50 --data /data/imagenet/train \
        --test-data /data/imagenet/val

    # several nodes: run on each node
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        -m fastclr pretrain --preset imagenet-r50 --data /data/imagenet/train --test-data /data/imagenet/val

    # after a crash or pre-emption (SIGTERM saves a checkpoint and exits 0): same command plus
    ... --resume auto

Under torchrun each rank trains on its own shard of every epoch, the loss gathers the negatives of all ranks,
gradients are averaged by DDP, and only rank 0 logs, evaluates and writes checkpoints.

Steps are queued on the device without reading anything back: the loss, a non-finite flag and the stop votes of each
step wait there until the host reads them all at once, every ``--log-every`` steps and before every checkpoint, epoch
end and stop (:meth:`Trainer.read_back`, the loop's one host sync). :mod:`fastclr.train.guard` packs them and undoes
non-finite steps on the device; :mod:`fastclr.train.resume` picks the checkpoint a run continues from.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastclr.eval.knn import contrastive_accuracy
from fastclr.losses.distributed import check_batches_once
from fastclr.train import dist
from fastclr.train.build import (
    build_loss,
    build_model,
    build_optimizer,
    build_train_loader,
    check_data_dir,
    prepare_demo_data,
    resolve_precision,
    wrap_model,
)
from fastclr.train.checkpoint import (
    CheckpointError,
    RunState,
    TrainCheckpoint,
    check_config,
    checkpoint_path,
    rng_state,
    set_rng_state,
)
from fastclr.train.config import RESUME_FREE_KEYS, ConfigError, PretrainConfig
from fastclr.train.guard import (
    PendingStep,
    ReadBack,
    TrainingError,
    UpdateGuard,
    any_nonfinite,
    check_finite_state,
    describe_nonfinite,
    nonfinite_error,
    pack_pending,
    unpack_pending,
)
from fastclr.train.metrics import PRETRAIN_NAMES, MetricsLog, plot_curves
from fastclr.train.monitor import KnnMonitor, StepMeter, describe, say, say_summary
from fastclr.train.resume import check_position, pick_checkpoint
from fastclr.train.runlock import OutputLock
from fastclr.train.signals import GracefulStop


def _no_timing(phase: str) -> None:
    pass


class Trainer:
    """One pretraining run; build with :meth:`setup`, then :meth:`fit`. Most callers use :func:`pretrain`.

    ``on_phase(name)`` is called as each phase of :meth:`train_step` ends ("data", "forward", "loss", "backward",
    "optimiser"); it does nothing unless a benchmark sets it to time the phases. ``metric_names``: what the metric
    files and curves call the logged numbers (:class:`~fastclr.train.metrics.MetricNames`).
    """

    metric_names = PRETRAIN_NAMES

    def __init__(self, cfg: PretrainConfig, info: dist.DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.run.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.state = RunState()
        self.last_ckpt: Path | None = None
        self.losses: list[float] = []  # every step's loss, appended as they are read back
        self.pending: list[PendingStep] = []
        self.on_phase = _no_timing
        # perf_counter() at the run's start, moved back by the time it trained before resuming
        self.t_origin: float | None = None

    # -- set-up ------------------------------------------------------------------------------------------------------

    def setup(self, loader=None) -> None:
        """Build the loader (unless given: the benchmark reuses one), model, optimiser, loss and kNN monitor."""
        cfg, info = self.cfg, self.info
        self.autocast_dtype, use_scaler = resolve_precision(cfg.run.precision, info.device)
        if loader is None:
            loader_dtype = torch.float16 if self.autocast_dtype == torch.float16 else torch.float32
            try:
                loader = self.make_loader(loader_dtype)
            except ConfigError:  # already names the flags it is about
                raise
            except ValueError as e:  # e.g. fewer images than one batch, a corrupt file: say which settings met which data
                raise ValueError(
                    f"--data {cfg.data.data}, --batch-size {cfg.optim.batch_size}: {e}"
                ) from None
        self.loader = loader
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {cfg.optim.batch_size} is larger than the data set ({len(self.loader.files)} "
                f"images in {cfg.data.data} over {info.world_size} rank(s)); lower --batch-size"
            )
        self.model = self.make_model()
        self.net = wrap_model(self.model, cfg, info)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = self.make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.loss_fn = build_loss(cfg, info)
        self.knn = self.make_monitor()
        if self.knn.enabled:
            # Every rank evaluates its shard; open (and so validate) them now: a bad --test-data stops every rank at once.
            dist.run_on_every_rank(self.knn.prepare, info)
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        # fp16's overflowing steps are undone as non-finite ones are with --skip-nonfinite; without either, a
        # non-finite step stops the run at the next read, before anything is saved, so it need not be undone.
        self.guard = (
            UpdateGuard(self.model, self.optimizer, self.loss_fn)
            if cfg.run.skip_nonfinite or self.scaler is not None
            else None
        )
        # Per-process randomness differs by rank; the data order/augmentation is seeded by the loader itself.
        torch.manual_seed(cfg.run.seed + info.rank)

    # What a run trains, made by setup(): SimCLR pretraining here; the fine-tuning and distillation trainers
    # (fastclr.train.stage) override these, compute_loss, evaluate_knn, describe and summarize.

    def make_loader(self, dtype: torch.dtype):
        """This rank's training loader: pairs of SimCLR views."""
        return build_train_loader(self.cfg, self.info, dtype)

    def make_model(self) -> torch.nn.Module:
        return build_model(self.cfg, self.info)

    def make_optimizer(self):
        """``(optimizer, scheduler)``."""
        return build_optimizer(self.cfg, self.model, self.steps_per_epoch)

    def make_monitor(self):
        """The held-out evaluation :meth:`evaluate_knn` runs; ``enabled`` False without --test-data."""
        return KnnMonitor(self.cfg, self.info, self.loader.classes, self.autocast_dtype)

    def describe(self) -> str:
        """The lines printed as the run starts."""
        return describe(self.cfg, self.info, self.loader, self.model)

    def summarize(self, result: dict[str, Any]) -> None:
        """Print the end-of-run lines (main rank)."""
        say_summary(result, self.loader, self.cfg.run.knn_k)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def resume_path(self) -> Path | None:
        """The checkpoint to resume from (rank 0 decides, every rank gets the same path), or None to start fresh."""
        return dist.run_on_main(
            lambda: pick_checkpoint(self.cfg.run.resume, self.ckpt_dir), self.info
        )

    def restore(self, path: Path) -> None:
        """Continue from checkpoint ``path``: weights, optimiser, schedule, scaler, the loss's state (a memory bank),
        this rank's RNGs, the position."""
        # on the CPU: load_state_dict below copies to the device
        ckpt = TrainCheckpoint.load(path, type(self.cfg))
        check_config(ckpt.config.to_dict(), self.cfg.to_dict(), ignore=RESUME_FREE_KEYS, path=path)
        if ckpt.world_size != self.info.world_size and ckpt.state.batch != 0:
            raise CheckpointError(
                f"{path} stopped mid-epoch with {ckpt.world_size} process(es); resume it with the same number "
                f"(now {self.info.world_size})"
            )
        check_position(ckpt.state, path, self.cfg, self.steps_per_epoch, self.loader.num_samples)
        self.model.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        if self.scaler is not None and ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        ckpt.restore_loss(self.loss_fn, path)
        set_rng_state(ckpt.rng_for(self.info.rank, self.info.world_size))
        self.state, self.last_ckpt = ckpt.state, path
        if self.info.is_main:
            s = self.state
            say(f"resumed from {path} at step {s.step} (epoch {s.epoch}, batch {s.batch})")

    def save(self) -> None:
        """Checkpoint the current step (every rank contributes its RNG state; rank 0 writes)."""
        path = checkpoint_path(self.ckpt_dir, self.state.step)
        if self.last_ckpt is not None and self.last_ckpt.name == path.name:
            return  # this step is saved already (e.g. an epoch end that is also a --ckpt-every step)
        if self.pending:
            raise RuntimeError(f"save() at step {self.state.step} before its steps were read back")
        check_finite_state(self.model, self.optimizer, self.state, self.last_ckpt)
        if self.t_origin is not None:
            self.state.elapsed_s = time.perf_counter() - self.t_origin
        rngs = dist.all_gather_object(rng_state(), self.info)
        if self.info.is_main:
            ckpt = TrainCheckpoint(
                state=self.state,
                model=self.model.state_dict(),
                config=self.cfg,
                world_size=self.info.world_size,
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict() if self.scaler is not None else None,
                rng=rngs,
                loss=dict(self.loss_fn.named_buffers()),
            )
            path = ckpt.save(self.ckpt_dir, keep=self.cfg.run.keep)
        self.last_ckpt = path

    # -- evaluation --------------------------------------------------------------------------------------------------

    def evaluate_knn(self, log: MetricsLog) -> float | None:
        """kNN top-1, each rank evaluating its shard (rank 0 logs it; every rank gets it)."""
        if not self.knn.enabled:
            return None
        s = self.state
        r = self.knn(self.model.backbone)
        # on every rank: all decide alike whether the end needs another evaluation
        s.knn_history.append((s.step, r.top1))
        if self.info.is_main:
            log.log("knn", {"step": s.step, "epoch": s.epoch, "knn_top1": r.top1})
            say(
                f"kNN top-1 / top-5 (k={self.cfg.run.knn_k}) at step {s.step}: "
                f"{100 * r.top1:.2f}% / {100 * r.top5:.2f}%"
            )
        return r.top1

    def check_ranks_in_sync(self) -> None:
        """Raise if DDP let any rank's parameters drift from rank 0's."""
        if not self.info.distributed:
            return
        if dist.parameters_differ(self.model, self.info):  # a host sync, once at the end
            raise TrainingError(f"parameters differ between ranks after step {self.state.step}")
        if self.info.is_main:
            say(f"parameters identical on all {self.info.world_size} ranks")

    # -- training ----------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        view_a: torch.Tensor,
        view_b: torch.Tensor,
        labels: torch.Tensor | None = None,
        with_top1: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(loss, top-1 or None)`` of a batch of view pairs (with their labels for --loss supcon), on the device:
        the contrastive loss and the contrastive top-1."""
        x = (
            torch.cat([view_a, view_b])
            .to(self.info.device, non_blocking=True)
            .contiguous(memory_format=torch.channels_last)
        )
        self.on_phase("data")

        with self.autocast():
            # one forward over both views: BN statistics over all 2N images, as in SimCLR
            _, z = self.net(x)
        self.on_phase("forward")

        z_a, z_b = z.float().chunk(2)
        if labels is None:
            loss = self.loss_fn(z_a, z_b)
        else:
            loss = self.loss_fn(z_a, z_b, labels.to(self.info.device, non_blocking=True))
        top1 = contrastive_accuracy(z_a.detach(), z_b.detach()) if with_top1 else None
        self.on_phase("loss")
        return loss, top1

    def train_step(self, *batch: torch.Tensor, with_top1: bool = False) -> None:
        """One optimisation step on a batch (``view_a, view_b`` when pretraining), queued on the device: nothing is
        read back.

        Its loss (:meth:`compute_loss`), whether the loss, the gradients or the updated weights were non-finite, and
        (``with_top1``) its top-1 wait in :attr:`pending` for :meth:`read_back`. With --skip-nonfinite (and under fp16,
        for overflowing gradients) a non-finite step is also undone on the device, BatchNorm statistics included.
        """
        s = self.state
        if self.guard is not None:
            self.guard.save()
        loss, top1 = self.compute_loss(*batch, with_top1=with_top1)

        # A non-finite loss on this rank makes its gradients NaN, and DDP's gradient all-reduce spreads them: every
        # rank then sees non-finite gradients at the same step and undoes it, with no collective of our own.
        loss_bad = loss.detach().isfinite().logical_not()
        loss_or_nan = loss * torch.where(loss_bad, float("nan"), 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss_or_nan.backward()
        else:  # fp16: backward through the scaled loss, then unscale (the scaler records overflows on the device)
            self.scaler.scale(loss_or_nan).backward()
            self.scaler.unscale_(self.optimizer)
        self.on_phase("backward")

        grads_bad = any_nonfinite(p.grad for p in self.params if p.grad is not None)
        self.optimizer.step()
        nonfinite = loss_bad | any_nonfinite(self.params)
        if self.scaler is None:
            nonfinite |= grads_bad
            undo = nonfinite
        else:
            self.scaler.update()  # non-finite fp16 gradients are overflows: skipped and the scale lowered
            undo = nonfinite | grads_bad
        if self.guard is not None:
            self.guard.undo_if(undo)
        self.scheduler.step()
        self.on_phase("optimiser")
        self.pending.append(PendingStep(s.step, s.epoch, s.batch, loss.detach(), nonfinite, top1))

    def read_back(self, stop_requested: bool) -> ReadBack:
        """Read the pending steps' results and every rank's stop vote: one all-reduce, one host sync.

        A non-finite step among them stops the run (TrainingError naming it), or with --skip-nonfinite is counted:
        it was undone on the device already.
        """
        steps, self.pending = self.pending, []
        packed = pack_pending(steps, stop_requested, self.info.device)
        # The host sync, summed over ranks so that every rank takes the same decisions.
        values = dist.all_reduce_sum(packed, self.info).tolist()
        read = unpack_pending(steps, values, self.info.world_size)
        self.losses += read.losses
        if read.nonfinite:
            self.nonfinite_steps(read.nonfinite)
        return read

    def nonfinite_steps(self, bad: list[tuple[PendingStep, float]]) -> None:
        """Non-finite steps just read back: stop, naming the first and the last good checkpoint; or, with
        --skip-nonfinite, count them (they were undone on the device)."""
        if not self.cfg.run.skip_nonfinite:
            raise nonfinite_error(bad, self.last_ckpt)
        self.state.nonfinite_skipped += len(bad)
        if self.info.is_main:
            steps = ", ".join(str(p.step) for p, _ in bad)
            say(f"skipped non-finite step(s) {steps} (first: {describe_nonfinite(bad[0][1])})")

    def run_steps(self, limit: int, stop: GracefulStop, log: MetricsLog, meter: StepMeter) -> str:
        """The epoch/batch loop up to step ``limit``; returns "completed" or "stopped" (by a signal)."""
        cfg, s = self.cfg, self.state
        while s.step < limit:
            self.loader.set_epoch(s.epoch, skip_batches=s.batch)
            for batch in meter.timed(self.loader):
                lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses
                logged = (s.step + 1) % cfg.run.log_every == 0
                self.train_step(*batch, with_top1=logged)
                s.step, s.batch = s.step + 1, s.batch + 1
                meter.step_done()
                epoch_ended = s.batch == self.steps_per_epoch
                ckpt_due = epoch_ended or (cfg.run.ckpt_every and s.step % cfg.run.ckpt_every == 0)
                # one process can act on its own signal at once; under torchrun the ranks vote at the next read
                signalled = stop.signal_name is not None and not self.info.distributed
                stop_now = False
                if logged or ckpt_due or s.step >= limit or signalled:
                    read = self.read_back(stop.signal_name is not None)  # the host sync
                    meter.read_done(s, read.losses, lr, read.top1)
                    stop_now = read.stop
                if epoch_ended:
                    s.epoch, s.batch = s.epoch + 1, 0
                    meter.epoch_done(s.epoch, lr)

                # every rank decided to stop together (read_back summed the votes)
                if stop_now:
                    return "stopped"
                if s.step >= limit:
                    return "completed"
                if ckpt_due:
                    self.save()
                if epoch_ended and cfg.run.knn_every and s.epoch % cfg.run.knn_every == 0:
                    self.evaluate_knn(log)
        return "completed"

    def fit(self, launched_at: float | None = None) -> dict[str, Any]:
        """Train from the current state to the end (or ``max_steps``, or a signal); returns the run summary.
        ``launched_at``: when the run started (``time.perf_counter()``), for its total time; default: now."""
        cfg, s = self.cfg, self.state
        # the rows of the steps this run trains (again) go: one row per step, however often it resumed
        log = MetricsLog(
            self.out,
            enabled=self.info.is_main,
            tensorboard=cfg.run.tensorboard,
            start_step=s.step,
            names=self.metric_names,
        )
        limit = min(self.total_steps, cfg.run.max_steps or self.total_steps)
        start_step, t_start = s.step, time.perf_counter()
        launched_at = t_start if launched_at is None else launched_at
        self.t_origin = t_start - s.elapsed_s
        if s.step >= limit and self.info.is_main:
            say(f"nothing to train: the run is at step {s.step} of {limit} already")
        if s.step == 0 and self.knn.enabled:
            s.knn_init = self.evaluate_knn(log)

        meter = StepMeter(cfg, log, start=s.step, limit=limit, t_start=self.t_origin)
        # every rank feeds the same fixed batch shape all run: the loss checks it once, not every step
        with GracefulStop() as stop, meter, check_batches_once():
            status = self.run_steps(limit, stop, log, meter)
        train_s = time.perf_counter() - t_start
        if status == "completed" and s.step < self.total_steps:
            status = "max_steps"

        # a final checkpoint, whatever ended the loop (a signal too: --resume auto continues from it)
        self.save()
        if status == "stopped" and self.info.is_main:
            say(
                f"stopped by {stop.signal_name or 'a signal on another rank'} at step {s.step}; "
                f"checkpoint {self.last_ckpt}; continue with --resume auto"
            )
        knn_final = None
        if status != "stopped" and self.knn.enabled:
            done = s.knn_history and s.knn_history[-1][0] == s.step
            knn_final = s.knn_history[-1][1] if done else self.evaluate_knn(log)
        self.check_ranks_in_sync()
        log.close()
        self.knn.close()

        plot = plot_curves(self.out, self.metric_names) if self.info.is_main else None
        now = time.perf_counter()
        elapsed = now - t_start
        result = {
            "status": status,
            "step": s.step,
            "epoch": s.epoch,
            "losses": self.losses,
            "knn_init": s.knn_init,
            "knn_final": knn_final,
            "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "nonfinite_skipped": s.nonfinite_skipped,
            "images_per_s": (s.step - start_step) * cfg.optim.batch_size / elapsed
            if s.step > start_step
            else None,
            "out": str(self.out),
            "plot": str(plot) if plot else None,
            "train_s": train_s,  # this process's time in the training loop
            "total_s": now - launched_at,  # this process's, set-up and evaluations included
        }
        if self.info.is_main:
            self.summarize(result)
        return result


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) SimCLR pretraining as configured; returns a summary dict (losses, kNN, checkpoint path).

    Works in one process or under torchrun (reads RANK/WORLD_SIZE/LOCAL_RANK from the environment).
    """
    return run_training(cfg, Trainer, prepare_demo_data)


def run_training(
    cfg: PretrainConfig,
    make_trainer: Callable[[PretrainConfig, dist.DistInfo], Trainer],
    prepare: Callable[[PretrainConfig, dist.DistInfo], None] | None = None,
) -> dict[str, Any]:
    """The life of a run, whatever it trains: check the config, join the process group, lock the output folder,
    ``prepare(cfg, info)`` (pretraining: the demo data), build ``make_trainer(cfg, info)`` (a :class:`Trainer` or
    a subclass), resume, fit, clean up."""
    launched_at = time.perf_counter()
    # before joining the group: a bad config fails fast on every rank
    cfg.validate(world_size=dist.env_world_size())
    info = dist.init_distributed(
        cfg.run.device, timeout=datetime.timedelta(minutes=cfg.run.dist_timeout)
    )
    lock = OutputLock(cfg.run.out)
    try:
        # rank 0 writes every file, so it alone holds the folder; if another run does, every rank stops here
        dist.run_on_main(lock.acquire, info)
        if prepare is not None:
            prepare(cfg, info)
        check_data_dir(cfg.data.data, "--data")
        if cfg.data.test_data is not None:
            check_data_dir(cfg.data.test_data, "--test-data")
        trainer = make_trainer(cfg, info)
        trainer.setup()
        path = trainer.resume_path()
        if path is not None:
            trainer.restore(path)
        if info.is_main:
            say(trainer.describe())
            trainer.out.mkdir(parents=True, exist_ok=True)
            (trainer.out / "config.toml").write_text(cfg.to_toml())
        try:
            return trainer.fit(launched_at)
        finally:
            trainer.loader.close()
    finally:
        lock.release()
        dist.cleanup_distributed()


__all__ = ["Trainer", "TrainingError", "pretrain", "run_training"]

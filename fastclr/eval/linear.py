"""Linear evaluation: a linear classifier trained on the features of a frozen backbone.

The standard self-supervised protocol (SimCLR section 4): the backbone is never updated, the
training images see only random crop + horizontal flip (the caller's ``train_loader`` provides
them), test images none. The backbone runs in eval mode with ``requires_grad`` off, and after
training every parameter and buffer is checked to be bit-identical to before.

Under ``torch.distributed`` every rank reads its shard of both sets (loaders built with
``shard_id=rank, num_shards=W``): the classifier is trained data-parallel (rank 0's initial
weights everywhere, gradients averaged over the ranks every step, every rank taking the step count
of the shortest shard, the batch-norm statistics averaged at the end), and the test counts are
summed, so every rank reports the same accuracies over the whole test set.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastclr.eval.knn import _world


def _classifier(feat_dim: int, num_classes: int) -> nn.Module:
    # A BN without affine parameters puts every feature on unit scale whatever the backbone's
    # feature norms, so one lr works across architectures; at test time it is a fixed per-feature
    # affine map, foldable into the linear layer, so the classifier stays linear.
    return nn.Sequential(nn.BatchNorm1d(feat_dim, affine=False), nn.Linear(feat_dim, num_classes))


def _frozen_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"param {n}": p.detach().clone() for n, p in backbone.named_parameters()}
    state.update({f"buffer {n}": b.detach().clone() for n, b in backbone.named_buffers()})
    return state


def _check_unchanged(backbone: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = _frozen_state(backbone)
    changed = [
        name for name, t in before.items() if name not in after or not torch.equal(t, after[name])
    ]
    if changed:
        raise RuntimeError(
            f"linear_eval modified the frozen backbone ({len(changed)} tensors, first: {changed[0]})"
        )


def _sync_head(head: nn.Module, world: int, group) -> None:
    """Rank 0's freshly initialised weights on every rank."""
    if world > 1:
        for p in head.parameters():
            torch.distributed.broadcast(p.data, group=group, group_src=0)


def _average(tensors: list[torch.Tensor], world: int, group) -> None:
    """Each tensor replaced in place by its mean over the ranks (one all-reduce for all of them)."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat, group=group)
    flat /= world
    for t, mean in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(mean.view_as(t))


def _steps_per_epoch(train_loader, world: int, group) -> int | None:
    """Batches every rank trains on per epoch: the shortest shard's count (None: all of a single process's)."""
    if world == 1:
        return None
    steps = torch.tensor(len(train_loader))
    if torch.distributed.get_backend(group) == "nccl":
        steps = steps.cuda()
    torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MIN, group=group)
    return int(steps)


def linear_eval(
    backbone: nn.Module,
    train_loader,
    test_loader,
    *,
    num_classes: int,
    epochs: int = 10,
    lr: float = 0.1,
    device: str | torch.device = "cpu",
    progress: bool = True,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    group=None,
) -> dict[str, float]:
    """Train a linear classifier on frozen backbone features and report test accuracy.

    Args:
        backbone: maps ``(B, 3, H, W)`` to ``(B, D)``; moved to ``device``, never updated.
        train_loader: iterable of ``(images (B, 3, H, W), labels (B,))`` with random crop + flip only;
            iterated once per epoch.
        test_loader: iterable of ``(images, labels)`` without augmentation.
        num_classes: number of classes.
        epochs: passes over ``train_loader``.
        lr: SGD learning rate, decayed to 0 with a per-epoch cosine.
        device: where everything runs.
        progress: show a tqdm bar over epochs.
        momentum: SGD (Nesterov) momentum.
        weight_decay: L2 on the classifier.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the backbone under autocast on a GPU.
        group: the process group whose ranks share the work (None: the default one).

    Returns:
        ``{"top1": ..., "top5": ..., "train_loss": ..., "test_images": ...}``: test accuracies in
        ``[0, 1]`` (top-5 is top-``min(5, num_classes)``), the mean loss of the last epoch and the
        number of test images counted (over all ranks).

    Raises:
        ValueError: bad hyper-parameters or an empty loader.
        RuntimeError: the backbone's parameters or buffers changed during evaluation.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    device = torch.device(device)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast:
            return backbone(images.to(device, non_blocking=True)).float()

    _, world = _world(group)
    was_training = backbone.training
    requires_grad = [p.requires_grad for p in backbone.parameters()]
    backbone.to(device).eval()
    backbone.requires_grad_(False)
    before = _frozen_state(backbone)
    try:
        head = optimizer = scheduler = None
        steps = _steps_per_epoch(train_loader, world, group)
        if steps == 0:
            raise ValueError("linear_eval: train_loader yields no batches on some rank")
        bar = tqdm(range(epochs), desc="linear eval", disable=not progress, leave=False)
        for epoch in bar:
            # a new order every epoch, even after an epoch cut short
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            total_loss, batches = torch.zeros((), device=device), 0
            for images, labels in train_loader:
                # a longer shard's extra batch: every rank takes the same number of steps
                if batches == steps:
                    break
                h = features(images)
                if head is None:  # built on the first batch, once the feature size is known
                    head = _classifier(h.shape[1], num_classes).to(device)
                    _sync_head(head, world, group)
                    optimizer = torch.optim.SGD(
                        head.parameters(),
                        lr=lr,
                        momentum=momentum,
                        nesterov=momentum > 0,
                        weight_decay=weight_decay,
                    )
                    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
                y = torch.as_tensor(labels).to(device, dtype=torch.long).reshape(-1)
                loss = F.cross_entropy(head(h), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _average([p.grad for p in head.parameters()], world, group)
                optimizer.step()
                total_loss += loss.detach()
                batches += 1
            if batches == 0:
                raise ValueError("linear_eval: train_loader yielded no batches")
            scheduler.step()
            mean_loss = total_loss / batches
            _average([mean_loss], world, group)
            train_loss = mean_loss.item()  # one host sync per epoch
            bar.set_postfix(loss=f"{train_loss:.3f}")

        # the test-time normalisation of every rank: the mean of the ranks' running statistics
        _average([head[0].running_mean, head[0].running_var], world, group)
        head.eval()
        top_k = min(5, num_classes)
        counts = torch.zeros(3, dtype=torch.long, device=device)  # top-1 hits, top-5 hits, images
        with torch.no_grad():
            for images, labels in test_loader:
                y = torch.as_tensor(labels).to(device, dtype=torch.long).reshape(-1)
                top = head(features(images)).topk(top_k, dim=1).indices
                hits = top == y[:, None]
                counts += torch.stack(
                    [hits[:, 0].sum(), hits.any(dim=1).sum(), y.new_tensor(len(y))]
                )
        if world > 1:
            torch.distributed.all_reduce(counts, group=group)
        correct1, correct5, total = counts.tolist()  # the host sync
        if total == 0:
            raise ValueError("linear_eval: test_loader yielded no samples")
        _check_unchanged(backbone, before)
    finally:
        backbone.train(was_training)
        for p, flag in zip(backbone.parameters(), requires_grad, strict=True):
            p.requires_grad_(flag)
    return {
        "top1": correct1 / total,
        "top5": correct5 / total,
        "train_loss": train_loss,
        "test_images": total,
    }

"""Linear evaluation: a linear classifier trained on the features of a frozen backbone.

The standard self-supervised protocol (SimCLR section 4): the backbone is never updated, the
training images see only random crop + horizontal flip (the caller's ``train_loader`` provides
them), test images none. The backbone runs in eval mode with ``requires_grad`` off, and after
training every parameter and buffer is checked to be bit-identical to before.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


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

    Returns:
        ``{"top1": ..., "top5": ..., "train_loss": ...}``: test accuracies in ``[0, 1]`` (top-5 is
        top-``min(5, num_classes)``) and the mean loss of the last epoch.

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

    was_training = backbone.training
    requires_grad = [p.requires_grad for p in backbone.parameters()]
    backbone.to(device).eval()
    backbone.requires_grad_(False)
    before = _frozen_state(backbone)
    try:
        head = optimizer = scheduler = None
        bar = tqdm(range(epochs), desc="linear eval", disable=not progress, leave=False)
        for _ in bar:
            total_loss, batches = torch.zeros((), device=device), 0
            for images, labels in train_loader:
                h = features(images)
                if head is None:  # built on the first batch, once the feature size is known
                    head = _classifier(h.shape[1], num_classes).to(device)
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
                optimizer.step()
                total_loss += loss.detach()
                batches += 1
            if batches == 0:
                raise ValueError("linear_eval: train_loader yielded no batches")
            scheduler.step()
            train_loss = total_loss.item() / batches  # one host sync per epoch
            bar.set_postfix(loss=f"{train_loss:.3f}")

        head.eval()
        top_k = min(5, num_classes)
        correct1 = correct5 = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                y = torch.as_tensor(labels).to(device, dtype=torch.long).reshape(-1)
                top = head(features(images)).topk(top_k, dim=1).indices
                hits = top == y[:, None]
                correct1 += hits[:, 0].sum().item()
                correct5 += hits.any(dim=1).sum().item()
                total += len(y)
        if total == 0:
            raise ValueError("linear_eval: test_loader yielded no samples")
        _check_unchanged(backbone, before)
    finally:
        backbone.train(was_training)
        for p, flag in zip(backbone.parameters(), requires_grad, strict=True):
            p.requires_grad_(flag)
    return {"top1": correct1 / total, "top5": correct5 / total, "train_loss": train_loss}

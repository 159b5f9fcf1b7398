"""Feature extraction, the weighted kNN monitor and the contrastive top-1 accuracy.

The kNN classifier is the InstDisc protocol (Wu et al. 2018) that SimCLR-style repos use as a
training-free monitor: for each test feature take the ``k`` most cosine-similar training features,
let each vote for its label with weight ``exp(sim / temperature)``, and predict the heaviest class.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader,
    device: str | torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of a whole loader, L2-normalised.

    Runs in eval mode without gradients and restores the module's previous train/eval mode.

    Args:
        backbone: maps ``(B, 3, H, W)`` to ``(B, D)``; moved to ``device``.
        loader: iterable of ``(images (B, 3, H, W), labels (B,))``.
        device: where the forward passes run and where the results live.
        autocast_dtype: e.g. ``torch.bfloat16`` to extract under autocast on a GPU; ``None`` for the
            module's own precision.

    Returns:
        ``(feats (N, D) float32, unit rows; labels (N,) int64)`` on ``device``.

    Raises:
        ValueError: the loader yields nothing.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.to(device).eval()
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    feats, labels = [], []
    try:
        for images, y in loader:
            with autocast:
                h = backbone(images.to(device, non_blocking=True))
            feats.append(F.normalize(h.float(), dim=1))
            labels.append(
                torch.as_tensor(y).to(device, dtype=torch.long, non_blocking=True).reshape(-1)
            )
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of the temperature-weighted kNN classifier on cosine similarity.

    Args:
        train_feats: ``(N, D)`` memory bank (normalised here, so raw features are fine).
        train_labels: ``(N,)`` integer labels.
        test_feats: ``(M, D)`` queries.
        test_labels: ``(M,)`` integer labels.
        k: neighbours per query (clamped to ``N``).
        temperature: vote weight is ``exp(similarity / temperature)``.
        num_classes: number of classes; ``None`` means ``max label + 1``.
        chunk: queries per similarity block, bounding memory to ``chunk * N`` floats.

    Returns:
        The fraction of test samples classified correctly, in ``[0, 1]``.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D); got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}"
        )
    if train_labels.shape != train_feats.shape[:1] or test_labels.shape != test_feats.shape[:1]:
        raise ValueError(
            f"labels must be (N,) and (M,) matching the features; got {tuple(train_labels.shape)} "
            f"and {tuple(test_labels.shape)}"
        )
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("knn_accuracy needs at least one train and one test sample")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    train_labels = train_labels.long()
    test_labels = test_labels.long().to(train_labels.device)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    bank = F.normalize(train_feats.float(), dim=1)
    queries = F.normalize(test_feats.float().to(bank.device), dim=1)
    k = min(k, len(bank))
    correct = torch.zeros((), dtype=torch.long, device=bank.device)
    for start in range(0, len(queries), chunk):
        sim = queries[start : start + chunk] @ bank.T  # (C, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=bank.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(dim=1) == test_labels[start : start + chunk]).sum()
    return correct.item() / len(queries)  # the only host sync


@torch.no_grad()
def contrastive_accuracy(
    z_a: torch.Tensor, z_b: torch.Tensor, block_rows: int = 1024
) -> torch.Tensor:
    """:func:`contrastive_top1` left on the device (a 0-d float32 tensor): no host sync, for a training loop.

    The (2N)^2 similarity matrix is never built: ``block_rows`` anchors at a time are compared with all 2N
    embeddings, so memory is ``block_rows * 2N`` floats.
    """
    n = len(z_a)
    z = F.normalize(torch.cat([z_a, z_b]).detach().float(), dim=1)
    positive = torch.arange(2 * n, device=z.device).roll(n)
    hits = torch.zeros((), dtype=torch.long, device=z.device)
    for start in range(0, 2 * n, block_rows):
        rows = torch.arange(start, min(start + block_rows, 2 * n), device=z.device)
        sim = z[start : start + block_rows] @ z.T  # (block_rows, 2N)
        sim[torch.arange(len(rows), device=z.device), rows] = float("-inf")  # not its own candidate
        hits += (sim.argmax(dim=1) == positive[rows]).sum()
    return hits.float() / (2 * n)


@torch.no_grad()
def contrastive_top1(z_a: torch.Tensor, z_b: torch.Tensor, block_rows: int = 1024) -> float:
    """Fraction of the 2N anchors whose most cosine-similar other embedding is their positive.

    Anchor ``i`` of view a has positive ``i`` of view b and vice versa; the candidates are the other
    ``2N - 1`` embeddings, the same set NT-Xent normalises over. Computed in row blocks (see
    :func:`contrastive_accuracy`), never as the full (2N)^2 matrix.

    Args:
        z_a: ``(N, D)`` embeddings of the first views.
        z_b: ``(N, D)`` embeddings of the second views.
        block_rows: anchors per similarity block.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"z_a and z_b must both be (N, D); got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows!r}")
    return contrastive_accuracy(z_a, z_b, block_rows).item()  # the host sync

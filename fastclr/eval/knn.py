"""Feature extraction, the weighted kNN classifier (sharded over ranks) and the contrastive top-1 accuracy.

The kNN classifier is the InstDisc protocol (Wu et al. 2018) that SimCLR-style repos use as a
training-free monitor: for each query feature take the ``k`` most cosine-similar bank features
(the training set), let each vote for its label with weight ``exp(sim / temperature)``, and rank
the classes by their summed votes; top-1 is the heaviest class, top-5 the five heaviest.

Under ``torch.distributed`` (:func:`knn_eval`) every rank extracts only its shard of the bank and
of the queries, :func:`gather_shards` reassembles both in the global order on every rank, and
each rank classifies every ``W``-th block of ``chunk`` queries, the same blocks against the same
bank as one process would, so the predictions are those of one process, bit for bit::

    rank r:  bank rows r, r+W, ...  --extract-->  local features  --gather-->  (N, D) bank, global order
             query blocks r, r+W, ... --classify-->  (M, T) ranked classes  --sum over ranks-->  every rank
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

BANK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
GATHER_BLOCK_BYTES = 64 << 20  # per rank and collective: a gather never holds the group for long


def _world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (None: the default process group), ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


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
def gather_shards(
    local: torch.Tensor, block_bytes: int = GATHER_BLOCK_BYTES, group=None
) -> torch.Tensor:
    """The rows of every rank's shard, reassembled in the global order on every rank.

    The shards are strided, as the evaluation loaders built with ``shard_id=rank, num_shards=W``
    read them: global row ``i`` is row ``i // W`` of rank ``i % W``, so rank ``r`` holds
    ``len(range(r, N, W))`` rows (the first ``N mod W`` ranks one more than the others). Row block
    ``[s, e)`` of every rank is exactly global rows ``[s W, e W)``, so the gather runs in blocks of
    at most ``block_bytes`` per rank, each a short collective; the shorter shards send a padding
    row in the last block, which is cut off. Without a process group (or with W = 1) ``local`` is
    returned as it is.

    Args:
        local: ``(n_r, ...)`` this rank's rows; the trailing shape and dtype must be the same on
            every rank; on the device the group communicates on (CUDA for NCCL).
        block_bytes: bound on the bytes one rank sends per collective.
        group: the process group (None: the default one); ranks are numbered within it.

    Returns:
        ``(N, ...)`` with ``N = sum of n_r``, on ``local``'s device.

    Raises:
        ValueError: on every rank, when the row counts are not those of a strided split of ``N``
            rows or the trailing shapes differ.
    """
    _, world = _world(group)
    if world == 1:
        return local
    meta = torch.tensor([len(local), local[0].numel() if len(local) else -1], device=local.device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    counts = [int(m[0]) for m in metas]
    widths = {int(m[1]) for m in metas if int(m[0]) > 0}
    total = sum(counts)
    expected = [len(range(r, total, world)) for r in range(world)]
    if counts != expected or len(widths) > 1:
        raise ValueError(
            f"gather_shards: rank row counts {counts} (row sizes {sorted(widths)}) are not a strided split of "
            f"{total} rows over {world} ranks ({expected}); build each rank's loader with shard_id=rank, "
            "num_shards=world_size"
        )
    rows = expected[0]  # the longest shard: ceil(total / world)
    tail = local.shape[1:]
    # from what every rank knows alike, so that all run the same number of collectives
    row_bytes = max(1, max(widths, default=1) * local.element_size())
    step = max(1, block_bytes // row_bytes)
    out = local.new_empty((rows * world, *tail))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        send = local[start:stop]
        if len(send) < stop - start:  # a short shard pads its last block: past row N, cut below
            send = torch.cat([send, send.new_zeros((stop - start - len(send), *tail))])
        recv = local.new_empty((world, stop - start, *tail))
        dist.all_gather(list(recv.unbind(0)), send.contiguous(), group=group)
        out[start * world : stop * world] = recv.transpose(0, 1).reshape(-1, *tail)
    return out[:total]


class KnnResult(NamedTuple):
    """What :func:`knn_classify` and :func:`knn_eval` return."""

    top1: float
    """Fraction of queries whose heaviest class is their label."""
    top5: float
    """Fraction whose label is among the ``min(5, num_classes)`` heaviest classes."""
    predictions: torch.Tensor
    """``(M, min(5, num_classes))`` int64 classes of each query, heaviest vote first."""


def _check_knn_args(bank, bank_labels, queries, query_labels, k, temperature, chunk, bank_chunk):
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D); got {tuple(bank.shape)} and {tuple(queries.shape)}"
        )
    if bank_labels.shape != bank.shape[:1] or query_labels.shape != queries.shape[:1]:
        raise ValueError(
            f"labels must be (N,) and (M,) matching the features; got {tuple(bank_labels.shape)} "
            f"and {tuple(query_labels.shape)}"
        )
    if len(bank) == 0 or len(queries) == 0:
        raise ValueError("the kNN classifier needs at least one train and one test sample")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk < 1 or bank_chunk < 1:
        raise ValueError(f"chunk and bank_chunk must be >= 1, got {chunk!r} and {bank_chunk!r}")


def _ranked_classes(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int,
    bank_chunk: int,
    blocks: range,
) -> torch.Tensor:
    """``(M, T)`` classes ranked by vote for the query blocks ``blocks`` (of ``chunk`` rows); other rows are 0.

    ``bank`` holds unit rows in its storage dtype; each block of ``bank_chunk`` rows is widened to
    fp32 for the similarity GEMM, so ``(chunk, bank_chunk)`` floats bound the working memory. The
    top-k of the whole bank is the top-k of the per-block top-k candidates, merged block by block.
    """
    top = min(5, num_classes)
    k = min(k, len(bank))
    ranked = torch.zeros(len(queries), top, dtype=torch.long, device=bank.device)
    for block in blocks:
        rows = slice(block * chunk, (block + 1) * chunk)
        q = queries[rows]
        best_sim = best_idx = None
        for start in range(0, len(bank), bank_chunk):
            sim = q @ bank[start : start + bank_chunk].float().T  # (C, bank_chunk)
            top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            top_idx += start
            if best_sim is not None:
                top_sim = torch.cat([best_sim, top_sim], dim=1)
                top_idx = torch.cat([best_idx, top_idx], dim=1)
                top_sim, pick = top_sim.topk(min(k, top_sim.shape[1]), dim=1)
                top_idx = top_idx.gather(1, pick)
            best_sim, best_idx = top_sim, top_idx
        votes = torch.zeros(len(q), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[best_idx], (best_sim / temperature).exp())
        # a stable sort: equal votes rank the lower class first, as argmax would
        ranked[rows] = votes.sort(dim=1, descending=True, stable=True).indices[:, :top]
    return ranked


def _score(ranked: torch.Tensor, labels: torch.Tensor) -> KnnResult:
    hits = ranked == labels[:, None]
    top1, top5 = hits[:, 0].sum().item(), hits.any(dim=1).sum().item()  # the host syncs
    return KnnResult(top1 / len(labels), top5 / len(labels), ranked)


def _prepare(bank, bank_labels, queries, query_labels, num_classes, normalized):
    """Labels as int64 on the bank's device, the class count, and unit rows (a bank keeps its dtype)."""
    bank_labels = bank_labels.long().to(bank.device)
    query_labels = query_labels.long().to(bank.device)
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    if bank.dtype not in BANK_DTYPES.values():
        bank = bank.float()
    queries = queries.float().to(bank.device)
    if not normalized:
        bank = F.normalize(bank.float(), dim=1).to(bank.dtype)
        queries = F.normalize(queries, dim=1)
    return bank, bank_labels, queries, query_labels, num_classes


@torch.no_grad()
def knn_classify(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
    bank_chunk: int = 65536,
    normalized: bool = False,
) -> KnnResult:
    """Top-1 and top-5 of the temperature-weighted kNN classifier on cosine similarity, in one process.

    With ``s_qi = <q, b_i> / (|q| |b_i|)`` and ``N_k(q)`` the ``k`` bank rows of highest ``s_qi``,
    class ``c`` scores ``sum_{i in N_k(q), y_i = c} exp(s_qi / temperature)``.

    Args:
        bank: ``(N, D)`` memory bank, fp32 or fp16 (kept in its dtype and widened to fp32 block
            by block; another dtype is made fp32).
        bank_labels: ``(N,)`` integer labels.
        queries: ``(M, D)`` queries.
        query_labels: ``(M,)`` integer labels.
        k: neighbours per query (clamped to ``N``).
        temperature: vote weight is ``exp(similarity / temperature)``.
        num_classes: number of classes; ``None`` means ``max label + 1``.
        chunk: queries per similarity block.
        bank_chunk: bank rows per similarity block: memory is ``chunk * bank_chunk`` floats.
        normalized: the rows of ``bank`` and ``queries`` are unit vectors already (as
            :func:`extract_features` returns them): use them as they are, without a normalised copy.

    Returns:
        :class:`KnnResult` (accuracies in ``[0, 1]``, predictions on ``bank``'s device).
    """
    _check_knn_args(bank, bank_labels, queries, query_labels, k, temperature, chunk, bank_chunk)
    bank, bank_labels, queries, query_labels, num_classes = _prepare(
        bank, bank_labels, queries, query_labels, num_classes, normalized
    )
    ranked = _ranked_classes(
        bank,
        bank_labels,
        queries,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk=chunk,
        bank_chunk=bank_chunk,
        blocks=range(-(-len(queries) // chunk)),
    )
    return _score(ranked, query_labels)


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
    """Top-1 accuracy of the temperature-weighted kNN classifier: :func:`knn_classify`'s ``top1``.

    Args:
        train_feats: ``(N, D)`` memory bank (normalised here, so raw features are fine).
        train_labels: ``(N,)`` integer labels.
        test_feats: ``(M, D)`` queries.
        test_labels: ``(M,)`` integer labels.
        k: neighbours per query (clamped to ``N``).
        temperature: vote weight is ``exp(similarity / temperature)``.
        num_classes: number of classes; ``None`` means ``max label + 1``.
        chunk: queries per similarity block.

    Returns:
        The fraction of test samples classified correctly, in ``[0, 1]``.
    """
    return knn_classify(
        train_feats,
        train_labels,
        test_feats,
        test_labels,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk=chunk,
    ).top1


@torch.no_grad()
def knn_eval(
    backbone: nn.Module,
    bank_loader,
    query_loader,
    device: str | torch.device,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    autocast_dtype: torch.dtype | None = None,
    bank_dtype: torch.dtype = torch.float32,
    chunk: int = 1024,
    bank_chunk: int = 65536,
    group=None,
) -> KnnResult:
    """kNN evaluation of a backbone, its work split evenly over the ranks of the process group.

    Call it on every rank (it is collective) with loaders sharded as :func:`gather_shards` expects
    (``shard_id=rank, num_shards=W``: rank ``r`` reads images ``r, r+W, ...``); in one process,
    with unsharded loaders. Each rank extracts its shard of both sets (``1/W`` of the images, give
    or take one), the features are gathered in the global order, and each rank classifies every
    ``W``-th block of ``chunk`` queries; the ranked classes are summed over the ranks. Given the
    same features the result equals one process's :func:`knn_classify` bit for bit; the features
    themselves are those of one process wherever the backbone's output for an image does not
    depend on the other images of its batch (eval-mode batch norm, and kernels that do not change
    with the batch size, as on CPUs; cuDNN may pick another algorithm for another batch size).
    One process's computation is ``knn_classify(features..., normalized=True)`` on the features
    of unsharded loaders, with the bank cast to ``bank_dtype``.

    No rank waits for long: every collective follows an extraction or a classification of equal
    size on every rank, and the gathers move at most ``GATHER_BLOCK_BYTES`` per rank at a time.

    Memory per rank: the whole bank, ``N * D`` elements of ``bank_dtype``, plus ``M * D`` fp32
    queries. ``bank_dtype=torch.float16`` halves the bank and its gather traffic (ImageNet's 1.28 M
    2048-d ResNet-50 features: 5.2 GB instead of 10.5 GB). The stored features are rounded to fp16
    (relative error <= 2^-11 per element) and widened to fp32 for the similarity, so by
    Cauchy-Schwarz each similarity moves by at most ``2^-11 ~ 4.9e-4``: only neighbours within
    ``1e-3`` of each other can swap, and a vote weight changes by at most ``2^-11 / temperature``
    relative (0.5% at 0.1).

    Args:
        backbone: maps ``(B, 3, H, W)`` to ``(B, D)``; run in eval mode, its mode restored.
        bank_loader: this rank's shard of the labelled training images, ``(images, labels)``.
        query_loader: this rank's shard of the labelled test images.
        device: where the forward passes and the classifier run.
        num_classes: number of classes.
        k, temperature, chunk, bank_chunk: as in :func:`knn_classify`.
        autocast_dtype: extract under autocast in this dtype; None for the backbone's own.
        bank_dtype: ``torch.float32`` or ``torch.float16``: how the bank is stored.
        group: the process group whose ranks share the work (None: the default one).

    Returns:
        :class:`KnnResult`, the same on every rank.
    """
    if bank_dtype not in BANK_DTYPES.values():
        raise ValueError(f"bank_dtype must be torch.float32 or torch.float16, got {bank_dtype!r}")
    rank, world = _world(group)
    bank, bank_labels = extract_features(backbone, bank_loader, device, autocast_dtype)
    queries, query_labels = extract_features(backbone, query_loader, device, autocast_dtype)
    bank = gather_shards(bank.to(bank_dtype), group=group)
    bank_labels = gather_shards(bank_labels, group=group)
    queries = gather_shards(queries, group=group)
    query_labels = gather_shards(query_labels, group=group)
    _check_knn_args(bank, bank_labels, queries, query_labels, k, temperature, chunk, bank_chunk)
    # extract_features returns unit rows: no normalised copy of the bank
    bank, bank_labels, queries, query_labels, num_classes = _prepare(
        bank, bank_labels, queries, query_labels, num_classes, normalized=True
    )
    ranked = _ranked_classes(
        bank,
        bank_labels,
        queries,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk=chunk,
        bank_chunk=bank_chunk,
        blocks=range(rank, -(-len(queries) // chunk), world),
    )
    if world > 1:
        dist.all_reduce(
            ranked, group=group
        )  # each row was filled by exactly one rank, zeros elsewhere
    return _score(ranked, query_labels)


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

"""kNN monitor, contrastive top-1 and feature extraction on constructed cases with known answers."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastclr.eval import contrastive_top1, extract_features, knn_accuracy
from fastclr.eval.knn import knn_classify


def unit(angle):
    return [math.cos(angle), math.sin(angle)]


# One class-0 neighbour straight on the query, two class-1 neighbours slightly further away.
BANK = torch.tensor([unit(0.0), unit(0.3), unit(-0.3), unit(2.0)])
BANK_LABELS = torch.tensor([0, 1, 1, 2])
QUERY = torch.tensor([unit(0.0)])
QUERY_LABEL = torch.tensor([0])


def numpy_knn(train, train_labels, test, test_labels, k, temperature, num_classes, top=1):
    """The InstDisc weighted kNN, one query at a time in float64: the fraction of queries whose label is among
    the ``top`` heaviest classes."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for q, y in zip(test, test_labels, strict=True):
        sim = train @ q
        nearest = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for i in nearest:
            votes[train_labels[i]] += np.exp(sim[i] / temperature)
        correct += int(y in np.argsort(-votes, kind="stable")[:top])
    return correct / len(test)


def test_separable_clusters_are_classified_perfectly():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 5
    train_labels = torch.arange(4).repeat(25)
    test_labels = torch.arange(4).repeat(5)
    train = centres[train_labels] + 0.3 * torch.randn(100, 16, generator=gen)
    test = centres[test_labels] + 0.3 * torch.randn(20, 16, generator=gen)
    assert knn_accuracy(train, train_labels, test, test_labels, k=10) == 1.0
    # Every test label shifted to another class: the same neighbours now always vote wrong.
    wrong = (test_labels + 1) % 4
    assert knn_accuracy(train, train_labels, test, wrong, k=10) == 0.0


def test_k_changes_the_answer():
    assert knn_accuracy(BANK, BANK_LABELS, QUERY, QUERY_LABEL, k=1, temperature=1.0) == 1.0
    # Three neighbours with nearly flat weights: two class-1 votes beat one class-0 vote.
    assert knn_accuracy(BANK, BANK_LABELS, QUERY, QUERY_LABEL, k=3, temperature=1.0) == 0.0


def test_temperature_sharpens_votes_towards_the_nearest():
    # exp(1/0.01) outweighs 2 * exp(0.955/0.01): the closest neighbour decides again.
    assert knn_accuracy(BANK, BANK_LABELS, QUERY, QUERY_LABEL, k=3, temperature=0.01) == 1.0


def test_k_larger_than_bank_is_clamped():
    assert knn_accuracy(BANK, BANK_LABELS, QUERY, QUERY_LABEL, k=200, temperature=0.01) == 1.0


@pytest.mark.parametrize("k, temperature", [(1, 0.1), (5, 0.1), (20, 0.5), (200, 0.07)])
def test_matches_numpy_and_is_chunk_and_scale_invariant(k, temperature):
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(60, 8, generator=gen), torch.randn(25, 8, generator=gen)
    train_labels = torch.randint(0, 5, (60,), generator=gen)
    test_labels = torch.randint(0, 5, (25,), generator=gen)
    expected = numpy_knn(
        train.double().numpy(),
        train_labels.numpy(),
        test.double().numpy(),
        test_labels.numpy(),
        min(k, 60),
        temperature,
        5,
    )
    got = knn_accuracy(
        train, train_labels, test, test_labels, k=k, temperature=temperature, chunk=7
    )
    assert got == pytest.approx(expected)
    scaled = knn_accuracy(
        train * 3.0, train_labels, test * 0.2, test_labels, k=k, temperature=temperature
    )
    assert scaled == pytest.approx(expected)


@pytest.mark.parametrize(
    "k, bank_chunk, chunk", [(7, 1, 1), (7, 9, 4), (30, 13, 25), (60, 60, 100)]
)
def test_top1_and_top5_match_numpy_whatever_the_blocks(k, bank_chunk, chunk):
    """Top-k over bank blocks merged block by block is the top-k of the whole bank."""
    gen = torch.Generator().manual_seed(2)
    train, test = torch.randn(60, 8, generator=gen), torch.randn(25, 8, generator=gen)
    train_labels = torch.randint(0, 9, (60,), generator=gen)
    test_labels = torch.randint(0, 9, (25,), generator=gen)
    r = knn_classify(
        train,
        train_labels,
        test,
        test_labels,
        k=k,
        temperature=0.2,
        chunk=chunk,
        bank_chunk=bank_chunk,
    )
    args = (
        train.double().numpy(),
        train_labels.numpy(),
        test.double().numpy(),
        test_labels.numpy(),
    )
    assert r.top1 == pytest.approx(numpy_knn(*args, k, 0.2, 9, top=1))
    assert r.top5 == pytest.approx(numpy_knn(*args, k, 0.2, 9, top=5))
    assert r.top5 > r.top1
    assert r.predictions.shape == (25, 5) and r.predictions.dtype == torch.long
    assert r.top1 == pytest.approx((r.predictions[:, 0] == test_labels).double().mean().item())
    whole = knn_classify(train, train_labels, test, test_labels, k=k, temperature=0.2)
    assert torch.equal(r.predictions, whole.predictions)


def test_top5_is_top_num_classes_for_fewer_classes():
    r = knn_classify(BANK, BANK_LABELS, QUERY, QUERY_LABEL, k=3, temperature=1.0)
    # class 1 wins (two votes), class 0 second, class 2 (not a neighbour) last
    assert r.predictions.tolist() == [[1, 0, 2]]
    assert (r.top1, r.top5) == (0.0, 1.0)


def test_fp16_bank_moves_each_similarity_by_at_most_2_to_the_minus_11():
    """The documented accuracy effect of ``bank_dtype=fp16``: |sim16 - sim32| <= 2^-11 for unit rows."""
    gen = torch.Generator().manual_seed(3)
    bank = nn.functional.normalize(torch.randn(500, 64, generator=gen), dim=1)
    queries = nn.functional.normalize(torch.randn(50, 64, generator=gen), dim=1)
    moved = (queries @ bank.half().float().T - queries @ bank.T).abs().max().item()
    assert 0 < moved <= 2**-11
    labels = torch.randint(0, 10, (500,), generator=gen)
    q_labels = torch.randint(0, 10, (50,), generator=gen)
    exact = knn_classify(bank, labels, queries, q_labels, k=20, normalized=True)
    half = knn_classify(bank.half(), labels, queries, q_labels, k=20, normalized=True)
    assert half.predictions.shape == exact.predictions.shape
    # random features: near-ties are rare; the predictions almost all agree
    assert (half.predictions[:, 0] == exact.predictions[:, 0]).float().mean() >= 0.9


def test_explicit_num_classes():
    assert knn_accuracy(BANK, BANK_LABELS, QUERY, QUERY_LABEL, k=1, num_classes=10) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"k": 0}, "k must"), ({"temperature": 0.0}, "temperature"), ({"chunk": 0}, "chunk")],
)
def test_knn_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        knn_accuracy(BANK, BANK_LABELS, QUERY, QUERY_LABEL, **kwargs)


def test_knn_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="features"):
        knn_accuracy(BANK, BANK_LABELS, torch.randn(1, 3), QUERY_LABEL)
    with pytest.raises(ValueError, match="labels"):
        knn_accuracy(BANK, BANK_LABELS[:2], QUERY, QUERY_LABEL)


def test_contrastive_top1_known_cases():
    z = torch.eye(6, 8)
    assert contrastive_top1(z, z * 2) == 1.0  # each positive is identical, the rest orthogonal
    assert contrastive_top1(z, z.roll(1, dims=0)) == 0.0  # positives swapped for orthogonal rows
    # First half matched, second half swapped pairwise: rows 3<->4 of view b.
    b = z.clone()
    b[[3, 4]] = z[[4, 3]]
    # anchors 0..2 in both views are right; 3, 4 wrong in both views; 5 right.
    assert contrastive_top1(z, b) == pytest.approx(8 / 12)


def test_contrastive_top1_excludes_self_similarity():
    # If the anchor itself were a candidate it would always win with similarity 1.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert contrastive_top1(a, b) == 0.0


def test_contrastive_top1_rejects_mismatched_views():
    with pytest.raises(ValueError, match="z_a and z_b"):
        contrastive_top1(torch.randn(4, 8), torch.randn(5, 8))


def test_extract_features_normalises_in_eval_mode_and_restores_mode():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6))
    backbone.train()
    images = torch.randn(10, 3, 2, 2)
    loader = [(images[:4], torch.arange(4)), (images[4:], [4, 5, 6, 7, 8, 9])]
    feats, labels = extract_features(backbone, loader, "cpu")
    assert backbone.training  # mode restored
    assert feats.shape == (10, 6) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    assert torch.equal(labels, torch.arange(10))
    with torch.no_grad():
        expected = nn.functional.normalize(backbone.eval()(images), dim=1)
    torch.testing.assert_close(feats, expected)  # eval-mode BN: running stats, not batch stats
    assert backbone[2].num_batches_tracked.item() == 0
    assert not feats.requires_grad


def test_extract_features_empty_loader_raises():
    with pytest.raises(ValueError, match="no batches"):
        extract_features(nn.Flatten(), [], "cpu")

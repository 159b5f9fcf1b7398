"""Evaluation: feature extraction, the kNN classifier (sharded over ranks), contrastive top-1 and linear evaluation."""

from fastclr.eval.knn import (
    KnnResult,
    contrastive_top1,
    extract_features,
    knn_accuracy,
    knn_classify,
    knn_eval,
)
from fastclr.eval.linear import linear_eval

__all__ = [
    "KnnResult",
    "contrastive_top1",
    "extract_features",
    "knn_accuracy",
    "knn_classify",
    "knn_eval",
    "linear_eval",
]

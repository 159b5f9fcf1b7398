"""Evaluation: feature extraction, the kNN monitor, contrastive top-1 and linear evaluation."""

from fastclr.eval.knn import contrastive_top1, extract_features, knn_accuracy
from fastclr.eval.linear import linear_eval

__all__ = ["contrastive_top1", "extract_features", "knn_accuracy", "linear_eval"]

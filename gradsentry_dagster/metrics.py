"""Detection metrics with poisoned as the positive class, in plain NumPy."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata


def auroc(labels, scores) -> float:
    """Return the area under the ROC curve; ties count one half. NaN with one class only."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def detection_metrics(labels, scores, flagged) -> dict:
    """Return AUROC, recall, precision, F1, accuracy and clean accuracy of a flagging.

    ``clean_accuracy`` is the fraction of clean samples that are not flagged (kept).
    """
    labels = np.asarray(labels, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool)
    true_positive = int((labels & flagged).sum())
    false_positive = int((~labels & flagged).sum())
    false_negative = int((labels & ~flagged).sum())
    true_negative = int((~labels & ~flagged).sum())
    recall = true_positive / (true_positive + false_negative) if labels.any() else math.nan
    precision = (
        true_positive / (true_positive + false_positive) if flagged.any() else (math.nan if labels.any() else 1.0)
    )
    if labels.any() and flagged.any() and (precision + recall) > 0:
        f1 = 2 * precision * recall / (precision + recall)
    elif labels.any():
        f1 = 0.0
    else:
        f1 = math.nan
    return {
        "auroc": auroc(labels, scores),
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "accuracy": (true_positive + true_negative) / len(labels) if len(labels) else math.nan,
        "clean_accuracy": true_negative / (true_negative + false_positive) if (~labels).any() else math.nan,
        "true_positive": true_positive,
        "false_positive": false_positive,
        "false_negative": false_negative,
        "true_negative": true_negative,
    }

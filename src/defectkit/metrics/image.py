"""Image-level metrics: one anomaly score and one label per image.

Convention: label 1 = defective, 0 = good; a higher score is more anomalous.
When the labels hold only one class, the ranking metrics are undefined and
the functions return NaN instead of raising, so a report over a good-only
validation set still prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["f1_max", "image_ap", "image_auroc", "recall_per_type"]


def _labels_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (labels as int8 0/1, scores as float64), both 1-D."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores; give one of each per image")
    if y.size and not np.isin(y, (0, 1)).all():
        bad = int(np.flatnonzero(~np.isin(y, (0, 1)))[0])
        raise ValueError(f"label of image {bad} is {y[bad]!r}; use 1 for defective, 0 for good")
    if np.isnan(s).any():
        raise ValueError(f"score of image {int(np.flatnonzero(np.isnan(s))[0])} is NaN")
    return y.astype(np.int8), s


def _one_class(y: np.ndarray) -> bool:
    return y.size == 0 or bool(y.min() == y.max())


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image scores; NaN when only one class is present.

    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y, s = _labels_scores(labels, scores)
    if _one_class(y):
        return math.nan
    return float(roc_auc_score(y, s))


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision (area under precision-recall, step rule of scikit-learn).

    NaN when only one class is present (scikit-learn would warn and return a
    value that says nothing about the detector).
    """
    y, s = _labels_scores(labels, scores)
    if _one_class(y):
        return math.nan
    return float(average_precision_score(y, s))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold that achieves it.

    An image is predicted defective when ``score >= threshold``; the candidate
    thresholds are the distinct scores. Where several thresholds reach the same
    best F1, the highest one is returned (fewest good parts rejected).
    Returns ``(nan, nan)`` when only one class is present.

    >>> f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    (0.8, 0.35)
    """
    y, s = _labels_scores(labels, scores)
    if _one_class(y):
        return math.nan, math.nan
    order = np.argsort(s)[::-1]
    s_desc = s[order]
    tp = np.cumsum(y[order], dtype=np.int64)
    n_pred = np.arange(1, s.size + 1)
    # Keep the last position of each run of tied scores: all of them are >= threshold.
    last = np.append(s_desc[1:] != s_desc[:-1], True)
    tp, n_pred, thresholds = tp[last], n_pred[last], s_desc[last]
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted positives + actual positives)
    f1 = 2.0 * tp / (n_pred + int(y.sum()))
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def recall_per_type(
    types: Sequence[str], labels: ArrayLike, scores: ArrayLike, threshold: float
) -> dict[str, float]:
    """Per defect type, the fraction of defective images caught (``score >= threshold``).

    Good images (label 0) are reported under the key ``"good"`` whatever their
    type string, and for them the value is the fraction correctly *passed*
    (``score < threshold``, the true-negative rate), so every value reads
    "higher is better". Keys: ``"good"`` first (when good images are present),
    then the defect types in sorted order; a type with no image is absent.
    """
    y, s = _labels_scores(labels, scores)
    t = [str(name) for name in types]
    if len(t) != y.size:
        raise ValueError(f"{len(t)} types but {y.size} labels; give one type per image")
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    kinds = np.array(t, dtype=object)
    clash = np.flatnonzero((y == 1) & (kinds == "good"))
    if clash.size:
        raise ValueError(f"image {int(clash[0])} is labelled defective but typed 'good'")
    caught = s >= threshold
    result: dict[str, float] = {}
    good = y == 0
    if good.any():
        result["good"] = float(np.mean(~caught[good]))
    for name in sorted(set(kinds[~good])):
        result[name] = float(np.mean(caught[(kinds == name) & ~good]))
    return result

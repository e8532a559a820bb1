"""Region-level metrics: are the ground-truth defect regions found as regions, and
how many predicted regions are false?

A ground-truth region (an 8-connected component of a mask) is *found* when some
predicted region overlaps it with IoU > ``iou`` (0.1 by default: a region
detector should point at the defect, not trace it). Every predicted region on a
good image is false; on a defective image, a predicted region that overlaps no
ground-truth region with IoU > ``iou`` is *unmatched*.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

__all__ = ["RegionCounts", "match_regions", "region_metrics"]


@dataclass
class RegionCounts:
    """Counts of one image, or summed over many."""

    n_truth: int = 0  # ground-truth regions
    n_found: int = 0  # of those, overlapped with IoU > iou by a predicted region
    n_pred: int = 0  # predicted regions
    n_pred_unmatched: int = 0  # predicted regions overlapping no truth region (IoU > iou)

    def __add__(self, other: RegionCounts) -> RegionCounts:
        return RegionCounts(*(a + b for a, b in zip(_vals(self), _vals(other), strict=True)))


def _vals(c: RegionCounts) -> tuple[int, int, int, int]:
    return (c.n_truth, c.n_found, c.n_pred, c.n_pred_unmatched)


def match_regions(truth: np.ndarray, pred_labels: np.ndarray, iou: float = 0.1) -> RegionCounts:
    """Match the regions of a bool mask against a predicted label image (0 is
    background, 1..k the predicted regions).

    >>> t = np.zeros((10, 10), bool); t[2:5, 2:5] = True
    >>> p = np.zeros((10, 10), np.int32); p[3:6, 3:6] = 1; p[8:, 8:] = 2
    >>> match_regions(t, p)
    RegionCounts(n_truth=1, n_found=1, n_pred=2, n_pred_unmatched=1)
    """
    truth = np.asarray(truth, dtype=bool)
    pred = np.asarray(pred_labels)
    if truth.shape != pred.shape:
        raise ValueError(f"mask shape {truth.shape} differs from prediction {pred.shape}")
    n_pred = int(pred.max()) if pred.size else 0
    if truth.any():
        n_gt, gt = cv2.connectedComponents(truth.astype(np.uint8), connectivity=8)
        n_gt -= 1
    else:
        n_gt, gt = 0, None
    if n_gt == 0 or n_pred == 0:
        return RegionCounts(n_gt, 0, n_pred, n_pred)
    joint = np.bincount(
        (gt.astype(np.int64) * (n_pred + 1) + pred).ravel(), minlength=(n_gt + 1) * (n_pred + 1)
    ).reshape(n_gt + 1, n_pred + 1)
    inter = joint[1:, 1:].astype(np.float64)
    area_gt = joint[1:, :].sum(axis=1).astype(np.float64)
    area_pred = joint[:, 1:].sum(axis=0).astype(np.float64)
    union = area_gt[:, None] + area_pred[None, :] - inter
    hit = inter / np.maximum(union, 1) > iou
    return RegionCounts(n_gt, int(hit.any(axis=1).sum()), n_pred, int((~hit.any(axis=0)).sum()))


def region_metrics(
    labels: Sequence[int],
    masks: Sequence[np.ndarray],
    pred_labels: Sequence[np.ndarray],
    iou: float = 0.1,
) -> dict[str, Any]:
    """Region recall and false regions over a test set (one mask and one predicted
    label image per image; good images have all-False masks).

    Keys: ``recall`` (found / truth regions; None without truth regions),
    ``false_regions_per_good_image`` (None without good images),
    ``unmatched_regions_per_defective_image`` and the summed counts.
    """
    good, defect = RegionCounts(), RegionCounts()
    n_good = n_defect = 0
    for y, m, p in zip(labels, masks, pred_labels, strict=True):
        c = match_regions(m, p, iou)
        if y == 0:
            good, n_good = good + c, n_good + 1
        else:
            defect, n_defect = defect + c, n_defect + 1
    return {
        "iou": iou,
        "recall": defect.n_found / defect.n_truth if defect.n_truth else None,
        "false_regions_per_good_image": good.n_pred / n_good if n_good else None,
        "unmatched_regions_per_defective_image": (
            defect.n_pred_unmatched / n_defect if n_defect else None
        ),
        "n_good_images": n_good,
        "n_defective_images": n_defect,
        "good": asdict(good),
        "defective": asdict(defect),
    }

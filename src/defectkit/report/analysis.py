"""What the report says about a scored test set: decisions at the model's
threshold, error rates with the calibration bound, recall per type, and
region-level results (regions as ``inspect`` reports them, and at the pixel
threshold alone)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defectkit.decide.calibration import clopper_pearson_upper
from defectkit.decide.regions import Region, locate_regions, overall_severity
from defectkit.decide.severity import GRADES, SeverityRules
from defectkit.metrics.image import f1_max, image_ap, image_auroc
from defectkit.metrics.regions import region_metrics
from defectkit.report.collect import ScoredSet

__all__ = ["Analysis", "analyse"]


@dataclass
class Analysis:
    """Per-image decisions and regions, and the summary figures (``summary``)."""

    threshold: float | None
    predicted: np.ndarray  # bool per image; all False without a threshold
    regions: list[list[Region]] = field(default_factory=list)  # as inspect reports them
    region_labels: list[np.ndarray] = field(default_factory=list)  # at the pixel threshold
    summary: dict[str, Any] = field(default_factory=dict)


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def analyse(
    det: Any,
    scored: ScoredSet,
    *,
    mm_per_pixel: float | None = None,
    rules: SeverityRules | None = None,
    iou: float = 0.1,
) -> Analysis:
    """Decide every image of ``scored`` with ``det`` and compute the figures."""
    y = scored.label_array.astype(int)
    s = scored.score_array
    n_good, n_def = int(np.sum(y == 0)), int(np.sum(y == 1))
    source = "model"
    thr: float | None = det.threshold.value if det.threshold is not None else None
    if thr is None:
        _, t = f1_max(y, s) if len(y) else (math.nan, math.nan)
        if math.isfinite(t):
            thr, source = float(t), "F1-max of this data (the model has no calibrated threshold)"
        else:
            source = "none"
    predicted = s >= thr if thr is not None else np.zeros(len(y), bool)
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    fn, tn = n_def - tp, n_good - fp

    cal = det.threshold
    far = fp / n_good if n_good else None
    bound = cal.false_alarm_upper if cal is not None else None
    per_type: dict[str, float] = {}
    counts: dict[str, list[int]] = {}
    for name in sorted({t for t, lab in zip(scored.types, y, strict=True) if lab == 1}):
        sel = np.array([t == name for t in scored.types]) & (y == 1)
        caught = int(np.sum(predicted[sel]))
        per_type[name] = caught / int(sel.sum())
        counts[name] = [caught, int(sel.sum())]

    # Regions: once at the pixel threshold, then kept only on NG images (as inspect).
    region_thr = det.region_threshold if det.region_threshold is not None else thr
    min_area = det.min_region_area
    all_labels: list[np.ndarray] = []
    reported: list[list[Region]] = []
    gated_labels: list[np.ndarray] = []
    severity_counts = dict.fromkeys(GRADES, 0)
    image_severity = dict.fromkeys(GRADES, 0)
    for amap, ng in zip(scored.maps, predicted, strict=True):
        if region_thr is None:
            regs, lab = [], np.zeros(amap.shape, np.int32)
        else:
            regs, lab = locate_regions(
                amap, region_thr, min_area=min_area, mm_per_pixel=mm_per_pixel, rules=rules
            )
        all_labels.append(lab)
        if ng:
            reported.append(regs)
            gated_labels.append(lab)
            for r in regs:
                severity_counts[r.severity] += 1
            grade = overall_severity(regs, True)
            if grade is not None:
                image_severity[grade] += 1
        else:
            reported.append([])
            gated_labels.append(np.zeros(amap.shape, np.int32))
    masks = scored.masks
    summary: dict[str, Any] = {
        "n_images": len(y),
        "n_good": n_good,
        "n_defect": n_def,
        "n_failed_files": len(scored.errors),
        "image_auroc": _num(image_auroc(y, s)) if len(y) else None,
        "image_ap": _num(image_ap(y, s)) if len(y) else None,
        "threshold": thr,
        "threshold_source": source,
        "calibration": None if cal is None else cal.to_dict(),
        "pixel_threshold": region_thr,
        "min_region_area_px": min_area,
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "false_alarm_rate": far,
        "false_alarm_upper_calibrated": bound,
        "bound_covers": None if far is None or bound is None else bool(far <= bound),
        "false_alarm_upper_test": clopper_pearson_upper(fp, n_good) if n_good else None,
        "recall": tp / n_def if n_def else None,
        "recall_per_type": per_type,
        "counts_per_type": counts,
        "regions": {
            "reported": region_metrics(y, masks, gated_labels, iou),
            "pixel_threshold_only": region_metrics(y, masks, all_labels, iou),
        },
        "severity_counts": {"regions": severity_counts, "ng_images": image_severity},
        "seconds": {"scoring": round(scored.seconds, 2)},
    }
    return Analysis(thr, predicted, reported, all_labels, summary)

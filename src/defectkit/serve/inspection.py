"""One image in, the ``inspect`` result object out, plus the overlay image.

The record has the same keys as a line of ``defectkit inspect --format jsonl``
(``path`` is the upload's name), so the service and the CLI share one result
contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from defectkit.decide.overlay import region_overlay
from defectkit.decide.regions import overall_severity
from defectkit.detector import Detector


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class Inspection:
    """The result object of one image and its overlay (uint8 RGB)."""

    record: dict[str, Any]
    overlay: np.ndarray


def inspect_image(det: Detector, image: np.ndarray, name: str) -> Inspection:
    """Score, decide and explain one image exactly as ``defectkit inspect`` does."""
    result = det.score([image])
    decisions = det.decide(result.scores)
    score = float(result.scores[0])
    is_defect = None if decisions is None else bool(decisions[0])
    regions, labels = det.locate_regions(result.maps[0], is_defect)
    rec: dict[str, Any] = {
        "path": name,
        "score": _json_float(score),
        "is_defect": is_defect,
        "threshold": det.threshold.value if det.threshold else None,
        "error": None,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "regions": [r.to_dict() for r in regions],
        "severity": overall_severity(regions, is_defect),
        "pixel_threshold": det.region_threshold,
    }
    if result.extras:
        extra = result.extras[0]
        rec["evidence"] = extra
        if "nearest_good" in extra:
            rec["closest_good"] = det.closest_good(extra)
    types = det.classifier.classes_ if det.classifier is not None else None
    if types is not None:
        proba = det.classify([image])[0] if is_defect else None
        rec["defect_type"] = None if proba is None else str(types[int(np.argmax(proba))])
        rec["type_probabilities"] = (
            None
            if proba is None
            else {str(t): round(float(p), 6) for t, p in zip(types, proba, strict=True)}
        )
    overlay = region_overlay(image, result.maps[0], det.map_threshold, regions, labels)
    return Inspection(rec, overlay)

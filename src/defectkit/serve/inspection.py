"""One image in, the ``inspect`` result object out, plus the overlay image.

The record has the same keys as a line of ``defectkit inspect --format jsonl``
(``path`` is the upload's name), so the service and the CLI share one result
contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from defectkit.decide.overlay import region_overlay
from defectkit.decide.records import image_record
from defectkit.detector import Detector


@dataclass
class Inspection:
    """The result object of one image and its overlay (uint8 RGB)."""

    record: dict[str, Any]
    overlay: np.ndarray


def inspect_image(det: Detector, image: np.ndarray, name: str) -> Inspection:
    """Score, decide and explain one image exactly as ``defectkit inspect`` does
    (the line comes from the same :func:`~defectkit.decide.records.image_record`)."""
    result = det.score([image])
    decisions = det.decide(result.scores)
    is_defect = None if decisions is None else bool(decisions[0])
    proba = None
    if det.classifier is not None and (decisions is None or is_defect):
        proba = det.classify([image])[0]
    rec, regions, labels = image_record(
        det,
        name,
        image,
        float(result.scores[0]),
        result.maps[0],
        is_defect,
        result.extras[0] if result.extras else None,
        proba,
    )
    overlay = region_overlay(image, result.maps[0], det.map_threshold, regions, labels)
    return Inspection(rec, overlay)

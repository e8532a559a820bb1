"""``inspect`` result objects for a batch of loaded files: the one place that
builds the lines of ``defectkit inspect`` (same keys, same rounding), used by
the local command and by the Ray batch engine alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from defectkit.data.batches import Loaded

if TYPE_CHECKING:  # records only read a detector: decide/ does not import upward
    from defectkit.detector import Detector


def json_float(x: float | None) -> float | None:
    """A finite float rounded to 6 decimals (as in the CLI), else None."""
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def type_fields(types: Sequence[str], proba: np.ndarray | None) -> dict[str, Any]:
    """defect_type and type_probabilities of one image (None when not classified)."""
    if proba is None:
        return {"defect_type": None, "type_probabilities": None}
    return {
        "defect_type": types[int(np.argmax(proba))],
        "type_probabilities": {t: round(float(p), 6) for t, p in zip(types, proba, strict=True)},
    }


def failed_record(det: Detector, path: str, problem: str | None) -> dict[str, Any]:
    """The line of a file that could not be inspected."""
    rec: dict[str, Any] = {
        "path": path,
        "score": None,
        "is_defect": None,
        "threshold": det.threshold.value if det.threshold else None,
        "error": problem,
        "regions": None,
        "severity": None,
    }
    if det.classifier is not None:
        rec.update(defect_type=None, type_probabilities=None)
    return rec


def image_record(
    det: Detector,
    name: str,
    image: np.ndarray,
    score: float,
    amap: np.ndarray,
    is_defect: bool | None,
    extra: dict[str, Any] | None,
    proba: np.ndarray | None,
    *,
    mm_per_pixel: float | None = None,
    rules: Any = None,
) -> tuple[dict[str, Any], list[Any], np.ndarray]:
    """The line of one scored image, with its regions and their label image (for
    an overlay). ``proba``: type probabilities when a classifier named its type."""
    from defectkit.decide.regions import overall_severity

    regions, labels = det.locate_regions(amap, is_defect, mm_per_pixel=mm_per_pixel, rules=rules)
    rec: dict[str, Any] = {
        "path": name,
        "score": json_float(score),
        "is_defect": is_defect,
        "threshold": det.threshold.value if det.threshold else None,
        "error": None,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "regions": [r.to_dict() for r in regions],
        "severity": overall_severity(regions, is_defect),
        "pixel_threshold": det.region_threshold,
    }
    if extra is not None:
        rec["evidence"] = extra
        if "nearest_good" in extra:
            rec["closest_good"] = det.closest_good(extra)
    if det.classifier is not None:
        rec.update(type_fields(det.classifier.classes_, proba))
    return rec, regions, labels


def inspect_loaded(
    det: Detector,
    items: Sequence[Loaded],
    names: Sequence[str],
    *,
    mm_per_pixel: float | None = None,
    rules: Any = None,
    maps_out: Path | None = None,
    numbers: Sequence[int] | None = None,
    maps_shown: Path | None = None,
    score: Callable[[list[np.ndarray]], Any] | None = None,
) -> list[dict[str, Any]]:
    """One record per item (``names`` are the paths written in the records).

    Files that did not load get their error; the others are scored together.
    With ``maps_out``, overlays are written as ``{number:06d}_{stem}_overlay.png``
    (``numbers``: 1-based positions in the whole input list, as in the CLI) and
    named in the records under ``maps_shown`` (default ``maps_out``). ``score``
    replaces ``det.score`` (e.g. scoring tile by tile).
    """
    from defectkit.data.images import save_png
    from defectkit.decide.overlay import region_overlay

    types = det.classifier.classes_ if det.classifier is not None else None
    good = [j for j, it in enumerate(items) if it.image is not None]
    out: list[dict[str, Any]] = [
        failed_record(det, names[j], it.error) for j, it in enumerate(items)
    ]
    if not good:
        return out
    result = (score or det.score)([items[j].image for j in good])
    decisions = det.decide(result.scores)
    type_of: dict[int, np.ndarray] = {}
    if types is not None:
        chosen = [k for k in range(len(good)) if decisions is None or decisions[k]]
        if chosen:
            proba = det.classify([items[good[k]].image for k in chosen])
            type_of = dict(zip(chosen, proba, strict=True))
    for k, j in enumerate(good):
        image = items[j].image
        assert image is not None
        is_defect = None if decisions is None else bool(decisions[k])
        rec, regions, labels = image_record(
            det,
            names[j],
            image,
            float(result.scores[k]),
            result.maps[k],
            is_defect,
            result.extras[k] if result.extras else None,
            type_of.get(k),
            mm_per_pixel=mm_per_pixel,
            rules=rules,
        )
        if maps_out is not None:
            number = numbers[j] if numbers is not None else j + 1
            name = f"{number:06d}_{items[j].path.stem}_overlay.png"
            overlay = region_overlay(image, result.maps[k], det.map_threshold, regions, labels)
            save_png(maps_out / name, overlay)
            rec["overlay"] = str((maps_shown or maps_out) / name)
        out[j] = rec
    return out

"""One call that computes the whole evaluation report of a test set."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from defectkit.metrics.image import f1_max, image_ap, image_auroc, recall_per_type
from defectkit.metrics.pixel import Maps, Masks, aupro, pixel_auroc

__all__ = ["evaluate", "format_table"]


def evaluate(
    labels: ArrayLike,
    scores: ArrayLike,
    types: Sequence[str] | None = None,
    masks: Masks | None = None,
    maps: Maps | None = None,
    threshold: float | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, Any]:
    """Image and pixel metrics of one test set, as a JSON-serialisable dict.

    Keys: ``image_auroc``, ``image_ap``, ``image_f1_max``, ``f1_threshold``,
    ``pixel_auroc``, ``aupro`` (normalised up to ``fpr_limit``), ``n_good``,
    ``n_defect``, ``threshold_used`` and ``recall_per_type``.

    ``recall_per_type`` is taken at ``threshold`` when given, else at the F1-max
    threshold; with neither (one class only, no threshold) it and
    ``threshold_used`` are None. Without ``types`` all defective images are
    reported under the type ``"defect"``. Pixel metrics need both ``masks`` and
    ``maps`` (one per image, in the order of ``labels``) and are None otherwise.
    Undefined metrics (one class only) are NaN; all numbers are plain Python
    ``float`` or ``int``.
    """
    y = np.asarray(labels)
    f1, f1_threshold = f1_max(labels, scores)
    result: dict[str, Any] = {
        "image_auroc": image_auroc(labels, scores),
        "image_ap": image_ap(labels, scores),
        "image_f1_max": f1,
        "f1_threshold": f1_threshold,
        "pixel_auroc": None,
        "aupro": None,
        "n_good": int(np.count_nonzero(y == 0)),
        "n_defect": int(np.count_nonzero(y == 1)),
        "threshold_used": None,
        "recall_per_type": None,
    }

    used = f1_threshold if threshold is None else float(threshold)
    if not math.isnan(used):
        kinds = ["defect"] * y.size if types is None else types
        result["threshold_used"] = used
        result["recall_per_type"] = recall_per_type(kinds, labels, scores, used)

    if (masks is None) != (maps is None):
        raise ValueError("pixel metrics need both masks and maps; got only one of them")
    if masks is not None and maps is not None:
        if len(masks) != y.size or len(maps) != y.size:
            raise ValueError(
                f"{y.size} images but {len(masks)} masks and {len(maps)} maps; "
                "give one mask and one map per image"
            )
        for i, (label, mask) in enumerate(zip(y, masks, strict=True)):
            if label == 0 and mask is not None and np.any(mask):
                raise ValueError(f"image {i} is labelled good but its mask marks a defect")
        result["pixel_auroc"] = pixel_auroc(masks, maps)
        result["aupro"] = aupro(masks, maps, fpr_limit)
    return result


_ROWS = (
    ("image_auroc", "image AUROC"),
    ("image_ap", "image AP"),
    ("image_f1_max", "image F1 max"),
    ("f1_threshold", "F1-max threshold"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("threshold_used", "threshold used"),
)


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, spec)
    return str(value)


def format_table(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows of an :func:`evaluate` result, ready to print.

    Rows for missing keys are skipped; None prints as ``n/a``. For the ``good``
    type the rate printed is the fraction of good images passed.

    >>> format_table({"image_auroc": 0.98765, "n_good": 3, "n_defect": 2})
    [('images (good / defective)', '3 / 2'), ('image AUROC', '0.9877')]
    """
    rows: list[tuple[str, str]] = []
    if "n_good" in metrics and "n_defect" in metrics:
        rows.append(("images (good / defective)", f"{metrics['n_good']} / {metrics['n_defect']}"))
    for key, name in _ROWS:
        if key in metrics:
            # Thresholds are raw scores of any scale: keep significant digits.
            rows.append((name, _fmt(metrics[key], ".6g" if "threshold" in key else ".4f")))
    for kind, rate in (metrics.get("recall_per_type") or {}).items():
        name = "good passed" if kind == "good" else f"recall {kind}"
        rows.append((name, _fmt(rate)))
    return rows

"""Heatmap overlays that show an engineer where the model looked."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from defectkit.decide.regions import Region


def normalise_map(
    amap: np.ndarray, threshold: float | None, reference: float | None = None
) -> np.ndarray:
    """Map scores to [0, 1] on a fixed scale: threshold -> 0.5, 2x threshold -> 1.

    A fixed scale keeps heatmaps of different images comparable (a per-image
    min-max stretch would make every good part look alarming).
    """
    scale = threshold if threshold and threshold > 0 else (reference or float(amap.max()) or 1.0)
    return np.clip(amap / (2.0 * scale), 0.0, 1.0)


def heatmap_overlay(
    image: np.ndarray, amap: np.ndarray, threshold: float | None, alpha: float = 0.45
) -> np.ndarray:
    """RGB uint8 image with the anomaly map blended on top (JET colours)."""
    norm = (normalise_map(amap, threshold) * 255).astype(np.uint8)
    colour = cv2.applyColorMap(norm, cv2.COLORMAP_JET)[:, :, ::-1]
    out = cv2.addWeighted(image, 1 - alpha, colour, alpha, 0)
    if threshold is not None:
        mask = (amap >= threshold).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out


#: outline colours (RGB) of region grades, and of ground-truth defects in reports
SEVERITY_COLOURS: dict[str, tuple[int, int, int]] = {
    "minor": (255, 230, 0),
    "major": (255, 140, 0),
    "critical": (255, 0, 0),
}
TRUTH_COLOUR = (0, 255, 0)


def _text(out: np.ndarray, text: str, org: tuple[int, int], colour, scale: float) -> None:
    thick = max(1, round(scale * 2))
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)


def region_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    threshold: float | None,
    regions: Sequence[Region],
    labels: np.ndarray | None,
    *,
    truth: np.ndarray | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """Heatmap overlay with each region outlined in its grade's colour and labelled
    ``#n grade`` (``labels`` is the label image of :func:`locate_regions`; without
    it boxes are drawn). ``truth``, a ground-truth mask, is outlined in green."""
    norm = (normalise_map(amap, threshold) * 255).astype(np.uint8)
    colour = cv2.applyColorMap(norm, cv2.COLORMAP_JET)[:, :, ::-1]
    out = np.ascontiguousarray(cv2.addWeighted(image, 1 - alpha, colour, alpha, 0))
    h, w = out.shape[:2]
    line = max(1, round(min(h, w) / 250))
    if truth is not None and np.any(truth):
        contours, _ = cv2.findContours(
            truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(out, contours, -1, TRUTH_COLOUR, line)
    scale = max(0.35, min(h, w) / 700)
    for i, r in enumerate(regions, start=1):
        c = SEVERITY_COLOURS.get(r.severity, (255, 255, 255))
        x, y, bw, bh = r.bbox
        if labels is not None:
            crop = (labels[y : y + bh, x : x + bw] == i).astype(np.uint8)
            contours, _ = cv2.findContours(
                crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x, y)
            )
            cv2.drawContours(out, contours, -1, c, line + 1)
        else:
            cv2.rectangle(out, (x, y), (x + bw - 1, y + bh - 1), c, line + 1)
        label = f"#{i} {r.severity}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y - 4 if y - 4 >= th + 2 else min(h - 3, y + bh + th + 4)
        _text(out, label, (max(0, min(x, w - tw - 2)), ty), c, scale)
    return out

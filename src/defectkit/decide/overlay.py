"""Heatmap overlays that show an engineer where the model looked."""

from __future__ import annotations

import cv2
import numpy as np


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

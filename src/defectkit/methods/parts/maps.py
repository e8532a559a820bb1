"""Anomaly map post-processing: back to input resolution, smoothed."""

from __future__ import annotations

import cv2
import numpy as np


def upsample_map(patch_map: np.ndarray, out_shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Bilinear upsampling of a patch-score grid to ``out_shape``, then Gaussian blur.

    ``sigma`` is in output pixels per 256 pixels of the shorter side, so the
    smoothing scales with the image.
    """
    h, w = out_shape
    up = cv2.resize(patch_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        s = sigma * min(h, w) / 256.0
        up = cv2.GaussianBlur(up, (0, 0), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT)
    return up


def top_mean(amap: np.ndarray, fraction: float) -> float:
    """Mean of the highest ``fraction`` of a map's values (at least one value)."""
    flat = amap.ravel()
    k = max(1, round(fraction * flat.size))
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean())

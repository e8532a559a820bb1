"""Grey-level building blocks of the classical methods: grey images at a working
size, background flattening, robust statistics of good images, Otsu's
threshold, and z-score maps back at input resolution."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from defectkit.errors import ConfigError
from defectkit.methods.base import Image

#: MAD to standard deviation for normal data
MAD_TO_STD = 1.4826


def gray(image: Image, size: int | None = None) -> np.ndarray:
    """float32 grey levels (0..255) of an RGB uint8 image, squashed to ``size``^2 if given."""
    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if size is not None and g.shape != (size, size):
        interp = cv2.INTER_AREA if size * size < g.size else cv2.INTER_LINEAR
        g = cv2.resize(g, (size, size), interpolation=interp)
    return g.astype(np.float32)


def flatten_background(g: np.ndarray, sigma: float) -> np.ndarray:
    """``log`` of the ratio of ``g`` to its Gaussian-blurred self: local contrast,
    free of slow lighting changes (an adaptive threshold's reference)."""
    g = g + 1.0
    blur = cv2.GaussianBlur(g, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return np.log(g) - np.log(blur)


def robust_stats(stack: np.ndarray, axis: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD-based spread along ``axis`` (None: over everything).

    The spread has a floor of half its median, so pixels that never change in
    the good images do not turn every tiny difference into a huge z-score.
    """
    med = np.median(stack, axis=axis)
    spread = np.median(np.abs(stack - med), axis=axis) * MAD_TO_STD
    floor = 0.5 * float(np.median(spread)) + 1e-6
    return med.astype(np.float32), (np.maximum(spread, 0) + floor).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist / hist.sum()
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def signed(z: np.ndarray, polarity: str) -> np.ndarray:
    """|z| for ``"both"``, the dark (negative) or bright (positive) side only."""
    if polarity == "both":
        return np.abs(z)
    if polarity == "dark":
        return np.maximum(-z, 0.0)
    return np.maximum(z, 0.0)


def smooth(m: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return m
    return cv2.GaussianBlur(m, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def to_input(m: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A working-size map resized (bilinear) to an input's ``(H, W)``."""
    h, w = int(shape[0]), int(shape[1])
    if m.shape == (h, w):
        return m.astype(np.float32)
    return cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def segment(z: np.ndarray, z_threshold: float, open_px: int = 1) -> np.ndarray:
    """Pixels above ``z_threshold``, specks removed by a morphological opening."""
    mask = (z > z_threshold).astype(np.uint8)
    if open_px > 0 and mask.any():
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * open_px + 1, 2 * open_px + 1))
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k)
    return mask.astype(bool)


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")

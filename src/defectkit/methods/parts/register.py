"""Rigid registration of an image to a reference: phase correlation for the
shift, then ECC (enhanced correlation coefficient) for rotation and sub-pixel
shift.

A warp is a float32 ``(2, 3)`` matrix ``W`` mapping reference coordinates to
image coordinates (OpenCV's ECC convention): ``to_reference(image, W, shape)``
resamples the image onto the reference grid, ``to_image(map, W, shape)`` sends
a map computed on the reference grid back onto the image.

>>> rng = np.random.default_rng(0)
>>> ref = cv2.GaussianBlur(rng.random((96, 96)).astype(np.float32), (0, 0), 2)
>>> moved = np.roll(ref, (3, -5), axis=(0, 1))
>>> w = estimate_rigid(moved, ref)
>>> [round(float(v)) for v in w[:, 2]]
[-5, 3]
"""

from __future__ import annotations

import contextlib

import cv2
import numpy as np


def _prepare(g: np.ndarray) -> np.ndarray:
    g = g.astype(np.float32)
    g = g - float(g.mean())
    s = float(g.std())
    return g / s if s > 0 else g


def phase_shift(image: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(dx, dy) such that ``image(x + dx, y + dy) ~ reference(x, y)``."""
    win = cv2.createHanningWindow(reference.shape[::-1], cv2.CV_32F)
    (dx, dy), _ = cv2.phaseCorrelate(_prepare(reference), _prepare(image), win)
    return float(dx), float(dy)


def estimate_rigid(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    rotation: bool = True,
    iterations: int = 60,
    blur: int = 5,
) -> np.ndarray:
    """Warp ``(2, 3)`` from ``reference`` to ``image`` coordinates (grey float images,
    same shape). ECC refines the phase-correlation shift; if ECC fails to
    converge the shift alone is returned."""
    if image.shape != reference.shape:
        raise ValueError(f"shapes differ: {image.shape} vs {reference.shape}")
    dx, dy = phase_shift(image, reference)
    warp = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
    motion = cv2.MOTION_EUCLIDEAN if rotation else cv2.MOTION_TRANSLATION
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, 1e-5)
    # if ECC does not converge (e.g. a flat image), the phase-correlation shift stays
    with contextlib.suppress(cv2.error):
        _, warp = cv2.findTransformECC(
            _prepare(reference), _prepare(image), warp, motion, criteria, None, blur
        )
    return warp.astype(np.float32)


def to_reference(
    image: np.ndarray,
    warp: np.ndarray,
    shape: tuple[int, int],
    *,
    border: int = cv2.BORDER_REPLICATE,
) -> np.ndarray:
    """``image`` resampled onto the reference grid of ``shape`` (h, w)."""
    return cv2.warpAffine(
        image,
        warp,
        (shape[1], shape[0]),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=border,
    )


def valid_region(
    image_shape: tuple[int, int], warp: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """bool (h, w) of reference pixels that fall inside the image."""
    ones = np.ones(image_shape[:2], dtype=np.float32)
    inside = to_reference(ones, warp, shape, border=cv2.BORDER_CONSTANT)
    return inside >= 0.999


def to_image(map_: np.ndarray, warp: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """A map on the reference grid sent back onto the image grid of ``image_shape``."""
    return cv2.warpAffine(
        map_.astype(np.float32),
        warp,
        (image_shape[1], image_shape[0]),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )

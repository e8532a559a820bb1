"""Resizing images to the network's input, keeping the aspect ratio."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from defectkit.methods.parts.photometric import gain_offset

#: training images whose aspect ratios (w / h) all lie within this factor of each
#: other share one working aspect; more varied sets are squashed to a square
UNIFORM_ASPECT = 1.15


def fit_size(
    height: int,
    width: int,
    side: int,
    multiple: int,
    keep_aspect: bool,
    aspect: float | None = None,
) -> tuple[int, int]:
    """Network input size (h, w), both multiples of ``multiple``.

    With ``aspect`` (w / h, the model's working aspect: :func:`working_aspect`)
    every image gets one size, whatever its own shape: ``side`` on the short side
    and ``aspect`` times that on the long one, so an elongated part keeps the
    resolution across its width that a square part gets. Else, with
    ``keep_aspect``, each image keeps its own aspect at an area of about
    ``side**2``; without either it is squashed to ``side`` x ``side``. The ratio
    is capped at 4:1.
    """
    if aspect is not None:
        ratio = min(max(aspect, 0.25), 4.0)
        h, w = (side, side * ratio) if ratio >= 1 else (side / ratio, side)
    elif keep_aspect:
        ratio = min(max(width / height, 0.25), 4.0)
        h, w = side / math.sqrt(ratio), side * math.sqrt(ratio)
    else:
        return side, side
    return max(multiple, round(h / multiple) * multiple), max(
        multiple, round(w / multiple) * multiple
    )


def working_aspect(shapes: list[tuple[int, int]]) -> float:
    """One working aspect (w / h) for a model, from its training images' (h, w).

    Images of one shape (a camera's frames, line-scan tiles, elongated parts) keep
    it: their median aspect, so a 500 x 1250 part is not squashed 2.5 times
    across its length. Where the aspects vary by more than :data:`UNIFORM_ASPECT`
    (crops of parts in both orientations), 1.0: every image squashed to a square,
    which scored better on such a set (magnetic-tile, aspects 0.36 to 2.6: image
    AUROC 0.89 squashed against 0.87 with each image's own aspect, lite0).
    """
    ratios = np.array([w / h for h, w in shapes], np.float64)
    if len(ratios) == 0 or ratios.max() > UNIFORM_ASPECT * ratios.min():
        return 1.0
    return float(np.median(ratios))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` at ``size`` (h, w): area averaging when shrinking (no aliasing),
    bilinear when enlarging."""
    h, w = size
    interp = cv2.INTER_AREA if h * w < image.shape[0] * image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


def to_tensor(image: np.ndarray, size: tuple[int, int], photometric: str = "none") -> torch.Tensor:
    """uint8 (H, W, 3) -> float (1, 3, h, w) in [0, 1], resized with area/linear;
    ``photometric="standardise"``: to a fixed mean and spread (parts.photometric)."""
    resized = resize_image(image, size)
    gain, offset = gain_offset(resized, photometric)
    t = torch.from_numpy(resized).permute(2, 0, 1).unsqueeze(0)
    return t.float().mul_(gain).add_(offset)

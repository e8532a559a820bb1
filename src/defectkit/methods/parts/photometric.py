"""Photometric normalisation: every image brought to one brightness and contrast
before the backbone.

Lighting, exposure and surface finish move a whole image's grey levels; a
pretrained backbone sees that as a change of every patch, so the good images'
spread of brightness widens the normal model and a defect must stand out
against it. Standardising each image (its own mean and standard deviation,
over all pixels and channels, to fixed targets) removes that spread and keeps
the local structure. On magnetic-tile, whose good images' mean grey level
varies with a standard deviation of 30 around 113, it raised PatchCore's image
AUROC from 0.944 to 0.97 (BENCHMARKS.md).

The price: a part that differs from good parts only in overall brightness or
contrast is no longer different after normalisation. Where that is a defect
(wrong coating, missing paint), turn it off (``photometric="none"``) or add a
classical ``threshold`` check.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from defectkit.errors import ConfigError, ModelFileError

PHOTOMETRIC = ("standardise", "none")
TARGET_MEAN = 0.45  # in [0, 1] pixel units: about ImageNet's mean grey
TARGET_STD = 0.18


def check_mode(mode: str) -> None:
    """Refuse an unknown ``photometric`` setting."""
    if mode not in PHOTOMETRIC:
        raise ConfigError(f"photometric must be one of {PHOTOMETRIC}, got {mode!r}")


def mode_from_file(info: dict[str, Any], method: str) -> str:
    """The mode a model file was fitted with; files written before photometric
    normalisation existed were fitted without it."""
    mode = str(info.get("photometric", "none"))
    if mode not in PHOTOMETRIC:
        raise ModelFileError(f"{method} model: unknown photometric {mode!r}")
    return mode


def standardise(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1], each image moved to mean ``TARGET_MEAN`` and
    standard deviation ``TARGET_STD`` (a flat image only to the mean)."""
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(1).view(-1, 1, 1, 1)
    std = flat.std(1, correction=0).view(-1, 1, 1, 1)
    return (x - mean) / std.clamp_min(eps) * TARGET_STD + TARGET_MEAN


def gain_offset(image: np.ndarray, mode: str, eps: float = 1e-3) -> tuple[float, float]:
    """(gain, offset) that take a uint8 image's values ``v`` to ``v * gain + offset``
    in [0, 1] units, normalised as ``mode`` says; the same result as
    :func:`standardise` on the image / 255, from the 8-bit image in one cheap pass
    (the torch reduction took 1 s of a 22 s inspect run)."""
    if mode != "standardise":
        return 1.0 / 255.0, 0.0
    means, stds = cv2.meanStdDev(image)  # per channel
    means, stds = means.ravel() / 255.0, stds.ravel() / 255.0
    mean = float(means.mean())
    std = float(np.sqrt(max(float((stds**2 + means**2).mean()) - mean**2, 0.0)))
    scale = TARGET_STD / max(std, eps)
    return scale / 255.0, TARGET_MEAN - mean * scale

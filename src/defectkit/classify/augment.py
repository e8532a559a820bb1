"""Augmentation for inspection images: what changes between two photos of the same
defect on a line (the part's orientation, a small misplacement, lighting, sensor
noise) and nothing that changes what the defect looks like (no colour shifts, no
crops that could cut the defect away, no shear)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from defectkit.errors import ConfigError

__all__ = ["Augmentation"]


@dataclass(frozen=True)
class Augmentation:
    """One random variant of an image per call; a seeded ``rng`` gives the same variant.

    - ``flips``: horizontal and vertical flips, each with probability 1/2;
    - ``max_rotation``: a rotation by up to this many degrees either way about the
      centre, borders filled by reflection (no black corners a classifier could learn);
    - ``brightness``: an offset of up to this share of the full range (255);
    - ``contrast``: a gain of up to 1 +- this around the image mean;
    - ``noise``: Gaussian noise with a standard deviation of up to this share of 255.

    >>> aug = Augmentation(max_rotation=10)
    >>> img = np.zeros((32, 32, 3), np.uint8)
    >>> aug(img, np.random.default_rng(0)).shape
    (32, 32, 3)
    """

    flips: bool = True
    max_rotation: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.15
    noise: float = 0.02

    def __post_init__(self) -> None:
        for name in ("max_rotation", "brightness", "contrast", "noise"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ConfigError(f"augmentation {name} must be >= 0, got {value}")
        if self.max_rotation > 180 or self.contrast >= 1:
            raise ConfigError(
                f"augmentation max_rotation must be <= 180 and contrast < 1, got "
                f"{self.max_rotation} and {self.contrast}"
            )

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = image
        if self.flips:
            if rng.random() < 0.5:
                out = out[:, ::-1]
            if rng.random() < 0.5:
                out = out[::-1]
        if self.max_rotation > 0:
            angle = rng.uniform(-self.max_rotation, self.max_rotation)
            h, w = out.shape[:2]
            rot = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
            out = cv2.warpAffine(
                np.ascontiguousarray(out),
                rot,
                (w, h),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT_101,
            )
        x = out.astype(np.float32)
        if self.contrast > 0:
            gain = rng.uniform(1 - self.contrast, 1 + self.contrast)
            x = (x - x.mean()) * gain + x.mean()
        if self.brightness > 0:
            x += rng.uniform(-self.brightness, self.brightness) * 255
        if self.noise > 0:
            sigma = rng.uniform(0, self.noise) * 255
            x += rng.standard_normal(x.shape[:2], dtype=np.float32)[:, :, None] * sigma
        return np.ascontiguousarray(np.clip(np.round(x), 0, 255).astype(np.uint8))

"""Threshold segmentation against the grey-level statistics of good images.

Each image is turned grey and squashed to ``size`` x ``size``; its grey levels
are optionally freed of slow lighting changes (``background``); then every
pixel gets a robust z-score against the good images (``reference``):

- ``"pixel"``: median and MAD of that pixel over the good images (parts in a
  fixed position, e.g. cropped tiles or fixtured parts);
- ``"global"``: one median and MAD over all pixels of the good images (uniform
  surfaces, position free: a global threshold);
- ``"otsu"``: Otsu's threshold splits the good grey levels into a dark and a
  bright class (e.g. pads on a board); a pixel's z-score is its distance to the
  nearer class, in that class's MAD.

``background`` is ``"local"`` (divide by a Gaussian blur of ``background_sigma``
working pixels: an adaptive threshold), ``"median"`` (divide by the image's
median grey level: global brightness only) or ``"none"``. ``polarity`` keeps
both sides, or only darker or only brighter than normal. The map is the
smoothed z-score; the image score its maximum. ``extras`` give the segmentation
at ``z_threshold`` (after a morphological opening): its area in % of the image.

Measured on magnetic-tile (CLI split): image AUROC 0.658, pixel AUROC 0.619
with the defaults (pixel reference, local background, both polarities); image
AUROC 0.645 with ``polarity="dark"``, 0.644 with the median background, 0.573
without background correction, and below chance (about 0.40) with the global
or Otsu reference, which ignore where on the tile a pixel is.

Weaknesses, honestly: it sees grey levels only, so defects that change texture
but not brightness (fine cracks in a streaky surface, "uneven" grinding)
are mostly missed; the per-pixel reference needs parts at the same place and
scale in every image; the maximum of a z-map is sensitive to any single odd
pixel (dust, a bright streak), which is what limits it on magnetic-tile; one
global threshold is only useful for uniform surfaces under even light; with
the Otsu reference, blurred borders between the two classes are in-between
grey levels and score like defects (keep ``presmooth`` at 0 there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from defectkit.errors import ConfigError
from defectkit.methods.base import (
    AnomalyModel,
    Image,
    Progress,
    ScoreResult,
    check_images,
    loaded_array,
)
from defectkit.methods.parts import intensity as ip

REFERENCES = ("pixel", "global", "otsu")
BACKGROUNDS = ("local", "median", "none")
POLARITIES = ("both", "dark", "bright")


class ThresholdMethod(AnomalyModel):
    """Robust z-scores of grey levels against good images, thresholded (the method
    ``"threshold"``; not :class:`~defectkit.decide.calibration.Threshold`, the OK/NG
    decision any method's scores feed).

    >>> model = ThresholdMethod(reference="global").fit(good_images)   # doctest: +SKIP
    >>> model.score(new_images).extras[0]["defect_area_pct"]           # doctest: +SKIP
    """

    name = "threshold"
    summary = "grey-level threshold against good-image statistics (classical)"

    def __init__(
        self,
        size: int = 128,
        reference: str = "pixel",
        background: str = "local",
        background_sigma: float = 8.0,
        polarity: str = "both",
        presmooth: float = 1.0,
        smooth: float = 1.0,
        z_threshold: float = 6.0,
    ) -> None:
        self.size = size
        self.reference = reference
        self.background = background
        self.background_sigma = background_sigma
        self.polarity = polarity
        self.presmooth = presmooth
        self.smooth = smooth
        self.z_threshold = z_threshold

    def _validate(self) -> None:
        ip.check_choice("reference", self.reference, REFERENCES)
        ip.check_choice("background", self.background, BACKGROUNDS)
        ip.check_choice("polarity", self.polarity, POLARITIES)
        if self.size < 16:
            raise ConfigError(f"size must be >= 16, got {self.size}")
        if self.background_sigma <= 0 or self.presmooth < 0 or self.smooth < 0:
            raise ConfigError("background_sigma must be > 0; presmooth and smooth >= 0")

    def _levels(self, images: Sequence[Image], progress: Progress | None, stage: str) -> np.ndarray:
        """(N, size, size) normalised grey levels."""
        out = np.empty((len(images), self.size, self.size), dtype=np.float32)
        for i, img in enumerate(images):
            g = ip.smooth(ip.gray(img, self.size), self.presmooth)
            if self.background == "local":
                g = ip.flatten_background(g, self.background_sigma)
            elif self.background == "median":
                g = np.log(g + 1.0) - np.log(float(np.median(g)) + 1.0)
            out[i] = g
            if progress is not None and (i + 1) % 64 == 0:
                progress(stage, i + 1, len(images))
        if progress is not None:
            progress(stage, len(images), len(images))
        return out

    # -- contract ---------------------------------------------------------------
    def fit(self, images: Sequence[Image], progress: Progress | None = None) -> ThresholdMethod:
        self._validate()
        images = check_images(images)
        levels = self._levels(images, progress, "statistics")
        if self.reference == "pixel":
            centre, spread = ip.robust_stats(levels, axis=0)
        elif self.reference == "global":
            c, s = ip.robust_stats(levels.ravel(), axis=None)
            centre, spread = np.atleast_1d(c), np.atleast_1d(s)
        else:
            t = ip.otsu_threshold(levels)
            parts = [levels[levels <= t], levels[levels > t]]
            parts = [p if p.size else levels.ravel() for p in parts]
            stats = [ip.robust_stats(p, axis=None) for p in parts]
            centre = np.array([s[0] for s in stats], dtype=np.float32)
            spread = np.array([s[1] for s in stats], dtype=np.float32)
        self.centre_ = np.asarray(centre, dtype=np.float32)
        self.spread_ = np.asarray(spread, dtype=np.float32)
        self.n_train_images_ = len(images)
        return self

    def z_maps(self, levels: np.ndarray) -> np.ndarray:
        """Signed robust z-scores (N, size, size) of normalised grey levels."""
        if self.reference == "otsu":
            z = (levels[..., None] - self.centre_) / self.spread_
            nearer = np.argmin(np.abs(z), axis=-1)
            return np.take_along_axis(z, nearer[..., None], axis=-1)[..., 0]
        return (levels - self.centre_) / self.spread_

    def score(self, images: Sequence[Image], progress: Progress | None = None) -> ScoreResult:
        self._require_fitted()
        images = check_images(images)
        z = self.z_maps(self._levels(images, progress, "score"))
        scores = np.empty(len(images), dtype=np.float32)
        maps, extras = [], []
        for i, img in enumerate(images):
            m = ip.smooth(ip.signed(z[i], self.polarity), self.smooth)
            scores[i] = float(m.max())
            maps.append(ip.to_input(m, img.shape[:2]))
            seg = ip.segment(m, self.z_threshold)
            extras.append({"defect_area_pct": round(100.0 * float(seg.mean()), 3)})
        return ScoreResult(scores=scores, maps=maps, extras=extras)

    # -- persistence ------------------------------------------------------------
    def learned_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        return (
            {"centre": self.centre_, "spread": self.spread_},
            {"n_train_images": self.n_train_images_},
        )

    def load_learned_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        self._validate()
        expected = {"pixel": (self.size, self.size), "global": (1,), "otsu": (2,)}.get(
            self.reference
        )
        detail = f"reference={self.reference!r}, size={self.size}"
        centre = loaded_array(arrays, "centre", expected, "threshold", detail=detail)
        spread = loaded_array(arrays, "spread", expected, "threshold", detail=detail, positive=True)
        self.centre_ = centre.astype(np.float32)
        self.spread_ = spread.astype(np.float32)
        self.n_train_images_ = int(info.get("n_train_images", 0))

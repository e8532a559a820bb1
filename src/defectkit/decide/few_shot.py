"""Calibration from a handful of good images (few-shot mode).

With fewer good images than ``FEW_SHOT_BELOW`` (64, in
:mod:`defectkit.decide.defaults`), holding some out to set the threshold leaves
too few to learn from and too few to calibrate on (8 images: 7 fitted, the
threshold from the one left, a 95% bound of 95% on its false-alarm rate).
Instead every image is fitted, and each is then scored by the method as if it
had been fitted without it (``score_left_out``, methods tagged
``leave_one_out``). Those scores are what new good parts look like to the
model, one per image.

Copies of each image, mildly changed the way parts on a line vary (mirrored,
turned a few degrees, lit a little brighter or darker), are scored the same way
(against the model without their source image) and pooled with them, but only
the kinds of change that the product allows: a kind is kept when its copies score
like the images themselves (median copy score at most the largest plain score), so
a part with a printed label is not calibrated on mirrored labels. The threshold
is then a fitted tail of the pooled scores (see
:func:`~defectkit.decide.calibration.threshold_for_false_alarm_rate`), while its
stated 95% bound counts images, never copies.

With one image there is nothing to leave out: its copies are scored against the
model of the image itself (optimistic), and only the photometric and rotation
copies are used; the bound says that nothing is certified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defectkit.decide.calibration import Threshold, clopper_pearson_upper, rounded_scores
from defectkit.methods.base import AnomalyModel, Image, Progress


def _rotate(image: Image, degrees: float) -> Image:
    import cv2

    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _gain(image: Image, factor: float) -> Image:
    return np.clip(image.astype(np.float32) * factor, 0, 255).astype(np.uint8)


#: the kinds of copy, by name; ``True``: used with a single image too (no mirror)
AUGMENTATIONS: dict[str, tuple[Callable[[Image], Image], bool]] = {
    "mirror-lr": (lambda im: np.ascontiguousarray(im[:, ::-1]), False),
    "mirror-ud": (lambda im: np.ascontiguousarray(im[::-1]), False),
    "rotate+3": (lambda im: _rotate(im, 3.0), True),
    "rotate-3": (lambda im: _rotate(im, -3.0), True),
    "brighter": (lambda im: _gain(im, 1.1), True),
    "darker": (lambda im: _gain(im, 0.9), True),
}


@dataclass
class LeftOutScores:
    """What a few-shot calibration scored: the images' leave-one-out scores and maps
    and, pooled after them, the kept copies'; which kinds were kept and why."""

    n_images: int
    scores: np.ndarray
    maps: list[np.ndarray]
    kept: list[str] = field(default_factory=list)
    #: every copy's score per kind (kept or not), in image order
    copies: dict[str, list[float]] = field(default_factory=dict)

    @property
    def medians(self) -> dict[str, float]:
        """Median copy score per kind: what decides whether a kind is kept."""
        return {k: float(np.median(v)) for k, v in self.copies.items()}

    @property
    def plain(self) -> np.ndarray:
        """The images' own leave-one-out scores (none for a single image)."""
        return self.scores[: self.n_images] if self.n_images >= 2 else self.scores[:0]

    def summary(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "scores": "leave-one-out",
            "copies_kept": self.kept,
            "n_copies": int(len(self.scores) - self.n_images),
            "copy_scores": {k: rounded_scores(np.array(v)) for k, v in self.copies.items()},
        }


def left_out_scores(
    model: AnomalyModel, images: Sequence[Image], progress: Progress | None = None
) -> LeftOutScores:
    """Leave-one-out scores of the fitted ``images`` and of their kept copies."""
    n = len(images)
    kinds = [name for name, (_, single) in AUGMENTATIONS.items() if n >= 2 or single]
    copies = [(i, AUGMENTATIONS[name][0](images[i])) for name in kinds for i in range(n)]
    if n >= 2:
        res = model.score_left_out(images, list(enumerate(images)) + copies, progress)
        first = n
    else:  # nothing to leave out: the copies against the image itself (optimistic)
        res = model.score([im for _, im in copies], progress=progress)
        first = 0
    all_scores = np.asarray(res.scores, np.float64)
    plain = all_scores[:first]
    scores, maps = [plain], list(res.maps[:first])
    kept: list[str] = []
    by_kind: dict[str, list[float]] = {}
    for k, name in enumerate(kinds):
        part = slice(first + k * n, first + (k + 1) * n)
        by_kind[name] = all_scores[part].tolist()
        if n >= 2 and np.median(all_scores[part]) > plain.max():
            continue
        kept.append(name)
        scores.append(all_scores[part])
        maps += list(res.maps[part])
    return LeftOutScores(n, np.concatenate(scores), maps, kept, by_kind)


def counted_by_images(thr: Threshold, found: LeftOutScores) -> Threshold:
    """``thr`` (set on the pooled scores) with its sample size, measured rate and 95%
    bound counted on the images alone: copies are not independent parts."""
    plain = found.plain
    k = int(np.sum(plain >= thr.value))
    n = found.n_images
    thr.n_good = n
    thr.false_alarm_rate = k / n if len(plain) else None
    thr.false_alarm_upper = clopper_pearson_upper(k, n) if len(plain) else 1.0
    thr.left_out = True
    thr.n_copies = int(len(found.scores) - n)
    return thr

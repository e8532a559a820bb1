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
like the images themselves (median copy score at most the largest plain score, and
a copy's score at most ``COPY_RATIO`` times its own image's, in the median over
images), so a part with a printed label is not calibrated on mirrored labels. The
second test holds where one odd image (another fabric in the set) makes the largest
plain score no bound at all: on aitex at 8 good images that image scored 3.6 times
the median, and mirrored or turned fabric 2.4 to 3.6 times its own image, which then
set the threshold (no defect caught); the suite's other sets' copies score 0.8 to 1.7
times their images. The threshold
is then a fitted tail of the pooled scores (see
:func:`~defectkit.decide.calibration.threshold_for_false_alarm_rate`), while its
stated 95% bound counts images, never copies.

With one image there is nothing to leave out: its copies are scored against the
model of the image itself (optimistic), and only the photometric and rotation
copies are used; the bound says that nothing is certified.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defectkit.data.files import image_shapes
from defectkit.decide.calibration import Threshold, clopper_pearson_upper, rounded_scores
from defectkit.decide.map_store import SavedMaps
from defectkit.methods.base import AnomalyModel, Image, Progress

#: the most a kept kind's copies may score over their own images (median ratio)
COPY_RATIO = 2.0


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
    maps: Sequence[np.ndarray]
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
    model: AnomalyModel,
    images: Sequence[Image],
    progress: Progress | None = None,
    *,
    map_memory: int | None = None,
    stack: ExitStack | None = None,
    keep_maps: bool = True,
    only: Sequence[str] | None = None,
) -> LeftOutScores:
    """Leave-one-out scores of the fitted ``images`` and of their kept copies.

    One image and its copies are scored at a time, so only one image's copies are
    ever held. Their maps (one per image and copy, H x W x 4 bytes each) stay in
    memory up to ``map_memory`` bytes; above it, and given a ``stack``, they go to
    a temporary folder removed when ``stack`` closes (same values, read back when
    the pixel threshold counts regions): 63 images of 900 x 900 px and six kinds
    of copy are 1.4 GB of maps. ``keep_maps`` False: scores only (no maps).
    ``only``: these kinds of copy alone (each kind is kept or not on its own).
    """
    n = len(images)
    kinds = [
        name
        for name, (_, single) in AUGMENTATIONS.items()
        if (n >= 2 or single) and (only is None or name in only)
    ]
    shapes = image_shapes(images)
    per_query = (1 + len(kinds)) if n >= 2 else len(kinds)
    total = per_query * sum(h * w * 4 for h, w in shapes)
    sink: list[np.ndarray] | SavedMaps = []
    if keep_maps and stack is not None and map_memory is not None and total > map_memory:
        sink = SavedMaps(stack.enter_context(tempfile.TemporaryDirectory(prefix="defectkit-")))
    first = n if n >= 2 else 0
    all_scores = np.empty(first + len(kinds) * n, np.float64)
    where = np.empty(len(all_scores), np.int64)  # each query's map in ``sink``
    for i in range(n):
        image = images[i]
        copies = [AUGMENTATIONS[name][0](image) for name in kinds]
        if n >= 2:
            res = model.score_left_out(images, [(i, im) for im in [image, *copies]])
            positions = [i] + [first + k * n + i for k in range(len(kinds))]
        else:  # nothing to leave out: the copies against the image itself (optimistic)
            res = model.score(copies)
            positions = [k * n + i for k in range(len(kinds))]
        for pos, score, amap in zip(positions, res.scores, res.maps, strict=True):
            all_scores[pos], where[pos] = score, len(sink)
            if keep_maps:
                sink.append(amap)
        if progress is not None:
            progress("leave-one-out", i + 1, n)
    plain = all_scores[:first]
    chosen = list(range(first))
    kept: list[str] = []
    by_kind: dict[str, list[float]] = {}
    for k, name in enumerate(kinds):
        part = slice(first + k * n, first + (k + 1) * n)
        by_kind[name] = all_scores[part].tolist()
        if n >= 2 and (
            np.median(all_scores[part]) > plain.max()
            # a ratio only means something on scores above zero (distances)
            or (plain.min() > 0 and np.median(all_scores[part] / plain) > COPY_RATIO)
        ):
            continue
        kept.append(name)
        chosen += range(part.start, part.stop)
    maps = _Picked(sink, where[chosen].tolist() if keep_maps else [])
    return LeftOutScores(n, all_scores[chosen], maps, kept, by_kind)


class _Picked(Sequence[np.ndarray]):
    """The maps at ``indices`` of ``maps``, without copying them."""

    def __init__(self, maps: Sequence[np.ndarray], indices: list[int]) -> None:
        self._maps, self._indices = maps, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return self._maps[self._indices[index]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in self._indices:
            yield self._maps[i]


#: mirrored copies join a few-shot memory bank from this many good images (fewer:
#: at 2 and 4 images casting fell by 0.015 and 0.026 with them, benchmarks/fewshot.py)
MIRROR_BANK_FROM = 8
#: kinds of copy that are mirrors, and their ``mirror_bank`` flip
_FLIPS = {"mirror-lr": "lr", "mirror-ud": "ud"}
MIRROR_KINDS = tuple(_FLIPS)


def memory_mirrors(kept: Sequence[str]) -> str:
    """The ``mirror_bank`` setting for the mirrors a calibration kept: the part
    allows them, so its memory may hold them too."""
    flips = [_FLIPS[k] for k in kept if k in _FLIPS]
    return "both" if len(flips) == 2 else (flips[0] if flips else "none")


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

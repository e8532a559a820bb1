"""High-resolution images in overlapping tiles.

A 4096x4096 web or wafer image shrunk to a network's 256 px loses every defect
smaller than 16 px. Tiling keeps the resolution: the image is cut into
``tile`` x ``tile`` crops that overlap by ``overlap`` px, each crop is scored by
the model (fitted on crops of good images at the same tile size, e.g. with
:func:`split_tiles`), and the crops' maps are stitched back into one map at the
image's resolution. The image score is the highest tile score.

Stitching where tiles overlap: ``"max"`` (default) keeps the higher value, so a
defect on a seam is never diluted; ``"mean"`` blends with weights that fall
linearly towards each tile's border over the overlap, which smooths seams where
a method's maps are less reliable near a crop's edge.

Thresholds: a detector fitted on tiles is calibrated on tile scores, but a
tiled image's score is the highest of its many tiles, so at the same threshold
a whole image raises a false alarm more often than one tile does.
:func:`calibrate_tiled` re-calibrates on whole held-out good images, scored
tile by tile as they will be inspected.

Settings made for whole parts do not suit tiles, and :func:`tile_params` turns
them off for tiled fits unless asked for: ``photometric`` would standardise
each tile on its own, and a tile's brightness is content of the photograph,
not lighting (a dull tile's noise was stretched until it outscored a 10 px hole
on a 4096 px image); PatchCore's ``context_size`` would shrink each tile to a
quarter of its side, which tiling is there to avoid.

>>> params = tile_params("patchcore", {})                                   # doctest: +SKIP
>>> det = Detector.fit(split_tiles(good_images, 512), "patchcore", params)  # doctest: +SKIP
>>> calibrate_tiled(det, held_out_good_images, tile=512)                   # doctest: +SKIP
>>> result = score_tiled(det, [big_image], tile=512, overlap=64)           # doctest: +SKIP
>>> det.decide(result.scores), result.maps[0].shape                        # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from defectkit.decide.defaults import DEFAULT_MAX_FALSE_REGIONS
from defectkit.errors import ConfigError
from defectkit.methods.base import Image, Progress, ScoreResult, check_images

if TYPE_CHECKING:
    from defectkit.detector import Detector

BLENDS = ("max", "mean")


class Scorer(Protocol):
    """Anything that scores images: a :class:`~defectkit.detector.Detector` or a method."""

    def score(self, images: Sequence[Image], progress: Progress | None = None) -> ScoreResult: ...


def default_overlap(tile: int) -> int:
    """An eighth of the tile: enough that a small defect on a seam is whole in one tile."""
    return tile // 8


def check_tiling(tile: int, overlap: int | None) -> int:
    """Validate ``tile`` and ``overlap``; returns the overlap to use."""
    if not isinstance(tile, (int, np.integer)) or tile < 32:
        raise ConfigError(f"tile size must be an integer >= 32 px, got {tile}")
    overlap = default_overlap(tile) if overlap is None else overlap
    if not 0 <= overlap <= tile // 2:
        raise ConfigError(f"tile overlap must be in [0, {tile // 2}] px, got {overlap}")
    return int(overlap)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` px along a side of ``length`` px.

    Tiles overlap by at least ``overlap``; the first starts at 0 and the last ends
    at ``length``, the rest spread evenly between. A side no longer than a tile
    gets one tile covering it.

    >>> tile_starts(1000, 512, 64)
    [0, 488]
    >>> tile_starts(4096, 512, 64)[:3]
    [0, 448, 896]
    """
    if length <= tile:
        return [0]
    step = tile - overlap
    n = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """``(y, x, h, w)`` of every tile of an image, row by row."""
    th, tw = min(tile, height), min(tile, width)
    return [
        (y, x, th, tw)
        for y in tile_starts(height, tile, overlap)
        for x in tile_starts(width, tile, overlap)
    ]


_TILE_SETTINGS = {"photometric": "none", "context_size": 0}


def tile_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` for a model fitted on tiles: ``photometric="none"`` and
    ``context_size=0`` where the method has them and ``params`` does not choose
    them (see above)."""
    from defectkit.methods import get_method

    known = inspect.signature(get_method(method).__init__).parameters
    extra = {k: v for k, v in _TILE_SETTINGS.items() if k in known and k not in params}
    return {**params, **extra}


def tile_for_defect(
    method: str, params: dict[str, Any], min_defect_px: int, longest_side: int
) -> int | None:
    """Tile size at which a defect of ``min_defect_px`` image pixels spans at least
    one feature cell of ``method`` (``grid_stride`` px of its ``image_size`` input,
    8 of 256 by default: a tile of 32 x ``min_defect_px`` px), or None when whole
    images of ``longest_side`` px already give cells that small (no tiling)."""
    from defectkit.methods import get_method

    if min_defect_px < 1:
        raise ConfigError(f"the smallest defect must be >= 1 px, got {min_defect_px}")
    known = inspect.signature(get_method(method).__init__).parameters
    if "image_size" not in known:
        raise ConfigError(
            f"a smallest defect size sets the working scale of methods with an image_size "
            f"setting, not {method}"
        )
    side = int(params.get("image_size", known["image_size"].default))
    stride = int(params.get("grid_stride", 8))
    tile = max(32, (side * min_defect_px // stride) // 32 * 32)
    return tile if longest_side > tile else None


def split_tiles(
    images: Sequence[Image] | Image, tile: int, overlap: int | None = None
) -> list[Image]:
    """All tiles of ``images`` (the crops :func:`score_tiled` scores): fit a model on
    the tiles of good images so it learns at the resolution it will inspect."""
    overlap = check_tiling(tile, overlap)
    out = []
    for img in check_images(images):
        for y, x, h, w in tile_boxes(img.shape[0], img.shape[1], tile, overlap):
            out.append(np.ascontiguousarray(img[y : y + h, x : x + w]))
    return out


def _ramp(n: int, overlap: int) -> np.ndarray:
    """1-D blending weights: rising linearly over ``overlap`` px at both ends."""
    i = np.arange(n, dtype=np.float32)
    edge = np.minimum(i + 1, n - i)
    return np.clip(edge / (overlap + 1), 1e-3, 1.0) if overlap > 0 else np.ones(n, np.float32)


def score_tiled(
    scorer: Scorer,
    images: Sequence[Image] | Image,
    tile: int,
    overlap: int | None = None,
    *,
    blend: str = "max",
    batch_size: int = 16,
    progress: Progress | None = None,
) -> ScoreResult:
    """Score each image tile by tile; one stitched map per image at its resolution.

    ``scores[i]`` is the highest tile score of image ``i``; ``extras[i]`` gives the
    number of tiles and the worst tile's box ``[x, y, w, h]`` with the method's
    evidence for that tile (its coordinates are the tile's own).
    """
    if blend not in BLENDS:
        raise ConfigError(f"tile blend must be one of {BLENDS}, got {blend!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    overlap = check_tiling(tile, overlap)
    images = check_images(images)
    plan = [tile_boxes(img.shape[0], img.shape[1], tile, overlap) for img in images]
    total = sum(len(p) for p in plan)
    scores = np.empty(len(images), np.float32)
    maps: list[np.ndarray] = []
    extras: list[dict[str, Any]] = []
    done = 0
    for img, boxes in zip(images, plan, strict=True):
        acc = np.full(img.shape[:2], -np.inf if blend == "max" else 0.0, np.float32)
        weight = np.zeros(img.shape[:2], np.float32) if blend == "mean" else None
        best, best_extra, best_box = -np.inf, {}, boxes[0]
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start : start + batch_size]
            crops = [img[y : y + h, x : x + w] for y, x, h, w in chunk]
            res = scorer.score(crops)
            for k, (y, x, h, w) in enumerate(chunk):
                m = res.maps[k]
                view = acc[y : y + h, x : x + w]
                if weight is None:
                    np.maximum(view, m, out=view)
                else:
                    wt = np.outer(_ramp(h, overlap), _ramp(w, overlap))
                    view += m * wt
                    weight[y : y + h, x : x + w] += wt
                s = float(res.scores[k])
                if s > best:
                    best, best_box = s, (y, x, h, w)
                    best_extra = res.extras[k] if res.extras else {}
            done += len(chunk)
            if progress is not None:
                progress("tiles", done, total)
        if weight is not None:
            acc /= np.maximum(weight, 1e-12)
        scores[len(maps)] = best
        maps.append(acc)
        y, x, h, w = best_box
        extras.append({"tiles": len(boxes), "worst_tile": {"bbox": [x, y, w, h], **best_extra}})
    return ScoreResult(scores=scores, maps=maps, extras=extras)


def calibrate_tiled(
    det: Detector,
    good_images: Sequence[Image],
    tile: int,
    overlap: int | None = None,
    *,
    false_alarm_rate: float = 0.01,
    max_false_regions: float = DEFAULT_MAX_FALSE_REGIONS,
    blend: str = "max",
) -> Detector:
    """Set ``det``'s image and pixel thresholds from good images scored tile by tile
    (images not fitted on), as :meth:`Detector.fit` does for whole images; returns
    ``det``. The region size floor stays the detector's."""
    from defectkit.decide.calibration import (
        pixel_threshold_for_false_regions,
        rounded_scores,
        threshold_for_false_alarm_rate,
    )

    if det.rescorer is not None:
        raise ConfigError("calibrate_tiled: a detector with a re-scorer cannot be re-calibrated")
    res = score_tiled(det, good_images, tile, overlap, blend=blend)
    threshold = threshold_for_false_alarm_rate(res.scores, false_alarm_rate)
    det.pixel_threshold = pixel_threshold_for_false_regions(
        res.maps, max_false_regions, min_area=det.min_region_area, cap=threshold.value
    )
    det.threshold = threshold
    det.info["calibration_scores"] = rounded_scores(res.scores)
    return det

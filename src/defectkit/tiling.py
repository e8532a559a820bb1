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

A detector knows its own tiling (:attr:`Detector.tiling
<defectkit.detector.Detector.tiling>`, stored in the model file): every entry
point that scores it (inspect, evaluate, report, calibrate, serve, Ray, ONNX)
goes through :meth:`Detector.score <defectkit.detector.Detector.score>`, which
scores tile by tile, so they all give the same scores.

>>> params = tile_params("patchcore", {})                                   # doctest: +SKIP
>>> det = Detector.fit(split_tiles(good_images, 512), "patchcore", params,  # doctest: +SKIP
...                    calibration_fraction=0.0)
>>> det.tiling = Tiling(512)                                                # doctest: +SKIP
>>> det.calibrate(held_out_good_images)          # scored tile by tile      # doctest: +SKIP
>>> result = det.score([big_image])                                        # doctest: +SKIP
>>> det.decide(result.scores), result.maps[0].shape                        # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from defectkit.errors import ConfigError
from defectkit.methods.base import Image, Progress, ScoreResult, check_images

BLENDS = ("max", "mean")


class Scorer(Protocol):
    """Anything that scores images: a :class:`~defectkit.detector.Detector` or a method."""

    def score(self, images: Sequence[Image], progress: Progress | None = None) -> ScoreResult: ...


ScoreFn = Callable[[Sequence[Image]], ScoreResult]


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


@dataclass(frozen=True)
class Tiling:
    """How a model cuts images into tiles: ``tile`` px squares overlapping by
    ``overlap`` px (default ``tile // 8``), overlaps stitched by ``blend``.
    Checked when made, so a bad setting fails before any long work."""

    tile: int
    overlap: int | None = None
    blend: str = "max"

    def __post_init__(self) -> None:
        if self.blend not in BLENDS:
            raise ConfigError(f"tile blend must be one of {BLENDS}, got {self.blend!r}")
        object.__setattr__(self, "overlap", check_tiling(self.tile, self.overlap))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tiling:
        try:
            return cls(int(d["tile"]), int(d["overlap"]), str(d.get("blend", "max")))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"tiling {d!r} is invalid ({e})") from None

    def score(
        self, score: ScoreFn, images: Sequence[Image], progress: Progress | None = None
    ) -> ScoreResult:
        """``images`` scored tile by tile by ``score`` (see :func:`score_tiled`)."""
        return score_tiled(
            score, images, self.tile, self.overlap, blend=self.blend, progress=progress
        )

    def split(self, images: Sequence[Image]) -> list[Image]:
        """The tiles of ``images`` (to fit on)."""
        return split_tiles(images, self.tile, self.overlap)


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


def tile_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` for a model fitted on tiles: the method's ``tile_settings`` (for
    PatchCore and PaDiM ``photometric="none"`` and ``context_size=0``) where
    ``params`` does not choose them (see above)."""
    from defectkit.methods import get_method

    extra = {k: v for k, v in get_method(method).tile_settings.items() if k not in params}
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
    scorer: Scorer | ScoreFn,
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
    evidence for that tile (its coordinates are the tile's own). ``scorer`` is an
    object with a ``score`` method or the scoring function itself.
    """
    score = scorer if callable(scorer) and not hasattr(scorer, "score") else scorer.score
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
            res = score(crops)
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

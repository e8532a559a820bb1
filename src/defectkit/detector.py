"""A detector is what a model file holds: a fitted method, its decision
thresholds (image and pixel) and where it came from. It turns scores into OK/NG
decisions and anomaly maps into defect regions.

Optionally, in the same file: a defect-type classifier (a bundle: each NG part
also gets its type, see :mod:`defectkit.classify`) and a re-scorer learned from a
few labelled defective images (semi-supervised, see
:mod:`defectkit.decide.rescore`). Files without them load as before; a file
holding a classifier alone is read with :func:`load_model`."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from defectkit import __version__
from defectkit.classify.classifier import DefectClassifier, is_classifier_file
from defectkit.data.files import (
    DEFAULT_IMAGE_MEMORY,
    ImageFiles,
    image_shapes,
    seeded_split,
    take,
)
from defectkit.decide.calibration import (
    PixelThreshold,
    Threshold,
    calibration_warning,
    pixel_threshold_for_false_regions,
    rounded_scores,
    threshold_for_false_alarm_rate,
)
from defectkit.decide.defaults import DEFAULT_MAX_FALSE_REGIONS, DEFAULT_MIN_AREA, FEW_SHOT_BELOW
from defectkit.decide.few_shot import (
    MIRROR_BANK_FROM,
    MIRROR_KINDS,
    counted_by_images,
    left_out_scores,
    memory_mirrors,
)
from defectkit.decide.map_store import SavedMaps
from defectkit.decide.regions import Region, locate_regions
from defectkit.decide.rescore import EVIDENCE, DefectRescorer
from defectkit.decide.severity import SeverityRules
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods import AnomalyModel, ScoreResult, get_method
from defectkit.methods.base import Image, Progress, check_images
from defectkit.methods.parts.mask_head import check_masks, check_settings
from defectkit.model_file import ModelFile, read_model, write_model
from defectkit.tiling import Tiling

MODEL_SUFFIX = ".dkm"


#: calibration images scored at a time when their maps are kept on disk
_MAP_CHUNK = 64


def _calibration_maps(
    score: Any,
    images: Sequence[Image],
    budget: int,
    stack: ExitStack,
    progress: Progress | None,
) -> tuple[np.ndarray, Sequence[np.ndarray]]:
    """Scores and maps of the calibration images: the maps in memory while they fit
    in ``budget`` bytes, else written to a temporary folder (removed when ``stack``
    closes) chunk by chunk as they are scored."""
    shapes = image_shapes(images)
    if sum(h * w * 4 for h, w in shapes) <= budget:
        res = score(images, progress=progress)
        return res.scores, res.maps
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="defectkit-maps-"))
    maps = SavedMaps(folder)
    scores = []
    n = len(images)
    for start in range(0, n, _MAP_CHUNK):
        idx = range(start, min(n, start + _MAP_CHUNK))
        res = score(take(images, idx), progress=_offset(progress, start, n))
        scores.append(np.asarray(res.scores))
        for m in res.maps:
            maps.append(m)
    return np.concatenate(scores), maps


def _offset(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """``progress`` for one chunk of ``total`` items starting at ``offset``."""
    if progress is None:
        return None
    return lambda stage, done, _: progress(stage, offset + done, total)


def _as_sequence(images: Sequence[Image]) -> Sequence[Image]:
    """A list of the images, or the :class:`ImageFiles` itself (not decoded here)."""
    return images if isinstance(images, ImageFiles) else list(images)


def _check_mask_head(
    model: AnomalyModel,
    defect_images: Sequence[Image] | None,
    masks: Sequence[np.ndarray],
    settings: dict[str, Any],
) -> None:
    """Refuse defect masks (or settings) that cannot teach ``model`` a mask head,
    before fitting."""
    if not model.learns_masks:
        from defectkit.methods import available_methods

        which = ", ".join(n for n, c in available_methods().items() if c.learns_masks)
        raise ConfigError(
            f"defect masks teach a mask head to methods with patch features ({which}), "
            f"not {model.name}"
        )
    check_masks(image_shapes(defect_images or []), masks)
    check_settings(settings)


def split_for_calibration(
    n: int, fraction: float, seed: int, min_fit: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, calibration): a seeded random hold-out of good images."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"calibration fraction must be in [0, 1), got {fraction}")
    n_cal = round(n * fraction)
    if n - n_cal < min_fit:
        n_cal = max(0, n - min_fit)
    return seeded_split(n, n_cal, seed)


class Detector:
    """A fitted anomaly model plus its thresholds and its input geometry.

    ``tiling`` (a :class:`~defectkit.tiling.Tiling`, or None for whole images) is
    part of the model: :meth:`score` cuts images into those tiles, so every entry
    point that scores through it scores a tiled model the same way.

    >>> det = Detector.fit(good_images, method="patchcore")   # doctest: +SKIP
    >>> det.save("part.dkm"); det = Detector.load("part.dkm")  # doctest: +SKIP
    >>> det.inspect(new_images)                                # doctest: +SKIP
    """

    def __init__(
        self,
        model: AnomalyModel,
        threshold: Threshold | None = None,
        info: dict[str, Any] | None = None,
        pixel_threshold: PixelThreshold | None = None,
        *,
        classifier: DefectClassifier | None = None,
        rescorer: DefectRescorer | None = None,
        tiling: Tiling | None = None,
    ) -> None:
        self.model = model
        self.threshold = threshold
        self.pixel_threshold = pixel_threshold
        self.info = dict(info or {})
        #: defect-type classifier of a bundle (types of NG parts), or None
        self.classifier = classifier
        #: semi-supervised re-scorer (image scores from labelled defects), or None
        self.rescorer = rescorer
        #: tiles the model scores images in (fitted on such tiles), or None
        self.tiling = tiling

    @classmethod
    def fit(
        cls,
        images: Sequence[Image],
        method: str = "patchcore",
        params: dict[str, Any] | None = None,
        *,
        false_alarm_rate: float = 0.01,
        calibration_fraction: float = 0.1,
        calibration_images: Sequence[Image] | None = None,
        seed: int = 0,
        progress: Progress | None = None,
        paths: Sequence[str | os.PathLike[str]] | None = None,
        calibration_paths: Sequence[str | os.PathLike[str]] | None = None,
        max_false_regions: float = DEFAULT_MAX_FALSE_REGIONS,
        min_region_area: int = DEFAULT_MIN_AREA,
        defect_images: Sequence[Image] | None = None,
        defect_paths: Sequence[str | os.PathLike[str]] | None = None,
        rescore_params: dict[str, Any] | None = None,
        map_memory: int = DEFAULT_IMAGE_MEMORY,
        defect_masks: Sequence[np.ndarray] | None = None,
        mask_head_params: dict[str, Any] | None = None,
        few_shot_below: int = FEW_SHOT_BELOW,
    ) -> Detector:
        """Fit ``method`` on good images and calibrate its thresholds on good images
        held out from fitting (or on ``calibration_images`` when given).

        The image threshold is set for ``false_alarm_rate``; the pixel threshold
        for at most ``max_false_regions`` regions (of ``min_region_area`` pixels or
        more) per good image, capped at the image threshold. ``paths`` (one per
        image) are recorded so that evidence can name the training image of a
        memory-bank patch.

        ``defect_images`` (a few labelled defective images, optional) make it
        semi-supervised: a :class:`~defectkit.decide.rescore.DefectRescorer`
        (settings ``rescore_params``) learns from them and the held-out good
        images, and is kept only if its cross-validated AUROC on them beats the
        anomaly score's; the image threshold is then calibrated on the held-out
        good images' out-of-fold re-scored values. Without them the detector is
        exactly the unsupervised one.

        ``defect_masks`` (one bool H x W mask per defect image, optional) also teach
        the method where defects are: a mask head joins its maps (settings
        ``mask_head_params``; methods with a ``fit_mask_head``, i.e. PatchCore). The
        head learns from the fit images and the defects only, and both thresholds
        are calibrated after it, on the held-out good images.

        The calibration images' maps (H x W x 4 bytes each) are held in memory up
        to ``map_memory`` bytes; above it they are scored in chunks and kept in a
        temporary folder until the pixel threshold is set (same threshold).

        Few-shot mode: with fewer than ``few_shot_below`` good images, no separate
        calibration images and no defect images, a method tagged ``leave_one_out``
        fits on every image and both thresholds come from their leave-one-out
        scores and copies (:mod:`defectkit.decide.few_shot`); ``info["few_shot"]``
        says so. ``calibration_fraction`` 0 still means no calibration.
        """
        model_cls = get_method(method)
        params = dict(params or {})
        model_cls.check_params(params)
        model = model_cls(**params)
        if paths is not None and len(paths) != len(images):
            raise ConfigError(f"{len(paths)} paths for {len(images)} images; give one per image")
        few_shot = (
            model.leave_one_out
            and calibration_images is None
            and calibration_fraction > 0
            and defect_images is None
            and defect_masks is None
            and len(images) < few_shot_below
        )
        if few_shot:
            fit_set, cal_set = _as_sequence(images), []
            fit_paths = None if paths is None else list(paths)
            cal_paths = None
        elif calibration_images is None:
            fit_idx, cal_idx = split_for_calibration(len(images), calibration_fraction, seed)
            fit_set, cal_set = take(images, fit_idx), take(images, cal_idx)
            fit_paths = None if paths is None else [paths[i] for i in fit_idx]
            cal_paths = None if paths is None else [paths[i] for i in cal_idx]
        else:
            fit_set, cal_set = _as_sequence(images), _as_sequence(calibration_images)
            fit_paths = None if paths is None else list(paths)
            cal_paths = None if calibration_paths is None else list(calibration_paths)
        if not fit_set:
            raise ConfigError("no good images to fit on")
        if defect_masks is not None:
            _check_mask_head(model, defect_images, defect_masks, mask_head_params or {})
        t0 = time.perf_counter()
        model.fit(fit_set, progress=progress)
        fit_s = time.perf_counter() - t0
        mask_info: dict[str, Any] | None = None
        if defect_masks is not None:
            assert defect_images is not None
            t1 = time.perf_counter()
            model.fit_mask_head(  # type: ignore[attr-defined]
                defect_images, defect_masks, fit_set, progress=progress, **(mask_head_params or {})
            )
            mask_info = {
                "n_defect_images": len(defect_images),
                "n_defect_pixels": int(sum(np.count_nonzero(m) for m in defect_masks)),
                "params": dict(mask_head_params or {}),
                "fit_seconds": round(time.perf_counter() - t1, 3),
            }
        det = cls(model)
        semi: dict[str, Any] | None = None
        if defect_images is not None and len(defect_images) and not cal_set:
            raise ConfigError(
                "semi-supervised fitting (defect images) needs held-out good images: "
                "a calibration fraction > 0 or calibration images"
            )
        if few_shot:
            mirrors = det._mirror_memory(fit_set, progress)
            det._calibrate_left_out(
                fit_set, false_alarm_rate, max_false_regions, min_region_area, map_memory, progress
            )
            if mirrors is not None:
                det.info["few_shot"]["memory_mirrors"] = mirrors
        if cal_set:
            cal_scores = det._calibrate(
                cal_set, false_alarm_rate, max_false_regions, min_region_area, map_memory, progress
            )
            if defect_images is not None and len(defect_images):
                rescore_params = {"seed": seed, **(rescore_params or {})}
                DefectRescorer.check_params(rescore_params)
                candidate = DefectRescorer(**rescore_params)
                defect_scores = model.score(defect_images, progress=progress).scores
                found = candidate.fit(
                    fit_set, cal_set, cal_scores, defect_images, defect_scores, progress
                )
                semi = found.to_dict()
                if defect_paths is not None:
                    semi["defect_images"] = [os.path.abspath(p) for p in defect_paths]
                if found.used:
                    candidate.unsupervised_threshold_ = det.threshold
                    det.threshold = threshold_for_false_alarm_rate(found.good_oof, false_alarm_rate)
                    det.rescorer = candidate
                    det.info["calibration_scores"] = rounded_scores(found.good_oof)
        info: dict[str, Any] = {
            "n_fit_images": len(fit_set),
            "n_calibration_images": len(cal_set),
            "fit_seconds": round(fit_s, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
        }
        if fit_paths is not None:
            # in fit order: a memory-bank method's train index points into this list
            info["fit_images"] = [
                {"path": os.path.abspath(p), "width": int(w), "height": int(h)}
                for p, (h, w) in zip(fit_paths, image_shapes(fit_set), strict=True)
            ]
        if cal_paths is not None:
            info["calibration_images"] = [os.path.abspath(p) for p in cal_paths]
        if semi is not None:
            info["semi_supervised"] = semi
        if mask_info is not None:
            info["mask_head"] = mask_info
        det.info = {**info, **det.info}
        return det

    def calibrate(
        self,
        good_images: Sequence[Image],
        *,
        false_alarm_rate: float = 0.01,
        max_false_regions: float = DEFAULT_MAX_FALSE_REGIONS,
        min_region_area: int | None = None,
        map_memory: int = DEFAULT_IMAGE_MEMORY,
        progress: Progress | None = None,
    ) -> Detector:
        """Set the image threshold for ``false_alarm_rate`` and the pixel threshold
        for at most ``max_false_regions`` regions (of ``min_region_area`` px or
        more, default the detector's) per good image, from ``good_images`` (not
        fitted on) scored as :meth:`score` scores (tile by tile for a tiled model);
        returns ``self``. :meth:`fit` calibrates the same way; a few-shot fit's
        ``info["few_shot"]`` goes, its thresholds replaced."""
        if self.rescorer is not None:
            raise ConfigError(
                "a detector with a re-scorer is calibrated with its labelled defects: "
                "refit it, or use `defectkit calibrate` with labelled images"
            )
        self._calibrate(
            check_images(good_images),
            false_alarm_rate,
            max_false_regions,
            self.min_region_area if min_region_area is None else min_region_area,
            map_memory,
            progress,
        )
        # a few-shot fit's leave-one-out calibration no longer sets the thresholds
        self.info.pop("few_shot", None)
        return self

    def _calibrate(
        self,
        images: Sequence[Image],
        false_alarm_rate: float,
        max_false_regions: float,
        min_region_area: int,
        map_memory: int,
        progress: Progress | None,
    ) -> np.ndarray:
        """The thresholds from good ``images``; returns their scores. The scores are
        kept in :attr:`info` (a later calibrate or an audit can compare other rules
        on them), in image order."""
        with ExitStack() as stack:
            scores, maps = _calibration_maps(self.score, images, map_memory, stack, progress)
            self._set_thresholds(scores, maps, false_alarm_rate, max_false_regions, min_region_area)
            del maps
        self.info["calibration_scores"] = rounded_scores(scores)
        return scores

    def _set_thresholds(
        self,
        scores: np.ndarray,
        maps: Sequence[np.ndarray],
        false_alarm_rate: float,
        max_false_regions: float,
        min_region_area: int,
    ) -> Threshold:
        """Both thresholds from good images' scores and maps: the image threshold for
        ``false_alarm_rate``, the pixel threshold capped at it."""
        threshold = threshold_for_false_alarm_rate(scores, false_alarm_rate)
        self.pixel_threshold = pixel_threshold_for_false_regions(
            maps, max_false_regions, min_area=min_region_area, cap=threshold.value
        )
        self.threshold = threshold
        return threshold

    def _mirror_memory(self, images: Sequence[Image], progress: Progress | None) -> str | None:
        """With ``mirror_bank="auto"`` and at least ``MIRROR_BANK_FROM`` images: the
        mirrored copies that the part allows (those the few-shot calibration keeps)
        join the memory bank, a refit; the setting chosen, or None where there is
        no choice to make. Few images cover little of a part's variation, and a
        mirrored part is often still a good one: at 8 good images mean image AUROC
        0.806 against 0.796 (casting +0.035, magnetic-tile +0.014), at 16 0.844
        against 0.839 (benchmarks/fewshot.py, three draws)."""
        params = self.model.get_params()
        if params.get("mirror_bank") != "auto" or len(images) < MIRROR_BANK_FROM:
            return None
        found = left_out_scores(self.model, images, progress, keep_maps=False, only=MIRROR_KINDS)
        chosen = memory_mirrors(found.kept)
        self.model.set_params(mirror_bank=chosen)
        if chosen != "none":
            self.model.fit(images, progress=progress)
        return chosen

    def _calibrate_left_out(
        self,
        images: Sequence[Image],
        false_alarm_rate: float,
        max_false_regions: float,
        min_region_area: int,
        map_memory: int,
        progress: Progress | None,
    ) -> None:
        """Few-shot thresholds from the fitted ``images`` themselves, each scored as
        if left out, and their kept copies (:mod:`defectkit.decide.few_shot`); their
        maps on disk above ``map_memory`` bytes."""
        with ExitStack() as stack:
            found = left_out_scores(
                self.model, images, progress, map_memory=map_memory, stack=stack
            )
            threshold = self._set_thresholds(
                found.scores, found.maps, false_alarm_rate, max_false_regions, min_region_area
            )
        counted_by_images(threshold, found)
        self.info["calibration_scores"] = rounded_scores(found.plain)
        self.info["few_shot"] = found.summary()

    # -- use --------------------------------------------------------------------
    def score(self, images: Sequence[Image], progress: Progress | None = None) -> ScoreResult:
        """The method's scores and maps, tile by tile for a tiled model (each image's
        score then the worst tile's, its map stitched at its own resolution); with a
        re-scorer, the re-scored image scores (each image's ``extras`` then keeps the
        method's own as ``anomaly_score``)."""
        if self.tiling is not None:
            return self.tiling.score(self._score_whole, images, progress)
        return self._score_whole(images, progress)

    def _score_whole(
        self, images: Sequence[Image], progress: Progress | None = None
    ) -> ScoreResult:
        if self.rescorer is None:
            return self.model.score(images, progress=progress)
        images = check_images(images)
        res = self.model.score(images, progress=progress)
        scores = self.rescorer.rescore(res.scores, images)
        extras = res.extras or [{} for _ in images]
        extras = [
            {**e, "anomaly_score": round(float(a), 6)}
            for e, a in zip(extras, res.scores, strict=True)
        ]
        return ScoreResult(scores=scores.astype(np.float32), maps=res.maps, extras=extras)

    def set_precision(self, precision: str) -> Detector:
        """Score with the method's backbone in ``precision`` ("float32" or
        "bfloat16"; see :meth:`~defectkit.backbones.FeatureExtractor.set_precision`).

        Only for the methods whose scoring is a frozen backbone plus arithmetic on
        its features (tag ``low_precision``), where bfloat16 was measured;
        thresholds stay as calibrated. A classifier in the file stays float32.
        """
        from defectkit.backbones import FeatureExtractor, check_precision

        check_precision(precision)
        if precision == "float32":  # the default everywhere: only undo an earlier choice
            fx = getattr(self.model, "_extractor", None)
            if isinstance(fx, FeatureExtractor):
                fx.set_precision(precision)
            return self
        if not self.model.low_precision:
            from defectkit.methods import available_methods

            which = ", ".join(n for n, c in available_methods().items() if c.low_precision)
            raise ConfigError(
                f"precision {precision} is for the backbone methods ({which}), "
                f"not {self.model.name}"
            )
        fx = self.model.extractor
        if not isinstance(fx, FeatureExtractor):
            raise ConfigError(
                f"precision {precision} is for the PyTorch runtime; this model's backbone "
                f"runs in {type(fx).__name__}"
            )
        fx.set_precision(precision)
        return self

    def classify(self, images: Sequence[Image]) -> np.ndarray | None:
        """Defect-type probabilities (n, types), columns in ``classifier.classes_``
        order; None without a classifier."""
        if self.classifier is None:
            return None
        return self.classifier.predict_proba(images)

    def decide(self, scores: np.ndarray) -> np.ndarray | None:
        """True where a score means NG; None when no threshold is set."""
        if self.threshold is None:
            return None
        return np.asarray(scores) >= self.threshold.value

    # -- regions and evidence -----------------------------------------------------
    @property
    def map_threshold(self) -> float | None:
        """The image threshold on the anomaly maps' scale: the image threshold, or
        with a re-scorer (whose scores are no longer map maxima) the unsupervised
        one, kept from fitting."""
        thr = self.threshold if self.rescorer is None else self.rescorer.unsupervised_threshold_
        return None if thr is None else thr.value

    @property
    def region_threshold(self) -> float | None:
        """Where maps are cut into regions: the pixel threshold, never above the
        image threshold (on the maps' scale, :attr:`map_threshold`); the image
        threshold for models without a pixel one."""
        pixel = None if self.pixel_threshold is None else self.pixel_threshold.value
        values = [v for v in (pixel, self.map_threshold) if v is not None]
        return min(values) if values else None

    @property
    def min_region_area(self) -> int:
        return self.pixel_threshold.min_area_px if self.pixel_threshold else DEFAULT_MIN_AREA

    def regions(
        self,
        amap: np.ndarray,
        is_defect: bool | None = None,
        *,
        mm_per_pixel: float | None = None,
        rules: SeverityRules | None = None,
    ) -> list[Region]:
        """Defect regions of one map, worst first. An OK image (``is_defect`` False)
        has none: regions explain an NG decision."""
        return self.locate_regions(amap, is_defect, mm_per_pixel=mm_per_pixel, rules=rules)[0]

    def locate_regions(
        self,
        amap: np.ndarray,
        is_defect: bool | None = None,
        *,
        mm_per_pixel: float | None = None,
        rules: SeverityRules | None = None,
    ) -> tuple[list[Region], np.ndarray]:
        """Like :meth:`regions`, plus the label image (``i + 1`` marks region ``i``)."""
        thr = self.region_threshold
        if is_defect is False or thr is None:
            return [], np.zeros(np.shape(amap), np.int32)
        return locate_regions(
            amap, thr, min_area=self.min_region_area, mm_per_pixel=mm_per_pixel, rules=rules
        )

    def closest_good(self, extra: dict[str, Any] | None) -> dict[str, Any] | None:
        """The training image and box of the memory-bank patch nearest to the worst
        patch, from a method's ``nearest_good`` evidence; None when unknown.

        The box is the patch's grid cell scaled to that image's pixels (cell *
        image size / grid size). The grid of the training image is taken from the
        evidence when the method gives it, else it is the scored image's grid, which
        holds when every image is resized to one network size (``keep_aspect`` not
        true: squashed, or the model's one working aspect).
        """
        if not extra or "nearest_good" not in extra:
            return None
        ng = extra["nearest_good"] or {}
        fit_images = self.info.get("fit_images") or []
        i = ng.get("train_index")
        if not isinstance(i, int) or not 0 <= i < len(fit_images):
            return None
        src = fit_images[i]
        grid = ng.get("grid")
        if grid is None and getattr(self.model, "keep_aspect", False) is not True:
            grid = extra.get("grid")
        row, col = ng.get("grid_row"), ng.get("grid_col")
        bbox = None
        if grid is not None and grid[0] > 0 and grid[1] > 0 and row is not None and col is not None:
            bbox = grid_cell_box(row, col, grid, src["height"], src["width"])
        return {"path": src["path"], "bbox": bbox}

    # -- files ------------------------------------------------------------------
    def _file_thresholds(self) -> tuple[Threshold | None, dict[str, Any] | None]:
        """(``threshold`` of the file, re-scored threshold for the re-scorer's JSON).

        With a re-scorer the file's ``threshold`` stays the unsupervised one, so a
        defectkit that does not know re-scorers still reads a coherent model (the
        unsupervised one); the re-scored threshold lives with the re-scorer."""
        if self.rescorer is None:
            return self.threshold, None
        own = None if self.threshold is None else self.threshold.to_dict()
        return self.rescorer.unsupervised_threshold_, own

    def save(self, path: str | Path) -> Path:
        """Write the model file (atomically): :meth:`to_model_file`."""
        return write_model(path, self.to_model_file())

    def to_model_file(self) -> ModelFile:
        """The model file's contents: the method's arrays under ``method.``, a
        bundled classifier's under ``classifier.`` and a re-scorer's under
        ``rescorer.``, each part's JSON under its own key."""
        arrays, state = self.model.learned_state()
        file_threshold, rescored = self._file_thresholds()
        info: dict[str, Any] = {
            "method": self.model.name,
            "params": self.model.get_params(),
            "state": state,
            "threshold": None if file_threshold is None else file_threshold.to_dict(),
            "pixel_threshold": (
                None if self.pixel_threshold is None else self.pixel_threshold.to_dict()
            ),
            "tiling": None if self.tiling is None else self.tiling.to_dict(),
            "provenance": self.info,
        }
        stored = {f"method.{k}": v for k, v in arrays.items()}
        if self.classifier is not None:
            part, carrays = self.classifier.to_file_parts()
            info["classifier"] = part
            stored.update(carrays)
        if self.rescorer is not None:
            rarrays, rstate = self.rescorer.learned_state()
            info["rescorer"] = {
                "params": self.rescorer.get_params(),
                "state": rstate,
                "threshold": rescored,
            }
            stored.update({f"{_RESCORER}{k}": v for k, v in rarrays.items()})
        return ModelFile(info=info, arrays=stored)

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        """Read a detector model file (with its classifier and re-scorer, if any)."""
        return cls.from_model_file(read_model(path), path)

    @classmethod
    def from_model_file(cls, mf: ModelFile, path: str | Path) -> Detector:
        info = mf.info
        if is_classifier_file(info):
            raise ModelFileError(
                f"{path}: holds a defect-type classifier alone, not an anomaly detector "
                "(it gives types, not OK/NG: inspect and evaluate take it; calibrate and "
                "report need an anomaly model)"
            )
        try:
            model_cls = get_method(str(info["method"]))
            params = dict(info.get("params") or {})
            model_cls.check_params(params)
            model = model_cls(**params)
            arrays = {
                k.removeprefix("method."): v
                for k, v in mf.arrays.items()
                if not k.startswith((_CLASSIFIER, _RESCORER))
            }
            model.load_learned_state(arrays, dict(info.get("state") or {}))
            thr = info.get("threshold")
            threshold = None if thr is None else Threshold.from_dict(thr)
            pthr = info.get("pixel_threshold")
            pixel_threshold = None if pthr is None else PixelThreshold.from_dict(pthr)
            classifier = None
            if info.get("classifier") is not None:
                classifier = DefectClassifier.from_file_parts(info["classifier"], mf.arrays)
            rescorer = None
            if info.get("rescorer") is not None:
                rescorer = _load_rescorer(info["rescorer"], mf.arrays)
                if threshold is None:
                    raise ModelFileError("a re-scorer needs the unsupervised threshold")
                rescorer.unsupervised_threshold_ = threshold
                rthr = info["rescorer"].get("threshold")
                threshold = None if rthr is None else Threshold.from_dict(rthr)
        except ModelFileError as e:
            raise ModelFileError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ModelFileError(f"{path}: model description is invalid ({e})") from None
        info_prov = dict(info.get("provenance") or {})
        info_prov["defectkit_version"] = info.get("defectkit_version")
        # files written before the tiling was part of the model kept it in provenance
        tiling = info.get("tiling") or info_prov.pop("tiling", None)
        try:
            tiles = None if tiling is None else Tiling.from_dict(tiling)
        except ConfigError as e:
            raise ModelFileError(f"{path}: {e}") from None
        return cls(
            model,
            threshold,
            info_prov,
            pixel_threshold,
            classifier=classifier,
            rescorer=rescorer,
            tiling=tiles,
        )

    def save_decision(self, path: str | Path, out: str | Path | None = None, **note: Any) -> Path:
        """Write this detector's thresholds into the model file at ``path`` (or a
        copy at ``out``) without refitting: the file's arrays and everything else
        it describes stay as they are; ``note`` is appended to its calibration
        history. Atomic, like every model write."""
        mf = read_model(path)
        try:
            info = self.decision_info(mf.info, **note)
        except ModelFileError as e:
            raise ModelFileError(f"{path}: {e}") from None
        return write_model(path if out is None else out, ModelFile(info=info, arrays=mf.arrays))

    def decision_info(self, info: dict[str, Any], **note: Any) -> dict[str, Any]:
        """A model file's description (``info``) with this detector's thresholds
        and ``note`` appended to its calibration history (see :meth:`save_decision`)."""
        info = dict(info)
        if info.get("method") != self.model.name:
            raise ModelFileError(f"holds method {info.get('method')!r}, not {self.model.name!r}")
        file_threshold, rescored = self._file_thresholds()
        info["threshold"] = None if file_threshold is None else file_threshold.to_dict()
        if self.rescorer is not None:
            info["rescorer"] = {**dict(info.get("rescorer") or {}), "threshold": rescored}
        info["pixel_threshold"] = (
            None if self.pixel_threshold is None else self.pixel_threshold.to_dict()
        )
        prov = dict(info.get("provenance") or {})
        if file_threshold is None or not file_threshold.left_out:
            # a few-shot fit's leave-one-out calibration no longer sets the thresholds
            prov.pop("few_shot", None)
            self.info.pop("few_shot", None)
        history = list(prov.get("calibrations") or [])
        history.append({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **note})
        prov["calibrations"] = history
        info["provenance"] = prov
        self.info["calibrations"] = history
        return info

    def describe(self, full: bool = False) -> dict[str, Any]:
        """What the model holds; long path lists are summarised unless ``full``."""
        info = dict(self.info)
        if not full:
            for key in ("fit_images", "calibration_images", "calibration_scores"):
                if key in info:
                    what = "scores" if key.endswith("scores") else "paths"
                    info[key] = _listed(len(info[key]), what)
            few = info.get("few_shot")
            if few is not None and "copy_scores" in few:
                n = sum(len(v) for v in few["copy_scores"].values())
                info["few_shot"] = {**few, "copy_scores": _listed(n, "scores")}
        out = {
            "method": self.model.name,
            "params": self.model.get_params(),
            "threshold": None if self.threshold is None else self.threshold.to_dict(),
            "pixel_threshold": (
                None if self.pixel_threshold is None else self.pixel_threshold.to_dict()
            ),
            "tiling": None if self.tiling is None else self.tiling.to_dict(),
            **info,
            "calibration": _calibration_summary(self.threshold),
            "defectkit_version_running": __version__,
        }
        if self.classifier is not None:
            out["classifier"] = self.classifier.describe()
        if self.rescorer is not None:
            out["rescorer"] = {
                "params": self.rescorer.get_params(),
                "evidence_weights": dict(
                    zip(EVIDENCE, (round(float(c), 6) for c in self.rescorer.coef_), strict=True)
                ),
                "unsupervised_threshold": self.rescorer.unsupervised_threshold_.to_dict(),
            }
        return out


_CLASSIFIER = "classifier."

_RESCORER = "rescorer."


def _listed(n: int, what: str) -> str:
    """What ``describe`` shows for a long list it leaves to ``info --full``."""
    return f"{n} {what} (`defectkit info --full` lists them)"


def _calibration_summary(thr: Threshold | None) -> dict[str, Any] | None:
    """How far the image threshold can be trusted, in one place for ``info`` and the
    service's ``/model``: the held-out images that set it, how, and the 95% bound."""
    if thr is None:
        return None
    return {
        "n_good": thr.n_good,
        "n_defect": thr.n_defect,
        "rule": thr.rule,
        "target": thr.target,
        "estimator": thr.estimator,
        "false_alarm_upper_95": thr.false_alarm_upper,
        "n_to_certify": thr.n_to_certify,
        "warning": calibration_warning(thr),
    }


def _load_rescorer(part: dict[str, Any], arrays: dict[str, np.ndarray]) -> DefectRescorer:
    params = dict(part.get("params") or {})
    DefectRescorer.check_params(params)
    rescorer = DefectRescorer(**params)
    state = dict(part.get("state") or {})
    own = {k.removeprefix(_RESCORER): v for k, v in arrays.items() if k.startswith(_RESCORER)}
    rescorer.load_learned_state(own, state)
    return rescorer


def grid_cell_box(row: int, col: int, grid: Sequence[int], height: int, width: int) -> list[int]:
    """The box (x, y, w, h) in an image of ``height`` x ``width`` pixels of cell
    (``row``, ``col``) of a feature grid of ``grid`` = (rows, cols) cells over it."""
    sy, sx = height / grid[0], width / grid[1]
    x0, y0 = round(col * sx), round(row * sy)
    x1, y1 = round((col + 1) * sx), round((row + 1) * sy)
    return [x0, y0, max(1, x1 - x0), max(1, y1 - y0)]


def load_model(path: str | Path) -> Detector | DefectClassifier:
    """Read any defectkit model file: a :class:`Detector` (an anomaly model, maybe
    bundled with a classifier), or a :class:`DefectClassifier` stored alone."""
    mf = read_model(path)
    if is_classifier_file(mf.info):
        return DefectClassifier.from_model_file(mf, path)
    from defectkit.products import is_product_file

    if is_product_file(mf.info):
        raise ModelFileError(
            f"{path}: a unified model of several products; load it with "
            "defectkit.pipeline.load (or ProductSet.load)"
        )
    return Detector.from_model_file(mf, path)

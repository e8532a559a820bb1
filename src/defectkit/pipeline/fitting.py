"""``fit`` as a library call: good images in (tiled or not), a detector out with
its thresholds, optional re-scorer, mask head, defect-type classifier and
provenance. Raises :class:`~defectkit.errors.DefectkitError` for anything it
cannot use and returns the files it skipped; it never prints."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectkit.classify.classifier import DefectClassifier
from defectkit.detector import Detector, split_for_calibration
from defectkit.errors import ConfigError, DatasetError, DefectkitError
from defectkit.methods.base import Image, Progress
from defectkit.pipeline.settings import FitData, FitSettings, check_classifier_params
from defectkit.tiling import Tiling, tile_for_defect, tile_params

#: a file that could not be used, and why
Skipped = tuple[Path, str]


@dataclass
class FitResult:
    """What :func:`fit` made: the detector, the files it skipped, and what it
    chose by itself (``notes``, e.g. tiles from ``min_defect_px``)."""

    detector: Detector
    errors: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def fit(settings: FitSettings, data: FitData, progress: Progress | None = None) -> FitResult:
    """Fit ``settings.method`` on the good images of ``data`` and calibrate it.

    Every file and setting is checked before any long work: the calibration images
    must be held out, the defect images need their masks, and so on.
    """
    from defectkit.data.batches import load_all
    from defectkit.data.datasets import fit_images

    cal = settings.calibration
    paths = fit_images(data.data)
    cal_paths = _calibration_paths(data.calibration_dir, paths)
    if data.manifest is not None and settings.classifier is None:
        raise ConfigError("--manifest is for --method classifier or --classify-types")
    type_items = None if settings.classifier is None else classifier_items(data.data, data.manifest)
    defect_paths = _defect_paths(data.defects, paths, cal.calibration_fraction, cal_paths)
    mask_paths = _mask_paths(data.defect_masks, defect_paths)
    if settings.mask_head and mask_paths is None:
        raise ConfigError("--mask-head-param needs --defect-masks")
    notes: list[str] = []
    tiling = settings.tiling
    if settings.min_defect_px is not None:
        auto = tile_for_defect(
            str(settings.method),
            dict(settings.params),
            settings.min_defect_px,
            _longest_side(paths),
        )
        if auto is not None:
            tiling = Tiling(auto)
            notes.append(
                f"tiles of {auto} px: a {settings.min_defect_px} px defect then spans a "
                "feature cell (--min-defect-px)"
            )
    if tiling is not None:
        if defect_paths is not None or type_items is not None:
            raise ConfigError("--tile: not with --defects, --defect-masks or --classify-types")
        if cal_paths is None and cal.calibration_fraction == 0:
            raise ConfigError("--tile needs held-out good images: --calibration-fraction > 0")
    t0 = time.perf_counter()
    # tiles are cut from decoded images: a tiled fit holds them whatever the budget
    budget = settings.image_memory if tiling is None else None
    images, ok_paths, errors = _load(paths, budget)
    if not images:
        raise DatasetError(
            f"none of the {len(paths)} images under {data.data} could be read{_why(errors)}"
        )
    cal_images = cal_ok = None
    if cal_paths is not None:
        cal_images, cal_ok, cal_errors = _load(cal_paths, budget)
        errors += cal_errors
        if not cal_images:
            raise DatasetError(
                f"none of the {len(cal_paths)} images under {data.calibration_dir} could be "
                f"read{_why(cal_errors)}"
            )
    defect_images = defect_ok = masks = None
    if defect_paths is not None:
        defect_images, defect_ok, defect_errors = load_all(defect_paths)
        errors += defect_errors
        if mask_paths is not None:
            masks = _load_defect_masks(defect_images, defect_ok, mask_paths)
    if tiling is not None:
        det = _fit_tiled(images, settings, tiling, cal_images, progress)
    else:
        det = Detector.fit(
            images,
            str(settings.method),
            dict(settings.params),
            false_alarm_rate=cal.false_alarm_rate,
            calibration_fraction=cal.calibration_fraction,
            calibration_images=cal_images,
            seed=settings.seed,
            progress=progress,
            paths=ok_paths,
            calibration_paths=cal_ok,
            max_false_regions=cal.max_false_regions,
            min_region_area=cal.min_region_area,
            defect_images=defect_images,
            defect_paths=defect_ok,
            map_memory=settings.image_memory,
            defect_masks=masks,
            mask_head_params=dict(settings.mask_head),
            few_shot_below=cal.few_shot_below,
        )
        few = det.info.get("few_shot")
        if few is not None:
            kept = ", ".join(few["copies_kept"]) or "none"
            notes.append(
                f"few-shot mode: {few['n_images']} good images (fewer than "
                f"{cal.few_shot_below}): all fitted, the thresholds from their leave-one-out "
                f"scores and {few['n_copies']} copies (kinds kept: {kept})"
            )
    if type_items is not None:
        from defectkit.classify.workflow import fit_classifier

        assert settings.classifier is not None
        clf, clf_info, clf_errors = fit_classifier(type_items, dict(settings.classifier), progress)
        det.classifier = clf
        det.info["classifier_data"] = {
            "data": str(data.manifest or data.data),
            "split": split_note(data.manifest),
            **{k: v for k, v in clf_info.items() if k != "train_images"},
        }
        errors += clf_errors
    det.info["data"] = str(data.data)
    for key, where in (
        ("calibration_data", data.calibration_dir),
        ("defects_data", data.defects),
        ("defect_masks_data", data.defect_masks),
    ):
        if where is not None:
            det.info[key] = str(where)
    det.info["n_skipped_files"] = len(errors)
    return FitResult(det, errors, notes, time.perf_counter() - t0)


def _fit_tiled(
    images: list[Image],
    settings: FitSettings,
    tiling: Tiling,
    cal_images: Sequence[Image] | None,
    progress: Progress | None,
) -> Detector:
    """Fit on tiles of the good images; calibrate on whole held-out images scored
    tile by tile (the detector's own scoring), since a tiled image's score is the
    worst of its tiles'."""
    cal = settings.calibration
    if cal_images is None:
        fit_idx, cal_idx = split_for_calibration(
            len(images), cal.calibration_fraction, settings.seed
        )
        fit_set = [images[i] for i in fit_idx]
        cal_images = [images[i] for i in cal_idx]
    else:
        fit_set = images
    if not cal_images:
        raise ConfigError("--tile: no good images left to calibrate on; add more good images")
    tiles = tiling.split(fit_set)
    det = Detector.fit(
        tiles,
        str(settings.method),
        tile_params(str(settings.method), dict(settings.params)),
        calibration_fraction=0.0,
        seed=settings.seed,
        progress=progress,
        min_region_area=cal.min_region_area,
    )
    det.tiling = tiling
    det.calibrate(
        cal_images,
        false_alarm_rate=cal.false_alarm_rate,
        max_false_regions=cal.max_false_regions,
        progress=progress,
    )
    det.info.update(
        {
            "n_fit_images": len(fit_set),
            "n_fit_tiles": len(tiles),
            "n_calibration_images": len(cal_images),
        }
    )
    return det


def fit_type_classifier(
    data: Path, manifest: Path | None, params: dict[str, Any], progress: Progress | None = None
) -> tuple[DefectClassifier, dict[str, Any], list[Skipped]]:
    """``fit --method classifier``: a defect-type classifier from labelled images
    (class folders, a manifest CSV or an MVTec layout's test/<type> folders), its
    provenance, and the files skipped."""
    from defectkit.classify.workflow import fit_classifier
    from defectkit.data.datasets import is_mvtec

    if manifest is None and not data.exists():
        raise DatasetError(f"dataset folder not found: {data}")
    check_classifier_params(params)
    items = classifier_items(data, manifest)
    clf, provenance, errors = fit_classifier(items, params, progress)
    provenance.update(data=str(data), manifest=None if manifest is None else str(manifest))
    provenance["split"] = (
        split_note(manifest)
        if manifest or is_mvtec(data)
        else "class folders: all images train (a stratified share validates)"
    )
    provenance["n_skipped_files"] = len(errors)
    return clf, provenance, errors


def split_note(manifest: Path | None) -> str:
    from defectkit.data.labelled import MVTEC_TYPE_SPLIT

    if manifest is not None:
        return "the manifest's split column (train; val for early stopping)"
    return MVTEC_TYPE_SPLIT


def classifier_items(data: Path, manifest: Path | None) -> list[Any]:
    """Labelled items for a classifier; refuses a set it cannot train on, early."""
    from defectkit.classify.workflow import training_split
    from defectkit.data.labelled import read_labelled

    items = read_labelled(data, manifest)
    training_split(items)
    return items


def _why(errors: list[Skipped], shown: int = 3) -> str:
    """The first files' problems, for an error that no image could be read."""
    if not errors:
        return ""
    more = f"; and {len(errors) - shown} more" if len(errors) > shown else ""
    return ": " + "; ".join(f"{p}: {problem}" for p, problem in errors[:shown]) + more


def _load(paths: list[Path], budget: int | None) -> tuple[Any, list[Path], list[Skipped]]:
    from defectkit.data.files import load_within

    images, ok, errors = load_within(paths, budget)
    return images, ok, list(errors)


def _calibration_paths(calibration_dir: Path | None, fit_paths: list[Path]) -> list[Path] | None:
    """Images of --calibration-dir, none of them fitted on."""
    from defectkit.data.datasets import list_images

    if calibration_dir is None:
        return None
    if not calibration_dir.is_dir():
        raise ConfigError(f"--calibration-dir {calibration_dir} is not a folder")
    found, _ = list_images([calibration_dir])
    if not found:
        raise ConfigError(f"no images found under --calibration-dir {calibration_dir}")
    overlap = _same_files(found, fit_paths)
    if overlap:
        raise ConfigError(
            f"{len(overlap)} calibration image(s) are also fitted on (e.g. "
            f"{sorted(overlap)[0]}); calibration images must be held out"
        )
    return found


def _same_files(a: Sequence[Path], b: Sequence[Path]) -> set[str]:
    return {os.path.realpath(p) for p in a} & {os.path.realpath(p) for p in b}


def _defect_paths(
    defects: Path | None,
    fit_paths: list[Path],
    calibration_fraction: float,
    cal_paths: list[Path] | None,
) -> list[Path] | None:
    """Images of --defects, checked before any long work."""
    from defectkit.data.datasets import list_images
    from defectkit.decide.rescore import MIN_DEFECT

    if defects is None:
        return None
    if not defects.is_dir():
        raise ConfigError(f"--defects {defects} is not a folder")
    if cal_paths is None and calibration_fraction <= 0:
        raise ConfigError(
            "--defects needs held-out good images to learn against: a --calibration-fraction "
            "> 0 or --calibration-dir"
        )
    found, _ = list_images([defects])
    if len(found) < MIN_DEFECT:
        raise ConfigError(f"--defects {defects}: {len(found)} image(s); need at least {MIN_DEFECT}")
    overlap = _same_files(found, fit_paths)
    if overlap:
        raise ConfigError(
            f"{len(overlap)} defective image(s) are also among the good images to fit on "
            f"(e.g. {sorted(overlap)[0]})"
        )
    return found


def _mask_paths(masks: Path | None, defect_paths: list[Path] | None) -> dict[Path, Path] | None:
    """The mask file of each --defects image (``<stem>_mask.<ext>`` under ``masks``; where
    two match, the one whose folder is named like the image's), checked before any
    long work: an image without its mask is an error, not a silent skip."""
    from defectkit.data.datasets import list_images

    if masks is None:
        return None
    if defect_paths is None:
        raise ConfigError("--defect-masks needs --defects (the images the masks belong to)")
    if not masks.is_dir():
        raise ConfigError(f"--defect-masks {masks} is not a folder")
    found, _ = list_images([masks])
    by_stem: dict[str, list[Path]] = {}
    for m in found:
        if m.stem.endswith("_mask"):
            by_stem.setdefault(m.stem[: -len("_mask")], []).append(m)
    out: dict[Path, Path] = {}
    for p in defect_paths:
        candidates = by_stem.get(p.stem, [])
        if len(candidates) > 1:
            candidates = [m for m in candidates if m.parent.name == p.parent.name]
        if len(candidates) != 1:
            problem = "no" if not candidates else f"{len(candidates)} ambiguous"
            raise ConfigError(
                f"--defect-masks {masks}: {problem} mask file {p.stem}_mask.* for defect image {p}"
            )
        out[p] = candidates[0]
    return out


def _load_defect_masks(
    images: list[np.ndarray], paths: list[Path], mask_paths: dict[Path, Path]
) -> list[np.ndarray]:
    """The masks of the defect images that loaded; a bad mask file stops the fit."""
    from defectkit.data.images import load_mask

    try:
        return [load_mask(mask_paths[p], im.shape) for im, p in zip(images, paths, strict=True)]
    except DefectkitError as e:
        raise ConfigError(f"--defect-masks: {e}") from None


def _longest_side(paths: Sequence[Path]) -> int:
    """The longest side among the images, from their headers (no decoding); 0 when
    no header can be read (the files' own errors come when they are loaded)."""
    from defectkit.data.files import header_shape

    return max((max(s) for s in map(header_shape, paths) if s is not None), default=0)

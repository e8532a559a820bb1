"""The ``defectkit`` command line. stdout carries results (tables or JSON lines);
progress bars and messages go to stderr.

Exit codes: 0 success; 1 some input files failed (the rest were processed);
2 bad usage, settings, dataset or model file.
"""

from __future__ import annotations

import inspect as pyinspect
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from defectkit import __version__
from defectkit.atomic import write_text
from defectkit.data.files import DEFAULT_IMAGE_MEMORY
from defectkit.decide.defaults import DEFAULT_MAX_FALSE_REGIONS, DEFAULT_MIN_AREA
from defectkit.errors import ConfigError, DefectkitError
from defectkit.scale.local_pool import (
    MAX_AUTO_JOBS,
    MIN_IMAGES_FOR_WORKERS,
    WorkerPool,
    auto_jobs,
    single_threaded,
)

# Spinning OpenMP threads collapse throughput (to ~2 images/s) when another
# process shares the cores, as on a line PC; passive waiting costs ~15% when idle.
# Set before torch is first imported (all heavy imports below are lazy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="defectkit: learn from good parts, inspect new ones, evaluate.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)

#: what `defectkit demo` generates (generate_demo keyword arguments)
DEMO_SETTINGS: dict[str, Any] = {}

EXIT_FILES_FAILED = 1
EXIT_USAGE = 2


def _fail(message: str) -> typer.Exit:
    # one line, never wrapped: an error naming a long path must stay greppable
    err.print(f"[bold red]error:[/] {_shown(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_USAGE)


def _check_method_params(model_cls: Any, params: dict[str, Any]) -> None:
    """Setting values, not only names, checked before any image is read: the
    method's own ``_validate`` where it has one, and the backbone's name."""
    from defectkit.errors import ConfigError

    try:
        model = model_cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {model_cls.name!r}: bad setting ({e})") from None
    validate = getattr(model, "_validate", None)
    if callable(validate):
        validate()
    backbone = params.get("backbone")
    if isinstance(backbone, str):
        from defectkit.backbones import stage_ends

        stage_ends(backbone)  # ConfigError naming the known backbones


def _write_error(path: Path, e: OSError) -> str:
    """Message for a model file that could not be written (writes are atomic)."""
    return (
        f"{path}: cannot write the model file ({e.strerror or e}); "
        "a model file already there is left unchanged"
    )


def _shown(text: object) -> str:
    """Text (often a file name) safe to print with Rich: markup such as ``[/]`` in a
    name escaped, and bytes of a name that are not UTF-8 (surrogates) shown as
    backslash escapes instead of failing with UnicodeEncodeError."""
    s = str(text)
    try:
        s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return escape(s)


@contextmanager
def _progress(enabled: bool = True) -> Iterator[Any]:
    """A Rich progress bar on stderr; yields a (stage, done, total) callback."""
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def _parse_params(items: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise _fail(f"--param expects NAME=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


@app.command()
def fit(
    data: Annotated[
        Path, typer.Argument(help="MVTec layout (fits on train/good) or a folder of good images")
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="model file to write (.dkm)")],
    method: Annotated[
        str | None, typer.Option(help="method name (see `defectkit methods`)")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="pretrained backbone, e.g. efficientnet-lite0")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="method setting NAME=VALUE")
    ] = None,
    false_alarm_rate: Annotated[
        float, typer.Option(help="target false-alarm rate of the threshold")
    ] = 0.01,
    calibration_fraction: Annotated[
        float, typer.Option(help="share of good images held out to calibrate")
    ] = 0.1,
    calibration_dir: Annotated[
        Path | None,
        typer.Option(
            help="separate folder of good images to calibrate on (then all of DATA is fitted "
            "and --calibration-fraction is not used)"
        ),
    ] = None,
    max_false_regions: Annotated[
        float,
        typer.Option(help="pixel threshold: allowed defect regions per good image"),
    ] = DEFAULT_MAX_FALSE_REGIONS,
    min_region_area: Annotated[
        int, typer.Option(help="regions smaller than this many pixels are dropped as specks")
    ] = DEFAULT_MIN_AREA,
    seed: Annotated[int, typer.Option(help="random seed", min=0)] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="CSV image,class,split (paths relative to the CSV; looked up in DATA too): "
            "the labelled images for --method classifier or --classify-types"
        ),
    ] = None,
    classify_types: Annotated[
        bool,
        typer.Option(
            "--classify-types",
            help="also fit a defect-type classifier, stored in the same model file, on the "
            "'train' half of DATA's test/<type> images (or --manifest): NG parts get a type",
        ),
    ] = False,
    classifier_param: Annotated[
        list[str] | None,
        typer.Option("--classifier-param", help="classifier setting NAME=VALUE (--classify-types)"),
    ] = None,
    defects: Annotated[
        Path | None,
        typer.Option(
            help="folder of a few labelled defective images: semi-supervised re-scoring, "
            "kept only if it beats the anomaly score on them (cross-validated)"
        ),
    ] = None,
    defect_masks: Annotated[
        Path | None,
        typer.Option(
            help="folder of the --defects images' masks (<stem>_mask.png, searched "
            "recursively, as in MVTec's ground_truth): a mask head learns where defects "
            "are and joins the maps (patchcore)"
        ),
    ] = None,
    mask_head_param: Annotated[
        list[str] | None,
        typer.Option(
            "--mask-head-param",
            help="mask head setting NAME=VALUE (--defect-masks): weight, hidden, steps, max_goods",
        ),
    ] = None,
    tile: Annotated[
        int | None,
        typer.Option(
            help="fit on tiles of this many px and calibrate on whole held-out images scored "
            "tile by tile (large images; inspect then tiles by itself)"
        ),
    ] = None,
    tile_overlap: Annotated[
        int | None, typer.Option(help="px shared by neighbouring tiles (default tile/8)")
    ] = None,
    tile_blend: Annotated[str, typer.Option(help="stitching of overlaps: max or mean")] = "max",
    min_defect_px: Annotated[
        int | None,
        typer.Option(
            help="the smallest defect that matters, in image px: images whose defects of "
            "that size would fall below one feature cell are fitted and inspected in tiles "
            "(32 x this size for patchcore's 256 px input); without it no tiling unless --tile",
            min=1,
        ),
    ] = None,
    image_memory: Annotated[
        float,
        typer.Option(
            help="GiB of decoded good images to hold while fitting (and, apart, of the "
            "calibration images' maps); above it each image is read from its file whenever "
            "it is needed and the maps wait in a temporary folder (slower, memory bounded)"
        ),
    ] = DEFAULT_IMAGE_MEMORY / 2**30,
) -> None:
    """Learn what good parts look like and write a model file.

    With --method classifier: learn defect types from labelled images instead
    (DATA/<class>/*, --manifest CSV, or an MVTec layout's test/<type> folders).
    """
    from defectkit.classify.classifier import CLASSIFIER_METHOD
    from defectkit.data.batches import load_all
    from defectkit.data.datasets import fit_images, list_images
    from defectkit.data.files import load_within
    from defectkit.detector import Detector
    from defectkit.methods import DEFAULT_METHOD, get_method
    from defectkit.methods.parts.mask_head import check_settings

    manifest = _resolve_manifest(manifest, data)
    if method == CLASSIFIER_METHOD:
        extra = [
            name
            for name, given in (
                ("--classify-types", classify_types),
                ("--classifier-param", bool(classifier_param)),
                ("--defects", defects is not None),
                ("--defect-masks", defect_masks is not None),
                ("--mask-head-param", bool(mask_head_param)),
                ("--calibration-dir", calibration_dir is not None),
                ("--tile", tile is not None),
            )
            if given
        ]
        if extra:
            raise _fail(f"{', '.join(extra)}: for anomaly methods, not --method classifier")
        params = _parse_params(param)
        if backbone is not None:
            params["backbone"] = backbone
        params.setdefault("seed", seed)
        _fit_classifier(data, manifest, out_path, params, quiet)
        return
    try:
        method = method or DEFAULT_METHOD
        model_cls = get_method(method)
        params = _parse_params(param)
        if backbone is not None:
            params["backbone"] = backbone
        if "seed" in pyinspect.signature(model_cls).parameters:
            params.setdefault("seed", seed)
        model_cls.check_params(params)
        _check_method_params(model_cls, params)
        if calibration_dir is None and not 0 <= calibration_fraction < 1:
            raise _fail(f"--calibration-fraction must be in [0, 1), got {calibration_fraction}")
        if out_path.is_dir():
            raise _fail(f"--out {out_path} is a folder; give the model file to write (.dkm)")
        paths = fit_images(data)
        if not 0 < false_alarm_rate < 1:
            raise _fail(f"--false-alarm-rate must be in (0, 1), got {false_alarm_rate}")
        if not (max_false_regions >= 0 and math.isfinite(max_false_regions)):
            raise _fail(f"--max-false-regions must be >= 0, got {max_false_regions}")
        if min_region_area < 1:
            raise _fail(f"--min-region-area must be >= 1 pixel, got {min_region_area}")
        cal_paths: list[Path] | None = None
        if calibration_dir is not None:
            if not calibration_dir.is_dir():
                raise _fail(f"--calibration-dir {calibration_dir} is not a folder")
            cal_paths, _ = list_images([calibration_dir])
            if not cal_paths:
                raise _fail(f"no images found under --calibration-dir {calibration_dir}")
            overlap = {os.path.realpath(p) for p in cal_paths} & {
                os.path.realpath(p) for p in paths
            }
            if overlap:
                raise _fail(
                    f"{len(overlap)} calibration image(s) are also fitted on (e.g. "
                    f"{sorted(overlap)[0]}); calibration images must be held out"
                )
        type_items = None
        classifier_params = _parse_params(classifier_param)
        if classifier_param and not classify_types:
            raise _fail("--classifier-param needs --classify-types")
        if manifest is not None and not classify_types:
            raise _fail("--manifest is for --method classifier or --classify-types")
        if classify_types:
            type_items = _classifier_items(data, manifest)
            classifier_params.setdefault("seed", seed)
            _check_classifier_params(classifier_params)
        defect_paths = _defect_paths(defects, paths, calibration_fraction, calibration_dir)
        mask_paths = _mask_paths(defect_masks, defect_paths)
        mask_head_params = _parse_params(mask_head_param)
        if mask_head_param and mask_paths is None:
            raise _fail("--mask-head-param needs --defect-masks")
        check_settings(mask_head_params)
        if min_defect_px is not None and tile is not None:
            raise _fail("--min-defect-px sets the tile size itself: give it or --tile, not both")
        tiling = _tiling_options(tile, tile_overlap, tile_blend)
        if min_defect_px is not None:
            from defectkit.tiling import tile_for_defect

            auto_tile = tile_for_defect(method, params, min_defect_px, _longest_side(paths))
            if auto_tile is not None:
                err.print(
                    f"tiles of {auto_tile} px: a {min_defect_px} px defect then spans a "
                    "feature cell (--min-defect-px)",
                    highlight=False,
                )
                tiling = _tiling_options(auto_tile, tile_overlap, tile_blend)
        if tiling is not None:
            if defects is not None or classify_types:
                raise _fail("--tile: not with --defects, --defect-masks or --classify-types")
            if calibration_dir is None and calibration_fraction == 0:
                raise _fail("--tile needs held-out good images: --calibration-fraction > 0")
        if not (image_memory >= 0 and math.isfinite(image_memory)):
            raise _fail(f"--image-memory must be >= 0 GiB, got {image_memory}")
    except DefectkitError as e:
        raise _fail(str(e)) from None
    t0 = time.perf_counter()
    budget = int(image_memory * 2**30)
    # tiles are cut from decoded images: a tiled fit holds them whatever the budget
    image_budget = budget if tiling is None else None
    images, ok_paths, errors = load_within(paths, image_budget)
    cal_images: Sequence[np.ndarray] | None = None
    cal_ok: list[Path] | None = None
    if cal_paths is not None:
        cal_images, cal_ok, cal_errors = load_within(cal_paths, image_budget)
        errors = errors + cal_errors
        if not cal_images:
            raise _fail(
                f"none of the {len(cal_paths)} images under {calibration_dir} could be read"
            )
    defect_images: list[np.ndarray] | None = None
    defect_ok: list[Path] | None = None
    masks: list[np.ndarray] | None = None
    if defect_paths is not None:
        defect_images, defect_ok, defect_errors = load_all(defect_paths)
        errors = errors + defect_errors
        if mask_paths is not None:
            masks = _load_defect_masks(defect_images, defect_ok, mask_paths)
    for p, problem in errors:
        err.print(f"[yellow]skipped[/] {_shown(p)}: {_shown(problem)}", highlight=False)
    if not images:
        raise _fail(f"none of the {len(paths)} images under {data} could be read")
    try:
        with _progress(not quiet) as progress:
            if tiling is not None:
                det = _fit_tiled(
                    images,
                    method,
                    params,
                    tiling,
                    cal_images,
                    calibration_fraction,
                    seed,
                    progress,
                    false_alarm_rate=false_alarm_rate,
                    max_false_regions=max_false_regions,
                    min_region_area=min_region_area,
                )
            else:
                det = Detector.fit(
                    images,
                    method,
                    params,
                    false_alarm_rate=false_alarm_rate,
                    calibration_fraction=calibration_fraction,
                    calibration_images=cal_images,
                    seed=seed,
                    progress=progress,
                    paths=ok_paths,
                    calibration_paths=cal_ok,
                    max_false_regions=max_false_regions,
                    min_region_area=min_region_area,
                    defect_images=defect_images,
                    defect_paths=defect_ok,
                    map_memory=budget,
                    defect_masks=masks,
                    mask_head_params=mask_head_params,
                )
            if type_items is not None:
                from defectkit.classify.workflow import fit_classifier

                clf, clf_info, clf_errors = fit_classifier(type_items, classifier_params, progress)
                det.classifier = clf
                det.info["classifier_data"] = {
                    "data": str(manifest or data),
                    "split": _split_note(manifest),
                    **{k: v for k, v in clf_info.items() if k != "train_images"},
                }
                for p, problem in clf_errors:
                    err.print(f"[yellow]skipped[/] {_shown(p)}: {_shown(problem)}", highlight=False)
                errors = errors + clf_errors
        det.info["data"] = str(data)
        if calibration_dir is not None:
            det.info["calibration_data"] = str(calibration_dir)
        if defects is not None:
            det.info["defects_data"] = str(defects)
        if defect_masks is not None:
            det.info["defect_masks_data"] = str(defect_masks)
        det.info["n_skipped_files"] = len(errors)
        try:
            det.save(out_path)
        except OSError as e:  # disk full, read-only folder, ...: no traceback
            raise _fail(_write_error(out_path, e)) from None
    except DefectkitError as e:
        raise _fail(str(e)) from None
    thr = det.threshold
    err.print(
        f"fitted [bold]{method}[/] on {det.info['n_fit_images']} good images "
        f"({len(errors)} skipped) in {time.perf_counter() - t0:.1f} s -> {out_path}",
        highlight=False,
    )
    if thr is not None:
        err.print(
            f"threshold {thr.value:.4g} for a {thr.target:.1%} false-alarm rate "
            f"(calibrated on {thr.n_good} held-out good images; 95% upper bound on the "
            f"rate {thr.false_alarm_upper:.1%})",
            highlight=False,
        )
        _warn_calibration(thr)
    pthr = det.pixel_threshold
    if pthr is not None:
        err.print(
            f"pixel threshold {pthr.value:.4g} for <= {pthr.target:g} regions of >= "
            f"{pthr.min_area_px} px per good image (measured "
            f"{pthr.false_regions_per_image:.3g} on the calibration images"
            f"{'; capped at the image threshold' if pthr.capped else ''})",
            highlight=False,
        )
    semi = det.info.get("semi_supervised")
    if semi is not None:
        verdict = "used" if semi["used"] else "not used (no better than the anomaly score)"
        err.print(
            f"semi-supervised re-scoring {verdict}: cross-validated AUROC "
            f"{semi['labelled_cv_auroc']:.4f} vs {semi['labelled_anomaly_auroc']:.4f} for the "
            f"anomaly score, on {semi['n_good']} held-out good + {semi['n_defect']} labelled "
            "defective images",
            highlight=False,
        )
    head = det.info.get("mask_head")
    if head is not None:
        err.print(
            f"mask head learned from {head['n_defect_images']} defect masks "
            f"({head['n_defect_pixels']:,} defect pixels) in {head['fit_seconds']:.1f} s; "
            "it joins every map, and the thresholds above include it",
            highlight=False,
        )
    if det.classifier is not None:
        _print_classifier_summary(det.classifier)
    if errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _fit_tiled(
    images: list[np.ndarray],
    method: str,
    params: dict[str, Any],
    tiling: tuple[int, int, str],
    cal_images: list[np.ndarray] | None,
    calibration_fraction: float,
    seed: int,
    progress: Any,
    **calibration: Any,
) -> Any:
    """Fit on tiles of the good images; calibrate on whole held-out images scored
    tile by tile, since a tiled image's score is the worst of its tiles'."""
    from defectkit.detector import Detector, split_for_calibration
    from defectkit.tiling import calibrate_tiled, split_tiles, tile_params

    tile, overlap, blend = tiling
    if cal_images is None:
        fit_idx, cal_idx = split_for_calibration(len(images), calibration_fraction, seed)
        fit_set = [images[i] for i in fit_idx]
        cal_images = [images[i] for i in cal_idx]
    else:
        fit_set = images
    if not cal_images:
        raise ConfigError("--tile: no good images left to calibrate on; add more good images")
    tiles = split_tiles(fit_set, tile, overlap)
    det = Detector.fit(
        tiles,
        method,
        tile_params(method, params),
        calibration_fraction=0.0,
        seed=seed,
        progress=progress,
        min_region_area=calibration["min_region_area"],
    )
    calibrate_tiled(
        det,
        cal_images,
        tile,
        overlap,
        false_alarm_rate=calibration["false_alarm_rate"],
        max_false_regions=calibration["max_false_regions"],
        blend=blend,
    )
    det.info.update(
        {
            "tiling": {"tile": tile, "overlap": overlap, "blend": blend},
            "n_fit_images": len(fit_set),
            "n_fit_tiles": len(tiles),
            "n_calibration_images": len(cal_images),
        }
    )
    return det


# -- labelled images: classifier and semi-supervised helpers ---------------------------
def _resolve_manifest(manifest: Path | None, data: Path) -> Path | None:
    """``--manifest`` as given, or inside DATA when only there."""
    if manifest is None or manifest.exists() or manifest.is_absolute():
        return manifest
    inside = data / manifest
    return inside if inside.exists() else manifest


def _split_note(manifest: Path | None) -> str:
    from defectkit.data.labelled import MVTEC_TYPE_SPLIT

    if manifest is not None:
        return "the manifest's split column (train; val for early stopping)"
    return MVTEC_TYPE_SPLIT


def _classifier_items(data: Path, manifest: Path | None) -> list[Any]:
    """Labelled items for a classifier; refuses a set it cannot train on, early."""
    from defectkit.classify.workflow import training_split
    from defectkit.data.labelled import read_labelled

    items = read_labelled(data, manifest)
    training_split(items)
    return items


def _check_classifier_params(params: dict[str, Any]) -> None:
    from defectkit.classify.classifier import DefectClassifier

    DefectClassifier.check_params(params)
    DefectClassifier(**params)._validate()


def _defect_paths(
    defects: Path | None,
    fit_paths: list[Path],
    calibration_fraction: float,
    calibration_dir: Path | None,
) -> list[Path] | None:
    """Images of --defects, checked before any long work."""
    from defectkit.data.datasets import list_images
    from defectkit.decide.rescore import MIN_DEFECT

    if defects is None:
        return None
    if not defects.is_dir():
        raise _fail(f"--defects {defects} is not a folder")
    if calibration_dir is None and calibration_fraction <= 0:
        raise _fail(
            "--defects needs held-out good images to learn against: a --calibration-fraction "
            "> 0 or --calibration-dir"
        )
    found, _ = list_images([defects])
    if len(found) < MIN_DEFECT:
        raise _fail(f"--defects {defects}: {len(found)} image(s); need at least {MIN_DEFECT}")
    overlap = {os.path.realpath(p) for p in found} & {os.path.realpath(p) for p in fit_paths}
    if overlap:
        raise _fail(
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
        raise _fail("--defect-masks needs --defects (the images the masks belong to)")
    if not masks.is_dir():
        raise _fail(f"--defect-masks {masks} is not a folder")
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
            raise _fail(
                f"--defect-masks {masks}: {problem} mask file {p.stem}_mask.* for defect image "
                f"{_shown(p)}"
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
        raise _fail(f"--defect-masks: {e}") from None


def _print_classifier_summary(clf: Any) -> None:
    t = clf.training_
    acc = t.get("val_accuracy")
    err.print(
        f"defect-type classifier: {len(clf.classes_)} types ({', '.join(clf.classes_)}) from "
        f"{t['n_train']} training images (+{t['n_augmented']} augmented copies); validation "
        f"accuracy {'n/a' if acc is None else f'{acc:.1%}'} on {t['n_val']} images; "
        f"temperature {clf.temperature_:.3g}; {t['fit_seconds']:.1f} s",
        highlight=False,
    )


def _fit_classifier(
    data: Path, manifest: Path | None, out_path: Path, params: dict[str, Any], quiet: bool
) -> None:
    """``fit --method classifier``: labelled images in, a classifier model file out."""
    from defectkit.classify.workflow import fit_classifier

    t0 = time.perf_counter()
    try:
        if manifest is None and not data.exists():
            raise _fail(f"dataset folder not found: {data}")
        _check_classifier_params(params)
        items = _classifier_items(data, manifest)
        with _progress(not quiet) as progress:
            clf, provenance, errors = fit_classifier(items, params, progress)
        provenance.update(data=str(data), manifest=None if manifest is None else str(manifest))
        provenance["split"] = (
            _split_note(manifest)
            if manifest or _is_mvtec(data)
            else ("class folders: all images train (a stratified share validates)")
        )
        provenance["n_skipped_files"] = len(errors)
        try:
            clf.save(out_path, provenance)
        except OSError as e:
            raise _fail(_write_error(out_path, e)) from None
    except DefectkitError as e:
        raise _fail(str(e)) from None
    for p, problem in errors:
        err.print(f"[yellow]skipped[/] {_shown(p)}: {_shown(problem)}", highlight=False)
    err.print(
        f"fitted [bold]classifier[/] in {time.perf_counter() - t0:.1f} s -> {out_path}",
        highlight=False,
    )
    _print_classifier_summary(clf)
    if errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _is_mvtec(data: Path) -> bool:
    from defectkit.data.datasets import is_mvtec

    return is_mvtec(data)


def _load_detector(model: Path):
    from defectkit.detector import Detector

    try:
        return Detector.load(model)
    except DefectkitError as e:
        raise _fail(str(e)) from None


def _decision_options(mm_per_pixel: float | None, severity_rules: Path | None) -> Any:
    """Validate --mm-per-pixel and --severity-rules before any long work."""
    from defectkit.decide.severity import DEFAULT_RULES, load_severity_rules

    if mm_per_pixel is not None and not (mm_per_pixel > 0 and math.isfinite(mm_per_pixel)):
        raise _fail(f"--mm-per-pixel must be a number > 0, got {mm_per_pixel}")
    try:
        rules = DEFAULT_RULES if severity_rules is None else load_severity_rules(severity_rules)
    except DefectkitError as e:
        raise _fail(str(e)) from None
    if rules.needs_mm and mm_per_pixel is None:
        raise _fail(f"{severity_rules}: the severity rules use min_area_mm2; give --mm-per-pixel")
    return rules


MM_PER_PIXEL_HELP = "pixel size in mm, to give region areas in mm^2"
SEVERITY_RULES_HELP = "JSON or TOML file of severity rules (see decide/severity.py)"
RUNTIME_HELP = "auto (onnx for a bundle folder from `defectkit export`), torch or onnx"
PRECISION_HELP = (
    "backbone arithmetic when scoring: float32, or bfloat16 (torch runtime, patchcore/padim/"
    "kmeans, CPUs with AVX512-BF16 or AMX; 1.2x faster inspect on magnetic-tile, see "
    "BENCHMARKS.md)"
)
TILE_HELP = "score large images in tiles of this many px (model fitted on such tiles)"
JOBS_HELP = (
    "local processes, one torch thread each (0: one per CPU core, at most "
    f"{MAX_AUTO_JOBS}, from {MIN_IMAGES_FOR_WORKERS} images on; 1: this process alone, "
    "all cores)"
)


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="model file from `defectkit fit`")],
    inputs: Annotated[list[Path], typer.Argument(help="image files or folders (read recursively)")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or table")] = "jsonl",
    maps_out: Annotated[
        Path | None, typer.Option(help="write heatmap overlays with region outlines here")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="images scored together", min=1)] = 16,
    mm_per_pixel: Annotated[float | None, typer.Option(help=MM_PER_PIXEL_HELP)] = None,
    severity_rules: Annotated[Path | None, typer.Option(help=SEVERITY_RULES_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    engine: Annotated[str, typer.Option(help="local, or ray (a Ray cluster batch job)")] = "local",
    address: Annotated[
        str | None, typer.Option(help="ray: cluster address (default: start a local Ray)")
    ] = None,
    workers: Annotated[int, typer.Option(help="ray: actors, each loading the model once")] = 1,
    parquet: Annotated[
        Path | None, typer.Option(help="ray: also write the results to this Parquet file")
    ] = None,
    db: Annotated[
        str | None, typer.Option(help="ray: also store results in this database (as serve)")
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(help="ray, with --db: where stored images go (as serve)")
    ] = Path("defectkit-results"),
    runtime: Annotated[str, typer.Option(help=RUNTIME_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "float32",
    tile: Annotated[int | None, typer.Option(help=TILE_HELP)] = None,
    tile_overlap: Annotated[
        int | None, typer.Option(help="px shared by neighbouring tiles (default tile/8)")
    ] = None,
    tile_blend: Annotated[str, typer.Option(help="stitching of overlaps: max or mean")] = "max",
    jobs: Annotated[int, typer.Option(help=JOBS_HELP, min=0)] = 0,
) -> None:
    """Score images; one JSON object per image on stdout (exit 1 if any file failed).

    Each line: path, score, is_defect, threshold, error, width, height, regions
    (bbox [x, y, w, h], area_px, area_mm2, score, mean_score, severity; listed for
    NG images), severity (worst region; null when OK), pixel_threshold, and for
    memory-bank methods evidence and closest_good (training image path and bbox
    of the good patch nearest to the worst patch).

    A model with a defect-type classifier adds defect_type and type_probabilities
    ({type: probability}): for NG images in a bundle (null when OK), for every
    image with a classifier alone (then score is the top probability, and
    is_defect, threshold, regions and severity are null: a classifier names types,
    it does not decide OK/NG).
    """
    from defectkit.data.datasets import list_images

    if fmt not in ("jsonl", "table"):
        raise _fail(f"--format must be jsonl or table, got {fmt!r}")
    rules = _decision_options(mm_per_pixel, severity_rules)
    if engine not in ("local", "ray"):
        raise _fail(f"--engine must be local or ray, got {engine!r}")
    if engine == "local" and (parquet is not None or db is not None):
        raise _fail("--parquet and --db need --engine ray")
    if engine == "ray" and jobs > 1:
        raise _fail("--jobs is for --engine local; a Ray job takes --workers")
    tiling = _tiling_options(tile, tile_overlap, tile_blend)
    if engine == "ray" and (tiling is not None or runtime == "onnx" or model.is_dir()):
        raise _fail("--tile and ONNX bundles (--runtime onnx) need --engine local")
    if engine == "local":
        with ExitStack() as stack:
            # workers start now, so their start-up overlaps this process's own
            paths, problems = list_images(inputs, report_empty=True)
            pool = stack.enter_context(
                _worker_pool(model, runtime, precision, len(paths), jobs, batch_size)
            )
            det = _load_any_model(model, runtime, precision)
            if pool is not None and not hasattr(det, "set_precision"):
                stack.close()  # a classifier alone: this process, all its threads
                pool = None
            _inspect_local(
                det,
                model,
                inputs,
                paths,
                problems,
                fmt,
                maps_out,
                batch_size,
                mm_per_pixel,
                rules,
                quiet,
                tiling,
                pool,
            )
        return
    det = _load_any_model(model, runtime, precision)
    if getattr(det, "info", {}).get("tiling"):  # from fit --tile
        raise _fail(f"{model} was fitted on tiles; tiled inspection needs --engine local")
    _inspect_ray(
        det,
        model,
        inputs,
        fmt,
        maps_out,
        batch_size,
        mm_per_pixel,
        rules,
        quiet,
        address=address,
        workers=workers,
        parquet=parquet,
        db=db,
        data_dir=data_dir,
        precision=precision,
    )


@contextmanager
def _worker_pool(
    model: Path, runtime: str, precision: str, n_images: int, jobs: int, batch_size: int = 16
) -> Iterator[Any]:
    """Worker processes for scoring ``n_images`` (None when one process is better),
    with this process's torch and faiss on one thread meanwhile. Enter it before
    this process loads the model: the workers' start-up then overlaps its own."""
    n_batches = -(-n_images // batch_size)
    n_jobs = min(jobs or auto_jobs(n_images), max(1, n_batches))
    if n_jobs <= 1:
        yield None
        return
    load = partial(_worker_model, model, runtime, precision)
    with WorkerPool(n_jobs - 1, load) as pool, single_threaded():  # torch after the spawn
        yield pool


def _inspect_local(
    det: Any,
    model: Path,
    inputs: list[Path],
    paths: list[Path],
    problems: list[tuple[Path, str]],
    fmt: str,
    maps_out: Path | None,
    batch_size: int,
    mm_per_pixel: float | None,
    rules: Any,
    quiet: bool,
    tiling: Any,
    pool: Any,
) -> None:
    """``inspect`` on this machine: in this process, and in ``pool``'s worker
    processes when there is one."""
    from defectkit.classify.classifier import DefectClassifier
    from defectkit.data.batches import iter_batches
    from defectkit.decide.records import failed_record
    from defectkit.scale.local_pool import ordered_batches

    if isinstance(det, DefectClassifier):
        if maps_out is not None:
            raise _fail(f"{model} holds a classifier alone: no anomaly maps for --maps-out")
        _inspect_classifier(det, inputs, fmt, batch_size, quiet)
        return
    fitted_tiling = det.info.get("tiling")  # from fit --tile
    if tiling is None and fitted_tiling:
        t = fitted_tiling
        tiling = (int(t["tile"]), int(t["overlap"]), str(t["blend"]))
    types = det.classifier.classes_ if det.classifier is not None else None
    n_failed = 0
    rows: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        if fmt == "jsonl":
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
        else:
            rows.append(record)

    for p, problem in problems:
        n_failed += 1
        emit(failed_record(det, str(p), problem))
    if maps_out is not None:
        maps_out.mkdir(parents=True, exist_ok=True)
    work = partial(
        _inspect_batch,
        mm_per_pixel=mm_per_pixel,
        rules=rules,
        maps_out=maps_out,
        tiling=tiling,
    )
    starts = range(0, len(paths), batch_size)
    if pool is not None:
        batches = [(i + 1, paths[i : i + batch_size]) for i in starts]
        results = ordered_batches(batches, partial(work, det), pool, work)
    else:  # decoding the next batch in background threads while this one scores
        loaded = iter_batches(paths, batch_size)
        results = (work(det, (i + 1, items)) for i, items in zip(starts, loaded, strict=True))
    index = 0
    with _progress(not quiet and len(paths) > 1) as progress:
        try:
            for records in results:
                index += len(records)
                for record in records:
                    n_failed += record["error"] is not None
                    emit(record)
                if progress is not None:
                    progress("inspect", index, len(paths))
        except DefectkitError as e:  # e.g. model/backbone mismatch: nothing will work
            raise _fail(str(e)) from None
    if pool is not None and pool.failure:
        err.print(f"[yellow]{_shown(pool.failure)}; its images were inspected here[/]")
    if fmt == "table":
        columns = ["path", "score", "verdict", "severity", "regions", "error"]
        if types is not None:
            columns.insert(5, "type")
        table = Table(*columns)
        for r in rows:
            verdict = "" if r["is_defect"] is None else ("NG" if r["is_defect"] else "OK")
            cells = [
                _shown(r["path"]),
                "" if r["score"] is None else f"{r['score']:.4g}",
                verdict,
                r["severity"] or "",
                "" if r["regions"] is None else str(len(r["regions"])),
                _shown(r["error"] or ""),
            ]
            if types is not None:
                cells.insert(5, r.get("defect_type") or "")
            table.add_row(*cells)
        out.print(table)
    if n_failed:
        err.print(f"[yellow]{n_failed} file(s) could not be inspected[/]")
        raise typer.Exit(EXIT_FILES_FAILED)


def _inspect_batch(
    det: Any,
    batch: tuple[int, Sequence[Any]],
    *,
    mm_per_pixel: float | None,
    rules: Any,
    maps_out: Path | None,
    tiling: Any,
) -> list[dict[str, Any]]:
    """Records of one batch: ``(number of its first image, its paths or loaded
    items)``; paths are decoded here (in a worker process, for instance)."""
    from defectkit.data.batches import Loaded, load_item
    from defectkit.decide.records import inspect_loaded

    first, items = batch
    loaded = [it if isinstance(it, Loaded) else load_item(it) for it in items]
    return inspect_loaded(
        det,
        loaded,
        [str(it.path) for it in loaded],
        mm_per_pixel=mm_per_pixel,
        rules=rules,
        maps_out=maps_out,
        numbers=range(first, first + len(loaded)),
        score=lambda images: _score_images(det, images, tiling),
    )


def _worker_model(model: Path, runtime: str, precision: str) -> Any:
    """``_load_any_model`` in an inspect worker process, silent: this process has
    loaded the same model and reported any problem with it."""
    err.quiet = True
    return _load_any_model(model, runtime, precision)


def _inspect_ray(
    det: Any,
    model: Path,
    inputs: list[Path],
    fmt: str,
    maps_out: Path | None,
    batch_size: int,
    mm_per_pixel: float | None,
    rules: Any,
    quiet: bool,
    *,
    address: str | None,
    workers: int,
    parquet: Path | None,
    db: str | None,
    data_dir: Path,
    precision: str = "float32",
) -> None:
    """inspect --engine ray: the same lines as the local engine, scored by a pool
    of Ray actors (defectkit/scale/ray_engine.py); optionally Parquet and the
    results database too."""
    from defectkit.classify.classifier import DefectClassifier
    from defectkit.data.datasets import list_images
    from defectkit.decide.records import failed_record
    from defectkit.scale.ray_engine import ResultSinks, import_ray, inspect_paths, records_table

    if isinstance(det, DefectClassifier):
        raise _fail(f"{model} holds a classifier alone: --engine ray needs an anomaly detector")
    if fmt != "jsonl":
        raise _fail("--engine ray writes --format jsonl only")
    if workers < 1 or batch_size < 1:
        raise _fail("--workers and --batch-size must be >= 1")
    try:
        import_ray()
    except DefectkitError as e:
        raise _fail(str(e)) from None
    paths, problems = list_images(inputs, report_empty=True)
    if maps_out is not None:
        maps_out.mkdir(parents=True, exist_ok=True)
    n_failed = 0
    # inputs that do not exist come first (index -1), as in the local engine
    missing = [failed_record(det, str(p), problem) for p, problem in problems]
    first = [records_table([-1] * len(missing), missing)] if missing else []
    batches = inspect_paths(
        model,
        paths,
        workers=workers,
        address=address,
        batch_size=batch_size,
        mm_per_pixel=mm_per_pixel,
        rules=rules,
        maps_out=maps_out,
        progress_bars=not quiet,
        precision=precision,
    )
    with ResultSinks(parquet, db, data_dir) as sinks:
        for table in itertools.chain(first, batches):
            for line in table.column("record").to_pylist():
                sys.stdout.write(line + "\n")
            sys.stdout.flush()
            n_failed += table.num_rows - table.column("error").null_count
            sinks.write(table)
    if db is not None and not quiet:
        err.print(f"{sinks.n_stored} result(s) stored in {_shown(db)}", highlight=False)
    if n_failed:
        err.print(f"[yellow]{n_failed} file(s) could not be inspected[/]")
        raise typer.Exit(EXIT_FILES_FAILED)


def _load_any_model(model: Path, runtime: str = "torch", precision: str = "float32") -> Any:
    """A Detector, or a DefectClassifier stored alone; from an ONNX bundle folder
    with ``runtime`` onnx (or auto), its backbone then runs in onnxruntime. The
    detector's backbone runs in ``precision``."""
    from defectkit.backbones import check_precision

    if runtime not in ("auto", "torch", "onnx"):
        raise _fail(f"--runtime must be auto, torch or onnx, got {runtime!r}")
    try:
        check_precision(precision)  # before the model loads
    except DefectkitError as e:
        raise _fail(f"--{e}") from None
    det = _load_model_for(model, runtime)
    if precision != "float32" and not hasattr(det, "set_precision"):
        raise _fail(f"{model} holds a classifier alone: --precision is for anomaly detectors")
    try:
        return det.set_precision(precision) if hasattr(det, "set_precision") else det
    except DefectkitError as e:
        raise _fail(f"--precision {precision}: {e}") from None


def _load_model_for(model: Path, runtime: str) -> Any:
    """The model file or bundle at ``model`` for ``runtime`` (a usage error if unusable)."""
    from defectkit.detector import load_model
    from defectkit.export.onnx_bundle import read_bundle

    try:
        if runtime == "onnx" or (runtime == "auto" and model.is_dir()):
            from defectkit.export.runtime import load_onnx_detector

            if not model.is_dir():
                raise _fail(
                    f"{model}: --runtime onnx needs a bundle folder; make one with "
                    f"`defectkit export {model} --format onnx --out DIR`"
                )
            return load_onnx_detector(model)
        if model.is_dir():  # a bundle run with PyTorch: its detector file, verified
            return load_model(read_bundle(model).detector_path)
        return load_model(model)
    except DefectkitError as e:
        raise _fail(str(e)) from None


def _warn_calibration(thr: Any) -> None:
    """Warn on stderr when a threshold's held-out images cannot certify its target."""
    from defectkit.decide.calibration import calibration_warning

    warning = calibration_warning(thr)
    if warning is not None:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)


def _longest_side(paths: Sequence[Path]) -> int:
    """The longest side among the images, from their headers (no decoding); 0 when
    no header can be read (the files' own errors come when they are loaded)."""
    from defectkit.data.files import header_shape

    return max((max(s) for s in map(header_shape, paths) if s is not None), default=0)


def _tiling_options(tile: int | None, overlap: int | None, blend: str) -> Any:
    """(tile, overlap, blend) checked before any long work; None without --tile."""
    from defectkit.tiling import BLENDS, check_tiling

    if tile is None:
        if overlap is not None:
            raise _fail("--tile-overlap needs --tile")
        return None
    if blend not in BLENDS:
        raise _fail(f"--tile-blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    try:
        return tile, check_tiling(tile, overlap), blend
    except DefectkitError as e:
        raise _fail(str(e)) from None


def _score_images(det: Any, images: list[Any], tiling: Any) -> Any:
    """The detector's scores, tile by tile when ``tiling`` is set."""
    if tiling is None:
        return det.score(images)
    from defectkit.tiling import score_tiled

    tile, overlap, blend = tiling
    return score_tiled(det, images, tile, overlap, blend=blend)


def _inspect_classifier(clf: Any, inputs: list[Path], fmt: str, batch_size: int, quiet: bool):
    """inspect with a classifier alone: one line per image with its type."""
    from defectkit.data.batches import iter_batches
    from defectkit.data.datasets import list_images
    from defectkit.decide.records import type_fields

    paths, problems = list_images(inputs, report_empty=True)
    types = clf.classes_
    rows: list[dict[str, Any]] = []
    n_failed = 0

    def emit(rec: dict[str, Any]) -> None:
        if fmt == "jsonl":
            sys.stdout.write(json.dumps(rec) + "\n")
            sys.stdout.flush()
        else:
            rows.append(rec)

    def record(path: Path, error: str | None, image: Any, proba: Any) -> dict[str, Any]:
        return {
            "path": str(path),
            "score": None if proba is None else round(float(np.max(proba)), 6),
            "is_defect": None,
            "threshold": None,
            "error": error,
            **(
                {}
                if image is None
                else {"width": int(image.shape[1]), "height": int(image.shape[0])}
            ),
            "regions": None,
            "severity": None,
            **type_fields(types, proba),
        }

    for p, problem in problems:
        n_failed += 1
        emit(record(p, problem, None, None))
    done = 0
    with _progress(not quiet and len(paths) > 1) as progress:
        for batch in iter_batches(paths, batch_size):
            good = [b for b in batch if b.image is not None]
            try:
                proba = clf.predict_proba([b.image for b in good]) if good else []
            except DefectkitError as e:
                raise _fail(str(e)) from None
            k = 0
            for item in batch:
                if item.image is None:
                    n_failed += 1
                    emit(record(item.path, item.error, None, None))
                    continue
                emit(record(item.path, None, item.image, proba[k]))
                k += 1
            done += len(batch)
            if progress is not None:
                progress("inspect", done, len(paths))
    if fmt == "table":
        table = Table("path", "type", "probability", "error")
        for r in rows:
            table.add_row(
                _shown(r["path"]),
                _shown(r["defect_type"] or ""),
                "" if r["score"] is None else f"{r['score']:.3f}",
                _shown(r["error"] or ""),
            )
        out.print(table)
    if n_failed:
        err.print(f"[yellow]{n_failed} file(s) could not be inspected[/]")
        raise typer.Exit(EXIT_FILES_FAILED)


def run_evaluation(
    det: Any, data: Path, progress: Any = None, pool: Any = None, batch_size: int = 16
) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """Score an MVTec-layout test set (some batches in ``pool``'s worker processes
    when given); metrics plus the files that failed."""
    from defectkit.data.datasets import read_mvtec
    from defectkit.metrics import evaluate as evaluate_metrics
    from defectkit.report.collect import score_samples

    ds = read_mvtec(data)
    scored = score_samples(
        det, ds.test, progress, batch_size=batch_size, stage="evaluate", pool=pool
    )
    threshold = det.threshold.value if det.threshold else None
    metrics = evaluate_metrics(
        scored.label_array,
        scored.score_array,
        types=scored.types,
        masks=scored.masks,
        maps=scored.maps,
        threshold=threshold,
    )
    return metrics, scored.errors


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="model file")],
    data: Annotated[Path, typer.Argument(help="MVTec-layout dataset with test/ and ground_truth/")],
    fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    manifest: Annotated[
        Path | None,
        typer.Option(help="CSV image,class,split: classifiers are evaluated on its test rows"),
    ] = None,
    runtime: Annotated[str, typer.Option(help=RUNTIME_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "float32",
    jobs: Annotated[int, typer.Option(help=JOBS_HELP, min=0)] = 0,
    batch_size: Annotated[int, typer.Option(help="images scored together", min=1)] = 16,
) -> None:
    """Image and pixel metrics of a model on a labelled test set.

    A classifier (alone, or in a bundle as the `defect_types` key) is evaluated on
    the 'test' rows of --manifest, the 'test' half of an MVTec layout's defect
    types, or every image of DATA/<class>/ folders: accuracy, macro-F1, per-class
    precision and recall, confusion matrix (rows: true class, columns: predicted).
    """
    from defectkit.classify.classifier import DefectClassifier
    from defectkit.data.datasets import list_images

    if fmt not in ("json", "table"):
        raise _fail(f"--format must be json or table, got {fmt!r}")
    manifest = _resolve_manifest(manifest, data)
    with ExitStack() as stack:
        n_test = len(list_images([data / "test"])[0]) if (data / "test").is_dir() else 0
        pool = stack.enter_context(
            _worker_pool(model, runtime, precision, n_test, jobs, batch_size)
        )
        det = _load_any_model(model, runtime, precision)
        if isinstance(det, DefectClassifier):
            stack.close()  # a classifier: this process, all its threads
            _evaluate_classifier(det, data, manifest, fmt, quiet)
            return
        metrics, errors = _evaluate_detector(det, data, manifest, quiet, pool, batch_size)
    if not (metrics["n_good"] and metrics["n_defect"]):
        missing = "defective" if metrics["n_good"] else "good"
        err.print(
            f"[yellow]warning:[/] no {missing} images were scored: AUROC, AP, F1 and the "
            "pixel metrics are undefined (NaN; null in JSON)",
            highlight=False,
        )
    for p, problem in errors:
        err.print(f"[yellow]skipped[/] {_shown(p)}: {_shown(problem)}", highlight=False)
    if fmt == "json":
        sys.stdout.write(
            json.dumps(_strict_json(metrics), default=_json_default, allow_nan=False) + "\n"
        )
    else:
        out.print(_metrics_table(metrics, title=f"{det.model.name} on {data}"))
        if det.classifier is not None:
            _print_classification(metrics["defect_types"], f"defect types on {data}")
    if errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _evaluate_detector(
    det: Any, data: Path, manifest: Path | None, quiet: bool, pool: Any, batch_size: int
) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """``evaluate``'s metrics of a detector (and its defect-type classifier), with
    the files that failed."""
    t0 = time.perf_counter()
    try:
        with _progress(not quiet) as progress:
            metrics, errors = run_evaluation(det, data, progress, pool, batch_size)
            if det.classifier is not None:
                report, _, type_errors = _classifier_figures(
                    det.classifier, data, manifest, progress
                )
                metrics["defect_types"] = report
                errors = errors + type_errors
    except DefectkitError as e:
        raise _fail(str(e)) from None
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics["n_failed_files"] = len(errors)
    return metrics, errors


def _classifier_figures(
    clf: Any, data: Path, manifest: Path | None, progress: Any
) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[Path, str]]]:
    """Classification figures on the evaluation images of a labelled set."""
    from defectkit.classify.workflow import evaluate_classifier
    from defectkit.data.labelled import read_labelled, select
    from defectkit.errors import DatasetError

    items = read_labelled(data, manifest)
    if any(it.split is not None for it in items):
        chosen = select(items, "test")
        where = "the 'test' rows" if manifest is not None else "the 'test' half of the types"
        if not chosen:
            raise DatasetError(f"{manifest or data}: no 'test' images to evaluate on")
    else:
        chosen, where = list(items), "every image of the class folders"
    report, records, errors = evaluate_classifier(clf, chosen, progress)
    report["evaluated_on"] = where
    return report, records, errors


def _evaluate_classifier(
    clf: Any, data: Path, manifest: Path | None, fmt: str, quiet: bool
) -> None:
    t0 = time.perf_counter()
    try:
        with _progress(not quiet) as progress:
            report, _, errors = _classifier_figures(clf, data, manifest, progress)
    except DefectkitError as e:
        raise _fail(str(e)) from None
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["n_failed_files"] = len(errors)
    for p, problem in errors:
        err.print(f"[yellow]skipped[/] {_shown(p)}: {_shown(problem)}", highlight=False)
    if fmt == "json":
        sys.stdout.write(
            json.dumps(_strict_json(report), default=_json_default, allow_nan=False) + "\n"
        )
    else:
        _print_classification(report, f"classifier on {manifest or data}")
    if errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _print_classification(report: dict[str, Any], title: str) -> None:
    from defectkit.metrics.classification import format_classification

    table = Table("metric", "value", title=title)
    for name, value in format_classification(report):
        table.add_row(name, value)
    out.print(table)
    cm = report["confusion_matrix"]
    matrix = Table("true \\ predicted", *cm["labels"], title="confusion matrix")
    for label, row in zip(cm["labels"], cm["matrix"], strict=True):
        matrix.add_row(label, *(str(v) for v in row))
    out.print(matrix)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _strict_json(o: Any) -> Any:
    """``o`` with every NaN or infinite float (an undefined metric, e.g. AUROC without
    defective images) as None: JSON has no NaN, and strict parsers refuse it."""
    if isinstance(o, dict):
        return {k: _strict_json(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_strict_json(v) for v in o]
    if isinstance(o, float | np.floating) and not math.isfinite(float(o)):
        return None
    return o


def _metrics_table(metrics: dict[str, Any], title: str) -> Table:
    from defectkit.metrics import format_table

    table = Table("metric", "value", title=title)
    for name, value in format_table(metrics):
        table.add_row(name, value)
    return table


@app.command()
def methods() -> None:
    """List the registered methods."""
    from defectkit.classify.classifier import DefectClassifier
    from defectkit.methods import DEFAULT_METHOD, available_methods

    table = Table("method", "what it does")
    for name, cls in available_methods().items():
        table.add_row(name + (" (default)" if name == DEFAULT_METHOD else ""), cls.summary)
    table.add_row(DefectClassifier.name, DefectClassifier.summary)
    out.print(table)


@app.command()
def info(
    model: Annotated[Path, typer.Argument(help="model file")],
    full: Annotated[bool, typer.Option(help="list every fit and calibration image path")] = False,
) -> None:
    """Print what a model file holds (method, settings, thresholds, provenance) as JSON."""
    from defectkit.classify.classifier import DefectClassifier

    det = _load_any_model(model)
    if isinstance(det, DefectClassifier):
        described = {"method": det.name, **det.describe(), **getattr(det, "provenance_", {})}
        if not full and "train_images" in described:
            n = len(described["train_images"])
            described["train_images"] = f"{n} paths (`defectkit info --full` lists them)"
        described["defectkit_version_running"] = __version__
    else:
        described = det.describe(full)
    sys.stdout.write(json.dumps(described, indent=2, default=_json_default) + "\n")


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="model file from `defectkit fit`")],
    out: Annotated[Path, typer.Option(help="bundle folder to write (replaced if a bundle)")],
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
) -> None:
    """Write MODEL as an ONNX bundle folder for onnxruntime and edge devices.

    The folder holds the backbone as ONNX, the learned arrays as safetensors and a
    JSON manifest with checksums. `defectkit inspect DIR` runs it with onnxruntime
    (same output lines and decisions as the PyTorch path)."""
    from defectkit.export.onnx_bundle import export_onnx

    if fmt != "onnx":
        raise _fail(f"--format must be onnx, got {fmt!r}")
    det = _load_detector(model)
    try:
        export_onnx(det, out)
    except DefectkitError as e:
        raise _fail(str(e)) from None
    err.print(f"wrote ONNX bundle {out} ({det.model.name})", highlight=False)


TARGETS = ("false-alarm-rate", "miss-rate", "f1")


def _parse_target(text: str) -> tuple[str, float | None]:
    name, _, raw = text.partition("=")
    name = name.strip()
    if name not in TARGETS:
        raise _fail(f"--target must be false-alarm-rate=R, miss-rate=R or f1, got {text!r}")
    if name == "f1":
        if raw:
            raise _fail("--target f1 takes no value")
        return name, None
    try:
        value = float(raw)
    except ValueError:
        raise _fail(f"--target {name}=R needs a number R, got {raw!r}") from None
    low_ok = value > 0 if name == "false-alarm-rate" else value >= 0
    if not (low_ok and value < 1):
        bounds = "(0, 1)" if name == "false-alarm-rate" else "[0, 1)"
        raise _fail(f"--target {name} must be in {bounds}, got {value}")
    return name, value


@app.command()
def calibrate(
    model: Annotated[Path, typer.Argument(help="model file to re-calibrate")],
    data: Annotated[
        Path,
        typer.Argument(
            help="labelled images: an MVTec layout (its test set), a folder with good/ and "
            "<defect type>/ subfolders, or a folder of good images only"
        ),
    ],
    target: Annotated[
        str,
        typer.Option(help="false-alarm-rate=R (good images only), miss-rate=R or f1"),
    ],
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="write a new model file, not MODEL")
    ] = None,
    max_false_regions: Annotated[
        float | None,
        typer.Option(
            help="also re-choose the pixel threshold from DATA's good images for this many "
            "regions per good image (default: keep it)"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    jobs: Annotated[int, typer.Option(help=JOBS_HELP, min=0)] = 0,
) -> None:
    """Re-choose the threshold on labelled images; no refit, arrays unchanged.

    Rewrites the model file's thresholds atomically (or writes --out).
    """
    from defectkit.decide.calibration import (
        pixel_threshold_for_false_regions,
        threshold_for_f1,
        threshold_for_false_alarm_rate,
        threshold_for_miss_rate,
    )
    from defectkit.report.collect import labelled_samples

    rule, value = _parse_target(target)
    if max_false_regions is not None and not (
        max_false_regions >= 0 and math.isfinite(max_false_regions)
    ):
        raise _fail(f"--max-false-regions must be >= 0, got {max_false_regions}")
    try:
        samples = labelled_samples(data)
    except DefectkitError as e:
        raise _fail(str(e)) from None
    with _worker_pool(model, "torch", "float32", len(samples), jobs) as pool:
        det = _load_detector(model)
        scored = _score_for_calibration(det, samples, data, rule, max_false_regions, quiet, pool)
    for p, problem in scored.errors:
        err.print(f"[yellow]skipped[/] {_shown(p)}: {_shown(problem)}", highlight=False)
    y = scored.label_array
    scores = scored.score_array
    good, bad = scores[y == 0], scores[y == 1]
    try:
        if rule == "false-alarm-rate":
            new = threshold_for_false_alarm_rate(good, value)
            if bad.size:
                new.n_defect = int(bad.size)
                new.miss_rate = float(np.mean(bad < new.value))
        elif rule == "miss-rate":
            new = threshold_for_miss_rate(good, bad, value)
        else:
            new = threshold_for_f1(good, bad)
        pixel = det.pixel_threshold
        if max_false_regions is not None:
            good_maps = [m for m, lab in zip(scored.maps, y, strict=True) if lab == 0]
            # a re-scored image threshold is not on the maps' scale: cap at the one that is
            cap = new.value if det.rescorer is None else det.map_threshold
            pixel = pixel_threshold_for_false_regions(
                good_maps, max_false_regions, min_area=det.min_region_area, cap=cap
            )
    except DefectkitError as e:
        raise _fail(str(e)) from None
    previous = det.threshold
    det.threshold, det.pixel_threshold = new, pixel
    try:
        written = det.save_decision(
            model,
            out_path,
            rule=rule,
            target=value,
            data=str(data),
            n_good=int(good.size),
            n_defect=int(bad.size),
            pixel_recalibrated=max_false_regions is not None,
        )
    except DefectkitError as e:
        raise _fail(str(e)) from None
    except OSError as e:
        raise _fail(_write_error(out_path or model, e)) from None
    record = {
        "model": str(written),
        "threshold": new.to_dict(),
        "previous_threshold": None if previous is None else previous.to_dict(),
        "pixel_threshold": None if pixel is None else pixel.to_dict(),
        "region_threshold": det.region_threshold,
    }
    sys.stdout.write(json.dumps(record, default=_json_default) + "\n")
    old = "none" if previous is None else f"{previous.value:.6g}"
    far = "n/a" if new.false_alarm_rate is None else f"{new.false_alarm_rate:.1%}"
    miss = "n/a" if new.miss_rate is None else f"{new.miss_rate:.1%}"
    err.print(
        f"threshold {old} -> {new.value:.6g} ({rule}{'' if value is None else f' {value:g}'}; "
        f"on {good.size} good + {bad.size} defective images: false-alarm rate {far}, "
        f"miss rate {miss}) -> {written}",
        highlight=False,
    )
    _warn_calibration(new)
    if scored.errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _score_for_calibration(
    det: Any,
    samples: list[Any],
    data: Path,
    rule: str,
    max_false_regions: float | None,
    quiet: bool,
    pool: Any,
) -> Any:
    """``calibrate``'s scores of ``samples``, once they are known to suit ``rule``."""
    from defectkit.report.collect import score_samples

    n_good = sum(1 for x in samples if x.label == 0)
    n_defect = len(samples) - n_good
    if rule in ("miss-rate", "f1") and n_defect == 0:
        raise _fail(
            f"--target {rule} needs labelled defective images, but {data} has only "
            f"{n_good} good images; use --target false-alarm-rate=R (never collapses)"
        )
    if rule in ("false-alarm-rate", "f1") and n_good == 0:
        raise _fail(f"--target {rule} needs good images, but {data} has none")
    keep_maps = max_false_regions is not None
    with _progress(not quiet) as progress:
        try:
            return score_samples(
                det, samples, progress, keep_maps=keep_maps, stage="calibrate", pool=pool
            )
        except DefectkitError as e:
            raise _fail(str(e)) from None


@app.command()
def report(
    model: Annotated[Path, typer.Argument(help="model file")],
    data: Annotated[Path, typer.Argument(help="MVTec-layout dataset with test/ and ground_truth/")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write")],
    fmt: Annotated[str, typer.Option("--format", help="summary on stdout: table or json")] = (
        "table"
    ),
    gallery: Annotated[int, typer.Option(help="images in each gallery")] = 12,
    mm_per_pixel: Annotated[float | None, typer.Option(help=MM_PER_PIXEL_HELP)] = None,
    severity_rules: Annotated[Path | None, typer.Option(help=SEVERITY_RULES_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    jobs: Annotated[int, typer.Option(help=JOBS_HELP, min=0)] = 0,
) -> None:
    """Write a self-contained HTML report of a labelled test set.

    ROC and PR curves, score histograms, confusion matrix, recall per type,
    region-level results, worst false alarms and misses; each image scored once.
    """
    from defectkit.report import build_report, labelled_samples, score_samples

    if fmt not in ("json", "table"):
        raise _fail(f"--format must be json or table, got {fmt!r}")
    if gallery < 0:
        raise _fail(f"--gallery must be >= 0, got {gallery}")
    rules = _decision_options(mm_per_pixel, severity_rules)
    try:
        samples = labelled_samples(data)
    except DefectkitError as e:
        raise _fail(str(e)) from None
    with _worker_pool(model, "torch", "float32", len(samples), jobs) as pool:
        det = _load_detector(model)
        t0 = time.perf_counter()
        try:
            with _progress(not quiet) as progress:
                scored = score_samples(det, samples, progress, stage="report", pool=pool)
        except DefectkitError as e:
            raise _fail(str(e)) from None
    try:
        page, summary = build_report(
            det,
            scored,
            model=model,
            data=data,
            mm_per_pixel=mm_per_pixel,
            rules=rules,
            gallery=gallery,
        )
    except DefectkitError as e:
        raise _fail(str(e)) from None
    write_text(out_path, page)
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    summary["report"] = str(out_path)
    for p, problem in scored.errors:
        err.print(f"[yellow]skipped[/] {_shown(p)}: {_shown(problem)}", highlight=False)
    if fmt == "json":
        sys.stdout.write(
            json.dumps(_strict_json(summary), default=_json_default, allow_nan=False) + "\n"
        )
    else:
        out.print(_report_table(summary, title=f"{det.model.name} on {data}"))
        err.print(f"report written to {out_path} in {summary['seconds']['total']:.1f} s")
    if scored.errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _report_table(s: dict[str, Any], title: str) -> Table:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    reported = s["regions"]["reported"]
    fr = reported["false_regions_per_good_image"]
    table = Table("figure", "value", title=title)
    rows = [
        ("images (good / defective)", f"{s['n_good']} / {s['n_defect']}"),
        ("image AUROC", "n/a" if s["image_auroc"] is None else f"{s['image_auroc']:.4f}"),
        ("threshold", "n/a" if s["threshold"] is None else f"{s['threshold']:.6g}"),
        ("false-alarm rate (good images)", pct(s["false_alarm_rate"])),
        ("calibrated 95% upper bound", pct(s["false_alarm_upper_calibrated"])),
        ("recall", pct(s["recall"])),
        *((f"recall {k}", pct(v)) for k, v in s["recall_per_type"].items()),
        ("region recall (IoU > 0.1)", pct(reported["recall"])),
        ("false regions per good image", "n/a" if fr is None else f"{fr:.3f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


@app.command()
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="where demo data, models and heatmaps go")
    ] = Path("demo_out"),
    method: Annotated[str | None, typer.Option(help="method to demonstrate")] = None,
    seed: Annotated[int, typer.Option(help="data generator seed")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Generate synthetic inspection data, fit, inspect and evaluate it: no downloads."""
    from defectkit.data.batches import load_all
    from defectkit.data.datasets import read_mvtec
    from defectkit.data.images import save_png
    from defectkit.data.synthetic import generate_demo
    from defectkit.decide.overlay import heatmap_overlay
    from defectkit.detector import Detector
    from defectkit.methods import DEFAULT_METHOD

    method = method or DEFAULT_METHOD
    err.print(f"generating demo data in {out_dir} (seed {seed}) ...")
    datasets = generate_demo(out_dir / "data", seed=seed, **DEMO_SETTINGS)
    summary = Table(
        "category",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
        "fit s",
        "heatmaps",
        title=f"defectkit demo: {method}",
    )
    try:
        for category, root in datasets.items():
            ds = read_mvtec(root)
            images, _, _ = load_all(ds.train)
            with _progress(not quiet) as progress:
                det = Detector.fit(images, method, {}, seed=seed, progress=progress)
                model_path = det.save(out_dir / "models" / f"{category}.dkm")
                det = Detector.load(model_path)
                metrics, _ = run_evaluation(det, root, progress)
            maps_dir = out_dir / "heatmaps" / category
            test_images, test_paths, _ = load_all([s.path for s in ds.test])
            res = det.score(test_images)
            thr = det.threshold.value if det.threshold else None
            for img, p, m in zip(test_images, test_paths, res.maps, strict=True):
                save_png(maps_dir / f"{p.parent.name}_{p.stem}.png", heatmap_overlay(img, m, thr))
            summary.add_row(
                category,
                f"{metrics['image_auroc']:.3f}",
                f"{metrics['pixel_auroc']:.3f}",
                f"{metrics['aupro']:.3f}",
                f"{det.info.get('fit_seconds', float('nan')):.1f}",
                str(maps_dir),
            )
    except DefectkitError as e:
        raise _fail(str(e)) from None
    out.print(summary)
    out.print(
        f"models in {out_dir / 'models'}; try: "
        f"defectkit inspect {out_dir / 'models'}/<category>.dkm <image or folder>"
    )


@app.command()
def serve(
    model: Annotated[
        Path, typer.Argument(help="model file from `defectkit fit`, or an ONNX bundle folder")
    ],
    db: Annotated[
        str | None,
        typer.Option(help="database URL (postgresql://...); default SQLite in --data-dir"),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(help="SQLite file and stored images and overlays (by hash)")
    ] = Path("defectkit-results"),
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    token: Annotated[
        str | None, typer.Option(help="API token for write endpoints (or env DEFECTKIT_TOKEN)")
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(help="largest accepted upload, MiB")] = 20.0,
    webhook: Annotated[str | None, typer.Option(help="URL to POST SPC alarms to")] = None,
    spc_baseline: Annotated[int, typer.Option(help="good parts that set the SPC baseline")] = 100,
    threads: Annotated[int, typer.Option(help="torch threads of the scoring worker")] = 2,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "float32",
) -> None:
    """Run the inspection service and dashboard (see defectkit/serve/app.py)."""
    from defectkit.export.onnx_bundle import is_bundle
    from defectkit.serve.runner import serve as run_service

    if not (model.is_file() or is_bundle(model)):
        raise _fail(f"{model}: no such model file or ONNX bundle folder")
    if max_upload_mb <= 0 or spc_baseline < 5:
        raise _fail("--max-upload-mb must be > 0 and --spc-baseline at least 5")
    try:
        run_service(
            model,
            db=db,
            data_dir=data_dir,
            host=host,
            port=port,
            token=token,
            max_upload_mb=max_upload_mb,
            webhook=webhook,
            baseline=spc_baseline,
            threads=threads,
            precision=precision,
        )
    except DefectkitError as e:  # a model or setting the service cannot start with
        raise _fail(str(e)) from None


@app.command("export-labels")
def export_labels(
    out_dir: Annotated[
        Path, typer.Argument(help="folder to write <class>/<id>.<ext> and labels.csv")
    ],
    db: Annotated[
        str | None,
        typer.Option(help="database URL (postgresql://...); default SQLite in --data-dir"),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(help="the service's --data-dir (SQLite file, stored images)")
    ] = Path("defectkit-results"),
) -> None:
    """Write reviewed results of the service as a labelled dataset (class folders + CSV)."""
    from defectkit.serve.export import export_labels as run_export
    from defectkit.serve.runner import default_db_url
    from defectkit.serve.store import ResultStore

    if db is None and not (data_dir / "results.db").is_file():
        raise _fail(f"{data_dir / 'results.db'}: no results database (give --data-dir or --db)")
    store = ResultStore.open(db or default_db_url(data_dir), data_dir / "blobs")
    try:
        counts = run_export(store, out_dir)
    finally:
        store.close()
    total = sum(counts.values())
    out.print(f"{total} reviewed image(s) written to {out_dir}: {counts}")


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="print the version")] = False,
) -> None:
    if version:
        out.print(__version__)
        raise typer.Exit(0)


if __name__ == "__main__":
    app()

"""``defectkit fit``: flags to :class:`~defectkit.pipeline.FitSettings`, the
pipeline's fit, the model file and what was learned."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from defectkit.cli.common import (
    BLEND_HELP,
    EXIT_FILES_FAILED,
    OVERLAP_HELP,
    command,
    err,
    fail,
    parse_params,
    progress_bar,
    skipped,
    tiling_option,
    warn_calibration,
    write_error,
)
from defectkit.data.files import DEFAULT_IMAGE_MEMORY
from defectkit.decide.defaults import DEFAULT_MAX_FALSE_REGIONS, DEFAULT_MIN_AREA, FEW_SHOT_BELOW


@command()
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
    few_shot_below: Annotated[
        int,
        typer.Option(
            help="with fewer good images than this, fit on all of them and set the thresholds "
            "from their leave-one-out scores (few-shot mode; 0: never)",
            min=0,
        ),
    ] = FEW_SHOT_BELOW,
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
            "tile by tile (large images; the model then scores in tiles wherever it is used)"
        ),
    ] = None,
    tile_overlap: Annotated[int | None, typer.Option(help=OVERLAP_HELP)] = None,
    tile_blend: Annotated[str, typer.Option(help=BLEND_HELP)] = "max",
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
    products: Annotated[
        bool,
        typer.Option(
            "--products",
            help="DATA holds one folder per product (an MVTec layout or good images): fit "
            "one unified model that assigns each image to its product",
        ),
    ] = False,
    add: Annotated[
        list[str] | None,
        typer.Option(
            "--add",
            help="with --products: fit only this product folder of DATA and add it to the "
            "unified model at --out, the others as they are (repeatable)",
        ),
    ] = None,
) -> None:
    """Learn what good parts look like and write a model file.

    With --method classifier: learn defect types from labelled images instead
    (DATA/<class>/*, --manifest CSV, or an MVTec layout's test/<type> folders).
    With --products: one unified model over DATA's product folders.
    """
    from defectkit import pipeline
    from defectkit.classify.classifier import CLASSIFIER_METHOD

    params = parse_params(param)
    if backbone is not None:
        params["backbone"] = backbone
    if method == CLASSIFIER_METHOD:
        _fit_classifier(
            data,
            out_path,
            params,
            seed,
            quiet,
            manifest=manifest,
            anomaly_only={
                "--classify-types": classify_types,
                "--classifier-param": bool(classifier_param),
                "--defects": defects is not None,
                "--defect-masks": defect_masks is not None,
                "--mask-head-param": bool(mask_head_param),
                "--calibration-dir": calibration_dir is not None,
                "--tile": tile is not None,
            },
        )
        return
    if classifier_param and not classify_types:
        raise fail("--classifier-param needs --classify-types")
    if mask_head_param and defect_masks is None:
        raise fail("--mask-head-param needs --defect-masks")
    settings = pipeline.FitSettings(
        method=method,
        params=params,
        seed=seed,
        calibration=pipeline.CalibrationSettings(
            false_alarm_rate=false_alarm_rate,
            calibration_fraction=calibration_fraction,
            max_false_regions=max_false_regions,
            min_region_area=min_region_area,
            few_shot_below=few_shot_below,
        ),
        tiling=tiling_option(tile, tile_overlap, tile_blend),
        min_defect_px=min_defect_px,
        mask_head=parse_params(mask_head_param, "--mask-head-param"),
        classifier=parse_params(classifier_param) if classify_types else None,
        image_memory_gib=image_memory,
    )
    if out_path.is_dir():
        raise fail(f"--out {out_path} is a folder; give the model file to write (.dkm)")
    if add and not products:
        raise fail("--add is for --products (a unified model of several products)")
    if products:
        per_set = {
            "--calibration-dir": calibration_dir,
            "--defects": defects,
            "--defect-masks": defect_masks,
            "--manifest": manifest,
            "--classify-types": classify_types or None,
        }
        extra = [flag for flag, given in per_set.items() if given is not None]
        if extra:
            raise fail(f"{', '.join(extra)}: not with --products (each product folder fits alone)")
        _fit_products(settings, data, out_path, add or [], quiet)
        return
    where = pipeline.FitData(data, calibration_dir, defects, defect_masks, manifest)
    with progress_bar(not quiet) as progress:
        result = pipeline.fit(settings, where, progress)
    for note in result.notes:
        err.print(note, highlight=False)
    skipped(result.errors)
    det = result.detector
    try:
        det.save(out_path)
    except OSError as e:  # disk full, read-only folder, ...: no traceback
        raise fail(write_error(out_path, e)) from None
    err.print(
        f"fitted [bold]{settings.method}[/] on {det.info['n_fit_images']} good images "
        f"({len(result.errors)} skipped) in {result.seconds:.1f} s -> {out_path}",
        highlight=False,
    )
    _print_fitted(det)
    if result.errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _fit_products(settings: Any, root: Path, out_path: Path, add: list[str], quiet: bool) -> None:
    """``fit ROOT --products [--add NAME]``: one detector per product folder and
    the router, in one model file."""
    from defectkit.pipeline.products import fit_products
    from defectkit.products import ProductSet

    base = None
    if add:
        if not out_path.exists():
            raise fail(f"--add: no unified model at --out {out_path} to add to")
        base = ProductSet.load(out_path)
    with progress_bar(not quiet) as progress:
        result = fit_products(settings, root, add=add, base=base, progress=progress)
    n_errors = 0
    for name, fitted in result.fitted.items():
        err.print(f"[bold]product {name}[/]", highlight=False)
        for note in fitted.notes:
            err.print(note, highlight=False)
        skipped(fitted.errors)
        n_errors += len(fitted.errors)
        _print_fitted(fitted.detector)
    model = result.model
    try:
        model.save(out_path)
    except OSError as e:
        raise fail(write_error(out_path, e)) from None
    kept = [n for n in model.products if n not in result.fitted]
    err.print(
        f"unified model of {len(model.products)} products ({', '.join(model.products)}): "
        f"fitted {len(result.fitted)}"
        + (f", kept {len(kept)} as they were" if kept else "")
        + f" in {result.seconds:.1f} s -> {out_path}",
        highlight=False,
    )
    err.print(
        "each image is assigned to the product whose training images it is nearest to; "
        "one farther from every product than their own images are from each other (x"
        f"{model.router.margin:g}) is answered 'unknown product'",
        highlight=False,
    )
    if n_errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _print_fitted(det: Any) -> None:
    """What the detector learned: its geometry and search, thresholds, re-scorer,
    mask head, classifier."""
    for note in det.model.fit_notes():
        err.print(note, highlight=False)
    thr = det.threshold
    if thr is not None:
        err.print(
            f"threshold {thr.value:.4g} for a {thr.target:.1%} false-alarm rate "
            f"(calibrated on {thr.n_good} "
            f"{'fitted good images, each left out' if thr.left_out else 'held-out good images'}"
            f"; 95% upper bound on the rate {thr.false_alarm_upper:.1%})",
            highlight=False,
        )
        warn_calibration(thr)
    pthr = det.pixel_threshold
    if pthr is not None:
        err.print(
            f"pixel threshold {pthr.value:.4g} for <= {pthr.target:g} regions of >= "
            f"{pthr.min_area_px} px per good image (measured "
            f"{pthr.false_regions_per_image:.3g} on the calibration images"
            f"{'; capped at the image threshold' if pthr.capped else ''})",
            highlight=False,
        )
    if det.tiling is not None:
        t = det.tiling
        err.print(
            f"tiled: {det.info.get('n_fit_tiles')} tiles of {t.tile} px (overlap {t.overlap}, "
            f"{t.blend}); every entry point scores this model tile by tile",
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
        print_classifier_summary(det.classifier)


def print_classifier_summary(clf: Any) -> None:
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
    data: Path,
    out_path: Path,
    params: dict[str, Any],
    seed: int,
    quiet: bool,
    *,
    manifest: Path | None,
    anomaly_only: dict[str, bool],
) -> None:
    """``fit --method classifier``: labelled images in, a classifier model file out."""
    import time

    from defectkit import pipeline
    from defectkit.pipeline.settings import resolve_manifest

    extra = [flag for flag, given in anomaly_only.items() if given]
    if extra:
        raise fail(f"{', '.join(extra)}: for anomaly methods, not --method classifier")
    params.setdefault("seed", seed)
    manifest = resolve_manifest(manifest, data)
    t0 = time.perf_counter()
    with progress_bar(not quiet) as progress:
        clf, provenance, errors = pipeline.fit_type_classifier(data, manifest, params, progress)
    try:
        clf.save(out_path, provenance)
    except OSError as e:
        raise fail(write_error(out_path, e)) from None
    skipped(errors)
    err.print(
        f"fitted [bold]classifier[/] in {time.perf_counter() - t0:.1f} s -> {out_path}",
        highlight=False,
    )
    print_classifier_summary(clf)
    if errors:
        raise typer.Exit(EXIT_FILES_FAILED)

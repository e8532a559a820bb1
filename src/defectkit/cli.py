"""The ``defectkit`` command line. stdout carries results (tables or JSON lines);
progress bars and messages go to stderr.

Exit codes: 0 success; 1 some input files failed (the rest were processed);
2 bad usage, settings, dataset or model file.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from defectkit import __version__
from defectkit.decide.defaults import DEFAULT_MAX_FALSE_REGIONS, DEFAULT_MIN_AREA
from defectkit.errors import DefectkitError

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
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(EXIT_USAGE)


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


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


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
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Learn what good parts look like and write a model file."""
    from defectkit.data.batches import load_all
    from defectkit.data.datasets import fit_images, list_images
    from defectkit.detector import Detector
    from defectkit.methods import DEFAULT_METHOD, get_method

    try:
        method = method or DEFAULT_METHOD
        model_cls = get_method(method)
        params = _parse_params(param)
        if backbone is not None:
            params["backbone"] = backbone
        if "seed" in pyinspect.signature(model_cls).parameters:
            params.setdefault("seed", seed)
        model_cls.check_params(params)
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
    except DefectkitError as e:
        raise _fail(str(e)) from None
    t0 = time.perf_counter()
    images, ok_paths, errors = load_all(paths)
    cal_images: list[np.ndarray] | None = None
    cal_ok: list[Path] | None = None
    if cal_paths is not None:
        cal_images, cal_ok, cal_errors = load_all(cal_paths)
        errors = errors + cal_errors
        if not cal_images:
            raise _fail(
                f"none of the {len(cal_paths)} images under {calibration_dir} could be read"
            )
    for p, problem in errors:
        err.print(f"[yellow]skipped[/] {p}: {problem}", highlight=False)
    if not images:
        raise _fail(f"none of the {len(paths)} images under {data} could be read")
    try:
        with _progress(not quiet) as progress:
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
            )
        det.info["data"] = str(data)
        if calibration_dir is not None:
            det.info["calibration_data"] = str(calibration_dir)
        det.info["n_skipped_files"] = len(errors)
        det.save(out_path)
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
    pthr = det.pixel_threshold
    if pthr is not None:
        err.print(
            f"pixel threshold {pthr.value:.4g} for <= {pthr.target:g} regions of >= "
            f"{pthr.min_area_px} px per good image (measured "
            f"{pthr.false_regions_per_image:.3g} on the calibration images"
            f"{'; capped at the image threshold' if pthr.capped else ''})",
            highlight=False,
        )
    if errors:
        raise typer.Exit(EXIT_FILES_FAILED)


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


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="model file from `defectkit fit`")],
    inputs: Annotated[list[Path], typer.Argument(help="image files or folders (read recursively)")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or table")] = "jsonl",
    maps_out: Annotated[
        Path | None, typer.Option(help="write heatmap overlays with region outlines here")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="images scored together")] = 16,
    mm_per_pixel: Annotated[float | None, typer.Option(help=MM_PER_PIXEL_HELP)] = None,
    severity_rules: Annotated[Path | None, typer.Option(help=SEVERITY_RULES_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Score images; one JSON object per image on stdout (exit 1 if any file failed).

    Each line: path, score, is_defect, threshold, error, width, height, regions
    (bbox [x, y, w, h], area_px, area_mm2, score, mean_score, severity; listed for
    NG images), severity (worst region; null when OK), pixel_threshold, and for
    memory-bank methods evidence and closest_good (training image path and bbox
    of the good patch nearest to the worst patch).
    """
    from defectkit.data.batches import iter_batches
    from defectkit.data.datasets import list_images
    from defectkit.data.images import save_png
    from defectkit.decide.overlay import region_overlay
    from defectkit.decide.regions import overall_severity

    if fmt not in ("jsonl", "table"):
        raise _fail(f"--format must be jsonl or table, got {fmt!r}")
    rules = _decision_options(mm_per_pixel, severity_rules)
    det = _load_detector(model)
    paths, problems = list_images(inputs)
    threshold = det.threshold.value if det.threshold else None
    pixel_threshold = det.region_threshold
    n_failed = 0
    rows: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        if fmt == "jsonl":
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
        else:
            rows.append(record)

    def failed(path: Path, problem: str | None) -> dict[str, Any]:
        return {
            "path": str(path),
            "score": None,
            "is_defect": None,
            "threshold": threshold,
            "error": problem,
            "regions": None,
            "severity": None,
        }

    for p, problem in problems:
        n_failed += 1
        emit(failed(p, problem))
    if maps_out is not None:
        maps_out.mkdir(parents=True, exist_ok=True)
    index = 0
    with _progress(not quiet and len(paths) > 1) as progress:
        for batch in iter_batches(paths, batch_size):
            good = [b for b in batch if b.image is not None]
            result = None
            if good:
                try:
                    result = det.score([b.image for b in good])
                except DefectkitError as e:  # e.g. model/backbone mismatch: nothing will work
                    raise _fail(str(e)) from None
            decisions = det.decide(result.scores) if result is not None else None
            k = 0
            for item in batch:
                index += 1
                if item.image is None:
                    n_failed += 1
                    emit(failed(item.path, item.error))
                    continue
                rec: dict[str, Any] = {"path": str(item.path)}
                score = float(result.scores[k])
                is_defect = None if decisions is None else bool(decisions[k])
                regions, labels = det.locate_regions(
                    result.maps[k], is_defect, mm_per_pixel=mm_per_pixel, rules=rules
                )
                rec.update(
                    score=_json_float(score),
                    is_defect=is_defect,
                    threshold=threshold,
                    error=None,
                    width=int(item.image.shape[1]),
                    height=int(item.image.shape[0]),
                    regions=[r.to_dict() for r in regions],
                    severity=overall_severity(regions, is_defect),
                    pixel_threshold=pixel_threshold,
                )
                if result.extras:
                    extra = result.extras[k]
                    rec["evidence"] = extra
                    if "nearest_good" in extra:
                        rec["closest_good"] = det.closest_good(extra)
                if maps_out is not None:
                    name = f"{index:06d}_{item.path.stem}_overlay.png"
                    overlay = region_overlay(item.image, result.maps[k], threshold, regions, labels)
                    save_png(maps_out / name, overlay)
                    rec["overlay"] = str(maps_out / name)
                k += 1
                emit(rec)
            if progress is not None:
                progress("inspect", index, len(paths))
    if fmt == "table":
        table = Table("path", "score", "verdict", "severity", "regions", "error")
        for r in rows:
            verdict = "" if r["is_defect"] is None else ("NG" if r["is_defect"] else "OK")
            table.add_row(
                r["path"],
                "" if r["score"] is None else f"{r['score']:.4g}",
                verdict,
                r["severity"] or "",
                "" if r["regions"] is None else str(len(r["regions"])),
                r["error"] or "",
            )
        out.print(table)
    if n_failed:
        err.print(f"[yellow]{n_failed} file(s) could not be inspected[/]")
        raise typer.Exit(EXIT_FILES_FAILED)


def run_evaluation(
    det: Any, data: Path, progress: Any = None
) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """Score an MVTec-layout test set; metrics plus the files that failed."""
    from defectkit.data.datasets import read_mvtec
    from defectkit.metrics import evaluate as evaluate_metrics
    from defectkit.report.collect import score_samples

    ds = read_mvtec(data)
    scored = score_samples(det, ds.test, progress, stage="evaluate")
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
) -> None:
    """Image and pixel metrics of a model on a labelled test set."""
    if fmt not in ("json", "table"):
        raise _fail(f"--format must be json or table, got {fmt!r}")
    det = _load_detector(model)
    t0 = time.perf_counter()
    try:
        with _progress(not quiet) as progress:
            metrics, errors = run_evaluation(det, data, progress)
    except DefectkitError as e:
        raise _fail(str(e)) from None
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics["n_failed_files"] = len(errors)
    for p, problem in errors:
        err.print(f"[yellow]skipped[/] {p}: {problem}", highlight=False)
    if fmt == "json":
        sys.stdout.write(json.dumps(metrics, default=_json_default) + "\n")
    else:
        out.print(_metrics_table(metrics, title=f"{det.model.name} on {data}"))
    if errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _metrics_table(metrics: dict[str, Any], title: str) -> Table:
    from defectkit.metrics import format_table

    table = Table("metric", "value", title=title)
    for name, value in format_table(metrics):
        table.add_row(name, value)
    return table


@app.command()
def methods() -> None:
    """List the registered methods."""
    from defectkit.methods import DEFAULT_METHOD, available_methods

    table = Table("method", "what it does")
    for name, cls in available_methods().items():
        table.add_row(name + (" (default)" if name == DEFAULT_METHOD else ""), cls.summary)
    out.print(table)


@app.command()
def info(
    model: Annotated[Path, typer.Argument(help="model file")],
    full: Annotated[bool, typer.Option(help="list every fit and calibration image path")] = False,
) -> None:
    """Print what a model file holds (method, settings, thresholds, provenance) as JSON."""
    det = _load_detector(model)
    sys.stdout.write(json.dumps(det.describe(full), indent=2, default=_json_default) + "\n")


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
    from defectkit.report.collect import labelled_samples, score_samples

    rule, value = _parse_target(target)
    if max_false_regions is not None and not (
        max_false_regions >= 0 and math.isfinite(max_false_regions)
    ):
        raise _fail(f"--max-false-regions must be >= 0, got {max_false_regions}")
    det = _load_detector(model)
    try:
        samples = labelled_samples(data)
    except DefectkitError as e:
        raise _fail(str(e)) from None
    n_good = sum(1 for x in samples if x.label == 0)
    n_defect = len(samples) - n_good
    if rule in ("miss-rate", "f1") and n_defect == 0:
        raise _fail(
            f"--target {rule} needs labelled defective images, but {data} has only "
            f"{n_good} good images; use --target false-alarm-rate=R (never collapses)"
        )
    if rule in ("false-alarm-rate", "f1") and n_good == 0:
        raise _fail(f"--target {rule} needs good images, but {data} has none")
    with _progress(not quiet) as progress:
        try:
            scored = score_samples(
                det, samples, progress, keep_maps=max_false_regions is not None, stage="calibrate"
            )
        except DefectkitError as e:
            raise _fail(str(e)) from None
    for p, problem in scored.errors:
        err.print(f"[yellow]skipped[/] {p}: {problem}", highlight=False)
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
            pixel = pixel_threshold_for_false_regions(
                good_maps, max_false_regions, min_area=det.min_region_area, cap=new.value
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
    if scored.errors:
        raise typer.Exit(EXIT_FILES_FAILED)


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
    det = _load_detector(model)
    t0 = time.perf_counter()
    try:
        samples = labelled_samples(data)
        with _progress(not quiet) as progress:
            scored = score_samples(det, samples, progress, stage="report")
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
    _write_text_atomic(out_path, page)
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    summary["report"] = str(out_path)
    for p, problem in scored.errors:
        err.print(f"[yellow]skipped[/] {p}: {problem}", highlight=False)
    if fmt == "json":
        sys.stdout.write(json.dumps(summary, default=_json_default) + "\n")
    else:
        out.print(_report_table(summary, title=f"{det.model.name} on {data}"))
        err.print(f"report written to {out_path} in {summary['seconds']['total']:.1f} s")
    if scored.errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _write_text_atomic(path: Path, text: str) -> None:
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="print the version")] = False,
) -> None:
    if version:
        out.print(__version__)
        raise typer.Exit(0)


if __name__ == "__main__":
    app()

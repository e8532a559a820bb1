"""``defectkit inspect``: one JSON line (or a table row) per image, scored by the
pipeline on this machine or by a Ray job."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from defectkit.cli.common import (
    BLEND_HELP,
    EXIT_FILES_FAILED,
    JOBS_HELP,
    MM_PER_PIXEL_HELP,
    OVERLAP_HELP,
    PRECISION_HELP,
    RUNTIME_HELP,
    SEVERITY_RULES_HELP,
    check_format,
    command,
    decision_options,
    err,
    fail,
    out,
    progress_bar,
    shown,
    tiling_option,
)

TILE_HELP = (
    "score large images in tiles of this many px (model fitted on such tiles; a model "
    "from fit --tile tiles by itself)"
)


@command()
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
    tile_overlap: Annotated[int | None, typer.Option(help=OVERLAP_HELP)] = None,
    tile_blend: Annotated[str, typer.Option(help=BLEND_HELP)] = "max",
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
    from defectkit import pipeline
    from defectkit.classify.classifier import DefectClassifier
    from defectkit.data.datasets import list_images

    check_format(fmt, ("jsonl", "table"))
    rules = decision_options(mm_per_pixel, severity_rules)
    if engine not in ("local", "ray"):
        raise fail(f"--engine must be local or ray, got {engine!r}")
    if engine == "local" and (parquet is not None or db is not None):
        raise fail("--parquet and --db need --engine ray")
    if engine == "ray" and jobs > 1:
        raise fail("--jobs is for --engine local; a Ray job takes --workers")
    tiling = tiling_option(tile, tile_overlap, tile_blend)
    if engine == "ray" and (tiling is not None or runtime == "onnx" or model.is_dir()):
        raise fail(
            "--tile and ONNX bundles (--runtime onnx) need --engine local (a model fitted "
            "with --tile tiles by itself on Ray too)"
        )
    if engine == "ray":
        _inspect_ray(
            pipeline.load(model, runtime, precision),
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
        return
    with ExitStack() as stack:
        # workers start now, so their start-up overlaps this process's own
        paths, problems = list_images(inputs, report_empty=True)
        pool = stack.enter_context(
            pipeline.worker_pool(
                model,
                len(paths),
                jobs,
                batch_size,
                runtime=runtime,
                precision=precision,
                tiling=tiling,
            )
        )
        det = pipeline.load(model, runtime, precision)
        if isinstance(det, DefectClassifier):
            stack.close()  # a classifier alone: this process, all its threads
            if maps_out is not None:
                raise fail(f"{model} holds a classifier alone: no anomaly maps for --maps-out")
            batches = pipeline.classify(det, paths, problems=problems, batch_size=batch_size)
            _exit_if_failed(
                _emit(batches, fmt, len(paths), quiet, classifier=True, skip_first=bool(problems))
            )
            return
        if tiling is not None:  # this run's tiles replace the model's own
            det.tiling = tiling
        batches = pipeline.inspect(
            det,
            paths,
            problems=problems,
            batch_size=batch_size,
            mm_per_pixel=mm_per_pixel,
            rules=rules,
            maps_out=maps_out,
            pool=pool,
        )
        clf = getattr(det, "classifier", None)  # a unified model: per product, not here
        types = clf.classes_ if clf is not None else None
        n_failed = _emit(batches, fmt, len(paths), quiet, types=types, skip_first=bool(problems))
        if pool is not None and pool.failure:
            err.print(f"[yellow]{shown(pool.failure)}; its images were inspected here[/]")
    _exit_if_failed(n_failed)


def _exit_if_failed(n_failed: int) -> None:
    if n_failed:
        err.print(f"[yellow]{n_failed} file(s) could not be inspected[/]")
        raise typer.Exit(EXIT_FILES_FAILED)


def _emit(
    batches: Iterable[list[dict[str, Any]]],
    fmt: str,
    n_paths: int,
    quiet: bool,
    *,
    types: list[str] | None = None,
    classifier: bool = False,
    skip_first: bool = False,
) -> int:
    """Write the records as JSON lines as they come (or one table at the end), with
    a progress bar over the paths; returns how many files failed."""
    rows: list[dict[str, Any]] = []
    n_failed = done = 0
    first = skip_first
    with progress_bar(not quiet and n_paths > 1) as progress:
        for records in batches:
            for record in records:
                n_failed += record["error"] is not None
                if fmt == "jsonl":
                    sys.stdout.write(json.dumps(record) + "\n")
                else:
                    rows.append(record)
            sys.stdout.flush()
            if first:  # the inputs that were not found: no images scored
                first = False
                continue
            done += len(records)
            if progress is not None:
                progress("inspect", done, n_paths)
    if fmt == "table":
        out.print(_classifier_table(rows) if classifier else _table(rows, types))
    return n_failed


def _table(rows: list[dict[str, Any]], types: list[str] | None) -> Table:
    columns = ["path", "score", "verdict", "severity", "regions", "error"]
    if types is not None:
        columns.insert(5, "type")
    table = Table(*columns)
    for r in rows:
        verdict = "" if r["is_defect"] is None else ("NG" if r["is_defect"] else "OK")
        cells = [
            shown(r["path"]),
            "" if r["score"] is None else f"{r['score']:.4g}",
            verdict,
            r["severity"] or "",
            "" if r["regions"] is None else str(len(r["regions"])),
            shown(r["error"] or ""),
        ]
        if types is not None:
            cells.insert(5, r.get("defect_type") or "")
        table.add_row(*cells)
    return table


def _classifier_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("path", "type", "probability", "error")
    for r in rows:
        table.add_row(
            shown(r["path"]),
            shown(r["defect_type"] or ""),
            "" if r["score"] is None else f"{r['score']:.3f}",
            shown(r["error"] or ""),
        )
    return table


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
        raise fail(f"{model} holds a classifier alone: --engine ray needs an anomaly detector")
    if fmt != "jsonl":
        raise fail("--engine ray writes --format jsonl only")
    if workers < 1 or batch_size < 1:
        raise fail("--workers and --batch-size must be >= 1")
    import_ray()
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
        err.print(f"{sinks.n_stored} result(s) stored in {shown(db)}", highlight=False)
    _exit_if_failed(n_failed)

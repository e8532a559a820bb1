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
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Learn what good parts look like and write a model file."""
    from defectkit.data.batches import load_all
    from defectkit.data.datasets import fit_images
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
    except DefectkitError as e:
        raise _fail(str(e)) from None
    t0 = time.perf_counter()
    images, _ok, errors = load_all(paths)
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
                seed=seed,
                progress=progress,
            )
        det.info["data"] = str(data)
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
    if errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _load_detector(model: Path):
    from defectkit.detector import Detector

    try:
        return Detector.load(model)
    except DefectkitError as e:
        raise _fail(str(e)) from None


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="model file from `defectkit fit`")],
    inputs: Annotated[list[Path], typer.Argument(help="image files or folders (read recursively)")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or table")] = "jsonl",
    maps_out: Annotated[Path | None, typer.Option(help="write heatmap overlays here")] = None,
    batch_size: Annotated[int, typer.Option(help="images scored together")] = 16,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Score images; one JSON object per image on stdout (exit 1 if any file failed)."""
    from defectkit.data.batches import iter_batches
    from defectkit.data.datasets import list_images
    from defectkit.data.images import save_png
    from defectkit.decide.overlay import heatmap_overlay

    if fmt not in ("jsonl", "table"):
        raise _fail(f"--format must be jsonl or table, got {fmt!r}")
    det = _load_detector(model)
    paths, problems = list_images(inputs)
    threshold = det.threshold.value if det.threshold else None
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
        emit(
            {
                "path": str(p),
                "score": None,
                "is_defect": None,
                "threshold": threshold,
                "error": problem,
            }
        )
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
                rec: dict[str, Any] = {"path": str(item.path)}
                if item.image is None:
                    n_failed += 1
                    rec.update(score=None, is_defect=None, threshold=threshold, error=item.error)
                else:
                    score = float(result.scores[k])
                    rec.update(
                        score=_json_float(score),
                        is_defect=None if decisions is None else bool(decisions[k]),
                        threshold=threshold,
                        error=None,
                        width=int(item.image.shape[1]),
                        height=int(item.image.shape[0]),
                    )
                    if result.extras:
                        rec["evidence"] = result.extras[k]
                    if maps_out is not None:
                        name = f"{index:06d}_{item.path.stem}_overlay.png"
                        save_png(
                            maps_out / name, heatmap_overlay(item.image, result.maps[k], threshold)
                        )
                        rec["overlay"] = str(maps_out / name)
                    k += 1
                emit(rec)
            if progress is not None:
                progress("inspect", index, len(paths))
    if fmt == "table":
        table = Table("path", "score", "verdict", "error")
        for r in rows:
            verdict = "" if r["is_defect"] is None else ("NG" if r["is_defect"] else "OK")
            table.add_row(
                r["path"],
                "" if r["score"] is None else f"{r['score']:.4g}",
                verdict,
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
    from defectkit.data.batches import iter_batches
    from defectkit.data.datasets import read_mvtec
    from defectkit.data.images import load_mask
    from defectkit.metrics import evaluate as evaluate_metrics

    ds = read_mvtec(data)
    labels, scores, types, masks, maps = [], [], [], [], []
    errors: list[tuple[Path, str]] = []
    samples = {s.path: s for s in ds.test}
    done = 0
    for batch in iter_batches([s.path for s in ds.test], 16):
        good = [b for b in batch if b.image is not None]
        errors.extend((b.path, b.error or "unreadable") for b in batch if b.image is None)
        if good:
            res = det.score([b.image for b in good])
            for b, s, m in zip(good, res.scores, res.maps, strict=True):
                sample = samples[b.path]
                try:
                    if sample.mask_path is not None:
                        mask = load_mask(sample.mask_path, b.image.shape[:2])
                    else:
                        mask = np.zeros(b.image.shape[:2], dtype=bool)
                except DefectkitError as e:
                    errors.append((sample.mask_path or b.path, str(e)))
                    continue
                labels.append(sample.label)
                scores.append(float(s))
                types.append(sample.defect_type)
                masks.append(mask)
                maps.append(m)
        done += len(batch)
        if progress is not None:
            progress("evaluate", done, len(ds.test))
    threshold = det.threshold.value if det.threshold else None
    metrics = evaluate_metrics(
        np.asarray(labels),
        np.asarray(scores),
        types=types,
        masks=masks,
        maps=maps,
        threshold=threshold,
    )
    return metrics, errors


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
def info(model: Annotated[Path, typer.Argument(help="model file")]) -> None:
    """Print what a model file holds (method, settings, threshold, provenance) as JSON."""
    det = _load_detector(model)
    sys.stdout.write(json.dumps(det.describe(), indent=2, default=_json_default) + "\n")


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

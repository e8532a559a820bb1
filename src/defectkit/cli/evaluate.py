"""``defectkit evaluate`` and ``defectkit report``: a labelled set scored once by
the pipeline, as metrics on stdout or a self-contained HTML page."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from defectkit.cli.common import (
    EXIT_FILES_FAILED,
    JOBS_HELP,
    MM_PER_PIXEL_HELP,
    PRECISION_HELP,
    RUNTIME_HELP,
    SEVERITY_RULES_HELP,
    check_format,
    command,
    decision_options,
    err,
    fail,
    out,
    print_json,
    progress_bar,
    skipped,
    two_column_table,
)


@command()
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
    from defectkit import pipeline
    from defectkit.classify.classifier import DefectClassifier
    from defectkit.data.datasets import list_images
    from defectkit.pipeline.settings import resolve_manifest
    from defectkit.products import ProductSet

    check_format(fmt, ("json", "table"))
    manifest = resolve_manifest(manifest, data)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        tests = [data / "test"] if (data / "test").is_dir() else list(data.glob("*/test"))
        n_test = len(list_images(tests)[0]) if tests else 0  # a products folder: theirs
        pool = stack.enter_context(
            pipeline.worker_pool(
                model, n_test, jobs, batch_size, runtime=runtime, precision=precision
            )
        )
        det = pipeline.load(model, runtime, precision)
        with progress_bar(not quiet) as progress:
            if isinstance(det, DefectClassifier):
                stack.close()  # a classifier: this process, all its threads
                report, errors = pipeline.classifier_figures(det, data, manifest, progress)
                report["seconds"] = round(time.perf_counter() - t0, 2)
                report["n_failed_files"] = len(errors)
                skipped(errors)
                _show(
                    report,
                    fmt,
                    lambda: _print_classification(report, f"classifier on {manifest or data}"),
                )
                if errors:
                    raise typer.Exit(EXIT_FILES_FAILED)
                return
            if isinstance(det, ProductSet):
                _evaluate_products(det, data, fmt, progress, pool, batch_size, t0)
                return
            metrics, errors = pipeline.evaluate_dataset(
                det, data, progress=progress, pool=pool, batch_size=batch_size
            )
            if det.classifier is not None:
                types, type_errors = pipeline.classifier_figures(
                    det.classifier, data, manifest, progress
                )
                metrics["defect_types"] = types
                errors = errors + type_errors
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics["n_failed_files"] = len(errors)
    if not (metrics["n_good"] and metrics["n_defect"]):
        missing = "defective" if metrics["n_good"] else "good"
        err.print(
            f"[yellow]warning:[/] no {missing} images were scored: AUROC, AP, F1 and the "
            "pixel metrics are undefined (NaN; null in JSON)",
            highlight=False,
        )
    skipped(errors)

    def table() -> None:
        from defectkit.metrics import format_table

        out.print(two_column_table(format_table(metrics), f"{det.model.name} on {data}"))
        if det.classifier is not None:
            _print_classification(metrics["defect_types"], f"defect types on {data}")

    _show(metrics, fmt, table)
    if errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _evaluate_products(
    det: Any, data: Path, fmt: str, progress: Any, pool: Any, batch_size: int, t0: float
) -> None:
    """``evaluate`` of a unified model on a folder of product sets: figures per
    product as the model routes its images, assignment, and overall."""
    from defectkit.pipeline.products import evaluate_products

    figures, errors = evaluate_products(
        det, data, progress=progress, pool=pool, batch_size=batch_size
    )
    figures["seconds"] = round(time.perf_counter() - t0, 2)
    figures["n_failed_files"] = len(errors)
    skipped(errors)

    def fmt3(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{v:.3f}"

    def table() -> None:
        t = Table(
            "product folder", "images", "assigned right", "unknown", "image AUROC",
            "pixel AUROC", "AUPRO", title=f"unified model on {data} (scores in threshold units)",
        )  # fmt: skip
        for name, f in figures["products"].items():
            right = f.get("assignment_accuracy")
            t.add_row(
                name + ("" if name in det.detectors else " (not in the model)"),
                str(f["n_images"]),
                "n/a" if right is None else f"{right:.1%}",
                f"{f['unknown_rate']:.1%}",
                fmt3(f.get("image_auroc")),
                fmt3(f.get("pixel_auroc")),
                fmt3(f.get("aupro")),
            )
        o = figures["overall"]
        acc = o["assignment_accuracy"]
        t.add_row(
            "overall", str(o["n_images"]), "n/a" if acc is None else f"{acc:.2%}", "",
            fmt3(o["mean_image_auroc"]), fmt3(o["mean_pixel_auroc"]), fmt3(o["mean_aupro"]),
        )  # fmt: skip
        out.print(t)

    _show(figures, fmt, table)
    if errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _show(figures: dict[str, Any], fmt: str, table: Any) -> None:
    if fmt == "json":
        print_json(figures)
    else:
        table()


def _print_classification(report: dict[str, Any], title: str) -> None:
    from defectkit.metrics.classification import format_classification

    out.print(two_column_table(format_classification(report), title))
    cm = report["confusion_matrix"]
    matrix = Table("true \\ predicted", *cm["labels"], title="confusion matrix")
    for label, row in zip(cm["labels"], cm["matrix"], strict=True):
        matrix.add_row(label, *(str(v) for v in row))
    out.print(matrix)


@command()
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
    product: Annotated[
        str | None,
        typer.Option(help="a unified model (fit --products): the product to report on"),
    ] = None,
) -> None:
    """Write a self-contained HTML report of a labelled test set.

    ROC and PR curves, score histograms, confusion matrix, recall per type,
    region-level results, worst false alarms and misses; each image scored once.
    """
    from defectkit import pipeline
    from defectkit.atomic import write_text
    from defectkit.report import build_report, labelled_samples

    check_format(fmt, ("json", "table"))
    if gallery < 0:
        raise fail(f"--gallery must be >= 0, got {gallery}")
    rules = decision_options(mm_per_pixel, severity_rules)
    samples = labelled_samples(data)
    t0 = time.perf_counter()
    # one product of a unified model is scored in this process
    with pipeline.worker_pool(model, len(samples), 1 if product else jobs, runtime="torch") as pool:
        det = _one_product(pipeline.load_detector(model, "torch", products=True), product, model)
        with progress_bar(not quiet) as progress:
            scored = pipeline.score_dataset(
                det, samples, progress=progress, pool=pool, stage="report"
            )
    page, summary = build_report(
        det, scored, model=model, data=data, mm_per_pixel=mm_per_pixel, rules=rules, gallery=gallery
    )
    write_text(out_path, page)
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    summary["report"] = str(out_path)
    skipped(scored.errors)
    if fmt == "json":
        print_json(summary)
    else:
        out.print(_report_table(summary, title=f"{det.model.name} on {data}"))
        err.print(f"report written to {out_path} in {summary['seconds']['total']:.1f} s")
    if scored.errors:
        raise typer.Exit(EXIT_FILES_FAILED)


def _one_product(det: Any, product: str | None, model: Path) -> Any:
    """The detector to report on: the model's, or ``product``'s of a unified model."""
    from defectkit.products import ProductSet

    if isinstance(det, ProductSet):
        if product is None:
            raise fail(
                f"{model} is a unified model of {len(det.products)} products "
                f"({', '.join(det.products)}): name one with --product (evaluate gives "
                "figures for all of them)"
            )
        return det.product(product)
    if product is not None:
        raise fail(f"--product {product}: {model} is not a unified model (fit --products)")
    return det


def _report_table(s: dict[str, Any], title: str) -> Table:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    reported = s["regions"]["reported"]
    fr = reported["false_regions_per_good_image"]
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
    return two_column_table(rows, title, ("figure", "value"))

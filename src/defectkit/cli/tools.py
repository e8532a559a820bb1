"""The small commands: ``methods``, ``info``, ``export``, ``demo``, ``--version``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from defectkit import __version__
from defectkit.cli.common import app, command, err, fail, json_default, out, progress_bar

#: what `defectkit demo` generates (generate_demo keyword arguments)
DEMO_SETTINGS: dict[str, Any] = {}


@command()
def methods() -> None:
    """List the registered methods."""
    from defectkit.classify.classifier import DefectClassifier
    from defectkit.methods import DEFAULT_METHOD, available_methods

    table = Table("method", "what it does")
    for name, cls in available_methods().items():
        table.add_row(name + (" (default)" if name == DEFAULT_METHOD else ""), cls.summary)
    table.add_row(DefectClassifier.name, DefectClassifier.summary)
    out.print(table)


@command()
def info(
    model: Annotated[Path, typer.Argument(help="model file")],
    full: Annotated[bool, typer.Option(help="list every fit and calibration image path")] = False,
) -> None:
    """Print what a model file holds (method, settings, thresholds, provenance) as JSON."""
    from defectkit import pipeline
    from defectkit.classify.classifier import DefectClassifier

    det = pipeline.load(model, "torch")
    if isinstance(det, DefectClassifier):
        described = {"method": det.name, **det.describe(), **getattr(det, "provenance_", {})}
        if not full and "train_images" in described:
            n = len(described["train_images"])
            described["train_images"] = f"{n} paths (`defectkit info --full` lists them)"
        described["defectkit_version_running"] = __version__
    else:
        described = det.describe(full)
    sys.stdout.write(json.dumps(described, indent=2, default=json_default) + "\n")


@command()
def export(
    model: Annotated[Path, typer.Argument(help="model file from `defectkit fit`")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="bundle folder to write (replaced if a bundle)")
    ],
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
) -> None:
    """Write MODEL as an ONNX bundle folder for onnxruntime and edge devices.

    The folder holds the backbone as ONNX, the learned arrays as safetensors and a
    JSON manifest with checksums. `defectkit inspect DIR` runs it with onnxruntime
    (same output lines and decisions as the PyTorch path)."""
    from defectkit import pipeline
    from defectkit.export.onnx_bundle import export_onnx

    if fmt != "onnx":
        raise fail(f"--format must be onnx, got {fmt!r}")
    det = pipeline.load_detector(model, "torch")
    export_onnx(det, out_dir)
    err.print(f"wrote ONNX bundle {out_dir} ({det.model.name})", highlight=False)


@command()
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="where demo data, models and heatmaps go")
    ] = Path("demo_out"),
    method: Annotated[str | None, typer.Option(help="method to demonstrate")] = None,
    seed: Annotated[int, typer.Option(help="data generator seed")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Generate synthetic inspection data, fit, inspect and evaluate it: no downloads."""
    from defectkit import pipeline
    from defectkit.data.batches import load_all
    from defectkit.data.datasets import read_mvtec
    from defectkit.data.images import save_png
    from defectkit.data.synthetic import generate_demo
    from defectkit.decide.overlay import heatmap_overlay

    settings = pipeline.FitSettings(method=method, seed=seed)
    err.print(f"generating demo data in {out_dir} (seed {seed}) ...")
    datasets = generate_demo(out_dir / "data", seed=seed, **DEMO_SETTINGS)
    summary = Table(
        "category",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
        "fit s",
        "heatmaps",
        title=f"defectkit demo: {settings.method}",
    )
    for category, root in datasets.items():
        with progress_bar(not quiet) as progress:
            det = pipeline.fit(settings, pipeline.FitData(root), progress).detector
            model_path = det.save(out_dir / "models" / f"{category}.dkm")
            det = pipeline.load_detector(model_path, "torch")
            metrics, _ = pipeline.evaluate_dataset(det, root, progress=progress)
        maps_dir = out_dir / "heatmaps" / category
        test_images, test_paths, _ = load_all([s.path for s in read_mvtec(root).test])
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

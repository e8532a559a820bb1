"""``defectkit calibrate``: new thresholds from labelled images, no refit."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from defectkit.cli.common import (
    EXIT_FILES_FAILED,
    JOBS_HELP,
    command,
    err,
    fail,
    json_default,
    progress_bar,
    skipped,
    warn_calibration,
    write_error,
)


def parse_target(text: str) -> tuple[str, float | None]:
    """``--target`` as (rule, rate); the rate is None for f1."""
    from defectkit.pipeline import TARGETS

    name, _, raw = text.partition("=")
    name = name.strip()
    if name not in TARGETS:
        raise fail(f"--target must be false-alarm-rate=R, miss-rate=R or f1, got {text!r}")
    if name == "f1":
        if raw:
            raise fail("--target f1 takes no value")
        return name, None
    try:
        value = float(raw)
    except ValueError:
        raise fail(f"--target {name}=R needs a number R, got {raw!r}") from None
    low_ok = value > 0 if name == "false-alarm-rate" else value >= 0
    if not (low_ok and value < 1):
        bounds = "(0, 1)" if name == "false-alarm-rate" else "[0, 1)"
        raise fail(f"--target {name} must be in {bounds}, got {value}")
    return name, value


@command()
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
    product: Annotated[
        str | None,
        typer.Option(help="a unified model (fit --products): the product to re-calibrate"),
    ] = None,
) -> None:
    """Re-choose the threshold on labelled images; no refit, arrays unchanged.

    Rewrites the model file's thresholds atomically (or writes --out). A model
    fitted on tiles is scored tile by tile, as it inspects.
    """
    from defectkit import pipeline
    from defectkit.report.collect import labelled_samples

    rule, value = parse_target(target)
    if max_false_regions is not None and not (
        max_false_regions >= 0 and math.isfinite(max_false_regions)
    ):
        raise fail(f"--max-false-regions must be >= 0, got {max_false_regions}")
    from defectkit.products import ProductSet

    samples = labelled_samples(data)
    # one product of a unified model is scored in this process
    with pipeline.worker_pool(model, len(samples), 1 if product else jobs, runtime="torch") as pool:
        # a classifier alone is refused first, a unified model without --product too
        loaded = pipeline.load_detector(model, "torch", products=product is not None)
        unified = loaded if isinstance(loaded, ProductSet) else None
        if product is not None and unified is None:
            raise fail(f"--product {product}: {model} is not a unified model (fit --products)")
        det = loaded if unified is None else unified.product(product)
        pipeline.check_target(rule, value, samples, data)
        with progress_bar(not quiet) as progress:
            scored = pipeline.score_dataset(
                det,
                samples,
                progress=progress,
                pool=pool,
                keep_maps=max_false_regions is not None,
                stage="calibrate",
            )
    skipped(scored.errors)
    new, pixel = pipeline.recalibrate(det, scored, rule, value, max_false_regions)
    previous = det.threshold
    det.threshold, det.pixel_threshold = new, pixel
    n_good = int((scored.label_array == 0).sum())
    n_defect = len(scored.labels) - n_good
    try:
        note = {
            "rule": rule,
            "target": value,
            "data": str(data),
            "n_good": n_good,
            "n_defect": n_defect,
            "pixel_recalibrated": max_false_regions is not None,
        }
        if unified is None:
            written = det.save_decision(model, out_path, **note)
        else:
            assert product is not None
            written = unified.save_decision(model, product, out_path, **note)
    except OSError as e:
        raise fail(write_error(out_path or model, e)) from None
    record = {
        "model": str(written),
        **({} if product is None else {"product": product}),
        "threshold": new.to_dict(),
        "previous_threshold": None if previous is None else previous.to_dict(),
        "pixel_threshold": None if pixel is None else pixel.to_dict(),
        "region_threshold": det.region_threshold,
    }
    sys.stdout.write(json.dumps(record, default=json_default) + "\n")
    old = "none" if previous is None else f"{previous.value:.6g}"
    far = "n/a" if new.false_alarm_rate is None else f"{new.false_alarm_rate:.1%}"
    miss = "n/a" if new.miss_rate is None else f"{new.miss_rate:.1%}"
    err.print(
        f"threshold {old} -> {new.value:.6g} ({rule}{'' if value is None else f' {value:g}'}; "
        f"on {n_good} good + {n_defect} defective images: false-alarm rate {far}, "
        f"miss rate {miss}) -> {written}",
        highlight=False,
    )
    warn_calibration(new)
    if scored.errors:
        raise typer.Exit(EXIT_FILES_FAILED)

"""Scoring many images with one model: the worker processes every batch command
shares (inspect, evaluate, report, calibrate), and a labelled set scored once for
evaluation, the report and re-calibration."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from defectkit.classify.classifier import DefectClassifier
from defectkit.data.datasets import Sample
from defectkit.decide.calibration import (
    PixelThreshold,
    Threshold,
    pixel_threshold_for_false_regions,
    threshold_for_f1,
    threshold_for_false_alarm_rate,
    threshold_for_miss_rate,
)
from defectkit.detector import Detector
from defectkit.errors import ConfigError, DatasetError
from defectkit.methods.base import Progress
from defectkit.pipeline.loading import load
from defectkit.scale.local_pool import WorkerPool, auto_jobs, single_threaded
from defectkit.tiling import Tiling

if TYPE_CHECKING:  # the report's metrics pull in scikit-learn: not for every worker
    from defectkit.report.collect import ScoredSet

#: calibration targets: a false-alarm rate (good images only), a miss rate, or best F1
TARGETS = ("false-alarm-rate", "miss-rate", "f1")


def worker_model(
    model: str | os.PathLike[str],
    runtime: str = "auto",
    precision: str = "float32",
    tiling: dict[str, Any] | None = None,
) -> Detector | DefectClassifier:
    """The model as a worker process loads it: :func:`load`, with the run's tiling
    (``inspect --tile``) where one replaces the model's own."""
    det = load(model, runtime, precision)
    if tiling is not None and isinstance(det, Detector):
        det.tiling = Tiling.from_dict(tiling)
    return det


@contextmanager
def worker_pool(
    model: str | os.PathLike[str],
    n_images: int | None,
    jobs: int = 0,
    batch_size: int = 16,
    *,
    runtime: str = "auto",
    precision: str = "float32",
    tiling: Tiling | None = None,
) -> Iterator[WorkerPool | None]:
    """Worker processes for scoring ``n_images`` (None: a stream that does not end,
    as the service and the hot folder score), or None when one process is better
    (few images, or ``jobs`` 1); ``jobs`` counts this process too. This process's
    torch and faiss run on one thread meanwhile. Enter it before this process loads
    the model: the workers' start-up then overlaps its own."""
    n_jobs = jobs or auto_jobs(n_images)
    if n_images is not None:
        n_jobs = min(n_jobs, max(1, -(-n_images // batch_size)))
    if n_jobs <= 1:
        yield None
        return
    spec = None if tiling is None else tiling.to_dict()
    setup = partial(worker_model, str(model), runtime, precision, spec)
    with WorkerPool(n_jobs - 1, setup) as pool, single_threaded():  # torch after the spawn
        yield pool


@contextmanager
def stream_model(
    model: str | os.PathLike[str], jobs: int = 0, precision: str = "float32", threads: int = 2
) -> Iterator[tuple[WorkerPool | None, Any]]:
    """For a stream of images with no fixed end (the service, the hot folder): the
    worker processes (``jobs`` processes in all, this one included; 0: one per
    usable core), started first so that their start-up overlaps this process's
    own, and this process's model (a detector or a unified model). Without workers
    this process scores on ``threads`` torch threads; with them, on one."""
    import torch

    from defectkit.pipeline.loading import load_detector

    with worker_pool(model, None, jobs, precision=precision) as pool:
        if pool is None:
            torch.set_num_threads(max(1, threads))
        det = load_detector(
            model, "auto", precision, threads=1 if pool else max(1, threads), products=True
        )
        yield pool, det


def score_dataset(
    det: Detector,
    samples: list[Sample],
    *,
    progress: Progress | None = None,
    pool: WorkerPool | None = None,
    batch_size: int = 16,
    keep_maps: bool = True,
    stage: str = "score",
) -> ScoredSet:
    """Every sample scored once by ``det`` (as :meth:`Detector.score` scores, tiles
    and all), with its mask; some batches in ``pool``'s workers when given."""
    from defectkit.report.collect import score_samples

    return score_samples(
        det, samples, progress, batch_size=batch_size, keep_maps=keep_maps, stage=stage, pool=pool
    )


def evaluate_dataset(
    det: Detector,
    data: Path,
    *,
    progress: Progress | None = None,
    pool: WorkerPool | None = None,
    batch_size: int = 16,
) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """Image and pixel metrics of ``det`` on an MVTec-layout test set, and the files
    that failed."""
    from defectkit.data.datasets import read_mvtec
    from defectkit.metrics import evaluate as evaluate_metrics

    ds = read_mvtec(data)
    scored = score_dataset(
        det, ds.test, progress=progress, pool=pool, batch_size=batch_size, stage="evaluate"
    )
    metrics = evaluate_metrics(
        scored.label_array,
        scored.score_array,
        types=scored.types,
        masks=scored.masks,
        maps=scored.maps,
        threshold=det.threshold.value if det.threshold else None,
    )
    return metrics, scored.errors


def classifier_figures(
    clf: DefectClassifier, data: Path, manifest: Path | None, progress: Progress | None = None
) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """Classification figures on the evaluation images of a labelled set: its
    'test' rows or half, else every image of its class folders."""
    from defectkit.classify.workflow import evaluate_classifier
    from defectkit.data.labelled import read_labelled, select

    items = read_labelled(data, manifest)
    if any(it.split is not None for it in items):
        chosen = select(items, "test")
        where = "the 'test' rows" if manifest is not None else "the 'test' half of the types"
        if not chosen:
            raise DatasetError(f"{manifest or data}: no 'test' images to evaluate on")
    else:
        chosen, where = list(items), "every image of the class folders"
    report, _, errors = evaluate_classifier(clf, chosen, progress)
    report["evaluated_on"] = where
    return report, errors


def check_target(rule: str, value: float | None, samples: Sequence[Sample], data: Path) -> None:
    """Refuse a calibration target the labelled ``samples`` cannot serve, before
    they are scored."""
    if rule not in TARGETS:
        raise ConfigError(f"--target must be false-alarm-rate=R, miss-rate=R or f1, got {rule!r}")
    n_good = sum(1 for x in samples if x.label == 0)
    n_defect = len(samples) - n_good
    if rule in ("miss-rate", "f1") and n_defect == 0:
        raise ConfigError(
            f"--target {rule} needs labelled defective images, but {data} has only "
            f"{n_good} good images; use --target false-alarm-rate=R (never collapses)"
        )
    if rule in ("false-alarm-rate", "f1") and n_good == 0:
        raise ConfigError(f"--target {rule} needs good images, but {data} has none")


def recalibrate(
    det: Detector,
    scored: ScoredSet,
    rule: str,
    value: float | None,
    max_false_regions: float | None = None,
) -> tuple[Threshold, PixelThreshold | None]:
    """New (image, pixel) thresholds for ``det`` from a labelled set it scored:
    the image threshold for ``rule`` (``value`` its rate), the pixel one re-chosen
    from the good images' maps when ``max_false_regions`` is given, else kept."""
    y, scores = scored.label_array, scored.score_array
    good, bad = scores[y == 0], scores[y == 1]
    if rule == "false-alarm-rate":
        assert value is not None
        new = threshold_for_false_alarm_rate(good, value)
        if bad.size:
            new.n_defect = int(bad.size)
            new.miss_rate = float(np.mean(bad < new.value))
    elif rule == "miss-rate":
        assert value is not None
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
    return new, pixel

"""``inspect`` as a library call: paths in, one record (the JSON line of
``defectkit inspect``) per path out, in input order, scored in this process and in
a pool's worker processes when given. Files that cannot be read get a record with
their error; the rest go on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from defectkit.classify.classifier import DefectClassifier
from defectkit.decide.records import failed_record, inspect_loaded, type_fields
from defectkit.detector import Detector
from defectkit.products import ProductSet, unknown_record
from defectkit.scale.local_pool import WorkerPool, ordered_batches

Record = dict[str, Any]


def inspect_batch(
    det: Detector | ProductSet,
    batch: tuple[int, Sequence[Any]],
    *,
    mm_per_pixel: float | None = None,
    rules: Any = None,
    maps_out: Path | None = None,
) -> list[Record]:
    """Records of one batch: ``(number of its first image, its paths or loaded
    items)``; paths are decoded here (in a worker process, for instance)."""
    from defectkit.data.batches import Loaded, load_item

    first, items = batch
    loaded = [it if isinstance(it, Loaded) else load_item(it) for it in items]
    # a unified model assigns each image to its product, whose detector inspects it
    run = det.inspect_loaded if isinstance(det, ProductSet) else partial(inspect_loaded, det)
    return run(
        loaded,
        [str(it.path) for it in loaded],
        mm_per_pixel=mm_per_pixel,
        rules=rules,
        maps_out=maps_out,
        numbers=range(first, first + len(loaded)),
    )


def inspect(
    det: Detector | ProductSet,
    paths: Sequence[Path],
    *,
    problems: Sequence[tuple[Path, str]] = (),
    batch_size: int = 16,
    mm_per_pixel: float | None = None,
    rules: Any = None,
    maps_out: Path | None = None,
    pool: WorkerPool | None = None,
) -> Iterator[list[Record]]:
    """Batches of records: first one for the inputs that were not found
    (``problems``), then one per batch of ``paths``, in order. With ``maps_out``,
    overlays are written there (see :func:`~defectkit.decide.records.inspect_loaded`)."""
    if problems:
        failed = unknown_record if isinstance(det, ProductSet) else partial(failed_record, det)
        yield [failed(str(p), problem) for p, problem in problems]
    if maps_out is not None:
        maps_out.mkdir(parents=True, exist_ok=True)
    work = partial(inspect_batch, mm_per_pixel=mm_per_pixel, rules=rules, maps_out=maps_out)
    starts = range(0, len(paths), batch_size)
    if pool is not None:
        batches = [(i + 1, paths[i : i + batch_size]) for i in starts]
        yield from ordered_batches(batches, partial(work, det), pool, work)
        return
    from defectkit.data.batches import iter_batches

    # decoding the next batch in background threads while this one scores
    loaded = iter_batches(list(paths), batch_size)
    for i, items in zip(starts, loaded, strict=True):
        yield work(det, (i + 1, items))


def classify(
    clf: DefectClassifier,
    paths: Sequence[Path],
    *,
    problems: Sequence[tuple[Path, str]] = (),
    batch_size: int = 16,
) -> Iterator[list[Record]]:
    """``inspect`` with a classifier alone: one record per image with its type
    (``score`` its probability; no OK/NG decision, regions or severity)."""
    from defectkit.data.batches import iter_batches

    types = clf.classes_

    def record(path: Path, error: str | None, image: Any, proba: Any) -> Record:
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

    if problems:
        yield [record(p, problem, None, None) for p, problem in problems]
    for batch in iter_batches(list(paths), batch_size):
        good = [b for b in batch if b.image is not None]
        proba = clf.predict_proba([b.image for b in good]) if good else []
        out, k = [], 0
        for item in batch:
            if item.image is None:
                out.append(record(item.path, item.error, None, None))
                continue
            out.append(record(item.path, None, item.image, proba[k]))
            k += 1
        yield out

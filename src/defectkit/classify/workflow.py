"""From a labelled dataset on disk to a fitted classifier, and to its figures: what
the command line (and the benchmark) do with :mod:`defectkit.data.labelled` items."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectkit.classify.classifier import DefectClassifier
from defectkit.data.labelled import LabelledImage, class_counts, select
from defectkit.errors import DatasetError
from defectkit.methods.base import Progress

__all__ = ["LoadedSet", "evaluate_classifier", "fit_classifier", "load_labelled", "training_split"]


@dataclass
class LoadedSet:
    """Images that loaded, with their labels and paths; the files that did not."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)


def load_labelled(items: Sequence[LabelledImage]) -> LoadedSet:
    """Decode every item's image (per-file errors, the rest kept)."""
    from defectkit.data.batches import iter_batches

    label_of = {it.path: it.class_name for it in items}
    out = LoadedSet()
    for batch in iter_batches([it.path for it in items], 32):
        for b in batch:
            if b.image is None:
                out.errors.append((b.path, b.error or "unreadable"))
            else:
                out.images.append(b.image)
                out.labels.append(label_of[b.path])
                out.paths.append(b.path)
    return out


def training_split(
    items: Sequence[LabelledImage],
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """(train, val) items: ``train`` and unassigned (None) items train, ``val`` items
    validate, ``test`` items are left for evaluation. Refuses a set with fewer
    than two classes to train on."""
    train = [it for it in items if it.split in (None, "train")]
    val = select(items, "val")
    classes = class_counts(train)
    if len(classes) < 2:
        raise DatasetError(
            f"a classifier needs training images of at least 2 classes; found {classes or 'none'}"
            " (train/unassigned rows or class folders)"
        )
    foreign = sorted({it.class_name for it in val} - set(classes))
    if foreign:
        raise DatasetError(f"validation classes {foreign} have no training images")
    return train, val


def fit_classifier(
    items: Sequence[LabelledImage],
    params: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> tuple[DefectClassifier, dict[str, Any], list[tuple[Path, str]]]:
    """Fit a :class:`DefectClassifier` on the training (and validation) items.

    Returns the classifier, provenance for the model file and the files that
    could not be read.
    """
    train_items, val_items = training_split(items)
    DefectClassifier.check_params(dict(params or {}))
    clf = DefectClassifier(**(params or {}))
    t0 = time.perf_counter()
    train = load_labelled(train_items)
    val = load_labelled(val_items) if val_items else None
    errors = train.errors + (val.errors if val else [])
    if len(set(train.labels)) < 2:
        raise DatasetError("fewer than 2 classes left after dropping unreadable files")
    clf.fit(
        train.images,
        train.labels,
        val_images=None if val is None else val.images,
        val_labels=None if val is None else val.labels,
        progress=progress,
    )
    provenance = {
        "n_train_images": len(train.images),
        "n_val_images": 0 if val is None else len(val.images),
        "class_counts": class_counts(train_items),
        "fit_seconds": round(time.perf_counter() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "train_images": [os.path.abspath(p) for p in train.paths],
    }
    return clf, provenance, errors


def evaluate_classifier(
    clf: DefectClassifier,
    items: Sequence[LabelledImage],
    progress: Progress | None = None,
    *,
    batch_size: int = 32,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[Path, str]]]:
    """Classify ``items`` and compare with their labels.

    Returns the :func:`~defectkit.metrics.classification_report` (plus the mean
    stated probability of the predicted class, ``mean_confidence``, to compare
    with the accuracy), one record per image (path, class, predicted,
    probability) and the files that could not be read.
    """
    from defectkit.data.batches import iter_batches
    from defectkit.metrics.classification import classification_report

    label_of = {it.path: it.class_name for it in items}
    records: list[dict[str, Any]] = []
    errors: list[tuple[Path, str]] = []
    confidences: list[float] = []
    done = 0
    for batch in iter_batches([it.path for it in items], batch_size):
        good = [b for b in batch if b.image is not None]
        errors.extend((b.path, b.error or "unreadable") for b in batch if b.image is None)
        if good:
            proba = clf.predict_proba([b.image for b in good])
            for b, p in zip(good, proba, strict=True):
                k = int(np.argmax(p))
                confidences.append(float(p[k]))
                records.append(
                    {
                        "path": str(b.path),
                        "class": label_of[b.path],
                        "predicted": clf.classes_[k],
                        "probability": round(float(p[k]), 6),
                    }
                )
        done += len(batch)
        if progress is not None:
            progress("evaluate", done, len(items))
    report = classification_report(
        [r["class"] for r in records], [r["predicted"] for r in records], clf.classes_
    )
    report["mean_confidence"] = float(np.mean(confidences)) if confidences else None
    return report, records, errors

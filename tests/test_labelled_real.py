"""Defect types and semi-supervised detection on the real datasets, on fixed subsets
(skipped with a reason when ../shared/data is absent). The full-size figures are
in BENCHMARKS.md (benchmarks/labelled.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_dataset

from defectkit.classify.workflow import evaluate_classifier, fit_classifier, load_labelled
from defectkit.data.batches import load_all
from defectkit.data.datasets import read_mvtec
from defectkit.data.labelled import first_per_class, read_manifest, read_mvtec_types, select
from defectkit.detector import Detector
from defectkit.metrics import image_auroc

pytestmark = pytest.mark.shared_data


def test_neu_det_types_from_a_third_of_the_training_images() -> None:
    items = read_manifest(shared_dataset("neu-det") / "split.csv")
    train = select(items, "train")[::3]  # 480 images, all six classes
    clf, _, errors = fit_classifier(train, {"image_size": 160, "augment_copies": 0})
    assert not errors
    report, _, errors = evaluate_classifier(clf, select(items, "test")[::2])
    assert not errors and report["n"] == 180
    assert report["accuracy"] >= 0.95, report["confusion_matrix"]


def test_magnetic_tile_types_on_the_fixed_split() -> None:
    items = read_mvtec_types(shared_dataset("magnetic-tile"))
    clf, _, _ = fit_classifier(items, {"augment_copies": 1})
    report, _, _ = evaluate_classifier(clf, select(items, "test"))
    assert report["n"] == 194
    assert report["macro_f1"] >= 0.85, report["confusion_matrix"]


def test_five_labelled_defects_per_type_improve_detection() -> None:
    root = shared_dataset("magnetic-tile")
    ds = read_mvtec(root)
    train, _, _ = load_all(ds.train[::4])
    # 5 labelled defects per type: the first 5 of each type's 'train' half
    labelled = first_per_class(select(read_mvtec_types(root), "train"), 5)
    defects = load_labelled(labelled).images
    taken = {it.path for it in labelled}
    rest = [s for s in ds.test if s.path not in taken][::3]
    test, _, _ = load_all([s.path for s in rest])
    y = np.array([s.label for s in rest])
    params = {"coreset_ratio": 0.05}
    plain = Detector.fit(train, "patchcore", params, calibration_fraction=0.25)
    semi = Detector.fit(
        train, "patchcore", params, calibration_fraction=0.25, defect_images=defects
    )
    assert semi.info["semi_supervised"]["n_defect"] == 25
    assert semi.rescorer is not None, semi.info["semi_supervised"]
    before = image_auroc(y, plain.score(test).scores)
    after = image_auroc(y, semi.score(test).scores)
    assert after > before + 0.02, (before, after)

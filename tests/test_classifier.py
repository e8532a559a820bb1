"""The defect-type classifier: its contract, calibration, determinism and files,
on synthetic defects the tests make (defect kind = class)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defectkit.classify import Augmentation, DefectClassifier, PooledFeatures, classifier_layers
from defectkit.classify.head import class_weights, fit_temperature, train_head
from defectkit.data.synthetic import add_defect, make_surface
from defectkit.errors import ConfigError, ImageError, ModelFileError
from defectkit.methods import available_methods, get_method
from defectkit.metrics.classification import classification_report
from defectkit.model_file import ModelFile, read_model, write_model

KINDS = ("hole", "scratch", "spot")
#: small and fast: 128 px images, a few epochs are enough for three clear kinds
FAST = {"image_size": 128, "seed": 0}


def _defects(n_per_kind: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n_per_kind):
        for kind in KINDS:
            img, _ = add_defect(make_surface("brushed_metal", (128, 128), rng), kind, rng)
            images.append(img)
            labels.append(kind)
    return images, labels


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[list[np.ndarray], list[str]]]:
    return {"train": _defects(10, 1), "test": _defects(6, 2)}


@pytest.fixture(scope="module")
def fitted(data: dict) -> DefectClassifier:
    images, labels = data["train"]
    return DefectClassifier(**FAST).fit(images, labels)


# -- learning -------------------------------------------------------------------------
def test_learns_the_defect_kinds(fitted: DefectClassifier, data: dict) -> None:
    images, labels = data["test"]
    assert fitted.classes_ == sorted(KINDS)
    predicted = fitted.predict(images)
    report = classification_report(labels, predicted, fitted.classes_)
    assert report["accuracy"] >= 0.9, report["confusion_matrix"]
    proba = fitted.predict_proba(images)
    assert proba.shape == (len(images), 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    assert [fitted.classes_[i] for i in proba.argmax(1)] == predicted


def test_training_record(fitted: DefectClassifier) -> None:
    t = fitted.training_
    # 15% of each class of 10 held out (1 each), 2 augmented copies of the rest
    assert t["n_train"] == 27 and t["n_val"] == 3 and t["n_augmented"] == 54
    assert t["class_counts"] == {k: 10 for k in sorted(KINDS)}
    assert t["refit"] is True
    assert 1 <= t["head"]["best_epoch"] <= t["head"]["epochs"]
    assert t["temperature"] == pytest.approx(fitted.temperature_, rel=1e-5)
    assert fitted.temperature_ > 0


def test_deterministic_with_a_seed(fitted: DefectClassifier, data: dict) -> None:
    images, labels = data["train"]
    again = DefectClassifier(**FAST).fit(images, labels)
    test = data["test"][0][:6]
    np.testing.assert_allclose(again.predict_proba(test), fitted.predict_proba(test), atol=1e-6)
    other = DefectClassifier(**{**FAST, "seed": 1}).fit(images, labels)
    assert not np.allclose(other.head_weight_, fitted.head_weight_)


def test_explicit_validation_images_are_used(data: dict) -> None:
    images, labels = data["train"]
    val_images, val_labels = data["test"]
    clf = DefectClassifier(**FAST, augment_copies=0, refit=False).fit(
        images, labels, val_images=val_images[:6], val_labels=val_labels[:6]
    )
    assert clf.training_["n_train"] == 30 and clf.training_["n_val"] == 6
    assert clf.training_["refit"] is False


def test_fine_tuning_the_last_block_round_trips(data: dict, tmp_path: Path) -> None:
    images, labels = data["train"]
    clf = DefectClassifier(**FAST, fine_tune=1, fine_tune_epochs=2, augment_copies=1).fit(
        images, labels
    )
    assert clf.training_["fine_tune"]["epochs"] >= 1
    assert set(clf.describe()["fine_tuned_blocks"]) == {15}
    frozen = DefectClassifier(**FAST).features.extractor
    tuned_net = clf.features.extractor.body.net
    assert not torch.equal(
        frozen.body.net._blocks[15]._project_conv.weight, tuned_net._blocks[15]._project_conv.weight
    )
    test = data["test"][0][:6]
    path = clf.save(tmp_path / "tuned.dkm")
    back = DefectClassifier.load(path)
    np.testing.assert_allclose(back.predict_proba(test), clf.predict_proba(test), atol=1e-5)


def test_fine_tune_settings_are_checked(data: dict) -> None:
    images, labels = data["train"]
    with pytest.raises(ConfigError, match="fine_tune must be in"):
        DefectClassifier(**FAST, fine_tune=99).fit(images, labels)
    with pytest.raises(ConfigError, match="increasing order"):
        DefectClassifier(**FAST, fine_tune=1, layers=["blocks.15", "blocks.14"]).fit(images, labels)


# -- contract and bad input --------------------------------------------------------------
def test_constructor_only_stores_settings() -> None:
    clf = DefectClassifier(**FAST)
    assert not clf.is_fitted
    params = clf.get_params()
    assert DefectClassifier(**params).get_params() == params
    json.dumps(params)  # settings go into the model file's JSON
    with pytest.raises(ConfigError, match="no setting"):
        DefectClassifier.check_params({"not_a_setting": 1})
    assert clf.set_params(l2=0.5) is clf and clf.l2 == 0.5
    with pytest.raises(ConfigError, match=r"method 'classifier' has no setting\(s\) \['nope'\]"):
        clf.set_params(l2=0.1, nope=1)
    assert clf.l2 == 0.5


def test_fit_and_files_keep_the_settings(fitted: DefectClassifier, tmp_path: Path) -> None:
    """The settings stay as given (``layers`` None); the layers used are ``layers_``."""
    assert fitted.get_params() == DefectClassifier(**FAST).get_params()
    assert fitted.layers is None and fitted.layers_ == classifier_layers(fitted.backbone)
    back = DefectClassifier.load(fitted.save(tmp_path / "c.dkm"))
    assert back.get_params() == fitted.get_params() and back.layers_ == fitted.layers_


def test_not_an_anomaly_method_and_the_registry_knows() -> None:
    assert "classifier" not in available_methods()
    with pytest.raises(ConfigError, match="unknown method 'classifier'"):
        get_method("classifier")


def test_bad_input_is_refused(data: dict, fitted: DefectClassifier) -> None:
    images, labels = data["train"]
    with pytest.raises(ConfigError, match="not fitted"):
        DefectClassifier(**FAST).predict(images[:1])
    with pytest.raises(ConfigError, match="at least 2 classes"):
        DefectClassifier(**FAST).fit(images[:3], ["a"] * 3)
    with pytest.raises(ConfigError, match="2 labels for 3 images"):
        DefectClassifier(**FAST).fit(images[:3], ["a", "b"])
    with pytest.raises(ConfigError, match="class_weight"):
        DefectClassifier(**FAST, class_weight="heavy").fit(images, labels)
    with pytest.raises(ConfigError, match="val_fraction"):
        DefectClassifier(**FAST, val_fraction=1.5).fit(images, labels)
    with pytest.raises(ConfigError, match="augmentation noise"):
        DefectClassifier(**FAST, noise=-1).fit(images, labels)
    with pytest.raises(ImageError, match="image #1"):
        fitted.predict([images[0], np.zeros((4, 4, 3), np.uint8)])
    assert fitted.predict_proba([]).shape == (0, 3)


# -- model files --------------------------------------------------------------------------
def test_save_load_round_trip(fitted: DefectClassifier, data: dict, tmp_path: Path) -> None:
    path = fitted.save(tmp_path / "types.dkm", {"data": "synthetic"})
    mf = read_model(path)
    assert mf.info["method"] == "classifier"
    assert set(mf.arrays) == {
        "classifier.feature_mean",
        "classifier.feature_scale",
        "classifier.head_weight",
        "classifier.head_bias",
    }
    back = DefectClassifier.load(path)
    assert back.classes_ == fitted.classes_
    assert back.provenance_["data"] == "synthetic"
    test = data["test"][0]
    np.testing.assert_allclose(back.predict_proba(test), fitted.predict_proba(test), atol=1e-6)


def test_tampered_classifier_state_is_refused(fitted: DefectClassifier, tmp_path: Path) -> None:
    mf = read_model(fitted.save(tmp_path / "ok.dkm"))
    arrays = dict(mf.arrays)
    arrays["classifier.head_weight"] = arrays["classifier.head_weight"][:2]
    write_model(tmp_path / "bad.dkm", ModelFile(info=mf.info, arrays=arrays))
    with pytest.raises(ModelFileError, match="inconsistent shapes"):
        DefectClassifier.load(tmp_path / "bad.dkm")
    info = json.loads(json.dumps(mf.info))
    info["classifier"]["state"]["temperature"] = -1
    write_model(tmp_path / "bad2.dkm", ModelFile(info=info, arrays=mf.arrays))
    with pytest.raises(ModelFileError, match="temperature must be a number > 0"):
        DefectClassifier.load(tmp_path / "bad2.dkm")


# -- parts ---------------------------------------------------------------------------------
def test_pooled_features_shape_and_layers() -> None:
    assert classifier_layers("efficientnet-lite0") == ["blocks.14", "blocks.15"]
    pf = PooledFeatures(image_size=64, pooling=["mean", "max"])
    feats = pf([np.zeros((50, 70, 3), np.uint8), np.full((64, 64, 3), 200, np.uint8)])
    assert feats.shape == (2, (192 + 320) * 2) == (2, pf.dim)
    assert np.all(np.isfinite(feats))
    with pytest.raises(ConfigError, match="pooling"):
        PooledFeatures(pooling=["median"])


def test_augmentation_is_seeded_and_keeps_the_image_shape() -> None:
    rng = np.random.default_rng(0)
    img = make_surface("stone", (40, 60), rng)
    aug = Augmentation()
    a = aug(img, np.random.default_rng(5))
    b = aug(img, np.random.default_rng(5))
    c = aug(img, np.random.default_rng(6))
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    still = Augmentation(flips=False, max_rotation=0, brightness=0, contrast=0, noise=0)
    np.testing.assert_array_equal(still(img, rng), img)
    with pytest.raises(ConfigError, match="contrast < 1"):
        Augmentation(contrast=1.0)


def test_class_weights_balance_the_classes() -> None:
    y = np.array([0, 0, 0, 1])
    w = class_weights(y, 2, "balanced")
    np.testing.assert_allclose(w, [4 / 6, 2.0])
    np.testing.assert_allclose(w[0] * 3, w[1] * 1)  # equal total weight per class
    np.testing.assert_array_equal(class_weights(y, 2, None), [1, 1])


def test_class_weighting_helps_a_minority_class() -> None:
    rng = np.random.default_rng(0)
    # class 1 is rare and overlaps class 0: without weights it is mostly missed
    x = np.concatenate([rng.normal(0, 1, (200, 2)), rng.normal(1.2, 1, (10, 2))]).astype("f4")
    y = np.r_[np.zeros(200, int), np.ones(10, int)]
    recall = {}
    for mode in (None, "balanced"):
        head, _ = train_head(x, y, 2, class_weight=mode, max_epochs=60, lr=0.05)
        with torch.no_grad():
            pred = head(torch.from_numpy(x)).argmax(1).numpy()
        recall[mode] = float(np.mean(pred[y == 1] == 1))
    assert recall["balanced"] > recall[None]


def test_early_stopping_keeps_the_best_epoch() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (40, 50)).astype("f4")  # noise: the head can only overfit
    y = rng.integers(0, 2, 40)
    xv = rng.normal(0, 1, (40, 50)).astype("f4")
    yv = rng.integers(0, 2, 40)
    _, info = train_head(x, y, 2, x_val=xv, y_val=yv, l2=0, lr=0.05, max_epochs=200, patience=5)
    assert info.stopped_early and info.epochs == info.best_epoch + 5
    assert info.best_val_loss == pytest.approx(min(info.val_losses), abs=1e-6)


def test_temperature_recovers_an_overconfident_scale() -> None:
    rng = np.random.default_rng(0)
    n, c = 4000, 3
    true_logits = rng.normal(0, 1.5, (n, c))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in p])
    t = fit_temperature(true_logits * 3.0, y)  # a head 3x too confident
    assert t == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


def test_temperature_stays_finite_when_validation_has_no_errors() -> None:
    logits = np.array([[5.0, 0.0], [0.0, 5.0]] * 10)
    y = np.array([0, 1] * 10)
    t = fit_temperature(logits, y)
    p = np.exp(logits[0] / t) / np.exp(logits[0] / t).sum()
    # 20 correct answers: about 1 - 1/22 confident, not 1.0
    assert 0.9 < p[0] < 0.99


def test_classification_report() -> None:
    r = classification_report(["a", "a", "b", "c"], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert r["accuracy"] == 0.5
    assert r["confusion_matrix"] == {
        "labels": ["a", "b", "c"],
        "matrix": [[1, 1, 0], [0, 1, 0], [0, 1, 0]],
    }
    assert r["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert r["per_class"]["c"]["f1"] == 0.0
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)

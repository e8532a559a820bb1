"""Semi-supervised re-scoring from a few labelled defective images, alone and in a
Detector (fit, score, thresholds, model files)."""

from __future__ import annotations

import numpy as np
import pytest

from defectkit.data.synthetic import make_surface
from defectkit.decide.calibration import Threshold, threshold_for_false_alarm_rate
from defectkit.decide.rescore import EVIDENCE, DefectRescorer
from defectkit.detector import Detector
from defectkit.errors import ConfigError
from defectkit.metrics import image_auroc
from defectkit.model_file import read_model

SMALL = {"image_size": 64}


def _surfaces(kind: str, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_surface(kind, (64, 64), rng) for _ in range(n)]


@pytest.fixture(scope="module")
def informative() -> dict:
    """Anomaly scores that are pure noise, but 'defective' parts look different as a
    whole (fabric among stone): only the learned evidence can tell them apart."""
    rng = np.random.default_rng(0)
    return {
        "good": _surfaces("stone", 12, 1),
        "cal": _surfaces("stone", 10, 2),
        "cal_scores": rng.normal(10, 1, 10),
        "defects": _surfaces("fabric", 6, 3),
        "defect_scores": rng.normal(10, 1, 6),
        "new": _surfaces("stone", 5, 4) + _surfaces("fabric", 5, 5),
        "new_scores": rng.normal(10, 1, 10),
    }


def test_rescoring_is_used_when_it_beats_the_anomaly_score(informative: dict) -> None:
    d = informative
    r = DefectRescorer(**SMALL)
    fit = r.fit(d["good"], d["cal"], d["cal_scores"], d["defects"], d["defect_scores"])
    assert fit.used
    assert fit.cv_auroc > fit.anomaly_auroc
    assert fit.cv_auroc > 0.9
    assert fit.n_good == 10 and fit.n_defect == 6
    assert fit.good_oof.shape == (10,) and np.all(np.isfinite(fit.good_oof))
    new = r.rescore(d["new_scores"], d["new"])
    y = np.r_[np.zeros(5), np.ones(5)]
    assert image_auroc(y, d["new_scores"]) < 0.9 < image_auroc(y, new)
    e = r.evidence(d["new_scores"], d["new"])
    assert e.shape == (10, len(EVIDENCE))
    assert r.good_bank_.shape[0] == 12 and r.defect_bank_.shape[0] == 6


def test_the_good_reference_is_subsampled_by_coreset(informative: dict) -> None:
    d = informative
    r = DefectRescorer(**SMALL, max_goods=4)
    r.fit(d["good"], d["cal"], d["cal_scores"], d["defects"], d["defect_scores"])
    assert r.good_bank_.shape == (4, r.features.dim)


def test_rescored_values_keep_the_anomaly_score_range(informative: dict) -> None:
    d = informative
    r = DefectRescorer(**SMALL)
    fit = r.fit(d["good"], d["cal"], d["cal_scores"], d["defects"], d["defect_scores"])
    # out-of-fold values of held-out good images: same mean and spread as their scores
    assert fit.good_oof.mean() == pytest.approx(d["cal_scores"].mean(), abs=1e-6)
    assert fit.good_oof.std() == pytest.approx(d["cal_scores"].std(), rel=1e-6)


def test_learned_state_round_trip(informative: dict) -> None:
    d = informative
    r = DefectRescorer(**SMALL, seed=3)
    r.fit(d["good"], d["cal"], d["cal_scores"], d["defects"], d["defect_scores"])
    arrays, info = r.learned_state()
    assert r.get_params() == DefectRescorer(**SMALL, seed=3).get_params()  # fit kept them
    assert r.layers is None and info["layers"] == r.layers_
    back = DefectRescorer(**r.get_params())
    back.load_learned_state(arrays, info)
    assert back.get_params() == r.get_params() and back.layers_ == r.layers_
    np.testing.assert_allclose(
        back.rescore(d["new_scores"], d["new"]), r.rescore(d["new_scores"], d["new"])
    )
    assert info["fit"]["used"] is True


def test_not_used_when_the_anomaly_score_already_separates() -> None:
    rng = np.random.default_rng(1)
    r = DefectRescorer(**SMALL)
    fit = r.fit(
        _surfaces("stone", 8, 1),
        _surfaces("stone", 8, 2),
        rng.normal(10, 1, 8),
        _surfaces("stone", 4, 3),  # "defects" that look like good parts ...
        rng.normal(30, 1, 4),  # ... but the anomaly score already catches every one
    )
    assert fit.anomaly_auroc == 1.0
    assert not fit.used


def test_too_few_images_is_a_clear_error() -> None:
    good = _surfaces("stone", 4, 1)
    with pytest.raises(ConfigError, match="at least 5 held-out good images and 3 labelled"):
        DefectRescorer(**SMALL).fit(good, good[:4], np.zeros(4), good[:2], np.ones(2))
    with pytest.raises(ConfigError, match="regularisation"):
        DefectRescorer(regularisation=0).fit(good, good, np.zeros(4), good, np.ones(4))
    with pytest.raises(ConfigError, match="no setting"):
        DefectRescorer.check_params({"bogus": 1})


def test_settings_on_the_estimator_scheme() -> None:
    r = DefectRescorer(**SMALL)
    assert list(r.get_params()) == DefectRescorer.param_names()
    assert r.set_params(folds=3) is r and r.get_params()["folds"] == 3
    with pytest.raises(ConfigError, match=r"re-scorer has no setting\(s\) \['bogus'\]"):
        r.set_params(bogus=1)


# -- in a Detector --------------------------------------------------------------------
FAST = {"image_size": 96, "coreset_ratio": 0.1}


def test_without_defects_the_detector_is_the_unsupervised_one(surface_set: dict) -> None:
    plain = Detector.fit(
        surface_set["train"], "patchcore", FAST, calibration_fraction=0.25, few_shot_below=0
    )
    empty = Detector.fit(
        surface_set["train"], "patchcore", FAST, calibration_fraction=0.25, defect_images=[]
    )
    assert plain.rescorer is None and empty.rescorer is None
    assert "semi_supervised" not in empty.info
    assert empty.threshold.value == plain.threshold.value
    images = surface_set["good"] + surface_set["bad"]
    np.testing.assert_array_equal(empty.score(images).scores, plain.score(images).scores)


def test_semi_supervised_fit_needs_held_out_good_images(surface_set: dict) -> None:
    with pytest.raises(ConfigError, match="needs held-out good images"):
        Detector.fit(
            surface_set["train"],
            "patchcore",
            FAST,
            calibration_fraction=0.0,
            defect_images=surface_set["bad"],
        )


def test_semi_supervised_detector_end_to_end(
    surface_set: dict, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The synthetic defects are too easy for PatchCore for re-scoring to win; make
    # the fit keep it anyway to exercise the whole path.
    original = DefectRescorer.fit

    def keep(self, *args, **kwargs):
        found = original(self, *args, **kwargs)
        found.used = True
        return found

    monkeypatch.setattr(DefectRescorer, "fit", keep)
    train, bad = surface_set["train"], surface_set["bad"]
    det = Detector.fit(
        train,
        "patchcore",
        FAST,
        calibration_fraction=0.25,
        defect_images=bad[:4],
        rescore_params=SMALL,
        defect_paths=[f"d{i}.png" for i in range(4)],
    )
    plain = Detector.fit(train, "patchcore", FAST, calibration_fraction=0.25, few_shot_below=0)
    semi = det.info["semi_supervised"]
    assert semi["used"] and semi["n_good"] == 5 and semi["n_defect"] == 4
    assert len(semi["defect_images"]) == 4
    # the unsupervised threshold is kept, on the map's scale, to bound the regions
    assert det.rescorer.unsupervised_threshold_.value == plain.threshold.value
    assert det.map_threshold == plain.threshold.value
    assert det.region_threshold == min(det.pixel_threshold.value, plain.threshold.value)
    assert det.threshold.rule == "false-alarm-rate" and det.threshold.n_good == 5
    # scores: re-scored, the method's own kept as evidence; maps unchanged
    images = surface_set["good"] + bad[4:]
    res, raw = det.score(images), plain.score(images)
    np.testing.assert_allclose(
        [e["anomaly_score"] for e in res.extras], raw.scores, rtol=1e-5, atol=1e-5
    )
    for a, b in zip(res.maps, raw.maps, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(res.scores, raw.scores)
    # model file round trip
    path = det.save(tmp_path / "semi.dkm")
    back = Detector.load(path)
    assert back.rescorer is not None
    np.testing.assert_allclose(back.score(images).scores, res.scores, rtol=1e-5)
    assert back.region_threshold == det.region_threshold
    assert back.threshold.value == det.threshold.value
    # the file's own threshold stays the unsupervised one: a defectkit that knows no
    # re-scorer reads a coherent (unsupervised) model
    mf = read_model(path)
    assert mf.info["threshold"]["value"] == plain.threshold.value
    assert mf.info["rescorer"]["threshold"]["value"] == det.threshold.value
    # re-choosing the threshold without refitting keeps that layout
    back.threshold = Threshold(value=1.0, rule="manual")
    back.save_decision(path)
    again = Detector.load(path)
    assert again.threshold.value == 1.0
    assert again.map_threshold == plain.threshold.value
    assert read_model(path).info["threshold"]["value"] == plain.threshold.value
    described = back.describe()
    assert set(described["rescorer"]["evidence_weights"]) == set(EVIDENCE)
    # a threshold from the held-out good images' out-of-fold values
    assert (
        det.threshold.value
        == threshold_for_false_alarm_rate(np.sort(det.rescorer.fit_.good_oof), 0.01).value
    )

"""What the self-supervised ``synthetic`` method finds beyond the contract:
defects located in its maps, settings that act as documented, bad settings
and damaged model files refused."""

from __future__ import annotations

import numpy as np
import pytest

from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods import get_method
from defectkit.metrics import pixel_auroc

#: the head alone (no Gaussian prior), small and fast
SMALL = {"image_size": 96, "n_synthetic": 80, "epochs": 6, "hidden": 16, "prior_weight": 0.0}


@pytest.fixture(scope="module")
def fitted(surface_set: dict):
    stages: dict[str, tuple[int, int]] = {}

    def progress(stage: str, done: int, total: int) -> None:
        stages[stage] = (done, total)

    model = get_method("synthetic")(**SMALL).fit(surface_set["train"], progress=progress)
    return model, stages


def test_maps_locate_the_defects(fitted, surface_set: dict) -> None:
    model, _ = fitted
    res = model.score(surface_set["bad"])
    auc = pixel_auroc(surface_set["masks"], res.maps)
    assert auc >= 0.9, f"pixel AUROC {auc:.3f}"
    good = model.score(surface_set["good"])
    assert res.scores.min() > np.median(good.scores), (res.scores, good.scores)
    for amap in res.maps + good.maps:  # probabilities
        assert amap.min() >= 0.0 and amap.max() <= 1.0


def test_training_learns_and_reports_progress(fitted, surface_set: dict) -> None:
    model, stages = fitted
    assert stages["train head"] == (SMALL["epochs"], SMALL["epochs"])
    assert stages["synthetic defects"] == (SMALL["n_synthetic"], SMALL["n_synthetic"])
    assert stages["features (good)"] == (20, 20)
    # the trained head beats an untrained one (one short epoch) on the defect maps
    weak = get_method("synthetic")(**{**SMALL, "epochs": 1, "n_synthetic": 8})
    weak.fit(surface_set["train"])
    auc_weak = pixel_auroc(surface_set["masks"], weak.score(surface_set["bad"]).maps)
    auc = pixel_auroc(surface_set["masks"], model.score(surface_set["bad"]).maps)
    assert auc > auc_weak


def test_top_fraction_scores_a_mean_below_the_max(fitted, surface_set: dict) -> None:
    model, _ = fitted
    arrays, info = model.learned_state()
    top = get_method("synthetic")(**{**SMALL, "top_fraction": 0.05})
    top.load_learned_state(arrays, info)
    a, b = model.score(surface_set["bad"]), top.score(surface_set["bad"])
    for m1, m2 in zip(a.maps, b.maps, strict=True):
        np.testing.assert_array_equal(m1, m2)  # same maps, other summary
    assert np.all(b.scores < a.scores)
    expected = np.sort(a.maps[0].ravel())[-round(0.05 * a.maps[0].size) :].mean()
    assert b.scores[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"n_synthetic": 0}, "n_synthetic"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"image_size": 16}, "image_size"),
        ({"kinds": ["hole", "nope"]}, "kinds"),
        ({"kinds": []}, "kinds"),
        ({"top_fraction": 1.0}, "top_fraction"),
        ({"lr": 0}, "lr"),
        ({"max_defects": 0}, "max_defects"),
        ({"prior_weight": -1.0}, "prior_weight"),
        ({"prior_features": 0}, "prior_features"),
    ],
)
def test_bad_settings_fail_at_fit(params: dict, match: str, surface_set: dict) -> None:
    with pytest.raises(ConfigError, match=match):
        get_method("synthetic")(**{**SMALL, **params}).fit(surface_set["train"])


def test_only_some_kinds_still_trains(surface_set: dict) -> None:
    model = get_method("synthetic")(**{**SMALL, "kinds": ["hole"], "epochs": 3})
    res = model.fit(surface_set["train"]).score(surface_set["bad"][:1])
    assert np.isfinite(res.scores).all()


def test_damaged_state_is_refused(fitted) -> None:
    model, _ = fitted
    arrays, info = model.learned_state()
    get_method("synthetic")(**SMALL).load_learned_state(dict(arrays), dict(info))
    key = "head.reduce.weight"
    with pytest.raises(ModelFileError, match=r"reduce\.weight"):
        get_method("synthetic")(**SMALL).load_learned_state(
            {**arrays, key: arrays[key][:-1]}, dict(info)
        )
    nan = arrays[key].copy()
    nan.flat[0] = np.nan
    with pytest.raises(ModelFileError, match="NaN"):
        get_method("synthetic")(**SMALL).load_learned_state({**arrays, key: nan}, dict(info))
    with pytest.raises(ModelFileError, match="positive"):
        get_method("synthetic")(**SMALL).load_learned_state(
            {**arrays, "head.std": -arrays["head.std"]}, dict(info)
        )
    with pytest.raises(ModelFileError, match="unexpected"):
        get_method("synthetic")(**SMALL).load_learned_state(
            {**arrays, "head.extra": arrays[key]}, dict(info)
        )
    with pytest.raises(ModelFileError):  # a head of another width
        get_method("synthetic")(**{**SMALL, "hidden": 8}).load_learned_state(arrays, dict(info))


def test_gaussian_prior_adds_novelty_and_round_trips(surface_set: dict, tmp_path) -> None:
    from defectkit.detector import Detector

    params = {**SMALL, "prior_weight": 0.5, "prior_features": 24}
    model = get_method("synthetic")(**params).fit(surface_set["train"])
    assert model.prior_channels_.shape == (24,)
    images = surface_set["good"] + surface_set["bad"]
    res = model.score(images)
    arrays, info = model.learned_state()
    plain = get_method("synthetic")(**{**params, "prior_weight": 0.0})
    plain.load_learned_state(arrays, info)
    base = plain.score(images)
    # the prior only adds (distances are >= 0), and it alone separates these defects
    for m1, m2 in zip(res.maps, base.maps, strict=True):
        assert np.all(m1 >= m2 - 1e-6)
    novelty = [m1 - m2 for m1, m2 in zip(res.maps, base.maps, strict=True)]
    assert pixel_auroc(surface_set["masks"], novelty[6:]) >= 0.85
    Detector(model).save(tmp_path / "p.dkm")
    loaded = Detector.load(tmp_path / "p.dkm").model
    np.testing.assert_allclose(loaded.score(images).scores, res.scores, rtol=1e-6)
    # a model fitted without the prior cannot score with one
    no_prior = get_method("synthetic")(**SMALL)
    no_prior.load_learned_state(
        {k: v for k, v in arrays.items() if k.startswith("head.")}, dict(info)
    )
    no_prior.prior_weight = 0.5
    with pytest.raises(ConfigError, match="without a prior"):
        no_prior.score(images[:1])
    bad_channels = {**arrays, "prior.channels": arrays["prior.channels"] + 1000}
    with pytest.raises(ModelFileError, match="indices"):
        get_method("synthetic")(**params).load_learned_state(bad_channels, dict(info))

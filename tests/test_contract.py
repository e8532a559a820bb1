"""The estimator contract, run over every registered method."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from defectkit.detector import Detector
from defectkit.errors import ConfigError, ImageError
from defectkit.methods import AnomalyModel, available_methods, get_method

#: settings that keep each method fast on tiny images; {} when the defaults are fast
FAST: dict[str, dict] = {
    "patchcore": {"image_size": 96, "coreset_ratio": 0.1},
    "padim": {"image_size": 96, "context_size": 64},
    "kmeans": {"image_size": 96, "n_clusters": 32, "n_iter": 5},
    "threshold": {"size": 64},
    "edges": {"size": 64},
    "texture": {"size": 64, "patch": 8},
    "template": {"max_side": 96},
    "autoencoder": {"image_size": 64, "epochs": 2, "hidden": 32, "latent": 8},
    "vae": {"image_size": 64, "epochs": 2, "hidden": 32, "latent": 8},
    "ganomaly": {"image_size": 64, "epochs": 2, "hidden": 32, "latent": 8},
    "synthetic": {"image_size": 96, "n_synthetic": 40, "epochs": 4, "hidden": 16},
}
FAST["ensemble"] = {"member_params": {m: FAST[m] for m in ("patchcore", "padim")}}

METHODS = sorted(available_methods())


def make(name: str) -> AnomalyModel:
    return get_method(name)(**FAST.get(name, {}))


def test_registry_lists_patchcore_with_summary() -> None:
    methods = available_methods()
    assert "patchcore" in methods
    for name, cls in methods.items():
        assert cls.name == name
        assert cls.summary, f"{name} needs a one-line summary"


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'nope'.*patchcore"):
        get_method("nope")


@pytest.mark.parametrize("name", METHODS)
def test_constructor_only_stores_settings(name: str) -> None:
    model = make(name)
    assert not model.is_fitted
    params = model.get_params()
    assert get_method(name)(**params).get_params() == params
    with pytest.raises(ConfigError, match="no setting"):
        get_method(name).check_params({"not_a_setting": 1})


@pytest.mark.parametrize("name", METHODS)
def test_set_params_checks_names_and_returns_self(name: str) -> None:
    model = make(name)
    params = model.get_params()
    for key in params:  # every setting reads back what was set
        marker = object()
        assert model.set_params(**{key: marker}) is model
        assert model.get_params()[key] is marker
    assert model.set_params(**params).get_params() == params
    with pytest.raises(ConfigError, match=r"no setting\(s\) \['not_a_setting'\]"):
        model.set_params(**{next(iter(params)): None}, not_a_setting=1)
    assert model.get_params() == params  # nothing set when a name is refused


@pytest.mark.parametrize("name", METHODS)
def test_settings_survive_fit_and_the_model_file(name: str, surface_set: dict, tmp_path) -> None:
    """scikit-learn's ``check_dont_overwrite_parameters``: fitting, scoring and the
    learned state leave every constructor setting as given (what a method derives
    from them, such as default layers, lives in ``_`` attributes), and the model
    file rebuilds the same settings and scores."""
    model = make(name)
    given = copy.deepcopy(model.get_params())
    model.fit(surface_set["train"])
    assert model.get_params() == given
    images = surface_set["good"][:2] + surface_set["bad"][:2]
    scores = model.score(images).scores
    arrays, state = model.learned_state()
    assert model.get_params() == given
    fresh = get_method(name)(**copy.deepcopy(given))
    fresh.load_learned_state(arrays, copy.deepcopy(state))
    assert fresh.get_params() == given
    np.testing.assert_allclose(fresh.score(images).scores, scores, rtol=1e-6, atol=1e-7)
    assert fresh.get_params() == given
    Detector(model).save(tmp_path / "m.dkm")
    loaded = Detector.load(tmp_path / "m.dkm").model
    assert loaded.get_params() == given
    np.testing.assert_allclose(loaded.score(images).scores, scores, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", METHODS)
def test_fit_score_contract(name: str, surface_set: dict) -> None:
    model = make(name)
    with pytest.raises(ConfigError, match="not fitted"):
        model.score(surface_set["good"])
    assert model.fit(surface_set["train"]) is model
    assert model.is_fitted
    images = surface_set["good"] + surface_set["bad"]
    result = model.score(images)
    assert result.scores.shape == (len(images),)
    assert np.all(np.isfinite(result.scores))
    for img, amap in zip(images, result.maps, strict=True):
        assert amap.shape == img.shape[:2]
        assert np.all(np.isfinite(amap))
    good, bad = result.scores[:6], result.scores[6:]
    assert bad.mean() > good.mean(), "defective images must score higher on average"


@pytest.mark.parametrize("name", METHODS)
def test_maps_follow_each_input_size(name: str, surface_set: dict) -> None:
    model = make(name).fit(surface_set["train"])
    odd = [surface_set["good"][0][:80, :60], np.ascontiguousarray(surface_set["good"][1][:, :, 0])]
    result = model.score(odd)
    assert result.maps[0].shape == (80, 60)
    assert result.maps[1].shape == (96, 112)


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_and_save_load_round_trip(name: str, surface_set: dict, tmp_path) -> None:
    images = surface_set["good"] + surface_set["bad"]
    a = make(name).fit(surface_set["train"])
    b = make(name).fit(surface_set["train"])
    ra, rb = a.score(images), b.score(images)
    np.testing.assert_array_equal(ra.scores, rb.scores)
    det = Detector(a)
    det.save(tmp_path / "m.dkm")
    loaded = Detector.load(tmp_path / "m.dkm")
    assert type(loaded.model) is type(a)
    rl = loaded.model.score(images)
    np.testing.assert_allclose(rl.scores, ra.scores, rtol=1e-6, atol=1e-7)
    for m1, m2 in zip(ra.maps, rl.maps, strict=True):
        np.testing.assert_allclose(m1, m2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_bad_arrays_are_refused_with_the_index(name: str, surface_set: dict) -> None:
    model = make(name).fit(surface_set["train"])
    bad_nan = surface_set["good"][0].astype(np.float32) / 255
    bad_nan[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match=r"#1.*NaN"):
        model.score([surface_set["good"][0], bad_nan])
    with pytest.raises(ImageError, match="too small"):
        model.score([np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(ImageError, match="shape"):
        model.score([np.zeros((10, 10, 5), np.uint8)])


@pytest.mark.parametrize("name", METHODS)
def test_fit_and_score_take_images_read_from_files(
    name: str, surface_set: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """What ``fit`` gives a method above its image memory budget (an ImageFiles):
    every method learns the same from it as from the decoded images."""
    from defectkit.data.files import ImageFiles
    from defectkit.data.images import save_png

    folder = tmp_path_factory.mktemp(f"files-{name}")
    paths = []
    for i, img in enumerate(surface_set["train"]):
        paths.append(folder / f"{i:02d}.png")
        save_png(paths[-1], img)
    test = surface_set["good"][:2] + surface_set["bad"][:2]
    from_arrays = make(name).fit(surface_set["train"]).score(test)
    from_files = make(name).fit(ImageFiles(paths)).score(ImageFiles(paths[:3]))
    again = make(name).fit(ImageFiles(paths)).score(test)
    assert from_files.scores.shape == (3,)
    np.testing.assert_allclose(again.scores, from_arrays.scores, rtol=1e-5, atol=1e-6)

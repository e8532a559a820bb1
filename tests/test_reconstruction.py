"""Behaviour of the reconstruction methods (autoencoder, vae, ganomaly) and
their shared parts, on the small synthetic surface set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods import get_method
from defectkit.methods.parts.reconstruction import smooth, ssim_map, top_mean

RECON = ("autoencoder", "vae", "ganomaly")
TINY = {"image_size": 64, "epochs": 2, "hidden": 32, "latent": 8}


def fitted(name: str, surface_set: dict, **extra):
    return get_method(name)(**{**TINY, **extra}).fit(surface_set["train"])


def pixel_auroc(maps: list[np.ndarray], masks: list[np.ndarray]) -> float:
    truth = np.concatenate([m.ravel() > 0 for m in masks])
    return float(roc_auc_score(truth, np.concatenate([m.ravel() for m in maps])))


@pytest.mark.parametrize("name", RECON)
def test_feature_space_maps_locate_defects(name: str, surface_set: dict) -> None:
    model = fitted(name, surface_set)
    result = model.score(surface_set["good"] + surface_set["bad"])
    assert pixel_auroc(result.maps[6:], surface_set["masks"]) > 0.9
    assert result.scores[6:].min() > np.median(result.scores[:6])


@pytest.mark.parametrize("name", ["autoencoder", "ganomaly"])
def test_pixel_space_maps_locate_defects(name: str, surface_set: dict) -> None:
    model = fitted(name, surface_set, space="pixels", ssim_weight=0.5)
    result = model.score(surface_set["bad"])
    assert pixel_auroc(result.maps, surface_set["masks"]) > 0.7


@pytest.mark.parametrize("name", RECON)
def test_seed_sets_the_model_and_leaves_global_rng_alone(name: str, surface_set: dict) -> None:
    images = surface_set["good"][:2] + surface_set["bad"][:2]
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = fitted(name, surface_set, seed=1).score(images).scores
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected_next.numpy())
    b = fitted(name, surface_set, seed=1).score(images).scores
    c = fitted(name, surface_set, seed=2).score(images).scores
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_ganomaly_score_is_the_latent_distance(surface_set: dict) -> None:
    model = fitted("ganomaly", surface_set, normalise=False, sigma=0.0)
    assert "norm.code_scale" not in model.learned_state()[0]
    images = surface_set["bad"][:2]
    result = model.score(images)
    gen = model._nets["generator"]
    inp = model._inputs()
    with torch.no_grad():
        x = inp.standardise(next(inp.raw_batches(images, None, "t"))[1])
        _, z, z_hat = gen(x)
    latent = ((z - z_hat) ** 2).mean(1).amax(dim=(1, 2)).numpy()
    np.testing.assert_allclose(result.scores, latent, rtol=1e-5)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"space": "voxels"}, "space"),
        ({"image_size": 16}, "image_size"),
        ({"space": "pixels", "image_size": 72}, "multiple of 16"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"kernel": 2}, "kernel"),
        ({"latent": 0}, "latent"),
        ({"ssim_weight": -1.0}, "ssim_weight"),
        ({"ssim_window": 4}, "ssim_window"),
        ({"top_fraction": 1.5}, "top_fraction"),
        ({"train_crop": -1}, "train_crop"),
    ],
)
@pytest.mark.parametrize("name", RECON)
def test_bad_settings_raise_before_work(name: str, settings: dict, match: str) -> None:
    model = get_method(name)(**settings)
    with pytest.raises(ConfigError, match=match):
        model.fit([np.zeros((32, 32, 3), np.uint8)] * 2)


def test_method_specific_bad_settings() -> None:
    images = [np.zeros((32, 32, 3), np.uint8)] * 2
    with pytest.raises(ConfigError, match="beta"):
        get_method("vae")(beta=-0.1).fit(images)
    with pytest.raises(ConfigError, match="w_con"):
        get_method("ganomaly")(w_con=0.0, w_enc=0.0).fit(images)


def test_progress_reports_features_and_every_epoch(surface_set: dict) -> None:
    seen: list[tuple[str, int, int]] = []
    threads = torch.get_num_threads()
    get_method("autoencoder")(**{**TINY, "epochs": 3}).fit(
        surface_set["train"], progress=lambda s, d, t: seen.append((s, d, t))
    )
    assert torch.get_num_threads() == threads  # training runs on one thread, then restores
    assert [e for e in seen if e[0] == "train"] == [("train", i, 3) for i in (1, 2, 3)]
    assert ("features", 20, 20) in seen


@pytest.mark.parametrize("name", RECON)
def test_tampered_weights_are_refused(name: str, surface_set: dict) -> None:
    model = fitted(name, surface_set)
    arrays, info = model.learned_state()
    key = next(k for k in arrays if k.endswith("weight"))
    broken = dict(arrays)
    broken[key] = np.full_like(arrays[key], np.nan)
    fresh = get_method(name)(**TINY)
    with pytest.raises(ModelFileError, match="NaN"):
        fresh.load_learned_state(broken, info)
    missing = {k: v for k, v in arrays.items() if k != key}
    with pytest.raises(ModelFileError, match="missing"):
        fresh.load_learned_state(missing, info)
    with pytest.raises(ModelFileError, match="missing or not of shape"):
        get_method(name)(**{**TINY, "hidden": 16}).load_learned_state(arrays, info)


def test_ssim_and_score_helpers() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((1, 3, 16, 16)).astype(np.float32))
    assert torch.allclose(ssim_map(x, x), torch.ones(1, 16, 16), atol=1e-5)
    assert float(ssim_map(x, 1 - x).mean()) < 0.5
    grid = np.zeros((10, 10), np.float32)
    grid[2, 3] = 10.0
    assert top_mean(grid, 0.0) == 10.0  # at least one value
    assert top_mean(grid, 0.02) == pytest.approx(5.0)
    assert smooth(grid, 1.0).max() < 10.0

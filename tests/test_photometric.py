"""Photometric normalisation: each image standardised to one brightness and
contrast before the backbone, so lighting changes do not move PatchCore's
scores, while a model file written before it existed keeps scoring without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectkit.errors import ConfigError
from defectkit.methods.base import AnomalyModel
from defectkit.methods.padim import PaDiM
from defectkit.methods.parts.photometric import TARGET_MEAN, TARGET_STD, standardise
from defectkit.methods.parts.resize import to_tensor
from defectkit.methods.patchcore import PatchCore

# one scale and the peak as it is (no reference pool): isolates the photometric step.
# The pool reads a relit image's whole-image distance against the training images
# it resembles, so without the step its score moves less (2.0% against 2.5% here)
FAST = {"image_size": 96, "coreset_ratio": 0.1, "context_size": 0, "reference_k": 0}
SMALL: dict[type[AnomalyModel], dict[str, object]] = {
    PatchCore: FAST,
    PaDiM: {"image_size": 96, "context_size": 64},
}


def test_standardise_sets_mean_and_spread_per_image() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.stack([torch.rand(3, 20, 30, generator=gen) * s + o for s, o in [(1, 0), (0.2, 0.5)]])
    y = standardise(x)
    for img in y:
        assert float(img.mean()) == pytest.approx(TARGET_MEAN, abs=1e-5)
        assert float(img.std(correction=0)) == pytest.approx(TARGET_STD, abs=1e-5)
    # a brighter, lower-contrast copy of an image gives the same input to the network
    torch.testing.assert_close(standardise(x[:1] * 0.4 + 0.3), y[:1], atol=1e-5, rtol=1e-5)


def test_standardise_leaves_a_flat_image_flat() -> None:
    y = standardise(torch.full((1, 3, 8, 8), 0.9))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.full_like(y, TARGET_MEAN), atol=1e-4, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_to_tensor_standardises_like_the_tensor_function(channels: int) -> None:
    rng = np.random.default_rng(channels)
    img = rng.integers(20, 200, (40, 50, 3)).astype(np.uint8)
    if channels == 1:
        img[..., 1] = img[..., 2] = img[..., 0]
    got = to_tensor(img, (40, 50), "standardise")
    torch.testing.assert_close(got, standardise(to_tensor(img, (40, 50))), atol=1e-5, rtol=1e-5)
    plain = to_tensor(img, (40, 50))
    assert float(plain.max()) <= 1.0 and float(plain.min()) >= 0.0
    torch.testing.assert_close(plain * 255.0, torch.from_numpy(img).permute(2, 0, 1)[None].float())


def _relight(img: np.ndarray, gain: float, offset: float) -> np.ndarray:
    return np.clip(img.astype(np.float32) * gain + offset, 0, 255).round().astype(np.uint8)


def test_patchcore_scores_ignore_lighting_but_not_defects(
    surface_set: dict[str, list[np.ndarray]],
) -> None:
    train, good, bad = surface_set["train"], surface_set["good"], surface_set["bad"]
    lit = [_relight(im, 0.7, 40) for im in good]
    on = PatchCore(**FAST).fit(train)
    off = PatchCore(**FAST, photometric="none").fit(train)
    s_on, s_lit_on = on.score(good).scores, on.score(lit).scores
    s_off, s_lit_off = off.score(good).scores, off.score(lit).scores
    # relit good parts: scores barely move with normalisation, and move far more without
    change_on = np.abs(s_lit_on - s_on) / s_on
    change_off = np.abs(s_lit_off - s_off) / s_off
    assert change_on.max() < 0.1
    assert change_off.mean() > 2 * change_on.mean()
    # defects still stand out: every defective image above every relit good one
    assert on.score(bad).scores.min() > s_lit_on.max()


@pytest.mark.parametrize("method", [PatchCore, PaDiM])
def test_old_model_files_score_without_normalisation(
    surface_set: dict[str, list[np.ndarray]], method: type[AnomalyModel]
) -> None:
    """A file from before the setting existed: fitted without normalisation, and its
    settings and learned info have no ``photometric`` key."""
    fitted = method(**SMALL[method], photometric="none").fit(surface_set["train"])
    arrays, info = fitted.learned_state()
    assert info["photometric"] == "none"
    old_info = {k: v for k, v in info.items() if k != "photometric"}
    loaded = method(**SMALL[method])  # the constructor's default is "standardise"
    loaded.load_learned_state(arrays, old_info)
    assert loaded.photometric_ == "none"  # the mode it was fitted with, from the file
    assert loaded.get_params()["photometric"] == "standardise"  # settings stay as given
    assert loaded.learned_state()[1]["photometric"] == "none"  # and it is saved that way again
    images = surface_set["good"] + surface_set["bad"]
    np.testing.assert_allclose(loaded.score(images).scores, fitted.score(images).scores, rtol=1e-5)
    # had it been read as "standardise", the scores would differ
    loaded.photometric_ = "standardise"
    assert not np.allclose(loaded.score(images).scores, fitted.score(images).scores, rtol=1e-3)


@pytest.mark.parametrize("method", [PatchCore, PaDiM])
def test_unknown_photometric_is_refused(method: type[AnomalyModel]) -> None:
    with pytest.raises(ConfigError, match="photometric"):
        method(photometric="histogram").fit([np.zeros((64, 64, 3), np.uint8)] * 3)

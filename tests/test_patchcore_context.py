"""PatchCore's context scale: a second bank at a smaller input size that decides
the image score and joins the map; old files without it load as single-scale."""

from __future__ import annotations

import numpy as np
import pytest

from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods.patchcore import PatchCore

SMALL = {"image_size": 96, "context_size": 64, "coreset_ratio": 0.1, "context_coreset_ratio": 0.2}


@pytest.fixture(scope="module")
def two_scale(surface_set: dict[str, list[np.ndarray]]) -> PatchCore:
    return PatchCore(**SMALL).fit(surface_set["train"])


def test_context_bank_and_blended_maps(
    two_scale: PatchCore, surface_set: dict[str, list[np.ndarray]]
) -> None:
    assert two_scale.context_bank_ is not None
    assert two_scale.context_layers is None  # the setting stays as given ...
    assert two_scale.context_layers_ and len(two_scale.context_layers_) == 3  # ... resolved
    images = surface_set["good"] + surface_set["bad"]
    res = two_scale.score(images)
    fine, context, _, _ = two_scale._raw_maps(images)
    fl, fs, cl, cs = (float(v) for v in two_scale.map_refs_)
    for amap, f, c in zip(res.maps, fine, context, strict=True):
        expected = 0.7 * (cl + cs * (f - fl) / fs) + 0.3 * c
        np.testing.assert_allclose(amap, expected, rtol=1e-5, atol=1e-5)
    # the image score: context peak plus whole-image evidence, never below the map's peak
    peaks = np.array([m.max() for m in res.maps])
    context_peaks = np.array([c.max() for c in context])
    assert np.all(res.scores >= peaks - 1e-6) and np.all(res.scores >= context_peaks - 1e-6)
    # defects still rank above good parts
    n = len(surface_set["good"])
    assert res.scores[n:].min() > res.scores[:n].max()


def test_context_weight_zero_keeps_the_fine_map_shape(
    surface_set: dict[str, list[np.ndarray]],
) -> None:
    model = PatchCore(**SMALL, context_map_weight=0.0).fit(surface_set["train"])
    img = surface_set["bad"][:1]
    fine, _, _, _ = model._raw_maps(img)
    fl, fs, cl, cs = (float(v) for v in model.map_refs_)
    np.testing.assert_allclose(model.score(img).maps[0], cl + cs * (fine[0] - fl) / fs, rtol=1e-5)


def test_save_load_round_trip(
    two_scale: PatchCore, surface_set: dict[str, list[np.ndarray]]
) -> None:
    arrays, info = two_scale.learned_state()
    assert "context_bank" in arrays and info["context_size"] == 64
    loaded = PatchCore(**SMALL)
    loaded.load_learned_state(arrays, info)
    images = surface_set["bad"]
    np.testing.assert_allclose(loaded.score(images).scores, two_scale.score(images).scores)
    broken = {k: v for k, v in arrays.items() if k != "context_bank"}
    with pytest.raises(ModelFileError, match="context_bank"):
        PatchCore(**SMALL).load_learned_state(broken, info)
    # settings that disagree with the file are refused, not rewritten to match it
    with pytest.raises(ModelFileError, match="fitted with context_size 64, the settings say 0"):
        PatchCore(**{**SMALL, "context_size": 0}).load_learned_state(arrays, info)


def test_files_from_before_the_context_scale_load_single_scale(
    surface_set: dict[str, list[np.ndarray]],
) -> None:
    single = PatchCore(**{**SMALL, "context_size": 0}).fit(surface_set["train"])
    arrays, info = single.learned_state()
    old_arrays = {k: v for k, v in arrays.items() if k != "map_refs"}
    old_info = {k: v for k, v in info.items() if k not in ("context_size", "context_layers")}
    loaded = PatchCore(**{k: v for k, v in SMALL.items() if k != "context_size"})
    loaded.load_learned_state(old_arrays, old_info)
    assert loaded.context_size == 0 and loaded.get_params()["context_size"] == 0
    images = surface_set["good"] + surface_set["bad"]
    np.testing.assert_allclose(loaded.score(images).scores, single.score(images).scores)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"context_size": 16}, "context_size must be 0"),
        ({"context_map_weight": 1.5}, "context_map_weight"),
        ({"context_coreset_ratio": 0}, "context_coreset_ratio"),
        ({"context_neighbourhood": 4}, "context_neighbourhood must be an odd"),
    ],
)
def test_bad_context_settings_are_refused(setting: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PatchCore(**setting).fit([np.zeros((64, 64, 3), np.uint8)] * 3)


def test_constant_descriptor_entries_do_not_amplify_rounding(
    surface_set: dict[str, list[np.ndarray]],
) -> None:
    # squashed to 64 px square, the context scale's deepest maps give constant entries
    two_scale = PatchCore(**SMALL, keep_aspect=False).fit(surface_set["train"])
    std = two_scale.global_std_
    raw = two_scale.global_bank_ * std + two_scale.global_mean_  # the training descriptors
    constant = raw.std(0) < 1e-4 * np.median(raw.std(0))
    assert constant.any()  # this size has them: the case the floor is for
    assert std.min() >= 0.01 * np.median(std) * (1 - 1e-6)
    # a file written before the floor (spread + 1e-6) loads re-standardised
    arrays, info = two_scale.learned_state()
    old_std = (raw.std(0) + 1e-6).astype(np.float32)
    old = {
        **arrays,
        "global_std": old_std,
        "global_bank": ((raw - two_scale.global_mean_) / old_std).astype(np.float32),
    }
    loaded = PatchCore(**SMALL, keep_aspect=False)
    loaded.load_learned_state(old, info)
    np.testing.assert_allclose(loaded.global_std_, std, rtol=1e-5)
    np.testing.assert_allclose(loaded.global_bank_, two_scale.global_bank_, rtol=1e-3, atol=1e-3)
    images = surface_set["bad"]
    np.testing.assert_allclose(
        loaded.score(images).scores, two_scale.score(images).scores, rtol=1e-4
    )
    # rounding-sized changes to a descriptor move the whole-image distance by rounding only
    d = (raw[:1] - two_scale.global_mean_) / std
    nudged = (raw[:1] + 1e-7 * constant - two_scale.global_mean_) / std
    assert float(np.abs(d - nudged).max()) < 1e-3

"""What the classical methods, PaDiM and k-means actually find, beyond the
contract: defects located in the map, settings that change behaviour as
documented, and learned state that is checked when loaded."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods import get_method
from defectkit.methods.texture import lbp_codes
from defectkit.metrics import pixel_auroc

#: small, fast settings (tiny images); maps must still locate the defects
SETTINGS = {
    "threshold": {"size": 64},
    "edges": {"size": 96},
    "texture": {"size": 96, "patch": 8},
    "padim": {"image_size": 96, "context_size": 64},
    "kmeans": {"image_size": 96, "n_clusters": 32, "n_iter": 5},
}
#: lowest pixel AUROC accepted on the defective images of ``surface_set``
MIN_PIXEL_AUROC = {"threshold": 0.8, "edges": 0.75, "texture": 0.8, "padim": 0.9, "kmeans": 0.9}


@pytest.fixture(scope="module")
def fitted(surface_set: dict) -> dict:
    return {n: get_method(n)(**s).fit(surface_set["train"]) for n, s in SETTINGS.items()}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_maps_locate_the_defects(name: str, fitted: dict, surface_set: dict) -> None:
    res = fitted[name].score(surface_set["bad"])
    auc = pixel_auroc(surface_set["masks"], res.maps)
    assert auc >= MIN_PIXEL_AUROC[name], f"{name}: pixel AUROC {auc:.3f}"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_truncated_or_poisoned_state_is_refused(name: str, fitted: dict) -> None:
    model = fitted[name]
    arrays, info = model.learned_state()
    fresh = get_method(name)(**SETTINGS[name])
    fresh.load_learned_state(dict(arrays), dict(info))  # the real thing loads
    key = max(arrays, key=lambda k: arrays[k].size)  # the main array
    cut = {**arrays, key: arrays[key][..., :-1]}
    with pytest.raises(ModelFileError):
        get_method(name)(**SETTINGS[name]).load_learned_state(cut, dict(info))
    if arrays[key].dtype.kind == "f":
        bad = arrays[key].copy()
        bad.flat[0] = np.nan
        with pytest.raises(ModelFileError):
            get_method(name)(**SETTINGS[name]).load_learned_state({**arrays, key: bad}, info)
    missing = {k: v for k, v in arrays.items() if k != key}
    with pytest.raises(ModelFileError):
        get_method(name)(**SETTINGS[name]).load_learned_state(missing, dict(info))


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("threshold", {"reference": "median"}, "reference"),
        ("threshold", {"polarity": "up"}, "polarity"),
        ("edges", {"detector": "laplace"}, "detector"),
        ("texture", {"patch": 7}, "patch"),
        ("padim", {"neighbourhood": 4}, "neighbourhood"),
        ("kmeans", {"n_clusters": 0}, "n_clusters"),
    ],
)
def test_bad_settings_fail_at_fit(name: str, params: dict, match: str, surface_set: dict) -> None:
    with pytest.raises(ConfigError, match=match):
        get_method(name)(**params).fit(surface_set["train"][:3])


# -- threshold --------------------------------------------------------------------
def _flat_parts(n: int, seed: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = 120 + rng.normal(0, 3, (size, size)) + rng.uniform(-10, 10)  # brightness varies
        out.append(np.repeat(np.clip(g, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2))
    return out


def test_threshold_polarity_keeps_the_requested_side() -> None:
    train = _flat_parts(20, 0)
    dark, bright = _flat_parts(2, 1)
    cv2.circle(dark, (20, 30), 4, (60, 60, 60), -1)
    cv2.circle(bright, (40, 20), 4, (200, 200, 200), -1)
    both = get_method("threshold")(size=64).fit(train)
    only_dark = get_method("threshold")(size=64, polarity="dark").fit(train)
    s_both = both.score([dark, bright]).scores
    s_dark = only_dark.score([dark, bright]).scores
    assert min(s_both) > 5
    assert s_dark[0] > 5 and s_dark[1] < 0.5 * s_dark[0]
    y, x = np.unravel_index(int(np.argmax(both.score([dark]).maps[0])), (64, 64))
    assert abs(y - 30) <= 3 and abs(x - 20) <= 3
    assert both.score([dark]).extras[0]["defect_area_pct"] > 0


def test_threshold_otsu_reference_on_a_two_level_part() -> None:
    """Dark pads on a bright board: a mid-grey blob is far from both classes."""
    parts = []
    for img in _flat_parts(12, 2):
        img[:, :32] //= 3
        parts.append(img)
    test = parts[-1].copy()
    cv2.circle(test, (48, 32), 5, (80, 80, 80), -1)
    model = get_method("threshold")(
        size=64, reference="otsu", background="median", presmooth=0
    ).fit(parts[:-1])
    assert model.centre_.shape == (2,) and model.centre_[0] < model.centre_[1]
    scores = model.score([parts[-1], test]).scores
    assert scores[1] > 3 * scores[0]


# -- edges ------------------------------------------------------------------------
@pytest.mark.parametrize("detector", ["sobel", "canny"])
def test_edges_find_a_scratch_on_a_smooth_part(detector: str) -> None:
    train = _flat_parts(16, 4, size=96)
    for img in train:  # a printed frame: edges that good parts have
        cv2.rectangle(img, (10, 10), (85, 40), (60, 60, 60), 2)
    test = train[0].copy()
    cv2.line(test, (20, 70), (70, 60), (40, 40, 40), 2)
    model = get_method("edges")(size=96, detector=detector).fit(train[1:])
    res = model.score([train[0], test])
    assert res.scores[1] > 2 * res.scores[0]
    y, x = np.unravel_index(int(np.argmax(res.maps[1])), (96, 96))
    assert 15 <= x <= 75 and 55 <= y <= 75


# -- texture ----------------------------------------------------------------------
def test_lbp_codes_of_known_patterns() -> None:
    flat = np.full((5, 5), 7.0, np.float32)
    assert np.all(lbp_codes(flat) == 8)  # every neighbour >= centre
    peak = flat.copy()
    peak[2, 2] = 9.0
    assert lbp_codes(peak)[2, 2] == 0  # no neighbour >= a peak
    edge = np.zeros((5, 5), np.float32)
    edge[:, 3:] = 1.0
    assert lbp_codes(edge)[2, 2] == 8  # centre on the dark side: all neighbours >= it
    assert lbp_codes(edge)[2, 3] == 5  # on the bright side: 3 right-hand + 2 same-level


def test_texture_global_model_finds_foreign_texture_anywhere(surface_set: dict) -> None:
    from defectkit.data.synthetic import make_surface

    rng = np.random.default_rng(5)
    model = get_method("texture")(size=96, patch=8, model="global").fit(surface_set["train"])
    assert model.mean_.shape == (1, model.n_features)
    test = surface_set["good"][0].copy()
    patch = make_surface("fabric", (32, 32), rng)
    test[40:72, 50:82] = patch
    res = model.score([surface_set["good"][0], test])
    assert res.scores[1] > res.scores[0]
    y, x = np.unravel_index(int(np.argmax(res.maps[1])), res.maps[1].shape)
    assert 32 <= y <= 80 and 42 <= x <= 90


# -- PaDiM and k-means ---------------------------------------------------------------
def test_padim_channel_subset_and_single_scale(surface_set: dict, tmp_path) -> None:
    from defectkit.detector import Detector

    sub = get_method("padim")(image_size=96, context_size=0, n_features=20, seed=3)
    sub.fit(surface_set["train"])
    assert list(sub.means_) == ["fine"]
    chans = sub.channels_["fine"]
    assert len(chans) == 20 and np.all(np.diff(chans) > 0)
    assert sub.precisions_["fine"].shape[1:] == (20, 20)
    other = get_method("padim")(image_size=96, context_size=0, n_features=20, seed=4)
    assert not np.array_equal(other.fit(surface_set["train"][:4]).channels_["fine"], chans)
    Detector(sub).save(tmp_path / "p.dkm")
    back = Detector.load(tmp_path / "p.dkm").model
    np.testing.assert_array_equal(back.channels_["fine"], chans)
    # a model saved with a context scale does not load into settings without one
    two = get_method("padim")(image_size=96, context_size=64).fit(surface_set["train"][:4])
    arrays, info = two.learned_state()
    with pytest.raises(ModelFileError, match="scales"):
        get_method("padim")(image_size=96, context_size=0).load_learned_state(arrays, info)


def test_padim_refuses_channel_indices_beyond_the_backbone(fitted: dict, surface_set) -> None:
    arrays, info = fitted["padim"].learned_state()
    chans = arrays["fine.channels"].copy()
    chans[-1] = 10_000
    model = get_method("padim")(**SETTINGS["padim"])
    model.load_learned_state({**arrays, "fine.channels": chans}, info)
    with pytest.raises(ModelFileError, match="channel"):
        model.score(surface_set["good"][:1])


def test_kmeans_uses_fewer_clusters_when_there_are_few_patches(surface_set: dict) -> None:
    model = get_method("kmeans")(image_size=96, n_clusters=10_000, n_iter=2)
    model.fit(surface_set["train"][:2])
    n_patches = 2 * 12 * 12
    assert len(model.centres_) == n_patches // 32
    assert model.cluster_sizes_.sum() == n_patches


_FIT_AFTER_THREAD_CHANGE = """
import sys
import numpy as np, torch
from defectkit.data.synthetic import make_surface
from defectkit.methods import get_method
rng = np.random.default_rng(123)
train = [make_surface("brushed_metal", (96, 112), rng) for _ in range(20)]
torch.set_num_threads(1)
torch.set_num_threads(2)
get_method(sys.argv[1])(image_size=96, context_size=64).fit(train)
print("fitted")
"""


def test_padim_fit_survives_thread_count_changes() -> None:
    """After torch.set_num_threads() (the service and the test suite call it),
    torch.linalg.inv on the batched covariances ran MKL's LU nested in torch's
    OpenMP loop and hung for ever (torch 2.13 CPU). A fresh interpreter with a
    time limit turns a regression into a failure instead of a stuck CI run."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _FIT_AFTER_THREAD_CHANGE, "padim"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "fitted"
    assert "MKL ERROR" not in done.stderr

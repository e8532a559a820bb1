"""PatchCore's reference pool: an image's patch score is read against the
leave-one-out peaks of the training images most like it, so good parts of a
rougher kind (a second fabric, a coarser finish) do not outrank defects on a
smoother kind."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from defectkit.detector import Detector
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods import patchcore
from defectkit.methods.patchcore import PatchCore
from defectkit.metrics.image import image_auroc

# photometric "none": the two kinds differ in contrast, which standardisation removes
FAST = {"image_size": 64, "coreset_ratio": 0.1, "photometric": "none"}


def _surface(rough: bool, rng: np.random.Generator) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.normal(0, 1, (64, 64)).astype(np.float32), (0, 0), 1.5)
    grey = 128 + (60 if rough else 12) * noise / noise.std()
    return np.clip(np.repeat(grey[..., None], 3, 2), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def two_kinds() -> dict[str, list[np.ndarray]]:
    """30 training images, smooth and rough in turn; new smooth and rough good
    images; smooth images with a bright spot."""
    rng = np.random.default_rng(0)
    train = [_surface(i % 2 == 1, rng) for i in range(30)]
    smooth = [_surface(False, rng) for _ in range(6)]
    rough = [_surface(True, rng) for _ in range(6)]
    bad = []
    for _ in range(6):
        im = _surface(False, rng)
        cv2.circle(im, (32, 32), 5, (230, 230, 230), -1)
        bad.append(im)
    return {"train": train, "smooth": smooth, "rough": rough, "bad": bad}


def test_the_pool_ranks_defects_on_the_smooth_kind_above_rough_good_parts(
    two_kinds: dict[str, list[np.ndarray]],
) -> None:
    images = two_kinds["smooth"] + two_kinds["rough"] + two_kinds["bad"]
    labels = [0] * 12 + [1] * 6
    with_pool = PatchCore(**FAST).fit(two_kinds["train"])
    without = PatchCore(**FAST, reference_k=0).fit(two_kinds["train"])
    got, before = with_pool.score(images), without.score(images)
    factors = np.array([e["reference_factor"] for e in got.extras])
    # the smooth kind's peaks are read up, the rough kind's down
    assert factors[:6].min() > 1.0 > factors[6:12].max()
    assert image_auroc(labels, got.scores) >= 0.9
    assert image_auroc(labels, got.scores) > image_auroc(labels, before.scores) + 0.2
    assert all("reference_factor" not in e for e in before.extras)
    # the pool changes image scores only: maps are the same
    for a, b in zip(got.maps, before.maps, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_pool_peaks_are_left_out_scores(two_kinds: dict[str, list[np.ndarray]]) -> None:
    train = two_kinds["train"]
    model = PatchCore(**FAST).fit(train)
    assert len(model.ref_peaks_) == len(train) == len(model.ref_images_)
    left = model.score_left_out(train, [(i, train[i]) for i in range(3)])
    as_fitted = model.score(train[:3])
    # left out, an image no longer finds its own patches: its peak rises
    for i in range(3):
        assert model.ref_peaks_[i] > as_fitted.maps[i].max()
        # the same search, one image at a time, gives the stored peak (exact
        # search left out against the pool's HNSW-or-exact search with own patches
        # removed: close, not equal)
        assert model.ref_peaks_[i] == pytest.approx(left.maps[i].max(), rel=0.05)


def test_pool_is_capped_and_skipped_for_a_handful_of_images(
    two_kinds: dict[str, list[np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(patchcore, "_REF_POOL", 10)
    capped = PatchCore(**FAST).fit(two_kinds["train"])
    assert capped.ref_images_.tolist() == np.linspace(0, 29, 10).round().astype(int).tolist()
    few = PatchCore(**FAST).fit(two_kinds["train"][: 3 * 5 - 1])  # 3 images per neighbour
    assert len(few.ref_peaks_) == 0
    assert len(PatchCore(**FAST).fit(two_kinds["train"][:15]).ref_peaks_) == 10  # on, capped
    assert len(PatchCore(**FAST, reference_k=2).fit(two_kinds["train"][:6]).ref_peaks_) == 6
    res = few.score(two_kinds["bad"][:2])
    assert all("reference_factor" not in e for e in res.extras)
    # without a pool the image score is never below its map's peak
    assert all(s >= m.max() for s, m in zip(res.scores, res.maps, strict=True))


def test_left_out_scoring_leaves_the_image_out_of_the_pool(
    two_kinds: dict[str, list[np.ndarray]],
) -> None:
    train = two_kinds["train"]
    model = PatchCore(**FAST).fit(train)
    peaks = model.ref_peaks_.copy()
    got = model.score_left_out(train, [(0, train[0])])
    # what the pool gives once image 0 and its peak are gone from it
    keep = model.ref_images_ != 0
    g = model._descriptor(model._embed_batches([train[0]], None, "t")[0]) - model.global_mean_
    g = g / model.global_std_
    d = np.linalg.norm(model.ref_bank_[keep] - g, axis=1)
    near = np.argsort(d)[: model.reference_k]
    want = np.median(peaks[keep]) / np.median(peaks[keep][near])
    assert got.extras[0]["reference_factor"] == pytest.approx(want, rel=1e-3)
    np.testing.assert_array_equal(model.ref_peaks_, peaks)  # restored afterwards


def test_the_pool_travels_in_the_model_file_and_old_files_go_without(
    two_kinds: dict[str, list[np.ndarray]], tmp_path
) -> None:
    model = PatchCore(**FAST).fit(two_kinds["train"])
    Detector(model).save(tmp_path / "m.dkm")
    loaded = Detector.load(tmp_path / "m.dkm").model
    images = two_kinds["bad"][:2] + two_kinds["rough"][:2]
    np.testing.assert_allclose(loaded.score(images).scores, model.score(images).scores, rtol=1e-6)
    arrays, info = model.learned_state()
    old = {k: v for k, v in arrays.items() if not k.startswith("ref_")}
    before = PatchCore(**FAST)
    before.load_learned_state(old, info)
    res = before.score(images)
    assert all("reference_factor" not in e for e in res.extras)
    broken = PatchCore(**FAST)
    with pytest.raises(ModelFileError, match="reference pool"):
        broken.load_learned_state({**arrays, "ref_peaks": arrays["ref_peaks"][:3]}, info)
    with pytest.raises(ConfigError, match="reference_k must be an integer >= 0"):
        PatchCore(reference_k=-1)._validate()


def test_whole_image_distance_is_read_against_the_pool_too(
    two_kinds: dict[str, list[np.ndarray]],
) -> None:
    """With ``reference_global`` the whole-image distance is divided by the typical
    distance between the most similar training images and their nearest others
    (to that power): the same fit, only the image score's second term changes."""
    # min_bank 0: a real coreset, so training peaks (the term's scale) are not 0
    settings = {**FAST, "min_bank": 0}
    train = two_kinds["train"]
    model = PatchCore(**settings, reference_global=1.0).fit(train)
    # each pool image's distance to its nearest other training image
    d = np.linalg.norm(model.global_bank_[:, None] - model.global_bank_[None], axis=2)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(model.ref_spread_, d.min(1)[model.ref_images_], rtol=1e-4)
    images = two_kinds["smooth"] + two_kinds["rough"] + two_kinds["bad"]
    got = model.score(images)
    # a scoring setting: the fitted pool serves any power
    base = model.set_params(reference_global=0.0).score(images)
    model.set_params(reference_global=1.0)
    descriptors = [model._descriptor(e) for _, e in model._iter_embeddings(images, None, "t")]
    g = (np.stack(descriptors) - model.global_mean_) / model.global_std_
    local, spread = model._reference_factors(g.astype(np.float32))
    bonus = base.scores - np.array([m.max() for m in base.maps]) * local
    np.testing.assert_allclose(got.scores - base.scores, bonus * (spread - 1), rtol=1e-3, atol=1e-3)
    # the rough kind's images lie further apart: its distances are read down
    assert spread[6:12].max() < 1.0 < spread[:6].min()
    for a, b in zip(got.maps, base.maps, strict=True):
        np.testing.assert_array_equal(a, b)

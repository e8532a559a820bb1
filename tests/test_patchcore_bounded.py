"""PatchCore on large training sets: above ``max_fit_patches`` the coreset runs on
a seeded random sample of every image's patches, so memory stays bounded; the
bank stays close to the exact one and the fit stays deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from defectkit.errors import ConfigError
from defectkit.methods.patchcore import PatchCore

# min_bank 0: these tests are about the coreset ratio and the pool budget
FAST = {"image_size": 96, "coreset_ratio": 0.1, "min_bank": 0}


@pytest.fixture(scope="module")
def exact(surface_set: dict[str, list[np.ndarray]]) -> PatchCore:
    return PatchCore(**FAST).fit(surface_set["train"])


def test_under_the_budget_every_patch_enters_the_coreset(exact: PatchCore) -> None:
    on_grids, in_pool = exact.fit_patches_
    # 96 px on the short side, the images' own 112:96 aspect kept -> 12 x 14 patch grid
    assert on_grids == in_pool == 20 * 12 * 14
    assert len(exact.memory_bank_) == round(on_grids * 0.1)


def test_bounded_pool_gives_a_bank_close_to_the_exact_one(
    exact: PatchCore, surface_set: dict[str, list[np.ndarray]]
) -> None:
    small = PatchCore(**FAST, max_fit_patches=600).fit(surface_set["train"])
    on_grids, in_pool = small.fit_patches_
    assert on_grids == 20 * 12 * 14
    assert 20 <= in_pool <= 600  # the same fraction of every image, at least one each
    # the bank keeps its size and holds patches of every training image
    assert small.memory_bank_.shape == exact.memory_bank_.shape
    assert len(np.unique(small.bank_origin_[:, 0])) == 20
    # every pooled patch is a real patch of its image: its features are in the full set
    i, r, c = small.bank_origin_[0]
    full = exact._embed_batches([surface_set["train"][i]], None, "t")[0]
    np.testing.assert_allclose(small.memory_bank_[0], full[r, c], rtol=1e-5, atol=1e-5)

    test = surface_set["good"] + surface_set["bad"]
    a, b = exact.score(test), small.score(test)
    rel = np.abs(b.scores - a.scores) / a.scores
    assert rel.max() < 0.15, rel
    # defect maps keep their shape (good images' maps are low-level noise)
    n = len(surface_set["good"])
    for ma, mb in zip(a.maps[n:], b.maps[n:], strict=True):
        assert np.corrcoef(ma.ravel(), mb.ravel())[0, 1] > 0.97
    # still separates defective from good images like the exact bank
    assert b.scores[n:].min() > b.scores[:n].max()


def test_bounded_fit_is_deterministic(surface_set: dict[str, list[np.ndarray]]) -> None:
    one = PatchCore(**FAST, max_fit_patches=500).fit(surface_set["train"])
    two = PatchCore(**FAST, max_fit_patches=500).fit(surface_set["train"])
    np.testing.assert_array_equal(one.memory_bank_, two.memory_bank_)
    np.testing.assert_array_equal(one.bank_origin_, two.bank_origin_)
    other = PatchCore(**FAST, max_fit_patches=500, seed=1).fit(surface_set["train"])
    assert not np.array_equal(one.bank_origin_, other.bank_origin_)


def test_pool_sample_does_not_depend_on_batching(
    surface_set: dict[str, list[np.ndarray]],
) -> None:
    one = PatchCore(**FAST, max_fit_patches=700, batch_size=3).fit(surface_set["train"])
    two = PatchCore(**FAST, max_fit_patches=700, batch_size=8).fit(surface_set["train"])
    np.testing.assert_array_equal(one.bank_origin_, two.bank_origin_)
    np.testing.assert_allclose(one.memory_bank_, two.memory_bank_, rtol=1e-4, atol=1e-4)


def test_fit_patches_survive_save_and_load(exact: PatchCore) -> None:
    arrays, info = exact.learned_state()
    back = PatchCore(**FAST)
    back.load_learned_state(arrays, info)
    assert back.fit_patches_ == exact.fit_patches_


def test_max_fit_patches_must_be_positive(surface_set: dict[str, list[np.ndarray]]) -> None:
    with pytest.raises(ConfigError, match="max_fit_patches"):
        PatchCore(**FAST, max_fit_patches=0).fit(surface_set["train"][:2])

"""Synthetic defects for self-supervised training: masks match what was painted,
one seed gives one result, every kind is drawn, sizes and channels are kept."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from defectkit.data.defect_synthesis import (
    SYNTH_KINDS,
    draw_kind,
    paint_defect,
    synthesize_defect,
)
from defectkit.data.synthetic import make_surface
from defectkit.errors import ConfigError, ImageError


@pytest.fixture(scope="module")
def goods() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [make_surface("stone", (96, 128), rng) for _ in range(3)]


def _grey(img: np.ndarray) -> np.ndarray:
    g = img.mean(axis=2).round().astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)


@pytest.mark.parametrize("kind", SYNTH_KINDS)
def test_mask_marks_the_painted_pixels(kind: str, goods: list[np.ndarray]) -> None:
    for seed in range(6):
        rng = np.random.default_rng(seed)
        good = goods[seed % len(goods)]
        bad, mask = paint_defect(good, kind, rng, sources=goods)
        assert bad.shape == good.shape and bad.dtype == np.uint8
        assert mask.shape == good.shape[:2] and mask.dtype == bool
        assert 0 < mask.mean() < 0.3, f"{kind} seed {seed}: mask covers {mask.mean():.3f}"
        d = _diff(bad, good)
        # nothing changes away from the mask (a soft edge of a few px at most)
        near = ndimage.binary_dilation(mask, iterations=4)
        assert d[~near].max() == 0, f"{kind} seed {seed}: pixels changed far from the mask"
        # the mask is not empty paint: most of it visibly changed
        assert np.mean(d[mask] >= 2) > 0.5, f"{kind} seed {seed}: mask barely changed"
        assert d[mask].mean() >= 5


def test_same_seed_same_defect_other_seed_other(goods: list[np.ndarray]) -> None:
    a = synthesize_defect(goods[0], np.random.default_rng(3), sources=goods, max_defects=2)
    b = synthesize_defect(goods[0], np.random.default_rng(3), sources=goods, max_defects=2)
    c = synthesize_defect(goods[0], np.random.default_rng(4), sources=goods, max_defects=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_every_kind_is_drawn_and_synthesize_paints_it(goods: list[np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    drawn = {draw_kind(rng) for _ in range(120)}
    assert drawn == set(SYNTH_KINDS)
    assert {draw_kind(rng, ["hole", "stain"]) for _ in range(40)} == {"hole", "stain"}
    for kind in SYNTH_KINDS:
        bad, mask = synthesize_defect(goods[1], np.random.default_rng(1), kinds=[kind])
        assert mask.any() and not np.array_equal(bad, goods[1])


def test_several_defects_join_their_masks(goods: list[np.ndarray]) -> None:
    rng = np.random.default_rng(11)
    sizes = []
    for _ in range(8):
        bad, mask = synthesize_defect(goods[2], rng, kinds=["hole"], max_defects=3)
        _, n = ndimage.label(mask)
        sizes.append(n)
        d = _diff(bad, goods[2])
        assert d[~ndimage.binary_dilation(mask, iterations=4)].max() == 0
    assert max(sizes) >= 2, "max_defects=3 should paint several holes sometimes"


@pytest.mark.parametrize("kind", SYNTH_KINDS)
def test_grey_stays_grey_and_sizes_are_kept(kind: str, goods: list[np.ndarray]) -> None:
    grey = _grey(goods[0])
    odd = grey[:70, :45]  # small, odd, non-square
    for img in (grey, odd):
        bad, mask = paint_defect(img, kind, np.random.default_rng(2), sources=[_grey(goods[1])])
        assert bad.shape == img.shape and mask.shape == img.shape[:2]
        np.testing.assert_array_equal(bad[:, :, 0], bad[:, :, 1])
        np.testing.assert_array_equal(bad[:, :, 0], bad[:, :, 2])


def test_bad_input_is_refused(goods: list[np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match=r"unknown.*'blob'"):
        synthesize_defect(goods[0], rng, kinds=["blob"])
    with pytest.raises(ConfigError, match="max_defects"):
        synthesize_defect(goods[0], rng, max_defects=0)
    with pytest.raises(ImageError, match="uint8"):
        paint_defect(goods[0].astype(np.float32), "hole", rng)
    with pytest.raises(ImageError, match="32x32"):
        paint_defect(goods[0][:20, :20], "hole", rng)

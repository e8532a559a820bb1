"""Property tests (hypothesis) for region extraction and the metrics.

tests/test_metrics.py already checks AUROC / AUPRO against references and their
invariance to strictly increasing transforms; here: what holds whatever the data
(bounds, order of samples, pooling) and, for regions, that they partition exactly
the pixels at or above the threshold.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from defectkit.decide.regions import count_regions, find_regions, locate_regions
from defectkit.decide.severity import GRADES
from defectkit.metrics import aupro, f1_max, image_ap, image_auroc, pixel_auroc

EIGHT = np.ones((3, 3), bool)  # 8-connectivity


@st.composite
def anomaly_maps(draw, max_side: int = 12):
    """A small map of integer-valued scores (many ties, several blobs) and a threshold."""
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    values = draw(st.lists(st.integers(0, 6), min_size=h * w, max_size=h * w))
    amap = np.array(values, np.float32).reshape(h, w)
    return amap, float(draw(st.integers(0, 7)))


@settings(max_examples=150, deadline=None)
@given(data=anomaly_maps(), min_area=st.integers(1, 6))
def test_regions_are_exactly_the_large_components_of_the_thresholded_pixels(data, min_area):
    amap, threshold = data
    regions, labels = locate_regions(amap, threshold, min_area=min_area)
    above = amap >= threshold
    # labelled pixels are thresholded pixels; with min_area 1, all of them
    assert labels.dtype == np.int32 and labels.shape == amap.shape
    assert np.all(above[labels > 0])
    comps, n = ndimage.label(above, structure=EIGHT)
    sizes = np.bincount(comps.ravel(), minlength=n + 1)
    kept = sizes[comps] >= min_area
    np.testing.assert_array_equal(labels > 0, above & kept)
    if min_area == 1:
        np.testing.assert_array_equal(labels > 0, above)
    # areas sum to the labelled pixels; one region per large component
    assert sum(r.area_px for r in regions) == int(np.count_nonzero(labels))
    assert len(regions) == int(np.count_nonzero(sizes[1:] >= min_area))
    assert count_regions(amap, threshold, min_area) == len(regions)
    assert [r.to_dict() for r in find_regions(amap, threshold, min_area=min_area)] == [
        r.to_dict() for r in regions
    ]
    # worst first
    assert [r.score for r in regions] == sorted((r.score for r in regions), reverse=True)
    for i, r in enumerate(regions, start=1):
        mine = labels == i
        ys, xs = np.nonzero(mine)
        assert r.area_px == ys.size >= min_area
        x, y, w, h = r.bbox
        assert (x, y, w, h) == (
            xs.min(),
            ys.min(),
            xs.max() - xs.min() + 1,
            ys.max() - ys.min() + 1,
        )
        assert r.score == pytest.approx(float(amap[mine].max()))
        assert r.mean_score == pytest.approx(float(amap[mine].mean()))
        assert threshold <= r.mean_score <= r.score
        assert r.severity in GRADES and r.area_mm2 is None
        # one 8-connected piece, and not touching another region
        assert ndimage.label(mine, structure=EIGHT)[1] == 1
        grown = ndimage.binary_dilation(mine, structure=EIGHT)
        assert set(np.unique(labels[grown])) <= {0, i}


@settings(max_examples=60, deadline=None)
@given(data=anomaly_maps(), shift=st.integers(-50, 50), mm=st.sampled_from([0.1, 0.5, 2.0]))
def test_regions_depend_on_the_map_only_relative_to_the_threshold(data, shift, mm):
    amap, threshold = data
    base = find_regions(amap, threshold, min_area=1)
    moved = find_regions(amap + shift, threshold + shift, min_area=1)
    assert [(r.bbox, r.area_px) for r in moved] == [(r.bbox, r.area_px) for r in base]
    sized = find_regions(amap, threshold, min_area=1, mm_per_pixel=mm)
    for r in sized:
        assert r.area_mm2 == pytest.approx(r.area_px * mm * mm)


@settings(max_examples=40, deadline=None)
@given(data=anomaly_maps())
def test_a_higher_threshold_never_marks_more_pixels(data):
    amap, threshold = data
    low = locate_regions(amap, threshold, min_area=1)[1] > 0
    high = locate_regions(amap, threshold + 1, min_area=1)[1] > 0
    assert np.all(low[high])


# -- metrics -------------------------------------------------------------------------------
def _mann_whitney(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(defect score > good score) + half the ties, by brute force."""
    bad, good = scores[labels == 1], scores[labels == 0]
    diff = bad[:, None] - good[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


@settings(max_examples=80, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 1), st.integers(-4, 4)), min_size=2, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_image_metrics_bounds_and_sample_order(pairs, seed):
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], float)
    auroc = image_auroc(labels, scores)
    if labels.min() == labels.max():
        assert math.isnan(auroc)
        return
    assert auroc == pytest.approx(_mann_whitney(labels, scores), abs=1e-12)
    assert 0.0 <= image_ap(labels, scores) <= 1.0
    f1, _ = f1_max(labels, scores)
    assert 0.0 < f1 <= 1.0  # predicting every image defective already scores > 0
    order = np.random.default_rng(seed).permutation(labels.size)
    assert image_auroc(labels[order], scores[order]) == pytest.approx(auroc, abs=1e-12)
    assert image_ap(labels[order], scores[order]) == pytest.approx(image_ap(labels, scores))


@st.composite
def masks_and_maps(draw, max_images: int = 3, max_side: int = 6):
    masks, maps = [], []
    for _ in range(draw(st.integers(1, max_images))):
        h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
        cells = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
        values = draw(st.lists(st.integers(-3, 3), min_size=h * w, max_size=h * w))
        masks.append(np.array(cells).reshape(h, w))
        maps.append(np.array(values, np.float64).reshape(h, w))
    return masks, maps


@settings(max_examples=60, deadline=None)
@given(data=masks_and_maps(), fpr_limit=st.sampled_from([0.05, 0.3, 1.0]))
def test_pixel_metrics_bounds_pooling_and_image_order(data, fpr_limit):
    masks, maps = data
    value = pixel_auroc(masks, maps)
    pro = aupro(masks, maps, fpr_limit)
    for v in (value, pro):
        assert math.isnan(v) or 0.0 <= v <= 1.0
    rev_masks, rev_maps = masks[::-1], maps[::-1]
    same = pytest.approx(value, abs=1e-12, nan_ok=True)
    assert pixel_auroc(rev_masks, rev_maps) == same
    assert aupro(rev_masks, rev_maps, fpr_limit) == pytest.approx(pro, abs=1e-12, nan_ok=True)
    # pixel AUROC pools pixels: one long image of all of them gives the same value
    flat_mask = np.concatenate([m.ravel() for m in masks])[None, :]
    flat_map = np.concatenate([a.ravel() for a in maps])[None, :]
    assert pixel_auroc([flat_mask], [flat_map]) == same

"""Metrics: cross-checks against scikit-learn and the official AUPRO algorithm,
property tests and hand-built cases."""

from __future__ import annotations

import bisect
import doctest
import importlib
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import label as scipy_label
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from defectkit.metrics import (
    aupro,
    evaluate,
    f1_max,
    format_table,
    image_ap,
    image_auroc,
    pixel_auroc,
    recall_per_type,
)

# The package re-exports `evaluate`, which shadows the submodule of that name.
image_module = importlib.import_module("defectkit.metrics.image")
pixel_module = importlib.import_module("defectkit.metrics.pixel")
evaluate_module = importlib.import_module("defectkit.metrics.evaluate")

# ---------------------------------------------------------------- references


def reference_aupro(masks, maps, fpr_limit=0.3):
    """The official MVTec AD algorithm, written plainly: one global sort of all
    pixels, cumulative FPR and PRO changes, the last point of each tie group,
    then a trapezoid cut at the limit. Regions from scipy, not OpenCV."""
    fp, pro, scores = [], [], []
    n_ok = n_regions = 0
    for mask, smap in zip(masks, maps, strict=True):
        mask = np.zeros(np.shape(smap)) if mask is None else np.asarray(mask)
        labels, n = scipy_label(mask != 0, structure=np.ones((3, 3), int))
        n_regions += n
        n_ok += int((labels == 0).sum())
        changes = np.zeros(labels.shape)
        for k in range(1, n + 1):
            changes[labels == k] = 1.0 / (labels == k).sum()
        fp.append((labels == 0).ravel().astype(float))
        pro.append(changes.ravel())
        scores.append(np.asarray(smap, np.float64).ravel())
    if n_regions == 0 or n_ok == 0:
        return math.nan
    order = np.argsort(np.concatenate(scores), kind="stable")[::-1]
    s = np.concatenate(scores)[order]
    fprs = np.cumsum(np.concatenate(fp)[order]) / n_ok
    pros = np.cumsum(np.concatenate(pro)[order]) / n_regions
    last = np.append(np.diff(s) != 0, True)
    x = np.concatenate(([0.0], np.minimum(fprs[last], 1), [1.0]))
    y = np.concatenate(([0.0], np.minimum(pros[last], 1), [1.0]))
    correction = 0.0
    if fpr_limit not in x:
        i = bisect.bisect_left(x, fpr_limit)
        y_lim = y[i - 1] + (y[i] - y[i - 1]) * (fpr_limit - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_lim + y[i - 1]) * (fpr_limit - x[i - 1])
    keep = x <= fpr_limit
    x, y = x[keep], y[keep]
    return (float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x))) + correction) / fpr_limit


def pooled(masks, maps):
    y = np.concatenate([np.zeros(np.size(a)) if m is None else np.ravel(m) != 0
                        for m, a in zip(masks, maps, strict=True)])  # fmt: skip
    return y, np.concatenate([np.ravel(a) for a in maps])


def random_pixels(rng, dtype=np.float32, n_images=4, levels=12):
    """Images of different sizes, blobs of defect, integer-ish scores (many ties)."""
    masks, maps = [], []
    for i in range(n_images):
        h, w = rng.integers(3, 20, 2)
        mask = (rng.random((h, w)) < rng.uniform(0.05, 0.5)).astype(np.uint8) * 255
        if i == 0:
            mask[:] = 0  # a good image
        smap = rng.integers(0, levels, (h, w)) + (mask > 0) * rng.integers(0, 4)
        if np.issubdtype(dtype, np.floating):
            smap = smap * 0.37 - 1.0
        masks.append(mask)
        maps.append(smap.astype(dtype))
    return masks, maps


@pytest.fixture(params=[None, 5], ids=["one-chunk", "chunk-of-5"])
def chunk(request, monkeypatch):
    """Run pixel tests also with tiny chunks so chunk boundaries split tie groups."""
    if request.param:
        monkeypatch.setattr(pixel_module, "_CHUNK", request.param)


# ------------------------------------------------------------- image metrics


def test_image_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.integers(0, 6, n).astype(float)  # heavy ties
        assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert image_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        precision, recall, _ = precision_recall_curve(y, s)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
        best, threshold = f1_max(y, s)
        assert best == pytest.approx(f1.max(), abs=1e-12)
        # The returned threshold reaches that F1 under the score >= threshold rule.
        predicted = s >= threshold
        tp = int((predicted & (y == 1)).sum())
        assert 2 * tp / (predicted.sum() + y.sum()) == pytest.approx(best, abs=1e-12)
        assert threshold in s


def test_f1_max_prefers_the_highest_threshold_on_ties():
    # Thresholds 0.9 and 0.6 both give F1 = 2/3; the higher one is returned.
    assert f1_max([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6]) == pytest.approx((2 / 3, 0.9))


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_image_metrics_one_class_is_nan(labels):
    scores = np.arange(len(labels), dtype=float)
    assert math.isnan(image_auroc(labels, scores))
    assert math.isnan(image_ap(labels, scores))
    assert all(math.isnan(v) for v in f1_max(labels, scores))


def test_image_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="image 1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, math.nan])


def test_recall_per_type():
    types = ["good", "good", "scratch", "scratch", "dent", "good"]
    labels = [0, 0, 1, 1, 1, 0]
    scores = [0.1, 0.7, 0.8, 0.3, 0.9, 0.2]
    result = recall_per_type(types, labels, scores, threshold=0.5)
    assert result == {"good": pytest.approx(2 / 3), "dent": 1.0, "scratch": 0.5}
    assert list(result) == ["good", "dent", "scratch"]
    # A score equal to the threshold counts as caught.
    assert recall_per_type(["dent"], [1], [0.5], 0.5) == {"dent": 1.0}
    with pytest.raises(ValueError, match="image 0 is labelled defective but typed 'good'"):
        recall_per_type(["good"], [1], [0.5], 0.5)
    with pytest.raises(ValueError, match="one type per image"):
        recall_per_type(["dent"], [1, 0], [0.5, 0.1], 0.5)


# ------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.int64, np.bool_])
def test_pixel_auroc_matches_sklearn(dtype, chunk):
    rng = np.random.default_rng(1)
    for levels in (2, 5, 40):
        masks, maps = random_pixels(rng, dtype, levels=levels)
        y, s = pooled(masks, maps)
        assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_pixel_auroc_more_defect_than_good_and_special_values(chunk):
    # More defect pixels than good ones takes the complement branch; -0.0 ties 0.0.
    mask = np.ones((4, 5), np.uint8)
    mask[0, :3] = 0
    smap = np.array(
        [[0.0, -np.inf, 2, np.inf, -0.0], [-0.0, 0, 1, 1, np.inf], [3, -1, 0, 2, 2], [1] * 5],
        np.float32,
    )
    y, s = pooled([mask], [smap])
    finite = np.nan_to_num(s, posinf=1e30, neginf=-1e30)  # same order; sklearn refuses inf
    assert pixel_auroc([mask], [smap]) == pytest.approx(roc_auc_score(y, finite), abs=1e-12)


def test_pixel_auroc_degenerate_and_bad_input():
    ok = np.zeros((2, 2))
    assert math.isnan(pixel_auroc([ok], [ok]))  # no defect pixel
    assert math.isnan(pixel_auroc([np.ones((2, 2))], [ok]))  # no good pixel
    assert math.isnan(pixel_auroc([], []))
    with pytest.raises(ValueError, match=r"image 1: mask shape \(3, 2\) differs"):
        pixel_auroc([ok, np.zeros((3, 2))], [ok, np.zeros((2, 3))])
    with pytest.raises(ValueError, match="2 masks but 1 anomaly maps"):
        pixel_auroc([ok, ok], [ok])
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc([np.eye(2)], [np.array([[0.0, np.nan], [1.0, 0.0]])])


def test_none_mask_means_all_good():
    rng = np.random.default_rng(2)
    masks, maps = random_pixels(rng)
    with_none = [None, *masks[1:]]  # masks[0] is all zero
    assert pixel_auroc(with_none, maps) == pixel_auroc(masks, maps)
    assert aupro(with_none, maps) == aupro(masks, maps)


# --------------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.int64])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 0.61, 1.0])
def test_aupro_matches_official_algorithm(dtype, fpr_limit, chunk):
    rng = np.random.default_rng(3)
    for levels in (2, 7, 100):
        masks, maps = random_pixels(rng, dtype, levels=levels)
        expected = reference_aupro(masks, maps, fpr_limit)
        assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-12)


def two_regions():
    mask = np.zeros((10, 10), np.uint8)
    mask[1:3, 1:3] = 1  # region A, 4 pixels
    mask[6:9, 6:9] = 1  # region B, 9 pixels; diagonal neighbours would merge (8-connected)
    return mask


def test_aupro_perfect_map_is_one():
    mask = two_regions()
    assert aupro([mask, np.zeros((5, 7))], [mask * 2.0, np.ones((5, 7))]) == 1.0


def test_aupro_constant_map_is_half_the_limit():
    # All pixels tie: the curve jumps straight from (0, 0) to (1, 1).
    mask = two_regions()
    assert aupro([mask], [np.full(mask.shape, 3.0)]) == pytest.approx(0.15)
    assert aupro([mask], [np.zeros(mask.shape)], fpr_limit=0.1) == pytest.approx(0.05)


def test_aupro_one_of_two_regions_found_is_a_half_plateau():
    mask = two_regions()
    rng = np.random.default_rng(4)
    smap = 1.0 + rng.random(mask.shape)  # good pixels: distinct scores in (1, 2)
    smap[1:3, 1:3] = 10.0  # region A above every good pixel
    smap[6:9, 6:9] = 0.0  # region B below every good pixel
    assert aupro([mask], [smap]) == pytest.approx(0.5)
    assert aupro([mask], [smap], fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_regions_weigh_equally_whatever_their_size():
    mask = two_regions()
    smap = np.where(mask > 0, 0.0, 1.0)
    smap[1:3, 1:3] = 5.0  # only the small region A (4 of 13 defect pixels) found
    assert aupro([mask], [smap]) == pytest.approx(0.5)
    assert aupro([mask], [smap]) == pytest.approx(reference_aupro([mask], [smap]))


def test_aupro_diagonal_pixels_are_one_region():
    mask = np.eye(4, dtype=np.uint8)  # one 8-connected region, four 4-connected ones
    smap = np.zeros((4, 4))
    smap[0, 0] = 1.0
    # One region with 1/4 found at FPR 0: PRO 0.25 until FPR 1.
    assert aupro([mask], [smap], fpr_limit=1.0) == pytest.approx(0.25 + 0.75 / 2)


def test_aupro_empty_mask_on_defective_image_counts_as_good_pixels():
    mask = two_regions()
    smap = mask * 1.0
    empty, busy = np.zeros((6, 6)), np.linspace(0, 2, 36).reshape(6, 6)
    value = aupro([mask, empty], [smap, busy])
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(reference_aupro([mask, empty], [smap, busy]))
    assert math.isnan(aupro([empty], [busy]))  # no region at all
    assert math.isnan(aupro([np.ones((2, 2))], [np.ones((2, 2))]))  # no good pixel


def test_aupro_bad_input():
    ok = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"image 2: mask shape \(2, 2\) differs.*\(2, 3\)"):
        aupro([ok, ok, ok], [ok, ok, np.zeros((2, 3))])
    with pytest.raises(ValueError, match="image 0: anomaly map must be 2-D"):
        aupro([ok], [np.zeros((2, 2, 3))])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([ok], [ok], fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN"):
        aupro([np.eye(2)], [np.array([[np.nan, 0.0], [1.0, 0.0]], np.float32)])


def test_aupro_random_scores_near_half_the_limit():
    rng = np.random.default_rng(5)
    masks = [(rng.random((64, 64)) < 0.05).astype(np.uint8) for _ in range(8)]
    maps = [rng.random((64, 64), dtype=np.float32) for _ in range(8)]
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.02)
    assert pixel_auroc(masks, maps) == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------ property tests


@st.composite
def scored_images(draw, max_images=3, max_side=6):
    """Masks and integer-valued maps of a few small images (many ties)."""
    masks, maps = [], []
    for _ in range(draw(st.integers(1, max_images))):
        h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
        cells = st.lists(st.integers(0, 1), min_size=h * w, max_size=h * w)
        values = st.lists(st.integers(-5, 5), min_size=h * w, max_size=h * w)
        masks.append(np.array(draw(cells), np.uint8).reshape(h, w))
        maps.append(np.array(draw(values), np.float64).reshape(h, w))
    return masks, maps


# Strictly increasing maps of integer-valued floats that stay exact (no new ties).
INCREASING = [lambda x: 3 * x + 7, lambda x: x**3, np.exp, lambda x: np.arctan(x / 7)]


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 1), min_size=2, max_size=30),
    data=st.data(),
    transform=st.sampled_from(INCREASING),
)
def test_image_auroc_properties(labels, data, transform):
    scores = np.array(
        data.draw(st.lists(st.integers(-5, 5), min_size=len(labels), max_size=len(labels))), float
    )
    value = image_auroc(labels, scores)
    if len(set(labels)) < 2:
        assert math.isnan(value)
        return
    assert 0.0 <= value <= 1.0
    assert image_auroc(labels, transform(scores)) == pytest.approx(value, abs=1e-12)
    assert image_auroc(labels, -scores) == pytest.approx(1.0 - value, abs=1e-12)
    assert image_auroc(labels, np.array(labels) * 10.0 + scores / 100) == pytest.approx(
        1.0, abs=1e-12
    )
    assert f1_max(labels, transform(scores))[0] == pytest.approx(f1_max(labels, scores)[0])


@settings(max_examples=60, deadline=None)
@given(images=scored_images(), transform=st.sampled_from(INCREASING))
def test_pixel_auroc_properties(images, transform):
    masks, maps = images
    value = pixel_auroc(masks, maps)
    y, s = pooled(masks, maps)
    if y.min() == y.max():
        assert math.isnan(value)
        return
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_auroc(masks, [transform(a) for a in maps]) == pytest.approx(value, abs=1e-12)
    assert pixel_auroc(masks, [-a for a in maps]) == pytest.approx(1.0 - value, abs=1e-12)
    assert pixel_auroc(masks, [m * 100.0 + a for m, a in zip(masks, maps, strict=True)]) == 1.0


@settings(max_examples=60, deadline=None)
@given(
    images=scored_images(),
    transform=st.sampled_from(INCREASING),
    fpr_limit=st.sampled_from([0.3, 0.1, 0.5, 1.0]),
)
def test_aupro_properties(images, transform, fpr_limit):
    masks, maps = images
    value = aupro(masks, maps, fpr_limit)
    expected = reference_aupro(masks, maps, fpr_limit)
    if math.isnan(expected):
        assert math.isnan(value)
        return
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(expected, abs=1e-12)
    transformed = [transform(a).astype(np.float32) for a in maps]
    assert aupro(masks, transformed, fpr_limit) == pytest.approx(value, abs=1e-12)
    separated = [m * 100.0 + a for m, a in zip(masks, maps, strict=True)]
    assert aupro(masks, separated, fpr_limit) == 1.0


# ----------------------------------------------------------------- evaluate


def test_evaluate_full_report_is_json_ready():
    rng = np.random.default_rng(6)
    masks, maps = random_pixels(rng, n_images=6)
    masks[1][:] = 0
    labels = [int(m.any()) for m in masks]
    types = ["good" if y == 0 else ("crack" if i % 2 else "dent") for i, y in enumerate(labels)]
    scores = [float(a.max()) for a in maps]
    result = evaluate(labels, scores, types, masks, maps)
    for key in ("image_auroc", "image_ap", "image_f1_max", "f1_threshold", "pixel_auroc"):
        assert type(result[key]) is float
    assert result["image_auroc"] == image_auroc(labels, scores)
    assert result["pixel_auroc"] == pixel_auroc(masks, maps)
    assert result["aupro"] == aupro(masks, maps)
    assert (result["n_good"], result["n_defect"]) == (labels.count(0), labels.count(1))
    assert result["threshold_used"] == result["f1_threshold"]
    assert result["recall_per_type"] == recall_per_type(
        types, labels, scores, result["f1_threshold"]
    )
    assert json.loads(json.dumps(result)) == result
    rows = format_table(result)
    assert rows[0] == ("images (good / defective)", f"{labels.count(0)} / {labels.count(1)}")
    assert ("AUPRO", f"{result['aupro']:.4f}") in rows
    assert all(isinstance(a, str) and isinstance(b, str) for a, b in rows)


def test_evaluate_image_only_and_given_threshold():
    result = evaluate([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], threshold=0.5)
    assert result["pixel_auroc"] is None and result["aupro"] is None
    assert result["threshold_used"] == 0.5
    assert result["recall_per_type"] == {"good": 1.0, "defect": 0.5}
    assert ("pixel AUROC", "n/a") in format_table(result)


def test_evaluate_one_class():
    result = evaluate([0, 0], [0.1, 0.2])
    assert math.isnan(result["image_auroc"]) and math.isnan(result["f1_threshold"])
    assert result["threshold_used"] is None and result["recall_per_type"] is None
    assert ("image AUROC", "nan") in format_table(result)
    assert evaluate([0, 0], [0.1, 0.2], threshold=0.15)["recall_per_type"] == {"good": 0.5}


def test_evaluate_bad_input():
    ok = np.zeros((2, 2))
    with pytest.raises(ValueError, match="both masks and maps"):
        evaluate([0], [0.1], masks=[ok])
    with pytest.raises(ValueError, match="one mask and one map per image"):
        evaluate([0, 1], [0.1, 0.2], masks=[ok], maps=[ok])
    with pytest.raises(ValueError, match="image 0 is labelled good but its mask marks a defect"):
        evaluate([0, 1], [0.1, 0.2], masks=[np.eye(2), np.eye(2)], maps=[ok, ok])


@pytest.mark.parametrize("module", [image_module, pixel_module, evaluate_module])
def test_docstring_examples(module):
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0

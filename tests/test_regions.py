"""Regions, severity rules, the pixel threshold rule and region-level matching,
on hand-built maps whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectkit.decide.calibration import PixelThreshold, pixel_threshold_for_false_regions
from defectkit.decide.regions import count_regions, find_regions, locate_regions, overall_severity
from defectkit.decide.severity import (
    DEFAULT_RULES,
    GradeRule,
    SeverityRules,
    load_severity_rules,
)
from defectkit.errors import ConfigError
from defectkit.metrics.regions import match_regions, region_metrics

# ---------------------------------------------------------------- regions


def blobs() -> np.ndarray:
    amap = np.zeros((40, 60), np.float32)
    amap[5:15, 10:30] = 2.0  # 200 px, peak 2
    amap[8, 12] = 5.0  # the peak of the first blob
    amap[25:35, 40:45] = 3.0  # 50 px, peak 3
    amap[30, 5] = 9.0  # a 1-px speck, the highest score of all
    return amap


def test_regions_boxes_areas_scores_worst_first() -> None:
    regions = find_regions(blobs(), 1.0, min_area=4)
    assert [r.bbox for r in regions] == [(10, 5, 20, 10), (40, 25, 5, 10)]
    assert [r.area_px for r in regions] == [200, 50]
    assert regions[0].score == 5.0
    assert regions[0].mean_score == pytest.approx((199 * 2 + 5) / 200)
    assert regions[1].score == regions[1].mean_score == 3.0
    assert all(r.area_mm2 is None for r in regions)


def test_specks_below_min_area_are_dropped_and_labels_match() -> None:
    regions, labels = locate_regions(blobs(), 1.0, min_area=4)
    assert len(regions) == 2  # the 9.0 speck is gone
    assert labels[30, 5] == 0
    assert labels[8, 12] == 1 and labels[30, 42] == 2
    assert np.count_nonzero(labels == 1) == 200
    assert len(find_regions(blobs(), 1.0, min_area=1)) == 3
    assert count_regions(blobs(), 1.0, min_area=1) == 3
    assert count_regions(blobs(), 1.0, min_area=51) == 1


def test_diagonal_pixels_are_one_region() -> None:
    amap = np.zeros((10, 10), np.float32)
    for i in range(6):
        amap[i, i] = 1.0
    assert len(find_regions(amap, 0.5, min_area=1)) == 1  # 8-connected


def test_threshold_is_inclusive_and_mm2_uses_pixel_size() -> None:
    amap = np.zeros((10, 10), np.float32)
    amap[2:4, 2:7] = 1.5
    (r,) = find_regions(amap, 1.5, min_area=1, mm_per_pixel=0.1)
    assert r.area_px == 10
    assert r.area_mm2 == pytest.approx(0.1)
    d = r.to_dict()
    assert set(d) == {"bbox", "area_px", "area_mm2", "score", "mean_score", "severity"}
    assert d["bbox"] == [2, 2, 5, 2]
    json.dumps(d)


def test_region_inputs_are_checked() -> None:
    with pytest.raises(ConfigError, match="2-D"):
        find_regions(np.zeros((3, 3, 3)), 1.0)
    with pytest.raises(ConfigError, match="finite"):
        find_regions(np.zeros((3, 3)), float("nan"))
    with pytest.raises(ConfigError, match="mm per pixel"):
        find_regions(np.zeros((3, 3)), 1.0, mm_per_pixel=0)


# ---------------------------------------------------------------- severity


def test_default_rules_grade_by_area_and_score() -> None:
    g = DEFAULT_RULES.grade
    kw = {"area_mm2": None, "image_area": 10_000, "threshold": 10.0}
    assert g(area_px=50, score=11.0, **kw) == "minor"
    assert g(area_px=100, score=11.0, **kw) == "major"  # 1% of the image
    assert g(area_px=50, score=15.0, **kw) == "major"  # 1.5x the threshold
    assert g(area_px=500, score=11.0, **kw) == "critical"  # 5% of the image
    assert g(area_px=50, score=20.0, **kw) == "critical"


def test_match_all_needs_every_condition() -> None:
    rule = GradeRule(min_area_px=100, min_score_ratio=2.0, match="all")
    rules = SeverityRules(major=rule)
    kw = {"area_mm2": None, "image_area": 10**6, "threshold": 1.0}
    assert rules.grade(area_px=100, score=1.5, **kw) == "minor"
    assert rules.grade(area_px=100, score=2.0, **kw) == "major"
    assert SeverityRules().grade(area_px=10**6, score=99.0, **kw) == "minor"  # no rule: minor


def test_rules_files_json_and_toml(tmp_path) -> None:
    toml = tmp_path / "rules.toml"
    toml.write_text('[major]\nmin_area_mm2 = 1.0\n\n[critical]\nmin_area_mm2 = 5\nmatch = "all"\n')
    rules = load_severity_rules(toml)
    assert rules.needs_mm
    assert rules.major == GradeRule(min_area_mm2=1.0)
    assert rules.critical.match == "all"
    js = tmp_path / "rules.json"
    js.write_text(json.dumps({"critical": {"min_score_ratio": 3}}))
    rules = load_severity_rules(js)
    assert not rules.needs_mm
    assert rules.major.conditions() == {}  # a grade the file does not name is never given
    kw = {"area_px": 10**5, "area_mm2": None, "image_area": 10**5, "threshold": 1.0}
    assert rules.grade(score=2.0, **kw) == "minor"
    assert rules.grade(score=3.0, **kw) == "critical"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"severe": {"min_area_px": 3}}', "unknown grade"),
        ('{"major": {"min_area": 3}}', r"unknown key.*min_area"),
        ('{"major": {"min_area_px": -1}}', "must be > 0"),
        ('{"major": {"min_area_px": "big"}}', "must be a number"),
        ('{"major": {"min_area_px": true}}', "must be a number"),
        ('{"major": {"min_area_fraction": 2}}', r"\(0, 1\]"),
        ('{"major": {"min_area_px": 3, "match": "some"}}', "'any' or 'all'"),
        ('{"major": {}}', "no condition"),
        ('{"major": [1, 2]}', "expected a table"),
        ("{}", "no grade"),
        ("[1]", "expected a table/object"),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(tmp_path, text: str, message: str) -> None:
    p = tmp_path / "rules.json"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_severity_rules(p)


def test_rules_file_kind_and_existence(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_severity_rules(tmp_path / "none.json")
    (tmp_path / "r.yaml").write_text("major: {}")
    with pytest.raises(ConfigError, match=r"\.json or \.toml"):
        load_severity_rules(tmp_path / "r.yaml")
    (tmp_path / "r.toml").write_text("[major\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_severity_rules(tmp_path / "r.toml")


def test_overall_severity_is_the_worst_region_or_none_when_ok() -> None:
    amap = blobs()
    regions = find_regions(amap, 1.0, min_area=4)
    grades = SeverityRules(critical=GradeRule(min_area_px=150)).grade
    assert grades(area_px=200, area_mm2=None, image_area=2400, score=5, threshold=1) == "critical"
    rules = SeverityRules(critical=GradeRule(min_area_px=150))
    regions = find_regions(amap, 1.0, min_area=4, rules=rules)
    assert [r.severity for r in regions] == ["critical", "minor"]
    assert overall_severity(regions, True) == "critical"
    assert overall_severity(regions, False) is None
    assert overall_severity([], True) == "minor"  # NG, but only specks
    assert overall_severity([], None) is None


# ---------------------------------------------------------------- pixel threshold


def good_maps(n: int, spots_per_map: float, seed: int = 0) -> list[np.ndarray]:
    """Smooth noise at ~1 with bright 6x6 spots of height 3..6 at random places."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        m = 1.0 + 0.05 * rng.standard_normal((64, 64)).astype(np.float32)
        for _ in range(rng.poisson(spots_per_map)):
            y, x = rng.integers(0, 58, size=2)
            m[y : y + 6, x : x + 6] = rng.uniform(3, 6)
        maps.append(m)
    return maps


@pytest.mark.parametrize("target", [0.0, 0.1, 0.5])
def test_pixel_threshold_meets_its_target_on_the_calibration_maps(target: float) -> None:
    maps = good_maps(60, 0.8)
    pt = pixel_threshold_for_false_regions(maps, target, min_area=9)
    assert isinstance(pt, PixelThreshold)
    mean = sum(count_regions(m, pt.value, 9) for m in maps) / len(maps)
    assert mean == pytest.approx(pt.false_regions_per_image)
    assert mean <= target
    assert pt.n_good == 60 and pt.min_area_px == 9 and pt.target == target
    assert 0.9 <= pt.good_pixel_quantile <= 1.0


def test_pixel_threshold_is_as_low_as_the_rule_allows() -> None:
    maps = good_maps(60, 0.8)
    strict = pixel_threshold_for_false_regions(maps, 0.0, min_area=9)
    loose = pixel_threshold_for_false_regions(maps, 0.5, min_area=9)
    assert loose.value < strict.value
    # no spots at all: the threshold sits in the noise's tail, far below the spot level
    quiet = pixel_threshold_for_false_regions(good_maps(30, 0.0), 0.1, min_area=9)
    assert quiet.value < 2.0
    assert quiet.false_regions_per_image <= 0.1
    assert quiet.good_pixel_quantile < 0.95  # the lowest candidates are reached


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_threshold_skipping_low_maps_changes_nothing(
    dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Maps whose peak is below a candidate are not counted (they have no region);
    every count, so the threshold, is what counting every map gives. Plateaus make
    candidates equal to map peaks, where the inclusive cut must still count."""
    from defectkit.decide import calibration

    maps = [m.astype(dtype) for m in good_maps(40, 0.6, seed=3)]
    for m in maps[::5]:
        m[20:30, 20:30] = 4.0  # the same plateau in several maps
    every = lambda maps, peaks, t, a: sum(count_regions(m, t, a) for m in maps) / len(maps)  # noqa: E731
    for target in (0.0, 0.1, 0.3, 1.0):
        for cap in (None, 3.0):
            fast = pixel_threshold_for_false_regions(maps, target, min_area=9, cap=cap)
            with monkeypatch.context() as mp:
                mp.setattr(calibration, "_mean_regions", every)
                slow = pixel_threshold_for_false_regions(maps, target, min_area=9, cap=cap)
            assert fast == slow


def test_pixel_threshold_cap_and_bad_input() -> None:
    maps = good_maps(20, 0.5)
    capped = pixel_threshold_for_false_regions(maps, 0.0, min_area=9, cap=1.5)
    assert capped.value == 1.5 and capped.capped
    with pytest.raises(ConfigError, match="at least one good"):
        pixel_threshold_for_false_regions([], 0.1)
    with pytest.raises(ConfigError, match=">= 0"):
        pixel_threshold_for_false_regions(maps, -1)
    bad = maps[0].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match="finite"):
        pixel_threshold_for_false_regions([bad], 0.1)
    d = capped.to_dict()
    assert PixelThreshold.from_dict(json.loads(json.dumps(d))) == capped


# ---------------------------------------------------------------- region matching


def test_match_regions_by_iou() -> None:
    truth = np.zeros((20, 20), bool)
    truth[0:10, 0:10] = True  # 100 px
    truth[15:20, 15:20] = True  # 25 px, not found
    pred = np.zeros((20, 20), np.int32)
    pred[0:10, 0:2] = 1  # 20 px inside the first: IoU 0.2 > 0.1
    pred[12:14, 0:5] = 2  # touches nothing
    c = match_regions(truth, pred)
    assert (c.n_truth, c.n_found, c.n_pred, c.n_pred_unmatched) == (2, 1, 2, 1)
    pred[0:10, 0:2] = 0
    pred[0:10, 0:1] = 1  # 10 px: IoU exactly 0.1, not > 0.1
    assert match_regions(truth, pred).n_found == 0
    assert match_regions(np.zeros((5, 5), bool), np.ones((5, 5), np.int32)).n_pred_unmatched == 1


def test_region_metrics_over_a_set() -> None:
    truth = np.zeros((10, 10), bool)
    truth[2:6, 2:6] = True
    hit = np.zeros((10, 10), np.int32)
    hit[2:6, 2:6] = 1
    false = np.zeros((10, 10), np.int32)
    false[8:, 8:] = 1
    none = np.zeros((10, 10), np.int32)
    m = region_metrics(
        [1, 1, 0, 0],
        [truth, truth, np.zeros_like(truth), np.zeros_like(truth)],
        [hit, none, false, none],
    )
    assert m["recall"] == 0.5
    assert m["false_regions_per_good_image"] == 0.5
    assert m["defective"]["n_truth"] == 2 and m["good"]["n_pred"] == 1
    empty = region_metrics([0], [np.zeros((3, 3), bool)], [np.zeros((3, 3), np.int32)])
    assert empty["recall"] is None and empty["false_regions_per_good_image"] == 0.0

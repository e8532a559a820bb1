"""Thresholds: the conformal false-alarm guarantee checked by simulation, the
Clopper-Pearson bound against scipy, miss-rate and F1 rules on hand-built cases,
and the seeded calibration hold-out of the detector."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from defectkit.decide.calibration import (
    MIN_TAIL_SCORES,
    Threshold,
    calibration_warning,
    clopper_pearson_upper,
    images_to_certify,
    threshold_for_f1,
    threshold_for_false_alarm_rate,
    threshold_for_miss_rate,
)
from defectkit.detector import split_for_calibration
from defectkit.errors import ConfigError

# ---------------------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize("n", [1, 2, 5, 20, 100, 1000])
def test_clopper_pearson_matches_scipy(n):
    for k in sorted({0, 1, n // 3, n // 2, n - 1}):
        ours = clopper_pearson_upper(k, n)
        one_sided = binomtest(k, n, alternative="less").proportion_ci(0.95, method="exact")
        two_sided = binomtest(k, n).proportion_ci(0.90, method="exact")  # same upper end
        assert ours == pytest.approx(one_sided.high, rel=1e-9, abs=1e-12)
        assert ours == pytest.approx(two_sided.high, rel=1e-9, abs=1e-12)
        assert k / n <= ours <= 1.0


@pytest.mark.parametrize("n", [1, 5, 59, 300])
def test_clopper_pearson_zero_events_by_hand(n):
    # P(0 events | p) = (1 - p)^n = 0.05  =>  p = 1 - 0.05^(1/n)
    assert clopper_pearson_upper(0, n) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-12)
    assert clopper_pearson_upper(0, n, confidence=0.99) == pytest.approx(1 - 0.01 ** (1 / n))


def test_clopper_pearson_edges():
    assert clopper_pearson_upper(0, 0) == 1.0
    assert clopper_pearson_upper(5, 5) == 1.0
    assert clopper_pearson_upper(3, 10) < clopper_pearson_upper(4, 10)  # more events, higher
    assert clopper_pearson_upper(3, 10) > clopper_pearson_upper(30, 100)  # more data, tighter
    assert clopper_pearson_upper(0, 59) < 0.05 < clopper_pearson_upper(0, 58)  # rule of three


# ---------------------------------------------------------------- false-alarm rate


def conformal_rank(n: int, rate: float) -> int:
    return min(math.ceil((n + 1) * (1 - rate)), n)


@pytest.mark.parametrize(("n", "rate"), [(19, 0.1), (50, 0.1), (99, 0.01), (200, 0.05), (7, 0.3)])
def test_false_alarm_guarantee_exact_on_uniform_scores(n, rate):
    # For U(0, 1) scores the false-alarm rate of a threshold t is exactly 1 - t, so
    # the average over draws estimates E[rate] = (n + 1 - rank) / (n + 1) <= rate.
    rng = np.random.default_rng(n)
    trials = 3000
    fa = np.empty(trials)
    for i in range(trials):
        fa[i] = 1.0 - threshold_for_false_alarm_rate(rng.random(n), rate).value
    expected = (n + 1 - conformal_rank(n, rate)) / (n + 1)
    assert expected <= rate
    sd = fa.std() / math.sqrt(trials)
    assert abs(fa.mean() - expected) < 4 * sd + 1e-12
    assert fa.mean() <= rate + 4 * sd
    if n >= 19:  # and not wastefully conservative: the guarantee is nearly tight
        assert fa.mean() >= rate - 1 / (n + 1) - 4 * sd


@pytest.mark.parametrize("dist", ["normal", "exponential", "lognormal"])
def test_false_alarm_rate_on_fresh_good_scores(dist):
    rng = np.random.default_rng(7)
    draw = getattr(rng, dist)
    rate, n, trials, fresh = 0.05, 99, 1000, 400
    rates = np.empty(trials)
    for i in range(trials):
        thr = threshold_for_false_alarm_rate(draw(size=n), rate)
        rates[i] = np.mean(draw(size=fresh) >= thr.value)
    assert rates.mean() <= rate + 0.005
    assert rates.mean() >= rate - 0.015  # rank 95 of 99: expected 5/100


def test_false_alarm_threshold_fields():
    scores = np.arange(1.0, 101.0)  # 1..100, distinct
    rng = np.random.default_rng(0)
    rng.shuffle(scores)
    thr = threshold_for_false_alarm_rate(scores, 0.1)
    rank = conformal_rank(100, 0.1)  # ceil(101 * 0.9) = 91
    assert rank == 91
    assert float(rank) < thr.value == np.nextafter(float(rank), np.inf)
    assert thr.rule == "false-alarm-rate"
    assert thr.target == 0.1
    assert thr.n_good == 100
    assert thr.n_defect == 0
    k = int(np.sum(scores >= thr.value))
    assert k == 100 - rank
    assert thr.false_alarm_rate == k / 100
    ci = binomtest(k, 100, alternative="less").proportion_ci(0.95, method="exact")
    assert thr.false_alarm_upper == pytest.approx(ci.high, rel=1e-9)
    assert thr.miss_rate is None


def test_scores_equal_to_threshold_rank_are_ok():
    thr = threshold_for_false_alarm_rate(np.full(30, 2.0), 0.1)
    assert thr.value > 2.0  # "defect when score > calibrated value": ties pass
    assert thr.false_alarm_rate == 0.0
    assert not np.any(np.full(30, 2.0) >= thr.value)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("rate", [0.001, 0.01, 0.05])
def test_tiny_calibration_sets_use_the_max(n, rate):
    scores = np.random.default_rng(n).normal(size=n)
    thr = threshold_for_false_alarm_rate(scores, rate)
    assert thr.value == np.nextafter(scores.max(), np.inf)
    assert thr.n_good == n
    assert thr.false_alarm_rate == 0.0
    assert thr.false_alarm_upper == pytest.approx(1 - 0.05 ** (1 / n))  # and says how weak


@pytest.mark.parametrize("n", [8, 24, 60])
def test_tail_threshold_holds_the_rate_where_the_max_does_not(n):
    # log-normal good scores, too few for the conformal rank at 1%: the tail's
    # prediction bound keeps the expected rate on fresh good parts near 1%, while
    # the largest score alone lets through about 1 / (n + 1) of them
    rng = np.random.default_rng(n)
    rate, trials = 0.01, 1500
    tail, top = np.empty(trials), np.empty(trials)
    for i in range(trials):
        s = np.exp(rng.normal(3.0, 0.2, size=n))
        thr = threshold_for_false_alarm_rate(s, rate)
        assert thr.estimator == "tail" and thr.value > s.max()
        # the fitted bound, or the largest score where that is above it
        assert thr.tail_rate == pytest.approx(rate, rel=1e-6) or thr.value == np.nextafter(
            s.max(), np.inf
        )
        fresh = np.exp(rng.normal(3.0, 0.2, size=2000))
        tail[i] = np.mean(fresh >= thr.value)
        top[i] = np.mean(fresh >= threshold_for_false_alarm_rate(s, rate, tail=False).value)
    assert 0.006 <= tail.mean() <= 0.013
    assert top.mean() == pytest.approx(1 / (n + 1), rel=0.15)


def test_tail_threshold_never_below_the_largest_score():
    # an outlier above the fitted tail's bound still passes
    s = np.r_[np.full(20, 10.0) + np.linspace(0, 1, 20), 1000.0]
    thr = threshold_for_false_alarm_rate(s, 0.01)
    assert thr.estimator == "tail" and thr.value == np.nextafter(1000.0, np.inf)
    assert thr.tail_rate < 0.01


def test_tail_threshold_on_scores_with_negatives_fits_a_normal():
    s = np.random.default_rng(3).normal(0.0, 1.0, size=30)
    thr = threshold_for_false_alarm_rate(s, 0.01)
    assert thr.estimator == "tail"
    from scipy.stats import t as student_t

    expected = s.mean() + student_t.ppf(0.99, 29) * s.std(ddof=1) * math.sqrt(1 + 1 / 30)
    assert thr.value == pytest.approx(max(expected, s.max()), rel=1e-9)


def test_estimator_and_what_the_calibration_can_certify():
    assert images_to_certify(0.01) == 299 and images_to_certify(0.05) == 59
    assert clopper_pearson_upper(0, 299) <= 0.01 < clopper_pearson_upper(0, 298)
    big = threshold_for_false_alarm_rate(np.arange(200.0), 0.01)
    assert big.estimator == "conformal" and big.tail_rate is None
    assert big.n_to_certify == 299 and calibration_warning(big) is None
    few = threshold_for_false_alarm_rate(np.arange(1.0, MIN_TAIL_SCORES), 0.01)
    assert few.estimator == "max"
    small = threshold_for_false_alarm_rate(np.linspace(1, 2, 24), 0.01)
    text = calibration_warning(small)
    assert "24 held-out good image(s) cannot certify a 1.0%" in text
    assert "11.7%" in text and "299 would be needed" in text and "log-normal tail" in text
    assert "fewer than 8" in calibration_warning(few)
    assert Threshold.from_dict(small.to_dict()) == small


def test_large_rate_on_tiny_set():
    thr = threshold_for_false_alarm_rate([1.0, 2.0, 3.0, 4.0, 5.0], 0.6)
    assert thr.value == np.nextafter(3.0, np.inf)  # rank ceil(6 * 0.4) = 3
    assert thr.false_alarm_rate == 2 / 5


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_false_alarm_rate_invalid(rate):
    with pytest.raises(ConfigError, match="false-alarm rate"):
        threshold_for_false_alarm_rate(np.ones(10), rate)


def test_false_alarm_needs_scores():
    with pytest.raises(ConfigError, match="at least one good image"):
        threshold_for_false_alarm_rate(np.array([]), 0.1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_refused(bad):
    # A NaN threshold would pass every part: nothing compares >= NaN.
    scores = np.array([0.1, 0.2, bad, 0.3])
    with pytest.raises(ConfigError, match="finite"):
        threshold_for_false_alarm_rate(scores, 0.1)
    with pytest.raises(ConfigError, match="finite"):
        threshold_for_miss_rate(np.ones(3), scores, 0.1)
    with pytest.raises(ConfigError, match="finite"):
        threshold_for_miss_rate(scores, np.ones(3), 0.1)
    with pytest.raises(ConfigError, match="finite"):
        threshold_for_f1(scores, np.ones(3))
    with pytest.raises(ConfigError, match="finite"):
        threshold_for_f1(np.ones(3), scores)


# ---------------------------------------------------------------- miss rate


def test_miss_rate_hand_built():
    good = np.array([0.0, 2.5, 3.0, 4.0])
    defect = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], dtype=float)
    thr = threshold_for_miss_rate(good, defect, 0.2)
    assert thr.value == 3.0  # defects 1 and 2 are missed, 2 / 10 = 0.2
    assert thr.miss_rate == 0.2
    assert thr.rule == "miss-rate"
    assert (thr.target, thr.n_good, thr.n_defect) == (0.2, 4, 10)
    assert thr.false_alarm_rate == 0.5  # 3.0 and 4.0
    assert thr.false_alarm_upper == pytest.approx(clopper_pearson_upper(2, 4))

    thr = threshold_for_miss_rate(good, defect, 0.0)
    assert thr.value == 1.0 and thr.miss_rate == 0.0
    thr = threshold_for_miss_rate(good, defect, 0.25)  # floor(2.5) = 2 misses allowed
    assert thr.value == 3.0


def test_miss_rate_ties():
    thr = threshold_for_miss_rate([0.0], [1.0, 1.0, 1.0, 5.0], 0.5)
    assert thr.value == 1.0  # raising it above 1 would miss 3 of 4
    assert thr.miss_rate == 0.0


def test_miss_rate_is_highest_meeting_target():
    rng = np.random.default_rng(3)
    for _ in range(200):
        defect = np.round(rng.normal(size=rng.integers(1, 40)), 1)  # with ties
        rate = float(rng.uniform(0, 0.9))
        thr = threshold_for_miss_rate(rng.normal(size=20), defect, rate)
        assert np.mean(defect < thr.value) == thr.miss_rate <= rate
        assert np.mean(defect < np.nextafter(thr.value, np.inf)) > rate


def test_miss_rate_without_good_scores():
    thr = threshold_for_miss_rate(np.array([]), np.array([1.0, 2.0]), 0.0)
    assert thr.false_alarm_rate is None
    assert thr.false_alarm_upper is None
    assert thr.n_good == 0


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_miss_rate_invalid(rate):
    with pytest.raises(ConfigError, match="miss rate"):
        threshold_for_miss_rate(np.ones(3), np.arange(10.0), rate)


def test_miss_rate_needs_defects():
    with pytest.raises(ConfigError, match="defective"):
        threshold_for_miss_rate(np.ones(3), np.array([]), 0.1)


# ---------------------------------------------------------------- F1


def f1_at(good, defect, t):
    tp = np.sum(defect >= t)
    fp = np.sum(good >= t)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / len(defect)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def test_f1_hand_built():
    good = np.array([0.1, 0.2, 0.3, 0.8])
    defect = np.array([0.5, 0.6, 0.9])
    thr = threshold_for_f1(good, defect)
    assert thr.value == 0.5  # F1 = 6/7; at 0.3 it is 3/4, at 0.9 it is 1/2
    assert f1_at(good, defect, thr.value) == pytest.approx(6 / 7)
    assert thr.rule == "f1"
    assert thr.miss_rate == 0.0
    assert thr.false_alarm_rate == 0.25
    assert (thr.n_good, thr.n_defect) == (4, 3)


def test_f1_separable():
    thr = threshold_for_f1([0.0, 1.0, 2.0], [3.0, 4.0])
    assert thr.value == 3.0
    assert thr.false_alarm_rate == 0.0 and thr.miss_rate == 0.0


def test_f1_is_the_best_over_all_thresholds():
    rng = np.random.default_rng(11)
    for _ in range(50):
        good = np.round(rng.normal(0, 1, rng.integers(1, 30)), 1)
        defect = np.round(rng.normal(1.5, 1, rng.integers(1, 30)), 1)
        thr = threshold_for_f1(good, defect)
        best = max(f1_at(good, defect, t) for t in np.concatenate([good, defect]))
        assert f1_at(good, defect, thr.value) == pytest.approx(best)
        assert thr.miss_rate == np.mean(defect < thr.value)


def test_f1_needs_both():
    with pytest.raises(ConfigError):
        threshold_for_f1(np.array([]), np.ones(3))
    with pytest.raises(ConfigError):
        threshold_for_f1(np.ones(3), np.array([]))


# ---------------------------------------------------------------- Threshold


def test_threshold_round_trip():
    for thr in (
        threshold_for_false_alarm_rate(np.arange(50.0), 0.05),
        threshold_for_miss_rate(np.arange(5.0), np.arange(3.0, 9.0), 0.2),
        threshold_for_f1(np.arange(5.0), np.arange(3.0, 9.0)),
        Threshold(value=1.5, rule="manual"),
    ):
        d = thr.to_dict()
        assert Threshold.from_dict(d) == thr
        assert Threshold.from_dict(json.loads(json.dumps(d))) == thr  # as stored in a model


def test_threshold_from_dict_ignores_unknown_and_fills_defaults():
    thr = Threshold.from_dict({"value": 2.0, "rule": "manual", "from_the_future": 1})
    assert thr == Threshold(value=2.0, rule="manual")
    assert thr.n_good == 0 and thr.false_alarm_upper is None


# ---------------------------------------------------------------- split_for_calibration


@pytest.mark.parametrize(("n", "fraction"), [(100, 0.1), (37, 0.25), (10, 0.5), (1000, 0.33)])
def test_split_is_a_seeded_partition(n, fraction):
    fit, cal = split_for_calibration(n, fraction, seed=5)
    assert len(cal) == round(n * fraction)
    assert np.intersect1d(fit, cal).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([fit, cal])), np.arange(n))
    assert np.all(np.diff(fit) > 0) and np.all(np.diff(cal) > 0)
    again = split_for_calibration(n, fraction, seed=5)
    np.testing.assert_array_equal(again[0], fit)
    np.testing.assert_array_equal(again[1], cal)
    other = split_for_calibration(n, fraction, seed=6)
    assert not np.array_equal(other[1], cal)  # the seed matters


def test_split_is_random_not_a_block():
    _, cal = split_for_calibration(1000, 0.1, seed=0)
    assert cal.max() - cal.min() > 500  # spread over the images, not the first or last 100


@pytest.mark.parametrize(("n", "fraction", "min_fit"), [(3, 0.9, 1), (10, 0.5, 8), (20, 0.99, 5)])
def test_split_keeps_min_fit(n, fraction, min_fit):
    fit, cal = split_for_calibration(n, fraction, seed=0, min_fit=min_fit)
    assert len(fit) == min_fit
    assert len(fit) + len(cal) == n
    assert np.intersect1d(fit, cal).size == 0


def test_split_edges():
    fit, cal = split_for_calibration(10, 0.0, seed=0)
    np.testing.assert_array_equal(fit, np.arange(10))
    assert cal.size == 0
    fit, cal = split_for_calibration(2, 0.5, seed=0, min_fit=5)  # fewer images than min_fit
    np.testing.assert_array_equal(fit, np.arange(2))
    assert cal.size == 0
    fit, cal = split_for_calibration(1, 0.5, seed=0)
    np.testing.assert_array_equal(fit, [0])
    fit, cal = split_for_calibration(0, 0.1, seed=0)
    assert fit.size == 0 and cal.size == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_invalid_fraction(fraction):
    with pytest.raises(ConfigError, match="calibration fraction"):
        split_for_calibration(10, fraction, seed=0)

"""Image thresholds: scores become OK/NG decisions at a stated error rate.

From good images alone: the threshold is the conformal quantile of held-out good
scores for the target false-alarm rate, and the Clopper-Pearson upper bound of
the false-alarm rate is reported with it. Such a threshold never collapses for
lack of defective images. With labelled defects, a threshold can instead be set
for a target miss rate or for the best F1.

The pixel threshold, where anomaly maps are cut into defect regions, is also
calibrated on good images alone: see :func:`pixel_threshold_for_false_regions`.
Both thresholds live in the model file's JSON (never inside an exported graph),
so ``defectkit calibrate`` can change them without refitting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from defectkit.decide.defaults import DEFAULT_MAX_FALSE_REGIONS, DEFAULT_MIN_AREA
from defectkit.decide.map_store import map_shapes
from defectkit.decide.regions import count_regions
from defectkit.errors import ConfigError


@dataclass
class Threshold:
    """A decision threshold and how it was chosen (stored in the model file)."""

    value: float
    rule: str  # "false-alarm-rate", "miss-rate", "f1", "manual"
    target: float | None = None
    n_good: int = 0
    n_defect: int = 0
    false_alarm_rate: float | None = None  # measured on the calibration set
    false_alarm_upper: float | None = None  # one-sided 95% upper bound
    miss_rate: float | None = None
    #: how a false-alarm-rate threshold was found: "conformal" (rank of the held-out
    #: scores), "tail" (fitted log-normal tail: too few images for the rank) or
    #: "max" (too few even for a tail); None for other rules
    estimator: str | None = None
    #: the fitted tail's false-alarm rate at ``value`` (a model's estimate, not a bound)
    tail_rate: float | None = None
    #: held-out good images needed to certify ``target`` (95% bound, none above)
    n_to_certify: int | None = None
    #: set on the fitted images' leave-one-out scores (few-shot mode), not held-out ones
    left_out: bool = False
    #: copies of them (mirrored, turned, relit) pooled with those scores
    n_copies: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Threshold:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a binomial rate with k events in n."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    from scipy.stats import beta  # scipy.stats takes 0.6 s to import; inspect never needs it

    return float(beta.ppf(confidence, k + 1, n - k))


def _scores(scores: np.ndarray, what: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not np.all(np.isfinite(s)):
        # A NaN threshold would pass every part (no score is >= NaN).
        raise ConfigError(f"{what} scores must be finite; got NaN or infinite values")
    return s


#: fewest held-out scores a tail is fitted to; below it the largest score is used
MIN_TAIL_SCORES = 8


def images_to_certify(rate: float, confidence: float = 0.95) -> int:
    """Good images, none above the threshold, whose one-sided Clopper-Pearson bound
    reaches ``rate``: 299 for 1%, 59 for 5%."""
    return math.ceil(math.log(1 - confidence) / math.log1p(-rate))


def lognormal_tail(scores: np.ndarray, rate: float) -> tuple[float, Callable[[float], float]]:
    """Upper prediction bound of a new good score at ``1 - rate`` under a log-normal
    fit of ``scores`` (a normal one where a score is <= 0), and the fitted tail's
    exceedance probability as a function of the threshold.

    The bound is ``mean + t(n-1) * sd * sqrt(1 + 1/n)`` on the log scale: Student's t
    and the ``1/n`` term widen it for the uncertainty of a mean and spread estimated
    from a few images, so it is above the plain fitted quantile, more so the fewer
    the scores.
    """
    from scipy.stats import t as student_t

    s = np.asarray(scores, np.float64)
    log = bool(np.all(s > 0))
    x = np.log(s) if log else s
    n = len(x)
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    sd = sd if sd > 0 else 1e-6 * max(abs(mean), 1.0)
    scale = sd * math.sqrt(1 + 1 / n)
    q = mean + float(student_t.ppf(1 - rate, n - 1)) * scale
    value = math.exp(q) if log else q

    def exceedance(t: float) -> float:
        if log and t <= 0:
            return 1.0
        z = ((math.log(t) if log else t) - mean) / scale
        return float(student_t.sf(z, n - 1))

    return value, exceedance


def threshold_for_false_alarm_rate(
    good_scores: np.ndarray, rate: float, tail: bool = True
) -> Threshold:
    """Threshold for a false-alarm rate on new good parts of at most ``rate``.

    With n held-out scores, the ceil((n+1)(1-rate))-th smallest is the conformal
    threshold (expected false-alarm rate <= ``rate``). When n is too small for that
    rank (n < 99 for 1%), the largest score alone would promise nothing: then, with
    ``tail`` and at least :data:`MIN_TAIL_SCORES` scores, the threshold is the
    log-normal tail's prediction bound (:func:`lognormal_tail`), never below the
    largest score. ``false_alarm_upper`` is always the distribution-free 95% bound
    of the held-out scores at the threshold; ``tail_rate`` the tail's own estimate.
    """
    if not 0 < rate < 1:
        raise ConfigError(f"false-alarm rate must be in (0, 1), got {rate}")
    s = np.sort(_scores(good_scores, "good"))
    if len(s) == 0:
        raise ConfigError("calibration needs at least one good image")
    n = len(s)
    rank = math.ceil((n + 1) * (1 - rate))
    estimator, tail_rate = "conformal", None
    value = float(s[min(rank, n) - 1])
    if rank > n:
        estimator = "max"
        if tail and n >= MIN_TAIL_SCORES:
            fitted, exceedance = lognormal_tail(s, rate)
            estimator = "tail"
            value = max(value, fitted)
            tail_rate = exceedance(value)
    value = float(np.nextafter(value, np.inf))  # "defect when score > calibrated max"
    k = int(np.sum(s >= value))
    return Threshold(
        value=value,
        rule="false-alarm-rate",
        target=rate,
        n_good=n,
        false_alarm_rate=k / n,
        false_alarm_upper=clopper_pearson_upper(k, n),
        estimator=estimator,
        tail_rate=tail_rate,
        n_to_certify=images_to_certify(rate),
    )


def rounded_scores(scores: np.ndarray) -> list[float]:
    """Scores as JSON numbers, to 7 significant digits (float32's precision)."""
    return [float(f"{float(v):.7g}") for v in np.asarray(scores).ravel()]


def calibration_warning(thr: Threshold) -> str | None:
    """What a user must know about a false-alarm-rate threshold that its held-out
    images cannot certify; None when they can (or for other rules)."""
    if thr.rule != "false-alarm-rate" or thr.target is None:
        return None
    n, target = thr.n_good, thr.target
    if thr.left_out:
        return (
            f"few-shot mode: {n} good image(s), all fitted; the threshold comes from their "
            f"leave-one-out scores and {thr.n_copies} mirrored, turned or relit copies "
            f"({thr.estimator} of the pooled scores). They bound the false-alarm rate at "
            f"{thr.false_alarm_upper:.1%} (95%), not the {target:.1%} target: "
            f"{thr.n_to_certify} held-out good images would be needed. As good parts "
            "accumulate, `defectkit calibrate MODEL GOOD_DIR` sets it on them."
        )
    if thr.estimator == "conformal":
        return None
    how = (
        f"the threshold comes from a log-normal tail fitted to their scores (its estimate "
        f"{thr.tail_rate:.2%}, a model's, not a bound)"
        if thr.estimator == "tail"
        else f"the threshold is just above their largest score (fewer than "
        f"{MIN_TAIL_SCORES} images: too few to fit a tail)"
    )
    return (
        f"{n} held-out good image(s) cannot certify a {target:.1%} false-alarm rate: they "
        f"bound it at {thr.false_alarm_upper:.1%} (95%), and {thr.n_to_certify} would be "
        f"needed; {how}. As good parts accumulate, `defectkit calibrate MODEL GOOD_DIR` "
        "sets it on them."
    )


def threshold_for_miss_rate(
    good_scores: np.ndarray, defect_scores: np.ndarray, rate: float
) -> Threshold:
    """Highest threshold whose miss rate on the labelled defects is <= rate."""
    if not 0 <= rate < 1:
        raise ConfigError(f"miss rate must be in [0, 1), got {rate}")
    d = np.sort(_scores(defect_scores, "defect"))
    if len(d) == 0:
        raise ConfigError("a miss-rate target needs labelled defective images")
    allowed = math.floor(rate * len(d))
    value = float(d[allowed])  # at most `allowed` defects score below it
    g = _scores(good_scores, "good")
    k = int(np.sum(g >= value))
    return Threshold(
        value=value,
        rule="miss-rate",
        target=rate,
        n_good=len(g),
        n_defect=len(d),
        false_alarm_rate=k / len(g) if len(g) else None,
        false_alarm_upper=clopper_pearson_upper(k, len(g)) if len(g) else None,
        miss_rate=float(np.mean(d < value)),
    )


def threshold_for_f1(good_scores: np.ndarray, defect_scores: np.ndarray) -> Threshold:
    """Threshold with the best F1 on labelled good and defective images."""
    g = _scores(good_scores, "good")
    d = _scores(defect_scores, "defect")
    if len(d) == 0 or len(g) == 0:
        raise ConfigError("an F1 target needs both good and defective labelled images")
    best, value = -1.0, float(d.min())
    for t in np.unique(np.concatenate([g, d])):
        tp = np.sum(d >= t)
        fp = np.sum(g >= t)
        f1 = 2 * tp / (2 * tp + fp + (len(d) - tp))
        if f1 > best:
            best, value = f1, float(t)
    k = int(np.sum(g >= value))
    return Threshold(
        value=value,
        rule="f1",
        n_good=len(g),
        n_defect=len(d),
        false_alarm_rate=k / len(g),
        false_alarm_upper=clopper_pearson_upper(k, len(g)),
        miss_rate=float(np.mean(d < value)),
    )


# ---------------------------------------------------------------- pixel threshold


@dataclass
class PixelThreshold:
    """Where anomaly maps are cut into defect regions (stored in the model file)."""

    value: float
    rule: str = "false-regions"  # "false-regions" or "manual"
    target: float | None = None  # allowed regions per good image
    min_area_px: int = DEFAULT_MIN_AREA  # smaller components are specks, dropped
    n_good: int = 0
    false_regions_per_image: float | None = None  # measured on the calibration maps
    good_pixel_quantile: float | None = None  # share of calibration pixels below value
    capped: bool = False  # lowered to the image threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PixelThreshold:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


#: candidate thresholds: the q-quantiles of good pixels for 1 - q = 10^-1 ... 10^-7
_LOG_TAIL = np.arange(1.0, 7.0001, 0.05)
#: good pixels sampled for the quantiles (exact below this many)
_MAX_POOLED = 4_000_000


def _pooled_sample(maps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every ``step``-th pixel of every map, and each map's peak (one pass; each
    map checked on the way)."""
    total = sum(int(np.prod(shape)) for shape in map_shapes(maps))
    step = max(1, math.ceil(total / _MAX_POOLED))
    parts, peaks = [], []
    for m in maps:
        a = np.asarray(m, np.float32)
        _scores(a, "good pixel")
        parts.append(a.ravel()[::step])
        peaks.append(a.max())
    return np.concatenate(parts), np.array(peaks, np.float32)


def _mean_regions(
    maps: Sequence[np.ndarray], peaks: np.ndarray, threshold: float, min_area: int
) -> float:
    """Mean region count over the maps; a map whose peak is below the threshold has
    none, so only the others are looked at (most good maps, near the top)."""
    hits = np.flatnonzero(peaks >= np.float32(threshold))
    return sum(count_regions(maps[int(i)], threshold, min_area) for i in hits) / len(maps)


def pixel_threshold_for_false_regions(
    good_maps: Sequence[np.ndarray],
    max_regions_per_image: float = DEFAULT_MAX_FALSE_REGIONS,
    *,
    min_area: int = DEFAULT_MIN_AREA,
    cap: float | None = None,
) -> PixelThreshold:
    """Pixel threshold from the maps of held-out good images.

    Rule: candidates are high quantiles of the good pixels (1 - q from 10^-7 up
    to 10^-1 in steps of 10^0.05, then upwards from the largest good pixel). The
    threshold is the lowest candidate at which, and at every higher candidate, the
    good images have on average at most ``max_regions_per_image`` regions of at
    least ``min_area`` pixels. Region counts are not monotone in the threshold (a
    region can split in two as it rises), hence "and every higher". With
    ``cap`` (the image threshold), the value is lowered to it if above, so that an
    image whose score (its map's maximum) passes the image threshold has a region.
    """
    if not max_regions_per_image >= 0 or not math.isfinite(max_regions_per_image):
        raise ConfigError(
            f"false regions per good image must be a number >= 0, got {max_regions_per_image}"
        )
    if min_area < 1:
        raise ConfigError(f"minimum region area must be >= 1 pixel, got {min_area}")
    if not len(good_maps):
        raise ConfigError("pixel calibration needs the map of at least one good image")
    maps = good_maps  # a list, or maps stored on disk (read again for each candidate)
    pooled, peaks = _pooled_sample(maps)
    pooled.sort()
    top = float(np.nextafter(np.float32(pooled[-1]), np.float32(np.inf)))
    candidates = [top]
    for k in _LOG_TAIL[::-1]:
        q = 1.0 - 10.0 ** (-k)
        if q * len(pooled) < len(pooled) - 1:  # the quantile is not just the maximum
            candidates.append(float(np.quantile(pooled, q, method="higher")))
    candidates = sorted(set(candidates), reverse=True)
    n = len(maps)
    value, mean = top, 0.0
    for t in candidates:
        m = _mean_regions(maps, peaks, t, min_area)
        if m > max_regions_per_image:
            break
        value, mean = t, m
    capped = cap is not None and value > cap
    if capped:
        value = float(cap)
        mean = _mean_regions(maps, peaks, value, min_area)
    return PixelThreshold(
        value=value,
        rule="false-regions",
        target=max_regions_per_image,
        min_area_px=int(min_area),
        n_good=n,
        false_regions_per_image=mean,
        good_pixel_quantile=float(np.searchsorted(pooled, value, "left") / len(pooled)),
        capped=bool(capped),
    )

"""Statistical process control on the inspection stream: an early warning of
tool wear or a process change, before parts go out of tolerance.

Charts (each fed one result at a time by :meth:`SpcMonitor.update`):

- **p-chart** of the defect rate per lot (or per UTC hour when a result has no
  lot) with 3-sigma limits (the binomial quantiles of the 3-sigma tails, see
  :func:`p_limits`), ``p̄`` from the other groups; a group is judged once it
  holds ``min_group`` parts.
- **EWMA** and two-sided tabular **CUSUM** on the anomaly scores of parts judged
  good: a shift in good parts' scores shows a drifting process while every part
  still passes. Target and sigma come from the first ``baseline`` good parts,
  on the log of the scores (``log_scores``; anomaly scores are positive and
  skewed to the right, their logs much less so). Charts watch for a rise only
  (``two_sided`` False): good parts drifting away from the good images the model
  learned score higher; lower scores are no warning.
- **Western Electric rules** 1-4 on the means of consecutive subgroups of
  ``subgroup`` good scores (an X-bar chart; means are close to normal where
  single anomaly scores are skewed).

A rule that fires raises one :class:`AlarmEvent` (kept, logged, and posted as
JSON to ``webhook_url`` when set); it fires again only after it has cleared.

>>> mon = SpcMonitor(baseline=30)
>>> events = mon.update(score=1.0, is_defect=False, lot="A")
"""

from __future__ import annotations

import json
import logging
import math
import threading
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("defectkit.spc")

#: one-sided tail probability of a normal 3-sigma limit
SIGMA3_TAIL = 0.00135


@dataclass
class AlarmEvent:
    chart: str
    rule: str
    message: str
    result_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Group:
    n: int = 0
    defects: int = 0
    judged: bool = False


@dataclass
class SpcMonitor:
    """EWMA, CUSUM, X-bar Western Electric rules and a p-chart (see module doc)."""

    baseline: int = 100
    ewma_lambda: float = 0.1
    ewma_l: float = 3.3
    cusum_k: float = 0.5
    cusum_h: float = 7.0
    subgroup: int = 5
    min_group: int = 10
    history: int = 500
    webhook_url: str | None = None
    log_scores: bool = True
    two_sided: bool = False
    # learned state
    log_: bool = False
    mean_: float | None = None
    sd_: float | None = None
    _base: list[float] = field(default_factory=list, repr=False)
    _ewma: float | None = field(default=None, repr=False)
    _cpos: float = field(default=0.0, repr=False)
    _cneg: float = field(default=0.0, repr=False)
    _sub: list[float] = field(default_factory=list, repr=False)
    _xbar: deque = field(default_factory=lambda: deque(maxlen=8), repr=False)
    _groups: dict[str, _Group] = field(default_factory=dict, repr=False)
    _active: set[str] = field(default_factory=set, repr=False)
    _series: deque = field(default_factory=deque, repr=False)
    alarms: list[AlarmEvent] = field(default_factory=list, repr=False)
    n_good_: int = 0
    #: the product this monitor charts (None: the results without one)
    product: str | None = None
    _products: dict[str, SpcMonitor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.baseline < 5:
            raise ValueError("baseline must be at least 5 parts")
        self._series = deque(maxlen=self.history)
        self._lock = threading.Lock()

    # -- products -----------------------------------------------------------------
    def for_product(self, product: str | None) -> SpcMonitor:
        """The charts of one product (a unified model's results): their own
        baseline, limits and groups, the same settings. None: this monitor."""
        if product is None or product == self.product:
            return self
        with self._lock:
            child = self._products.get(product)
            if child is None:
                settings = {
                    f.name: getattr(self, f.name)
                    for f in fields(self)
                    if f.init and not f.name.startswith("_") and not f.name.endswith("_")
                    and f.name not in ("alarms", "product")
                }  # fmt: skip
                child = self._products[product] = SpcMonitor(**settings, product=product)
            return child

    def charts_of(self, product: str | None) -> SpcMonitor | None:
        """The charts of ``product`` if it has any (None: this monitor's own);
        never creates them."""
        if product is None or product == self.product:
            return self
        with self._lock:
            return self._products.get(product)

    @property
    def products(self) -> list[str]:
        """The products charted apart so far."""
        with self._lock:
            return sorted(self._products)

    # -- feeding ----------------------------------------------------------------
    def update(
        self,
        score: float | None,
        is_defect: bool | None,
        *,
        lot: str | None = None,
        created_at: datetime | None = None,
        result_id: int | None = None,
        notify: bool = True,
        product: str | None = None,
    ) -> list[AlarmEvent]:
        """Add one result (to its ``product``'s charts when given); returns the
        alarms it raised (already logged and posted when ``notify``)."""
        if product is not None and product != self.product:
            return self.for_product(product).update(
                score, is_defect, lot=lot, created_at=created_at, result_id=result_id,
                notify=notify,
            )  # fmt: skip
        with self._lock:
            events: list[AlarmEvent] = []
            if is_defect is not None:
                events += self._p_chart(is_defect, lot, created_at, result_id)
            if is_defect is False and score is not None and math.isfinite(score):
                events += self._scores(float(score), result_id, created_at)
            if self.product is not None:  # the stored alarm says whose charts
                for e in events:
                    e.message = f"[{self.product}] {e.message}"
            self.alarms.extend(events)
        if notify:
            for e in events:
                self._notify(e)
        return events

    def _fire(self, key: str, firing: bool, event: AlarmEvent) -> list[AlarmEvent]:
        if not firing:
            self._active.discard(key)
            return []
        if key in self._active:
            return []
        self._active.add(key)
        return [event]

    def _p_chart(
        self, is_defect: bool, lot: str | None, at: datetime | None, rid: int | None
    ) -> list[AlarmEvent]:
        at = at or datetime.now(timezone.utc)
        key = f"lot {lot}" if lot else f"hour {at:%Y-%m-%dT%H}"
        g = self._groups.setdefault(key, _Group())
        g.n += 1
        g.defects += int(is_defect)
        if g.judged or g.n < self.min_group:
            return []
        limits = self._p_limits(key)
        if limits is None:
            return []
        _pbar, _lcl, ucl = limits
        p = g.defects / g.n
        if p > ucl + 1e-12:
            g.judged = True
            return [
                AlarmEvent(
                    "p",
                    "beyond 3 sigma",
                    f"defect rate of {key} is {p:.1%} ({g.defects}/{g.n}), above UCL {ucl:.1%}",
                    rid,
                )
            ]
        return []

    def _p_limits(self, key: str) -> tuple[float, float, float] | None:
        others = [g for k, g in self._groups.items() if k != key]
        n = sum(g.n for g in others)
        if n == 0:
            return None
        pbar = (sum(g.defects for g in others) + 0.5) / (n + 1)  # never 0 or 1
        return (pbar, *p_limits(pbar, self._groups[key].n))

    def _scores(self, x: float, rid: int | None, at: datetime | None) -> list[AlarmEvent]:
        self.n_good_ += 1
        stamp = _utc_stamp(at)  # the charts' time axis
        if self.mean_ is None:
            self._base.append(x)
            if len(self._base) >= self.baseline:
                self.log_ = self.log_scores and min(self._base) > 0
                base = [self._t(v) for v in self._base]
                m = sum(base) / len(base)
                var = sum((v - m) ** 2 for v in base) / (len(base) - 1)
                self.mean_, self.sd_ = m, max(math.sqrt(var), 1e-9)
                self._ewma = m
            self._series.append({"n": self.n_good_, "result_id": rid, "at": stamp, "score": x})
            return []
        m, s = self.mean_, self.sd_
        assert s is not None and self._ewma is not None
        lam = self.ewma_lambda
        v = self._t(x)
        self._ewma = lam * v + (1 - lam) * self._ewma
        half = self.ewma_l * s * math.sqrt(lam / (2 - lam))
        z = (v - m) / s
        self._cpos = max(0.0, self._cpos + z - self.cusum_k)
        self._cneg = max(0.0, self._cneg - z - self.cusum_k)
        self._series.append(
            {
                "n": self.n_good_,
                "result_id": rid,
                "at": stamp,
                "score": x,
                "ewma": self._inv(self._ewma),
                "cusum_pos": self._cpos,
                "cusum_neg": self._cneg,
            }
        )
        events: list[AlarmEvent] = []
        ew = self._ewma
        events += self._fire(
            "ewma",
            (abs(ew - m) if self.two_sided else ew - m) > half,
            AlarmEvent(
                "ewma",
                "beyond limit",
                f"EWMA of good parts' scores {self._inv(ew):.4g} outside "
                f"{self._inv(m - half):.4g}..{self._inv(m + half):.4g}",
                rid,
            ),
        )
        sides = (("up", self._cpos), ("down", self._cneg))
        for side, val in sides if self.two_sided else sides[:1]:
            fired = self._fire(
                f"cusum-{side}",
                val > self.cusum_h,
                AlarmEvent(
                    "cusum",
                    f"shift {side}",
                    f"CUSUM of good parts' scores {val:.3g} > h={self.cusum_h} (shift {side})",
                    rid,
                ),
            )
            if fired:  # restart the sum so a lasting shift is reported once per h
                self._cpos, self._cneg = 0.0, 0.0
            events += fired
        self._sub.append(v)
        if len(self._sub) == self.subgroup:
            zbar = (sum(self._sub) / self.subgroup - m) / (s / math.sqrt(self.subgroup))
            self._sub.clear()
            self._xbar.append(zbar)
            rules = western_electric(list(self._xbar), upper_only=not self.two_sided)
            for rule, firing in rules.items():
                events += self._fire(
                    f"we-{rule}",
                    firing,
                    AlarmEvent("xbar", rule, f"subgroup means of good scores: {rule}", rid),
                )
        return events

    def _t(self, x: float) -> float:
        return math.log(x) if self.log_ else x

    def _inv(self, v: float) -> float:
        return math.exp(v) if self.log_ else v

    # -- reporting ----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Chart data for ``GET /spc`` and the dashboard."""
        with self._lock:
            p_points = []
            for key, g in self._groups.items():
                lim = self._p_limits(key)
                p_points.append(
                    {
                        "group": key,
                        "n": g.n,
                        "defects": g.defects,
                        "p": g.defects / g.n,
                        "center": None if lim is None else lim[0],
                        "lcl": None if lim is None else lim[1],
                        "ucl": None if lim is None else lim[2],
                    }
                )
            half = None
            if self.sd_ is not None:
                lam = self.ewma_lambda
                half = self.ewma_l * self.sd_ * math.sqrt(lam / (2 - lam))
            return {
                "p_chart": p_points,
                "scores": {
                    "baseline_n": self.baseline,
                    "mean": self.mean_,
                    "sd": self.sd_,
                    "ewma_lambda": self.ewma_lambda,
                    "log_scale": self.log_,
                    "center": None if half is None else self._inv(self.mean_),
                    "ewma_ucl": None if half is None else self._inv(self.mean_ + half),
                    "ewma_lcl": None if half is None else self._inv(self.mean_ - half),
                    "cusum_k": self.cusum_k,
                    "cusum_h": self.cusum_h,
                    "points": list(self._series),
                },
                "alarms": [a.to_dict() for a in self.alarms[-100:]],
                "product": self.product,
                "products": sorted(self._products),
            }

    def _notify(self, event: AlarmEvent) -> None:
        log.warning("SPC alarm [%s %s]: %s", event.chart, event.rule, event.message)
        if self.webhook_url:
            threading.Thread(
                target=post_webhook, args=(self.webhook_url, event.to_dict()), daemon=True
            ).start()


def _utc_stamp(at: datetime | None) -> str:
    """ISO 8601 UTC with a Z; a naive time is taken as UTC (as the store keeps it)."""
    at = at or datetime.now(timezone.utc)
    if at.tzinfo is not None:
        at = at.astimezone(timezone.utc).replace(tzinfo=None)
    return at.isoformat(timespec="seconds") + "Z"


def p_limits(pbar: float, n: int) -> tuple[float, float]:
    """(LCL, UCL) of a defect rate over ``n`` parts: the binomial quantiles with
    the tail probabilities of 3 sigma (0.135% each side). At the small defect
    rates of a good line the normal approximation ``p̄ ± 3·sqrt(p̄(1-p̄)/n)`` would
    put the UCL below 2 defects; the exact quantiles do not.

    >>> p_limits(0.01, 100)
    (0.0, 0.05)
    """
    from scipy.stats import binom

    lo = float(binom.ppf(SIGMA3_TAIL, n, pbar))
    hi = float(binom.isf(SIGMA3_TAIL, n, pbar))
    return max(0.0, (lo - 1) / n) if lo > 0 else 0.0, hi / n


def post_webhook(url: str, payload: dict[str, Any], timeout: float = 5.0) -> bool:
    """POST ``payload`` as JSON; False (logged) when it fails."""
    req = urllib.request.Request(
        url,
        data=json.dumps({"alarm": payload}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except OSError as e:
        log.error("SPC webhook %s failed: %s", url, e)
        return False


def western_electric(z: list[float], upper_only: bool = False) -> dict[str, bool]:
    """Western Electric rules on standardised points ``z`` (newest last): whether
    each fires at the newest point (``upper_only``: above the centre line only).

    >>> western_electric([0.1, 3.5])["rule 1: beyond 3 sigma"]
    True
    """

    def same_side(pts: list[float], limit: float, need: int) -> bool:
        above = sum(p > limit for p in pts) >= need
        return above or (not upper_only and sum(p < -limit for p in pts) >= need)

    return {
        "rule 1: beyond 3 sigma": same_side(z[-1:], 3, 1),
        "rule 2: 2 of 3 beyond 2 sigma": len(z) >= 3 and same_side(z[-3:], 2, 2),
        "rule 3: 4 of 5 beyond 1 sigma": len(z) >= 5 and same_side(z[-5:], 1, 4),
        "rule 4: 8 on one side": len(z) >= 8 and same_side(z[-8:], 0, 8),
    }

"""Control charts as SVG, drawn by the service (no charting library in the page):
the good parts' scores against time with the EWMA, its centre line and limits
and the alarms marked, and the p-chart of the defect rate per lot or hour with
each group's limit.

Both take the state :meth:`~defectkit.serve.spc.SpcMonitor.state` gives, so the
dashboard draws exactly what ``GET /spc`` reports. Elements carry classes
(``point``, ``alarm``, ``ewma``, ``center``, ``ucl``, ``lcl``, ``tick``) that the
page styles and the tests read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from html import escape
from typing import Any

WIDTH, HEIGHT = 640, 240
#: plot margins: left (y labels), right (limit labels), top, bottom (time labels)
MARGIN = (56, 78, 14, 40)
#: groups shown on the p-chart (the newest)
P_GROUPS = 24


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.rstrip("Z"))


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round values spanning ``[lo, hi]``."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _time_label(t: datetime, span_s: float) -> str:
    if span_s < 600:
        return t.strftime("%H:%M:%S")
    if span_s < 2 * 86400:
        return t.strftime("%H:%M")
    return t.strftime("%m-%d %H:%M")


class _Frame:
    """The plot area and its scales."""

    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        left, right, top, bottom = MARGIN
        self.x0, self.x1 = left, width - right
        self.y0, self.y1 = height - bottom, top  # y grows downwards

    def x(self, f: float) -> float:
        return self.x0 + f * (self.x1 - self.x0)

    def y(self, f: float) -> float:
        return self.y0 + f * (self.y1 - self.y0)

    def axes(self) -> list[str]:
        return [
            f'<rect class="plot" x="{self.x0}" y="{self.y1}" width="{self.x1 - self.x0}" '
            f'height="{self.y0 - self.y1}" fill="#fff" stroke="#999"/>'
        ]

    def hline(self, f: float, cls: str, colour: str, label: str) -> list[str]:
        y = self.y(f)
        return [
            f'<line class="{cls}" x1="{self.x0}" x2="{self.x1}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{colour}" stroke-dasharray="5 3"/>',
            f'<text class="{cls}-label" x="{self.x1 + 4}" y="{y + 4:.1f}" fill="{colour}">'
            f"{escape(label)}</text>",
        ]

    def svg(self, title: str, body: list[str]) -> str:
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.w} {self.h}" '
            f'width="{self.w}" height="{self.h}" role="img" aria-label="{escape(title)}" '
            'font-family="system-ui, sans-serif" font-size="11">'
        )
        return "\n".join([head, f"<title>{escape(title)}</title>", *body, "</svg>"])


def _empty(frame: _Frame, title: str, message: str) -> str:
    x, y = (frame.x0 + frame.x1) / 2, (frame.y0 + frame.y1) / 2
    text = f'<text class="empty" x="{x}" y="{y}" text-anchor="middle" fill="#666">'
    body = [*frame.axes(), f"{text}{escape(message)}</text>"]
    return frame.svg(title, body)


def scores_svg(
    scores: dict[str, Any],
    alarms: Sequence[dict[str, Any]] = (),
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """The good parts' scores against time (UTC): points, EWMA, centre line, EWMA
    limits; points whose result raised an alarm on the score charts ringed in red.
    The y axis is logarithmic where the monitor works on log scores."""
    title = "Good parts' anomaly scores: EWMA chart"
    frame = _Frame(width, height)
    pts = [p for p in scores.get("points", []) if p.get("at") and p.get("score") is not None]
    if not pts:
        return _empty(frame, title, "no good parts inspected yet")
    log = bool(scores.get("log_scale")) and all(p["score"] > 0 for p in pts)
    limits = [scores.get(k) for k in ("center", "ewma_ucl", "ewma_lcl")]
    values = [p["score"] for p in pts] + [p["ewma"] for p in pts if "ewma" in p]
    values += [v for v in limits if v is not None]
    t = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = min(t(v) for v in values if not log or v > 0), max(t(v) for v in values)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad

    def fy(v: float) -> float:
        return (t(v) - lo) / (hi - lo)

    times = [_parse(p["at"]) for p in pts]
    t0, span = times[0], max((times[-1] - times[0]).total_seconds(), 0.0)

    def fx(i: int) -> float:  # by time; by order where every point has one time
        if span <= 0:
            return 0.5 if len(pts) == 1 else i / (len(pts) - 1)
        return (times[i] - t0).total_seconds() / span

    body = frame.axes()
    # y ticks: round values of the score (decades and their halves on a log axis)
    ticks = [10**e for e in _nice_ticks(lo, hi)] if log else _nice_ticks(lo, hi)
    for v in ticks:
        if not 0 <= fy(v) <= 1:
            continue
        y = frame.y(fy(v))
        body.append(
            f'<line class="grid" x1="{frame.x0}" x2="{frame.x1}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#eee"/>'
        )
        body.append(
            f'<text class="tick" x="{frame.x0 - 4}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_fmt(v)}</text>"
        )
    # x ticks: five times along the axis
    for k in range(5):
        f = k / 4
        x = frame.x(f)
        when = t0 if span <= 0 else t0 + (times[-1] - t0) * f
        body.append(
            f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.y1}" y2="{frame.y0}" '
            'stroke="#f2f2f2"/>'
        )
        body.append(
            f'<text class="tick time" x="{x:.1f}" y="{frame.y0 + 14}" text-anchor="middle">'
            f"{_time_label(when, span)}</text>"
        )
        if span <= 0:
            break
    body.append(
        f'<text class="axis-label" x="{(frame.x0 + frame.x1) / 2}" y="{height - 6}" '
        f'text-anchor="middle" fill="#444">time (UTC){", log score" if log else ""}</text>'
    )
    center, ucl, lcl = limits
    if center is not None:
        body += frame.hline(fy(center), "center", "#2a7a2a", f"CL {_fmt(center)}")
    if ucl is not None:
        body += frame.hline(fy(ucl), "ucl", "#c0392b", f"UCL {_fmt(ucl)}")
    if lcl is not None and (not log or lcl > 0):
        body += frame.hline(fy(lcl), "lcl", "#c0392b", f"LCL {_fmt(lcl)}")
    n_base = sum(1 for p in pts if "ewma" not in p)
    if n_base:
        x_end = frame.x(fx(n_base - 1))
        body.append(
            f'<rect class="baseline" x="{frame.x0}" y="{frame.y1}" '
            f'width="{max(x_end - frame.x0, 2):.1f}" height="{frame.y0 - frame.y1}" '
            'fill="#f4f4f4"><title>baseline: the limits come from these parts</title></rect>'
        )
    ewma = [(frame.x(fx(i)), frame.y(fy(p["ewma"]))) for i, p in enumerate(pts) if "ewma" in p]
    if len(ewma) > 1:
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in ewma)
        body.append(f'<polyline class="ewma" points="{coords}" fill="none" stroke="#1f6fb2"/>')
    alarmed = {
        a["result_id"]: a
        for a in alarms
        if a.get("result_id") is not None and a.get("chart") in ("ewma", "cusum", "xbar")
    }
    for i, p in enumerate(pts):
        x, y = frame.x(fx(i)), frame.y(fy(p["score"]))
        tip = f"result {p.get('result_id')}: score {_fmt(p['score'])} at {p['at']}"
        rid = f' data-result="{p["result_id"]}"' if p.get("result_id") is not None else ""
        body.append(
            f'<circle class="point"{rid} cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#777">'
            f"<title>{escape(tip)}</title></circle>"
        )
        a = alarmed.get(p.get("result_id"))
        if a is not None:
            body.append(
                f'<circle class="alarm"{rid} cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" '
                f'stroke="#c0392b" stroke-width="2"><title>{escape(a.get("message", ""))}'
                "</title></circle>"
            )
    return frame.svg(title, body)


def p_chart_svg(
    groups: Sequence[dict[str, Any]], *, width: int = WIDTH, height: int = HEIGHT
) -> str:
    """Defect rate per lot (or hour) in the order the groups began, the newest
    ``P_GROUPS``: each group's rate, its centre line and upper limit (they differ
    by group size), and groups above their limit in red."""
    title = "Defect rate per lot or hour: p-chart"
    frame = _Frame(width, height)
    groups = list(groups)[-P_GROUPS:]
    if not groups:
        return _empty(frame, title, "no decided parts yet")
    top = max([g["p"] for g in groups] + [g["ucl"] or 0 for g in groups] + [0.01]) * 1.12
    body = frame.axes()
    for v in _nice_ticks(0, top, 4):
        y = frame.y(v / top)
        body.append(
            f'<line class="grid" x1="{frame.x0}" x2="{frame.x1}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#eee"/>'
        )
        body.append(
            f'<text class="tick" x="{frame.x0 - 4}" y="{y + 4:.1f}" text-anchor="end">'
            f"{100 * v:.3g}%</text>"
        )
    n = len(groups)
    step = (frame.x1 - frame.x0) / n
    ucl_path, center_path = [], []
    for i, g in enumerate(groups):
        xa, xb = frame.x0 + i * step, frame.x0 + (i + 1) * step
        if g.get("ucl") is not None:
            y = frame.y(g["ucl"] / top)
            ucl_path += [f"{xa:.1f},{y:.1f}", f"{xb:.1f},{y:.1f}"]
        if g.get("center") is not None:
            y = frame.y(g["center"] / top)
            center_path += [f"{xa:.1f},{y:.1f}", f"{xb:.1f},{y:.1f}"]
    if center_path:
        body.append(
            f'<polyline class="center" points="{" ".join(center_path)}" fill="none" '
            'stroke="#2a7a2a" stroke-dasharray="5 3"/>'
        )
    if ucl_path:
        body.append(
            f'<polyline class="ucl" points="{" ".join(ucl_path)}" fill="none" '
            'stroke="#c0392b" stroke-dasharray="5 3"/>'
        )
        y_last = float(ucl_path[-1].split(",")[1])
        body.append(
            f'<text class="ucl-label" x="{frame.x1 + 4}" y="{y_last + 4:.1f}" '
            'fill="#c0392b">UCL</text>'
        )
    label_every = max(1, math.ceil(n / 8))
    for i, g in enumerate(groups):
        x, y = frame.x0 + (i + 0.5) * step, frame.y(g["p"] / top)
        out = g.get("ucl") is not None and g["p"] > g["ucl"] + 1e-12
        cls, colour = ("point alarm", "#c0392b") if out else ("point", "#1f6fb2")
        tip = f"{g['group']}: {g['defects']}/{g['n']} = {100 * g['p']:.1f}%"
        if g.get("ucl") is not None:
            tip += f", UCL {100 * g['ucl']:.1f}%"
        body.append(
            f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="{5 if out else 3.5}" '
            f'fill="{colour}"><title>{escape(tip)}</title></circle>'
        )
        if i % label_every == 0:
            name = g["group"].removeprefix("lot ").removeprefix("hour ")
            name = name if len(name) <= 14 else name[:13] + "…"
            body.append(
                f'<text class="tick group" x="{x:.1f}" y="{frame.y0 + 14}" '
                f'text-anchor="middle">{escape(name)}</text>'
            )
    body.append(
        f'<text class="axis-label" x="{(frame.x0 + frame.x1) / 2}" y="{height - 6}" '
        'text-anchor="middle" fill="#444">lot or hour (UTC), oldest first</text>'
    )
    return frame.svg(title, body)

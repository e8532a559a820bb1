"""Control charts drawn as SVG by the service: valid XML, points on a time axis,
limits, alarms ringed, an empty chart that says why."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import datetime, timedelta

from defectkit.serve.charts import p_chart_svg, scores_svg
from defectkit.serve.spc import SpcMonitor

SVG = "{http://www.w3.org/2000/svg}"


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def _classes(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if cls in (e.get("class") or "").split()]


def _fed_monitor(n_good: int, shift_after: int | None = None) -> SpcMonitor:
    mon = SpcMonitor(baseline=20)
    t0 = datetime(2026, 3, 1, 8, 0, 0)
    for i in range(n_good):
        score = 1.0 + 0.05 * ((i * 7) % 5 - 2)
        if shift_after is not None and i >= shift_after:
            score *= 3.0
        mon.update(
            score, False, lot=f"L{i // 25}", created_at=t0 + timedelta(minutes=i), result_id=i + 1
        )
    return mon


def test_score_chart_has_time_axis_limits_and_every_point():
    state = _fed_monitor(60).state()
    root = _parse(scores_svg(state["scores"], state["alarms"]))
    assert len(_classes(root, "point")) == 60
    times = [e.text for e in _classes(root, "time")]
    assert times[0] == "08:00" and times[-1] == "08:59"  # an hour of parts
    for cls in ("center", "ucl", "ewma"):
        assert _classes(root, cls), cls
    labels = {
        e.text.split()[0] for e in _classes(root, "ucl-label") + _classes(root, "center-label")
    }
    assert labels == {"UCL", "CL"}
    assert not _classes(root, "alarm")
    # the baseline parts are shaded: the limits come from them
    assert len(_classes(root, "baseline")) == 1


def test_score_chart_rings_the_parts_that_raised_alarms():
    mon = _fed_monitor(80, shift_after=40)
    state = mon.state()
    raised = {a["result_id"] for a in state["alarms"] if a["chart"] in ("ewma", "cusum", "xbar")}
    assert raised  # the shift was caught
    root = _parse(scores_svg(state["scores"], state["alarms"]))
    ringed = {int(e.get("data-result")) for e in _classes(root, "alarm")}
    assert ringed == raised
    # on the log scale the shifted points sit above the UCL line
    ucl_y = float(_classes(root, "ucl")[0].get("y1"))
    late = [e for e in _classes(root, "point") if int(e.get("data-result")) > 50]
    assert all(float(e.get("cy")) < ucl_y for e in late)


def test_empty_charts_say_why():
    assert _classes(_parse(scores_svg({"points": []})), "empty")[0].text.startswith("no good")
    assert _classes(_parse(p_chart_svg([])), "empty")[0].text.startswith("no decided")


def test_p_chart_marks_groups_above_their_limit():
    mon = SpcMonitor(baseline=5, min_group=10)
    for lot, defects in (("A", 1), ("B", 0), ("C", 9), ("D", 1)):
        for i in range(20):
            mon.update(1.0, i < defects, lot=lot)
    root = _parse(p_chart_svg(mon.state()["p_chart"]))
    points = _classes(root, "point")
    assert len(points) == 4
    out = [e for e in points if "alarm" in e.get("class").split()]
    assert len(out) == 1 and "C" in out[0].find(f"{SVG}title").text
    assert [e.text for e in _classes(root, "group")] == ["A", "B", "C", "D"]
    assert _classes(root, "ucl") and _classes(root, "center")


def test_text_from_lots_is_escaped():
    mon = SpcMonitor(baseline=5)
    mon.update(1.0, True, lot='<script>"x"</script>')
    svg = p_chart_svg(mon.state()["p_chart"])
    assert "<script>" not in svg
    _parse(svg)  # still valid XML

"""The report as one self-contained HTML file: inline CSS, every image embedded
as a base64 data URI, nothing fetched when it is opened."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Thumb", "render_html"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#1c1c1c;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;
padding-bottom:4px}.meta{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 10px;
text-align:left}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.plot{max-width:100%;height:auto}.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:240px;font-size:.8em}figure img{max-width:240px;max-height:240px;
display:block;border:1px solid #ccc}figcaption{word-break:break-all;margin-top:2px}
.ok{color:#2b8a3e}.bad{color:#c92a2a}.note{color:#555;font-size:.9em}
"""


@dataclass
class Thumb:
    """One gallery entry: an encoded image and its caption lines."""

    data: bytes
    mime: str
    caption: list[str]


def _uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else format(x, spec)
    return str(x)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _table(rows: Sequence[Sequence[Any]], head: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            cls = ' class="num"' if i > 0 else ""
            cells.append(f"<td{cls}>{c if isinstance(c, _Raw) else _e(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


class _Raw(str):
    """Markup that is already escaped."""


def _plot(png: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{_e(alt)}" src="{_uri(png, "image/png")}">'


def _gallery(thumbs: Sequence[Thumb], empty: str) -> str:
    if not thumbs:
        return f'<p class="note">{_e(empty)}</p>'
    items = []
    for t in thumbs:
        cap = "<br>".join(_e(c) for c in t.caption)
        items.append(
            f'<figure><img alt="{_e(t.caption[0])}" src="{_uri(t.data, t.mime)}">'
            f"<figcaption>{cap}</figcaption></figure>"
        )
    return '<div class="gallery">' + "\n".join(items) + "</div>"


def _region_rows(r: dict[str, Any]) -> list[list[Any]]:
    g, d = r["good"], r["defective"]
    return [
        ["ground-truth regions", d["n_truth"]],
        [f"found (IoU > {r['iou']:g} with a predicted region)", d["n_found"]],
        ["region recall", _pct(r["recall"])],
        ["predicted regions on good images", g["n_pred"]],
        ["false regions per good image", _fmt(r["false_regions_per_good_image"], ".3f")],
        ["predicted regions on defective images", d["n_pred"]],
        ["of those matching no ground-truth region", d["n_pred_unmatched"]],
    ]


def render_html(
    summary: dict[str, Any],
    plots: dict[str, bytes],
    false_alarms: Sequence[Thumb],
    misses: Sequence[Thumb],
    title: str,
) -> str:
    """The whole report page."""
    s = summary
    cal = s.get("calibration") or {}
    c = s["confusion"]
    thr = s["threshold"]
    covers = s.get("bound_covers")
    covers_html = (
        "n/a"
        if covers is None
        else (
            f'<span class="ok">yes</span> ({_pct(s["false_alarm_rate"])} &le; '
            f"{_pct(s['false_alarm_upper_calibrated'])})"
            if covers
            else f'<span class="bad">no</span> ({_pct(s["false_alarm_rate"])} &gt; '
            f"{_pct(s['false_alarm_upper_calibrated'])})"
        )
    )
    if cal:
        rule = f"{cal.get('rule')} target {cal.get('target')}, from {cal.get('n_good')} good"
        if cal.get("n_defect"):
            rule += f" + {cal.get('n_defect')} defective"
        rule += " calibration images"
    else:
        rule = s["threshold_source"]
    overview = _table(
        [
            ["images (good / defective)", f"{s['n_good']} / {s['n_defect']}"],
            ["image AUROC", _fmt(s["image_auroc"])],
            ["image AP", _fmt(s["image_ap"])],
            ["image threshold", f"{_fmt(thr, '.6g')} ({rule})"],
            ["pixel threshold (regions)", f"{_fmt(s['pixel_threshold'], '.6g')}"],
            ["false-alarm rate on good images", _pct(s["false_alarm_rate"])],
            [
                "calibrated 95% upper bound on the false-alarm rate",
                _pct(s["false_alarm_upper_calibrated"]),
            ],
            ["bound covers the measured rate", _Raw(covers_html)],
            ["recall (defective images caught)", _pct(s["recall"])],
            ["region recall (as inspect reports)", _pct(s["regions"]["reported"]["recall"])],
            [
                "false regions per good image (as inspect reports)",
                _fmt(s["regions"]["reported"]["false_regions_per_good_image"], ".3f"),
            ],
            ["files that could not be used", s["n_failed_files"]],
        ],
        ["figure", "value"],
    )
    per_type = _table(
        [
            [t, _pct(s["recall_per_type"][t]), f"{k} / {n}"]
            for t, (k, n) in s["counts_per_type"].items()
        ],
        ["defect type", "recall", "caught / images"],
    )
    confusion = _table(
        [["good", c["tn"], c["fp"]], ["defective", c["fn"], c["tp"]]],
        ["truth \\ decision", "OK", "NG"],
    )
    reported = s["regions"]["reported"]
    alone = s["regions"]["pixel_threshold_only"]
    regions = _table(
        [
            [name, v1, v2]
            for (name, v1), (_, v2) in zip(_region_rows(reported), _region_rows(alone), strict=True)
        ],
        ["", "as inspect reports (NG images only)", "pixel threshold alone (every image)"],
    )
    sev = s["severity_counts"]
    severity = _table(
        [[g, sev["regions"][g], sev["ng_images"][g]] for g in sev["regions"]],
        ["grade", "regions", "NG images (worst region)"],
    )
    secs = s.get("seconds", {})
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in secs.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="meta">model {_e(s.get("model", ""))} &middot; data {_e(s.get("data", ""))}
&middot; {_e(s.get("created", ""))} &middot; {_e(timing)}</p>

<section id="summary"><h2>Summary</h2>{overview}</section>

<section id="curves"><h2>ROC and precision-recall</h2>
{_plot(plots["curves"], "ROC and precision-recall curves")}</section>

<section id="histogram"><h2>Score distributions</h2>
{_plot(plots["histogram"], "score histograms of good and defective images")}</section>

<section id="confusion"><h2>Confusion matrix at the threshold</h2>
{_plot(plots["confusion"], "confusion matrix")}{confusion}</section>

<section id="recall"><h2>Recall per defect type</h2>
{_plot(plots["recall"], "recall per defect type")}{per_type}</section>

<section id="regions"><h2>Region level</h2>
<p class="note">Ground-truth regions are the 8-connected components of the masks; a
region is found when a predicted region overlaps it with IoU &gt; {reported["iou"]:g}.
Predicted regions are the components of the anomaly map at the pixel threshold of at
least {_e(s["min_region_area_px"])} px; <code>inspect</code> lists them on NG images only.</p>
{regions}
<h3>Severity of reported regions</h3>{severity}</section>

<section id="false-alarms"><h2>Worst false alarms</h2>
<p class="note">Good images decided NG, highest score first. Outlines: predicted regions
(yellow minor, orange major, red critical).</p>
{_gallery(false_alarms, "No false alarms at this threshold.")}</section>

<section id="misses"><h2>Worst misses</h2>
<p class="note">Defective images decided OK, lowest score first. Green: ground truth.</p>
{_gallery(misses, "No misses at this threshold.")}</section>
</body></html>
"""

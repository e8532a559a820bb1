"""The evaluation report: one self-contained HTML file with curves, histograms,
confusion matrix, recall per type, region-level results and galleries of the
worst false alarms and misses, from a test set scored once.

>>> scored = score_samples(det, read_mvtec(root).test)            # doctest: +SKIP
>>> page, summary = build_report(det, scored, model="m.dkm", data=root)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from defectkit.decide.severity import SeverityRules
from defectkit.report.analysis import Analysis, analyse
from defectkit.report.collect import ScoredSet, labelled_samples, score_samples
from defectkit.report.html import Thumb, render_html

__all__ = ["Analysis", "ScoredSet", "analyse", "build_report", "labelled_samples", "score_samples"]

THUMB_SIDE = 240


def _thumb(
    path: Path,
    amap: np.ndarray,
    threshold: float | None,
    analysis: Analysis,
    i: int,
    truth: np.ndarray,
) -> bytes | None:
    from defectkit.data.images import load_image
    from defectkit.decide.overlay import region_overlay
    from defectkit.errors import ImageError

    try:
        image = load_image(path)
    except ImageError:
        return None
    if image.shape[:2] != amap.shape:
        return None
    regions = analysis.regions[i]
    labels = analysis.region_labels[i] if regions else None
    over = region_overlay(image, amap, threshold, regions, labels, truth=truth)
    h, w = over.shape[:2]
    scale = THUMB_SIDE / max(h, w)
    if scale < 1:
        over = cv2.resize(over, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", over[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else None


def _gallery(
    scored: ScoredSet, analysis: Analysis, order: np.ndarray, limit: int, kind: str
) -> list[Thumb]:
    out: list[Thumb] = []
    thr = analysis.threshold
    for i in order[:limit]:
        i = int(i)
        data = _thumb(scored.paths[i], scored.maps[i], thr, analysis, i, scored.masks[i])
        if data is None:
            continue
        regs = analysis.regions[i]
        caption = [
            scored.paths[i].name,
            f"{scored.types[i]} · score {scored.scores[i]:.4g}"
            + (f" ({scored.scores[i] / thr:.2f}× threshold)" if thr else ""),
        ]
        if kind == "false-alarm":
            grades = ", ".join(r.severity for r in regs) or "no region above min area"
            caption.append(f"{len(regs)} region(s): {grades}")
        out.append(Thumb(data, "image/jpeg", caption))
    return out


def build_report(
    det: Any,
    scored: ScoredSet,
    *,
    model: str | Path = "",
    data: str | Path = "",
    mm_per_pixel: float | None = None,
    rules: SeverityRules | None = None,
    gallery: int = 12,
) -> tuple[str, dict[str, Any]]:
    """The HTML page and the summary figures (JSON-able) of a scored test set."""
    from defectkit.report.plots import confusion_plot, curves_plot, histogram_plot, recall_plot

    t0 = time.perf_counter()
    analysis = analyse(det, scored, mm_per_pixel=mm_per_pixel, rules=rules)
    s = analysis.summary
    s["model"] = str(model)
    s["data"] = str(data)
    s["created"] = time.strftime("%Y-%m-%d %H:%M %Z")
    y = scored.label_array.astype(int)
    scores = scored.score_array
    thr = analysis.threshold
    plots = {
        "curves": curves_plot(y, scores, thr),
        "histogram": histogram_plot(y, scores, thr),
        "confusion": confusion_plot(s["confusion"]),
        "recall": recall_plot(
            list(s["counts_per_type"]), [tuple(v) for v in s["counts_per_type"].values()]
        ),
    }
    pred = analysis.predicted
    fa = np.flatnonzero(pred & (y == 0))
    fa = fa[np.argsort(-scores[fa], kind="stable")]
    miss = np.flatnonzero(~pred & (y == 1))
    miss = miss[np.argsort(scores[miss], kind="stable")]
    false_alarms = _gallery(scored, analysis, fa, gallery, "false-alarm")
    misses = _gallery(scored, analysis, miss, gallery, "miss")
    s["seconds"]["report"] = round(time.perf_counter() - t0, 2)
    title = f"defectkit report: {det.model.name} on {Path(str(data)).name or data}"
    return render_html(s, plots, false_alarms, misses, title), s

"""The report's plots, drawn with matplotlib (Agg, no display) as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["confusion_plot", "curves_plot", "histogram_plot", "recall_plot"]

GOOD = "#2b8a3e"
DEFECT = "#c92a2a"
THRESHOLD = "#1c1c1c"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def curves_plot(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> bytes:
    """ROC and precision-recall curves side by side, the operating point marked."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig = _figure(9.0, 4.0)
    roc_ax, pr_ax = fig.subplots(1, 2)
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        for ax in (roc_ax, pr_ax):
            _note(ax, "needs both good and defective images")
        roc_ax.set_title("ROC")
        pr_ax.set_title("Precision-recall")
        return _png(fig)
    fpr, tpr, _ = roc_curve(y, s)
    roc_ax.plot(fpr, tpr, color=DEFECT, lw=1.8)
    roc_ax.plot([0, 1], [0, 1], color="#aaaaaa", lw=0.8, ls="--")
    prec, rec, _ = precision_recall_curve(y, s)
    pr_ax.plot(rec, prec, color=DEFECT, lw=1.8, drawstyle="steps-post")
    pr_ax.axhline(y.mean(), color="#aaaaaa", lw=0.8, ls="--")
    if threshold is not None:
        pred = s >= threshold
        tp = np.sum(pred & (y == 1))
        op_fpr = np.sum(pred & (y == 0)) / np.sum(y == 0)
        op_rec = tp / np.sum(y == 1)
        op_prec = tp / max(1, np.sum(pred))
        kw = {"color": THRESHOLD, "zorder": 5, "label": f"threshold {threshold:.4g}"}
        roc_ax.scatter([op_fpr], [op_rec], marker="o", **kw)
        pr_ax.scatter([op_rec], [op_prec], marker="o", **kw)
        roc_ax.legend(loc="lower right")
        pr_ax.legend(loc="lower left")
    roc_ax.set(xlabel="false-alarm rate", ylabel="recall", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    pr_ax.set(
        xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02)
    )
    return _png(fig)


def histogram_plot(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> bytes:
    """Score histograms of good and defective images, the threshold as a line."""
    fig = _figure(9.0, 3.6)
    ax = fig.subplots()
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        _note(ax, "no images")
        return _png(fig)
    lo, hi = float(s.min()), float(s.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 41)
    for lab, colour, name in ((0, GOOD, "good"), (1, DEFECT, "defective")):
        part = s[y == lab]
        if part.size:
            ax.hist(part, bins=bins, color=colour, alpha=0.55, label=f"{name} ({part.size})")
    if threshold is not None:
        ax.axvline(threshold, color=THRESHOLD, lw=1.5, ls="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score", ylabel="images", title="Scores: good vs defective")
    ax.legend()
    return _png(fig)


def confusion_plot(confusion: dict[str, int]) -> bytes:
    """2x2 confusion matrix at the threshold (rows truth, columns decision)."""
    fig = _figure(4.2, 3.6)
    ax = fig.subplots()
    m = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape, float), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{m[i, j]}\n{share[i, j]:.1%}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.6 else "black",
                fontsize=12,
            )
    ax.set_xticks([0, 1], ["OK", "NG"])
    ax.set_yticks([0, 1], ["good", "defective"])
    ax.set(xlabel="decision", ylabel="truth", title="Confusion at the threshold")
    return _png(fig)


def recall_plot(types: Sequence[str], counts: Sequence[tuple[int, int]]) -> bytes:
    """Recall per defect type as horizontal bars, caught / total written on each."""
    fig = _figure(6.5, 0.5 + 0.45 * max(1, len(types)))
    ax = fig.subplots()
    if not types:
        _note(ax, "no defective images")
        return _png(fig)
    rates = [c / n if n else 0.0 for c, n in counts]
    pos = np.arange(len(types))
    ax.barh(pos, rates, color=DEFECT, alpha=0.75)
    for p, r, (c, n) in zip(pos, rates, counts, strict=True):
        ax.text(min(r + 0.01, 0.86), p, f"{r:.0%} ({c}/{n})", va="center")
    ax.set_yticks(pos, list(types))
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="recall at the threshold", title="Recall per defect type")
    return _png(fig)

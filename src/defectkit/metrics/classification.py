"""Metrics of a defect-type classifier: accuracy, macro-F1, per-class precision
and recall, and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["classification_report", "format_classification"]


def classification_report(
    y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """Figures of predicted vs true class names, as a JSON-serialisable dict.

    Keys: ``accuracy``, ``macro_f1`` (the unweighted mean of the per-class F1 over
    the classes present in ``y_true``), ``n``, ``per_class`` (class ->
    ``precision``, ``recall``, ``f1``, ``support``) and ``confusion_matrix``
    (``labels`` and ``matrix``: row = true class, column = predicted class).
    ``classes`` fixes the order (classes that occur but are not listed follow,
    sorted). A class never predicted has precision 0; F1 is 0 where precision and
    recall are both 0.

    >>> r = classification_report(["a", "a", "b"], ["a", "b", "b"])
    >>> r["accuracy"], r["confusion_matrix"]["matrix"]
    (0.6666666666666666, [[1, 1], [0, 1]])
    """
    t, p = [str(x) for x in y_true], [str(x) for x in y_pred]
    if len(t) != len(p):
        raise ValueError(f"{len(t)} true labels but {len(p)} predictions")
    labels = list(classes or [])
    labels += sorted((set(t) | set(p)) - set(labels))
    index = {c: i for i, c in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for a, b in zip(t, p, strict=True):
        cm[index[a], index[b]] += 1
    per_class: dict[str, dict[str, float | int]] = {}
    f1s = []
    for c, i in index.items():
        tp = int(cm[i, i])
        support = int(cm[i].sum())
        predicted = int(cm[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support:
            f1s.append(f1)
    n = len(t)
    return {
        "accuracy": float(np.trace(cm) / n) if n else float("nan"),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "n": n,
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "matrix": cm.tolist()},
    }


def format_classification(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows of a :func:`classification_report`, ready to print."""
    rows = [
        ("images", str(report["n"])),
        ("accuracy", f"{report['accuracy']:.4f}"),
        ("macro-F1", f"{report['macro_f1']:.4f}"),
    ]
    for c, m in report["per_class"].items():
        rows.append(
            (
                f"{c} (n={m['support']})",
                f"precision {m['precision']:.3f}  recall {m['recall']:.3f}  F1 {m['f1']:.3f}",
            )
        )
    return rows

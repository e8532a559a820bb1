"""Reviewed results as a labelled dataset, to retrain from.

Layout written under ``out``: ``<class>/<id>.<ext>`` (``good`` for parts an
operator judged good; the reviewed defect type, or ``defect``, otherwise) and a
manifest ``labels.csv`` (``image,class,split`` with paths relative to it, the
format ``defectkit fit --manifest`` reads; ``split`` is left empty). ``good/``
alone is a folder of good images for ``defectkit fit``.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

from defectkit.serve.store import ResultStore

_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def class_name(verdict: str, defect_type: str | None) -> str:
    """Folder name for a review; only safe characters reach the file system."""
    if verdict == "good":
        return "good"
    name = _SAFE.sub("_", (defect_type or "defect").strip()).strip("_") or "defect"
    return "defect_good" if name == "good" else name


def export_labels(store: ResultStore, out: str | Path) -> dict[str, int]:
    """Copy every reviewed result's image into ``out``; returns images per class."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    rows = []
    for r in store.reviewed():
        cls = class_name(r.review_verdict or "", r.review_defect_type)
        rel = Path(cls) / f"{r.id:08d}.{r.image_ext}"
        (out / cls).mkdir(exist_ok=True)
        shutil.copyfile(store.blobs.path(r.image_sha256, r.image_ext), out / rel)
        rows.append((rel.as_posix(), cls))
        counts[cls] = counts.get(cls, 0) + 1
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "class", "split"])
        for rel, cls in rows:
            w.writerow([rel, cls, ""])
    return counts

"""Scoring a labelled image set once, keeping what evaluation, calibration and
the report need (scores, maps, masks, evidence), with per-file errors."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectkit.data.datasets import Sample, is_mvtec, list_images, read_mvtec
from defectkit.errors import DatasetError, DefectkitError
from defectkit.methods.base import Progress

__all__ = ["ScoredSet", "labelled_samples", "score_samples"]


def labelled_samples(data: str | os.PathLike[str]) -> list[Sample]:
    """Images of a labelled set and their labels, from one of three layouts:

    * an MVTec layout (``train/good`` present): its ``test`` set, masks included;
    * a folder with a ``good`` subfolder: ``good/`` is good, every other
      subfolder a defect type (no masks);
    * any other folder: all its images are good (false-alarm calibration only).
    """
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root}" if root.exists() else f"not found: {root}")
    if is_mvtec(root):
        return read_mvtec(root).test
    if (root / "good").is_dir():
        samples: list[Sample] = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            paths, _ = list_images([sub])
            label = 0 if sub.name == "good" else 1
            samples.extend(Sample(p, label, sub.name, None) for p in paths)
        if not samples:
            raise DatasetError(f"no images in the subfolders of {root}")
        return samples
    paths, problems = list_images([root])
    if not paths:
        detail = f" ({problems[0][0]}: {problems[0][1]})" if problems else ""
        raise DatasetError(f"no images found under {root}{detail}")
    return [Sample(p, 0, "good", None) for p in paths]


@dataclass
class ScoredSet:
    """Per image, in input order (files that failed are left out, with a reason)."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # all False for good images
    extras: list[dict[str, Any]] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def label_array(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=np.int8)

    @property
    def score_array(self) -> np.ndarray:
        return np.asarray(self.scores, dtype=np.float64)


def score_samples(
    det: Any,
    samples: list[Sample],
    progress: Progress | None = None,
    *,
    batch_size: int = 16,
    keep_maps: bool = True,
    stage: str = "score",
) -> ScoredSet:
    """Score every sample once with ``det`` (a Detector); load its mask when it has
    one. With ``keep_maps=False`` maps and masks are not kept (scores only)."""
    from defectkit.data.batches import iter_batches
    from defectkit.data.images import load_mask

    t0 = time.perf_counter()
    out = ScoredSet()
    by_path = {s.path: s for s in samples}
    done = 0
    for batch in iter_batches([s.path for s in samples], batch_size):
        good = [b for b in batch if b.image is not None]
        out.errors.extend((b.path, b.error or "unreadable") for b in batch if b.image is None)
        if good:
            res = det.score([b.image for b in good])
            extras = res.extras or [{} for _ in good]
            for b, s, m, ex in zip(good, res.scores, res.maps, extras, strict=True):
                sample = by_path[b.path]
                try:
                    if sample.mask_path is not None:
                        mask = load_mask(sample.mask_path, b.image.shape[:2])
                    else:
                        mask = np.zeros(b.image.shape[:2], dtype=bool)
                except DefectkitError as e:
                    out.errors.append((sample.mask_path or b.path, str(e)))
                    continue
                out.paths.append(b.path)
                out.labels.append(int(sample.label))
                out.types.append(sample.defect_type)
                out.scores.append(float(s))
                out.extras.append(ex)
                if keep_maps:
                    out.maps.append(m)
                    out.masks.append(mask)
        done += len(batch)
        if progress is not None:
            progress(stage, done, len(samples))
    out.seconds = time.perf_counter() - t0
    return out

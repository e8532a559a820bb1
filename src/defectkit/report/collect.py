"""Scoring a labelled image set once, keeping what evaluation, calibration and
the report need (scores, maps, masks, evidence), with per-file errors."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from defectkit.data.datasets import Sample, is_mvtec, list_images, read_mvtec
from defectkit.errors import DatasetError, DefectkitError
from defectkit.methods.base import Progress

if TYPE_CHECKING:
    from defectkit.scale.local_pool import WorkerPool

__all__ = ["ScoredImage", "ScoredSet", "labelled_samples", "score_batch", "score_samples"]


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


@dataclass
class ScoredImage:
    """One file scored (or why it could not be): what ``score_batch`` gives back."""

    path: Path
    error: str | None = None
    score: float = float("nan")
    map: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, int] = (0, 0)


def score_batch(det: Any, batch: Sequence[Any]) -> list[ScoredImage]:
    """Score a batch of paths (decoded here, e.g. in a worker process) or of
    already loaded items, in order."""
    from defectkit.data.batches import Loaded, load_item

    items = [b if isinstance(b, Loaded) else load_item(b) for b in batch]
    out = [ScoredImage(b.path, b.error or "unreadable") for b in items]
    good = [k for k, b in enumerate(items) if b.image is not None]
    if good:
        res = det.score([items[k].image for k in good])
        extras = res.extras or [{} for _ in good]
        for k, s, m, ex in zip(good, res.scores, res.maps, extras, strict=True):
            image = items[k].image
            assert image is not None
            out[k] = ScoredImage(items[k].path, None, float(s), m, ex, image.shape[:2])
    return out


def score_samples(
    det: Any,
    samples: list[Sample],
    progress: Progress | None = None,
    *,
    batch_size: int = 16,
    keep_maps: bool = True,
    stage: str = "score",
    pool: WorkerPool | None = None,
) -> ScoredSet:
    """Score every sample once with ``det`` (a Detector); load its mask when it has
    one. With ``keep_maps=False`` maps and masks are not kept (scores only). With
    ``pool``, its worker processes (each holding the same model) score some batches."""
    from defectkit.data.batches import iter_batches
    from defectkit.data.images import load_mask
    from defectkit.scale.local_pool import ordered_batches

    t0 = time.perf_counter()
    out = ScoredSet()
    by_path = {s.path: s for s in samples}
    paths = [s.path for s in samples]
    if pool is not None:
        chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        results = ordered_batches(chunks, partial(score_batch, det), pool, score_batch)
    else:  # decoding the next batch in background threads while this one scores
        results = (score_batch(det, b) for b in iter_batches(paths, batch_size))
    done = 0
    for batch in results:
        for r in batch:
            if r.error is not None:
                out.errors.append((r.path, r.error))
                continue
            sample = by_path[r.path]
            try:
                if sample.mask_path is not None:
                    mask = load_mask(sample.mask_path, r.shape)
                else:
                    mask = np.zeros(r.shape, dtype=bool)
            except DefectkitError as e:
                out.errors.append((sample.mask_path or r.path, str(e)))
                continue
            out.paths.append(r.path)
            out.labels.append(int(sample.label))
            out.types.append(sample.defect_type)
            out.scores.append(r.score)
            out.extras.append(r.extras)
            if keep_maps:
                assert r.map is not None
                out.maps.append(r.map)
                out.masks.append(mask)
        done += len(batch)
        if progress is not None:
            progress(stage, done, len(samples))
    out.seconds = time.perf_counter() - t0
    return out

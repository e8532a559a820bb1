"""Anomaly maps of many calibration images, kept on disk instead of in memory.

The pixel threshold is calibrated on the maps of every held-out good image, at
full image resolution (H x W x 4 bytes each): 300 images of 1024x1024 hold
1.2 GB. Above a budget :func:`defectkit.detector.Detector.fit` scores those
images in chunks and writes each map to a temporary folder as it comes;
:class:`SavedMaps` reads them back, one at a time, whenever the calibration
counts regions. The maps come back as the same arrays, so the threshold is
the same; reading them again costs some time (from the page cache, usually).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = ["SavedMaps", "map_shapes"]


class SavedMaps(Sequence[np.ndarray]):
    """Maps written into ``folder`` (which must exist and is left to the caller
    to remove) as ``.npy`` files, read back on each access."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.paths: list[Path] = []
        self.shapes: list[tuple[int, ...]] = []

    def append(self, amap: np.ndarray) -> None:
        a = np.ascontiguousarray(amap)  # its own dtype: the same values come back
        path = self.folder / f"{len(self.paths):07d}.npy"
        np.save(path, a, allow_pickle=False)
        self.paths.append(path)
        self.shapes.append(tuple(a.shape))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return np.load(self.paths[index], allow_pickle=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]


def map_shapes(maps: Sequence[np.ndarray]) -> list[tuple[int, ...]]:
    """Shape of each map; read from nothing but the record for :class:`SavedMaps`."""
    if isinstance(maps, SavedMaps):
        return list(maps.shapes)
    return [tuple(np.shape(m)) for m in maps]

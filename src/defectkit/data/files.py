"""Training images that stay on disk: decoded each time a method needs one.

A fit holds every decoded training image while the method learns, so memory
grows with the data set: 10,000 images of 512x512 RGB are 7.9 GB before the
method has stored anything. :class:`ImageFiles` is a sequence of the same
images that decodes a file on each access instead, so a method that walks its
images in batches (PatchCore, PaDiM) needs memory for one batch at a time.
:func:`load_within` makes the choice for a list of files: it reads them once
(reporting the files that cannot be used), keeps the decoded images while they
fit in a memory budget, and otherwise gives an :class:`ImageFiles` of the
readable ones.

>>> images, ok, errors = load_within(paths, budget_bytes=1 << 30)   # doctest: +SKIP
>>> len(images), images[0].shape                                    # doctest: +SKIP
(9000, (512, 512, 3))
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import overload

import numpy as np
from PIL import Image

from defectkit.data.batches import iter_batches
from defectkit.data.images import DEFAULT_MAX_PIXELS, load_image
from defectkit.errors import ImageError

__all__ = [
    "DEFAULT_IMAGE_MEMORY",
    "ImageFiles",
    "image_batches",
    "image_shapes",
    "load_within",
    "take",
]

#: decoded training images kept in memory up to this many bytes (1 GiB)
DEFAULT_IMAGE_MEMORY = 1 << 30


class ImageFiles(Sequence[np.ndarray]):
    """Images read from ``paths`` on each access, as uint8 ``(H, W, 3)`` RGB arrays
    (:func:`~defectkit.data.images.load_image`).

    ``shapes`` ((height, width) per file, recorded when the files were first
    read) lets a method size its work without decoding every file again. A file
    that changed or vanished since then raises :class:`~defectkit.errors.ImageError`
    naming it, as does one whose size no longer matches its recorded shape.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        shapes: Sequence[tuple[int, int]] | None = None,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if shapes is not None and len(shapes) != len(self.paths):
            raise ValueError(f"{len(shapes)} shapes for {len(self.paths)} files")
        self._shapes = None if shapes is None else [(int(h), int(w)) for h, w in shapes]
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> ImageFiles: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | ImageFiles:
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        path = self.paths[index]
        img = load_image(path, max_pixels=self.max_pixels)
        if self._shapes is not None and img.shape[:2] != self._shapes[index]:
            h, w = self._shapes[index]
            now = f"{img.shape[1]}x{img.shape[0]}"
            raise ImageError(str(path), f"changed since it was first read ({w}x{h}, now {now})")
        return img

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        """The files at ``indices``, still read on access."""
        idx = [int(i) for i in indices]
        shapes = None if self._shapes is None else [self._shapes[i] for i in idx]
        return ImageFiles([self.paths[i] for i in idx], shapes, max_pixels=self.max_pixels)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each image; decodes the files once if not recorded."""
        if self._shapes is None:
            self._shapes = [tuple(img.shape[:2]) for img in self]  # type: ignore[misc]
        return list(self._shapes)


def image_shapes(images: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """(height, width) of each image, without decoding an :class:`ImageFiles` or
    making the images of another lazy sequence that records its ``shapes``."""
    shapes = getattr(images, "shapes", None)
    if shapes is not None:
        return list(shapes)
    return [(int(img.shape[0]), int(img.shape[1])) for img in images]


def take(images: Sequence[np.ndarray], indices: Sequence[int]) -> Sequence[np.ndarray]:
    """The images at ``indices``: a list, or for an :class:`ImageFiles` another one
    (nothing is decoded)."""
    if isinstance(images, ImageFiles):
        return images.subset(indices)
    return [images[i] for i in indices]


def seeded_split(n: int, n_held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (kept, held out) of ``n`` images, ``n_held`` of them held out
    by a seeded permutation (the same images for the same ``n`` and ``seed``)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def image_batches(
    images: Sequence[np.ndarray], batches: Sequence[Sequence[int]]
) -> Iterator[list[np.ndarray]]:
    """The images of each batch of indices, in order. For an :class:`ImageFiles`
    the next batch decodes in a background thread (Pillow and OpenCV release the
    GIL) while the caller computes on the current one."""
    if not isinstance(images, ImageFiles):
        for idx in batches:
            yield [images[i] for i in idx]
        return
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:

        def read(idx: Sequence[int]) -> list[np.ndarray]:
            return [images[i] for i in idx]

        pending = pool.submit(read, batches[0])
        for k in range(len(batches)):
            current = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(read, batches[k + 1])
            yield current


def header_shape(path: Path) -> tuple[int, int] | None:
    """(h, w) from the file's header, without decoding; None where it cannot be
    read (the decoding pass then names the problem)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception:  # any unreadable header: judged when decoded
        return None
    return int(h), int(w)


def _header_bytes(path: Path) -> int:
    """Decoded RGB size from the file's header (0 where it cannot be read)."""
    shape = header_shape(path)
    return 0 if shape is None else shape[0] * shape[1] * 3


def load_within(
    paths: Sequence[Path],
    budget_bytes: int | None = DEFAULT_IMAGE_MEMORY,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[np.ndarray] | ImageFiles, list[Path], list[tuple[Path, str]]]:
    """Read every file once: (the images that loaded, their paths, (path, problem)
    for those that did not).

    The images come as a list while their decoded size stays within
    ``budget_bytes``; above it, an :class:`ImageFiles` of the readable files is
    returned instead (each image is then decoded again whenever it is used:
    slower, in bounded memory). The file headers tell the size before anything
    is decoded, so a set known to be too large is never held even in part; the
    decoded sizes still decide when the headers were wrong. A budget of 0
    always gives :class:`ImageFiles`; ``None`` (no budget) always a list.
    """
    if budget_bytes is None:
        budget_bytes = sys.maxsize  # no header pass: everything is held anyway
        over = False
    elif budget_bytes < 0:
        raise ValueError(f"image memory budget must be >= 0 bytes, got {budget_bytes}")
    else:
        over = sum(_header_bytes(p) for p in paths) > budget_bytes
    kept: list[np.ndarray] | None = None if over else []
    ok: list[Path] = []
    shapes: list[tuple[int, int]] = []
    errors: list[tuple[Path, str]] = []
    held = 0
    for batch in iter_batches(paths, 32, max_pixels=max_pixels):
        for item in batch:
            if item.image is None:
                errors.append((item.path, item.error or "unreadable"))
                continue
            ok.append(item.path)
            shapes.append((int(item.image.shape[0]), int(item.image.shape[1])))
            if kept is not None:
                held += item.image.nbytes
                if held > budget_bytes:
                    kept = None  # over budget: from here on, files are read when used
                else:
                    kept.append(item.image)
    if kept is not None:
        return kept, ok, errors
    return ImageFiles(ok, shapes, max_pixels=max_pixels), ok, errors

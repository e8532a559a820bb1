"""Loading many files with per-file errors, decoding ahead of compute."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectkit.data.images import DEFAULT_MAX_PIXELS, load_image
from defectkit.errors import ImageError


@dataclass
class Loaded:
    """One input file: its image, or the reason it could not be used."""

    path: Path
    image: np.ndarray | None
    error: str | None


def load_item(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Loaded:
    """One file as ``Loaded``: its image, or why it could not be decoded."""
    try:
        return Loaded(path, load_image(path, max_pixels=max_pixels), None)
    except ImageError as e:
        return Loaded(path, None, e.problem)
    except MemoryError:
        return Loaded(path, None, "out of memory while decoding")


def iter_batches(
    paths: Sequence[Path],
    batch_size: int = 16,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 2,
) -> Iterator[list[Loaded]]:
    """Yield lists of ``Loaded`` in input order; the next batch decodes in
    background threads (Pillow and OpenCV release the GIL) while the caller
    computes on the current one."""
    if not paths:
        return
    batches = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def submit(batch: list[Path]):
            return [pool.submit(load_item, p, max_pixels) for p in batch]

        pending = submit(batches[0])
        for i in range(len(batches)):
            nxt = submit(batches[i + 1]) if i + 1 < len(batches) else None
            yield [f.result() for f in pending]
            pending = nxt


def load_all(
    paths: Sequence[Path], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[np.ndarray], list[Path], list[tuple[Path, str]]]:
    """Images that loaded (with their paths) and (path, problem) for those that did not."""
    images: list[np.ndarray] = []
    ok: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for batch in iter_batches(paths, 32, max_pixels=max_pixels):
        for item in batch:
            if item.image is None:
                errors.append((item.path, item.error or "unreadable"))
            else:
                images.append(item.image)
                ok.append(item.path)
    return images, ok, errors

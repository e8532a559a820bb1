"""Backbone features in batches: images resized to a working size (squashed to
a square, or aspect kept and batched with images of the same network size)
and run through a feature extractor a batch at a time."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch

from defectkit.backbones import FeatureExtractor
from defectkit.data.files import image_batches, image_shapes
from defectkit.methods.base import Image, Progress
from defectkit.methods.parts.resize import fit_size, to_tensor


def feature_batches(
    extractor: FeatureExtractor,
    images: Sequence[Image],
    side: int,
    batch_size: int,
    *,
    keep_aspect: bool = False,
    aspect: float | None = None,
    photometric: str = "none",
    progress: Progress | None = None,
    stage: str = "features",
) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """Yield ``(image indices, feature maps)`` for batches of ``images``.

    Images are resized by :func:`~defectkit.methods.parts.resize.fit_size`
    (one working ``aspect`` for all when given, else squashed to ``side`` x ``side``
    unless ``keep_aspect``) and batched with
    others of the same network size, brightness and contrast normalised as
    ``photometric`` says (:mod:`~defectkit.methods.parts.photometric`).
    ``progress(stage, done, total)`` after each batch.
    """
    multiple = max(extractor.strides) if extractor.strides else 1
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (h, w) in enumerate(image_shapes(images)):
        groups[fit_size(h, w, side, multiple, keep_aspect, aspect)].append(i)
    batches = [
        (size, members[start : start + batch_size])
        for size, members in groups.items()
        for start in range(0, len(members), batch_size)
    ]
    done = 0
    with torch.inference_mode():
        loaded = image_batches(images, [idx for _, idx in batches])
        for (size, idx), batch in zip(batches, loaded, strict=True):
            x = torch.cat([to_tensor(img, size, photometric) for img in batch])
            yield idx, [f.contiguous() for f in extractor(x)]
            done += len(idx)
            if progress is not None:
                progress(stage, done, len(images))

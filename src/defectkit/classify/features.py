"""Whole-image features from a pretrained backbone: each chosen feature map pooled
over the image (mean, standard deviation, maximum) and concatenated.

Mean pooling says what textures are present, the standard deviation how uneven
they are, the maximum whether something small and strong is anywhere. With the
default layers and a logistic regression on the frozen features (no
augmentation), magnetic-tile defect types on the fixed split reached a macro-F1
of 0.93 with the mean alone and 0.98 with all three; NEU-DET was at 99.7-100%
either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from defectkit.backbones import FeatureExtractor, load_backbone, stage_ends
from defectkit.errors import ConfigError
from defectkit.methods.base import Image, Progress
from defectkit.methods.parts.resize import to_tensor

__all__ = ["POOLINGS", "PooledFeatures", "classifier_layers", "pool_maps"]

#: the poolings :class:`PooledFeatures` knows
POOLINGS: tuple[str, ...] = ("mean", "std", "max")


def classifier_layers(backbone: str) -> list[str]:
    """Layers pooled when none are named: the ends of the backbone's last two stages
    (stride 32), the most abstract maps, which transfer best to a new set of classes.
    (Anomaly methods take :func:`defectkit.backbones.default_layers`, mid-level maps.)

    >>> classifier_layers("efficientnet-lite0")
    ['blocks.14', 'blocks.15']
    """
    ends = stage_ends(backbone)
    return [f"blocks.{ends[5]}", f"blocks.{ends[6]}"]


def pool_maps(maps: Sequence[torch.Tensor], pooling: Sequence[str]) -> torch.Tensor:
    """(B, sum_i C_i * len(pooling)): for each map, its poolings in order; differentiable."""
    parts: list[torch.Tensor] = []
    for m in maps:
        flat = m.reshape(m.shape[0], m.shape[1], -1)
        for p in pooling:
            if p == "mean":
                parts.append(flat.mean(2))
            elif p == "std":
                parts.append(flat.std(2, correction=0))
            elif p == "max":
                parts.append(flat.amax(2))
            else:
                raise ConfigError(f"unknown pooling {p!r}; known: {list(POOLINGS)}")
    return torch.cat(parts, 1)


class PooledFeatures:
    """Images -> ``(n, dim)`` float32 pooled features (a part, like PatchCore's embedding).

    Images are resized to ``image_size`` squared (aspect not kept: a defect's
    type does not depend on the part's proportions) and batched.

    >>> pf = PooledFeatures("efficientnet-lite0", image_size=224)   # doctest: +SKIP
    >>> pf(images).shape                                            # doctest: +SKIP
    (len(images), 1536)
    """

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        layers: Sequence[str] | None = None,
        image_size: int = 224,
        pooling: Sequence[str] = POOLINGS,
        batch_size: int = 16,
    ) -> None:
        if image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {image_size}")
        if isinstance(pooling, str):
            pooling = [pooling]
        if not pooling or any(p not in POOLINGS for p in pooling):
            raise ConfigError(f"pooling must name one or more of {list(POOLINGS)}, got {pooling}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.layers = list(layers) if layers is not None else classifier_layers(backbone)
        self.image_size = int(image_size)
        self.pooling = list(pooling)
        self.batch_size = int(batch_size)
        self._extractor: FeatureExtractor | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = load_backbone(self.backbone, self.layers)
        return self._extractor

    @property
    def dim(self) -> int:
        return sum(self.extractor.channels) * len(self.pooling)

    def batch(self, images: Sequence[Image]) -> torch.Tensor:
        """Float (B, 3, s, s) in [0, 1] at the network size."""
        size = (self.image_size, self.image_size)
        return torch.cat([to_tensor(img, size) for img in images])

    def __call__(
        self, images: Sequence[Image], progress: Progress | None = None, stage: str = "features"
    ) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                maps = self.extractor(self.batch(chunk))
                out[start : start + len(chunk)] = pool_maps(maps, self.pooling).numpy()
                if progress is not None:
                    progress(stage, start + len(chunk), len(images))
        return out

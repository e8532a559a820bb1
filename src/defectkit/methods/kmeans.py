"""k-means over pretrained patch features: good patches are summarised by
``n_clusters`` centres; a patch's anomaly score is its distance to the nearest
centre, measured in units of that cluster's own spread per feature.

The per-cluster scaling matters: plain Euclidean distance to the nearest centre
scored 0.67-0.71 image AUROC on magnetic-tile with 256-1024 centres (rare but
normal patches such as tile edges lie far from every centre), against 0.91 when
each cluster's spread (diagonal variance of its members) divides the distance.
More clusters help (256: 0.84, 512: 0.89, 1024: 0.91) at the cost of fit time.
Features are standardised per channel before clustering. With the defaults on
magnetic-tile: image AUROC 0.912, pixel AUROC 0.820.

Compared with ``patchcore``, the memory is a fixed, small set of centres (about
1 MB) instead of a coreset of real patches; a cluster spanning several kinds
of normal patches can absorb a defect that lies between them, and clustering
of a subsample (``max_samples``) may leave rare normal patches without a centre
of their own. Built from parts: features in batches and patch embedding
(``parts.extract``, ``parts.embedding``), faiss k-means, nearest-centre search
(``parts.knn``), map upsampling (``parts.maps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import torch

from defectkit.backbones import FeatureExtractor, default_layers, load_backbone
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
from defectkit.methods.parts.knn import NearestNeighbours
from defectkit.methods.parts.maps import upsample_map

#: a cluster needs about this many member patches for a spread estimate
_MIN_PER_CLUSTER = 32
#: pseudo-members pulling a small cluster's spread toward the pooled spread
_PRIOR_MEMBERS = 4.0
#: floor on the per-feature variance, in standardised units
_VAR_FLOOR = 0.01
#: rows processed at a time in fit (bounded temporary memory)
_CHUNK = 65536


def _column_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (float32), accumulated in float64 by chunks."""
    shift = x[0].astype(np.float64)
    total = np.zeros(x.shape[1])
    total_sq = np.zeros(x.shape[1])
    for s in range(0, len(x), _CHUNK):
        c = x[s : s + _CHUNK].astype(np.float64) - shift
        total += c.sum(0)
        total_sq += (c * c).sum(0)
    n = len(x)
    mean = total / n
    var = np.maximum(total_sq / n - mean * mean, 0.0)
    std = np.sqrt(var)
    std = np.maximum(std, 1e-6 * max(float(std.max()), 1e-12))
    return (mean + shift).astype(np.float32), std.astype(np.float32)


class KMeans(AnomalyModel):
    """Nearest k-means centre of pretrained patch features, spread-normalised.

    >>> model = KMeans(n_clusters=512).fit(good_images)   # doctest: +SKIP
    >>> model.score(new_images).scores                    # doctest: +SKIP
    """

    name = "kmeans"
    summary = "k-means centres of pretrained patch features + distance to nearest centre"
    exportable = True
    onnx_scoring = "patch embedding in torch, nearest centre in faiss (not in ONNX)"
    low_precision = True
    _built_from_settings = ("_extractor", "_index")

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        layers: list[str] | None = None,
        image_size: int = 256,
        keep_aspect: bool = False,
        neighbourhood: int = 3,
        n_clusters: int = 1024,
        max_samples: int = 100_000,
        n_iter: int = 20,
        sigma: float = 4.0,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.image_size = image_size
        self.keep_aspect = keep_aspect
        self.neighbourhood = neighbourhood
        self.n_clusters = n_clusters
        self.max_samples = max_samples
        self.n_iter = n_iter
        self.sigma = sigma
        self.batch_size = batch_size
        self.seed = seed
        self._extractor: FeatureExtractor | None = None
        self._index: NearestNeighbours | None = None

    def _validate(self) -> None:
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")
        if self.n_clusters < 1:
            raise ConfigError(f"n_clusters must be >= 1, got {self.n_clusters}")
        if self.max_samples < 2:
            raise ConfigError(f"max_samples must be >= 2, got {self.max_samples}")
        if self.n_iter < 1:
            raise ConfigError(f"n_iter must be >= 1, got {self.n_iter}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def _settings_layers(self) -> list[str] | None:
        """The layers the settings name, defaults filled in (None: a backbone module
        without named layers, which ``load_backbone`` refuses)."""
        if self.layers is None:
            return default_layers(self.backbone) if isinstance(self.backbone, str) else None
        return [self.layers] if isinstance(self.layers, str) else list(self.layers)

    @property
    def extractor(self) -> FeatureExtractor:
        """The backbone, built on first use for the layers the model was fitted (or
        loaded) with, else the settings'."""
        if self._extractor is None:
            layers = self.layers_ if hasattr(self, "layers_") else self._settings_layers()
            self._extractor = load_backbone(self.backbone, layers)
        return self._extractor

    def _features(
        self, images: Sequence[Image], progress: Progress | None, stage: str
    ) -> dict[int, np.ndarray]:
        """Patch embeddings (h, w, C) per image index."""
        out: dict[int, np.ndarray] = {}
        for idx, maps in feature_batches(
            self.extractor,
            images,
            self.image_size,
            self.batch_size,
            keep_aspect=self.keep_aspect,
            progress=progress,
            stage=stage,
        ):
            emb = patch_embedding(maps, self.neighbourhood).permute(0, 2, 3, 1).numpy()
            for j, i in enumerate(idx):
                out[i] = emb[j]
        return out

    # -- contract ---------------------------------------------------------------
    def fit(self, images: Sequence[Image], progress: Progress | None = None) -> KMeans:
        self._validate()
        images = check_images(images)
        self.layers_ = self._settings_layers()
        if self._extractor is not None and list(self._extractor.layers) != self.layers_:
            self._extractor = None  # built for other layers (settings changed since)
        emb = self._features(images, progress, "features")
        dim = next(iter(emb.values())).shape[-1]
        x = np.concatenate([emb.pop(i).reshape(-1, dim) for i in range(len(images))])
        mean, std = _column_stats(x)
        for s in range(0, len(x), _CHUNK):  # standardise in place, a chunk at a time
            x[s : s + _CHUNK] -= mean
            x[s : s + _CHUNK] /= std
        rng = np.random.default_rng(self.seed)
        sample = x
        if len(x) > self.max_samples:
            sample = x[np.sort(rng.choice(len(x), self.max_samples, replace=False))]
        k = int(min(self.n_clusters, max(1, len(sample) // _MIN_PER_CLUSTER)))
        if progress is not None:
            progress("k-means", 0, 1)
        km = faiss.Kmeans(
            dim,
            k,
            niter=self.n_iter,
            seed=int(self.seed),
            max_points_per_centroid=len(sample),
            verbose=False,
        )
        km.train(np.ascontiguousarray(sample, dtype=np.float32))
        del sample
        centres = np.ascontiguousarray(km.centroids, dtype=np.float32)
        if progress is not None:
            progress("k-means", 1, 1)
        # spread of every cluster, from all training patches, a chunk at a time
        index = NearestNeighbours(centres)
        counts = torch.zeros(k, dtype=torch.float64)
        sq = torch.zeros((k, dim), dtype=torch.float64)
        for s in range(0, len(x), _CHUNK):
            chunk = x[s : s + _CHUNK]
            a = index.search(chunk, 1)[1][:, 0]
            d2 = torch.from_numpy((chunk - centres[a]) ** 2).double()
            at = torch.from_numpy(a)
            sq.index_add_(0, at, d2)
            counts.index_add_(0, at, torch.ones(len(a), dtype=torch.float64))
        sq_np, counts_np = sq.numpy(), counts.numpy()
        pooled = sq_np.sum(0) / max(len(x), 1)
        var = (sq_np + _PRIOR_MEMBERS * pooled) / (counts_np[:, None] + _PRIOR_MEMBERS)
        self.centres_ = centres
        self.inv_spread_ = (1.0 / np.sqrt(var + _VAR_FLOOR)).astype(np.float32)
        self.feature_mean_ = mean
        self.feature_std_ = std
        self.cluster_sizes_ = np.round(counts_np).astype(np.int64)
        self.n_train_images_ = len(images)
        self._index = None
        return self

    def _nn(self) -> NearestNeighbours:
        if self._index is None:
            self._index = NearestNeighbours(self.centres_)
        return self._index

    def score(self, images: Sequence[Image], progress: Progress | None = None) -> ScoreResult:
        self._require_fitted()
        images = check_images(images)
        emb = self._features(images, progress, "score")
        dim = self.centres_.shape[1]
        scores = np.empty(len(images), dtype=np.float32)
        maps: list[np.ndarray] = []
        extras: list[dict[str, Any]] = []
        for i, img in enumerate(images):
            e = emb.pop(i)
            h, w, c = e.shape
            if c != dim:
                raise ModelFileError(
                    f"kmeans model: centres have {dim} features but backbone "
                    f"{self.backbone!r} layers {self.layers_} give {c}"
                )
            z = (e.reshape(-1, c) - self.feature_mean_) / self.feature_std_
            _, nearest = self._nn().search(z, 1)
            a = nearest[:, 0]
            dist = np.sqrt((((z - self.centres_[a]) * self.inv_spread_[a]) ** 2).sum(1))
            amap = upsample_map(dist.reshape(h, w), img.shape[:2], self.sigma)
            maps.append(amap)
            scores[i] = float(amap.max())
            worst = int(np.argmax(dist))
            extras.append(
                {"worst_patch": [worst // w, worst % w], "grid": [h, w], "cluster": int(a[worst])}
            )
        return ScoreResult(scores=scores, maps=maps, extras=extras)

    # -- persistence ------------------------------------------------------------
    def learned_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        return (
            {
                "centres": self.centres_,
                "inv_spread": self.inv_spread_,
                "feature_mean": self.feature_mean_,
                "feature_std": self.feature_std_,
                "cluster_sizes": self.cluster_sizes_,
            },
            {"n_train_images": self.n_train_images_, "layers": self.layers_},
        )

    def load_learned_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        centres = arrays.get("centres")
        if centres is None or centres.ndim != 2 or centres.dtype != np.float32 or not len(centres):
            raise ModelFileError("kmeans model: centres missing or malformed")
        k, dim = centres.shape
        shapes = {
            "inv_spread": (k, dim),
            "feature_mean": (dim,),
            "feature_std": (dim,),
            "cluster_sizes": (k,),
        }
        for key, shape in shapes.items():
            arr = arrays.get(key)
            if arr is None or arr.shape != shape:
                raise ModelFileError(f"kmeans model: {key} missing or malformed")
            if not np.all(np.isfinite(arr)):
                raise ModelFileError(f"kmeans model: {key} holds NaN or infinite values")
        if not np.all(np.isfinite(centres)):
            raise ModelFileError("kmeans model: centres hold NaN or infinite values")
        if np.any(arrays["feature_std"] <= 0) or np.any(arrays["inv_spread"] <= 0):
            raise ModelFileError("kmeans model: spreads must be positive")
        self.centres_ = np.ascontiguousarray(centres)
        self.inv_spread_ = arrays["inv_spread"].astype(np.float32)
        self.feature_mean_ = arrays["feature_mean"].astype(np.float32)
        self.feature_std_ = arrays["feature_std"].astype(np.float32)
        self.cluster_sizes_ = arrays["cluster_sizes"].astype(np.int64)
        self.n_train_images_ = int(info.get("n_train_images", 0))
        # the layers it was fitted with (files that record none: the settings')
        self.layers_ = loaded_layers(info, "layers", "kmeans") or self._settings_layers()
        if self._extractor is not None and list(self._extractor.layers) != self.layers_:
            self._extractor = None
        self._index = None

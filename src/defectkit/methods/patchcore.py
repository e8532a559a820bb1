"""PatchCore (Roth et al., 2022): a memory bank of locally aware patch features
from good images, subsampled by greedy coreset; a patch's anomaly score is its
distance to the nearest patch in the bank.

Built from the parts in ``defectkit.methods.parts``: resize (aspect kept),
pretrained feature extractor, patch embedding, coreset, faiss nearest neighbour,
map upsampling and smoothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from defectkit.backbones import FeatureExtractor, default_layers, load_backbone, stage_ends
from defectkit.data.files import image_shapes, take
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods.base import (
    AnomalyModel,
    Image,
    Progress,
    ScoreResult,
    check_images,
    loaded_layers,
)
from defectkit.methods.parts.coreset import greedy_coreset
from defectkit.methods.parts.embedding import patch_embedding, with_position
from defectkit.methods.parts.extract import feature_batches
from defectkit.methods.parts.knn import NearestNeighbours
from defectkit.methods.parts.maps import upsample_map
from defectkit.methods.parts.mask_head import (
    MaskHead,
    MaskHeadSettings,
    check_masks,
    grid_mask,
    train_mask_head,
)
from defectkit.methods.parts.photometric import check_mode, mode_from_file
from defectkit.methods.parts.resize import fit_size, working_aspect

_FINE, _CONTEXT = "fine", "context"
#: smoothing (px) of the mask head's upsampled probability: sharper than the
#: distance map's, the head's cells being surer
_MASK_SIGMA = 4.0
#: training patches (left out of the bank) that HNSW is checked on at fit
_SEARCH_CHECK = 2048
#: HNSW recall below which ``nn_search="auto"`` searches exactly
_MIN_RECALL = 0.99
#: training images (evenly spaced) whose leave-one-out peaks are the reference pool
_REF_POOL = 200
#: the reference pool needs this many training images per neighbour asked
#: (``reference_k``; 15 for 5): with fewer, an image's neighbours are much of the
#: pool and their median is the pool's, give or take noise
_REF_PER_NEIGHBOUR = 3
#: ``mirror_bank``: which mirrored copies of the training images join the fine bank
_MIRRORS: dict[str, tuple[str, ...]] = {
    "auto": (),  # none here; few-shot fits choose (Detector.fit, decide.few_shot)
    "none": (),
    "lr": ("lr",),
    "ud": ("ud",),
    "both": ("lr", "ud"),
}
#: bank neighbours searched for the nearest patch from another training image
_LEFT_OUT_K = 16


def _floored_std(std: np.ndarray) -> np.ndarray:
    """Spreads of the whole-image descriptor, none below 1% of their median.

    A descriptor entry that is the same on every training image (a channel that
    is zero throughout, common on small inputs) would otherwise be divided by
    ~1e-6, so float rounding alone (1e-7: ONNX against PyTorch, one BLAS against
    another) moved image scores by 0.8% on a 96 px model. On magnetic-tile every
    spread is above a third of the median, so nothing changes there.
    """
    std = np.asarray(std, dtype=np.float32)
    floor = max(0.01 * float(np.median(std)), 1e-6)
    return np.maximum(std, np.float32(floor)).astype(np.float32)


class PatchCore(AnomalyModel):
    """PatchCore with an offline EfficientNet-Lite backbone.

    Chosen on the development suite (``benchmarks/suite.py``: magnetic-tile,
    mvtec-bottle, visa-fryum, aitex, casting; figures on each test set, so
    optimistic). Image AUROC / pixel AUROC / AUPRO:

    - The patch score is read against a reference pool (``reference_k=5``): the
      image's peak is multiplied by the median leave-one-out peak of up to 200
      training images over that of its 5 most similar ones (whole-image
      descriptor). Good parts of a rougher kind in the same set (aitex's two
      fabrics, magnetic-tile crops, castings at several scales) no longer outrank
      defects on a smoother kind. Image AUROC 0.971 / 1.000 / 0.972 / 0.887 /
      0.999, mean 0.966, against 0.965 / 1.000 / 0.970 / 0.847 / 0.997, mean
      0.956 without it; left out one set at a time the other four choose it every
      time. Maps are unchanged (it scales the image score only, so with it an
      image's score can be below its map's peak). Off with a context scale and
      below 3 training images per neighbour (15 for 5: with fewer, the
      neighbours are much of the pool and their median is the pool's, give or
      take noise). In few-shot mode at 16 good images (six draws,
      ``benchmarks/fewshot.py``) it gives mean image AUROC 0.831 against 0.812
      without it (casting 0.795 against 0.739, aitex 0.738 against 0.701,
      magnetic-tile 0.719 against 0.709, visa-fryum 0.906 against 0.914); at
      fit the pool's images are scored once instead of a sample of 100 for
      the whole-image term's scale (magnetic-tile fit 39.6 s against 39.1 s
      without it, separate runs).
      5 neighbours against 3 or 7 (one fit per set, all training images in the
      pool): mean image AUROC 0.968 against 0.968 and 0.967.
    - The whole-image distance is read against the same 5 images
      (``reference_global=0.75``): divided by their median distance to their
      nearest other training image over the pool's median (floored at half of
      it: duplicated training images are 0 apart), to the power 0.75. A
      distance means less where good parts of that kind already differ a lot.
      Image AUROC 0.978 / 1.000 / 0.969 / 0.941 / 0.994, mean 0.976, against the
      pool alone's 0.971 / 1.000 / 0.972 / 0.887 / 0.999, mean 0.966; false alarms
      on visa-fryum's test/good at the 1% target 3% against 4%. Powers 0.5 and
      1 gave means 0.974 and 0.976: 0.5 leaves aitex at 0.927, 1 lowers casting
      by 0.011 (0.75 lowers it by 0.005, no set more). Left out one set at a
      time the other four choose 0.75 on three splits of five (0.5 with aitex
      out, 1 with casting out, never 0), and on the set left out that gives
      0.978 / 1.000 / 0.969 / 0.927 / 0.988: aitex's 0.941 is chosen with aitex
      in view, so it is optimistic.
    - The working geometry comes from the training images (``keep_aspect="auto"``):
      images of one shape keep it (visa-fryum 3:2, aitex 2:1), mixed crops are
      squashed to a square (magnetic-tile), square sets are unchanged. With the
      search check below: visa-fryum 0.970 / 0.964 / 0.858 against 0.969 /
      0.970 / 0.779 squashed, aitex 0.847 / 0.785 / 0.623 against 0.843 / 0.732 /
      0.624; mean image AUROC 0.956 against 0.955, mean pixel AUROC 0.883 against
      0.872, mean AUPRO 0.783 against 0.764. Without the check the learned aspect
      had lowered visa-fryum to 0.852: HNSW missed the nearest patch there.
    - The nearest-neighbour search is checked at fit (``nn_search="auto"``):
      HNSW where it finds the true nearest bank patch for at least 99% of training
      patches left out of the bank, else exact search (about twice as slow to
      score on a bank of 7,000 patches).
    - Position channels of weight 30 (``position_weight``) instead of 100:
      0.965 / 1.000 / 0.969 / 0.843 / 0.997 (square), mean 0.955, against 0.966 /
      1.000 / 0.962 / 0.788 / 0.998, mean 0.943; without them (0) aitex rises to
      0.831 but mvtec-bottle, an aligned part, falls to 0.983. Left out one set at
      a time, the other four choose 30 every time.

    - A bank of at least ``min_bank`` (2,048) patches, all of them where the pool
      holds fewer: 1% of a handful of images' patches is a few dozen (10 for one
      256 px image), and on one mvtec-bottle image image AUROC was 0.614 with
      them against 0.998 with all 1,024 (``benchmarks/fewshot.py``). The floor
      covers one image of up to 2:1 at 256 px; on the suite's full training sets
      1% is already more (1,925 to 7,024 patches) but for mvtec-bottle (1,925).

    Tried on the suite and not kept (each lowers some set by more than 0.01 or the
    mean): each image's own aspect (``keep_aspect=True``: aitex 0.732), no
    photometric standardisation (magnetic-tile 0.945), the context scale
    (``context_size=128``: aitex 0.736), map smoothing sigma 6 (aitex 0.777),
    320 px (mvtec-bottle 0.982), no whole-image score (``global_weight=0``:
    aitex 0.710). Exact search everywhere (``nn_search="exact"``) scores aitex
    0.853 instead of 0.847 and the other sets the same (mean 0.957), but
    scoring takes about twice as long; it is one setting away.

    Earlier defaults came from an ablation on magnetic-tile (image AUROC / pixel AUROC /
    AUPRO, full test set; script in BENCHMARKS.md): lite0 at 256x256 squashed
    0.899 / 0.791 / 0.751; keeping the aspect ratio 0.865 / 0.791 / 0.747;
    reflect-padding the input border 0.892 / 0.781 / 0.749; 320 px 0.885 /
    0.792 / 0.771; + position channels (weight 100) 0.909 / 0.796 / 0.765;
    weight 300 0.904 / 0.796 / 0.761; + stride-4 layer 0.898 / 0.811 / 0.770;
    neighbourhood 5 0.916 / 0.819 / 0.710; whitened features 0.880 / 0.793 /
    0.754; lite2 (sigma 8) 0.925 / 0.808 / 0.760; lite2 with 2% coreset 0.919 /
    0.823 / 0.767, 0.5% 0.914 / 0.776 / 0.743; lite2 with map smoothing sigma 12
    (default) 0.931 / 0.816 / 0.755, sigma 16 0.936 / 0.823 / 0.749. HNSW search
    matched exact search to 1e-4 on every metric at a tenth of the time.
    Batches of 4 images score the 582 test images in 14.0 s against 17-18.5 s
    in batches of 8 (the smaller activations stay in the CPU's cache); the
    batch size changes scores only by float rounding.

    Context scale (``context_size``, off by default; 128 is the measured
    setting): a second memory bank of patches from the image shrunk to that
    size, embedded from the ends of the stride-8, -16 and -16 stages over a
    7-patch neighbourhood, so a patch sees a large part of the part. It decides
    the image score (with the whole-image descriptor, also taken at this scale)
    and adds ``context_map_weight`` (0.3) of its map to the fine one. On
    magnetic-tile (CLI split, 686 + 76 images): fine only 0.966 / 0.829 /
    0.756 and 56% recall at the 1% false-alarm threshold; context only 0.978 /
    0.869 / 0.509; both 0.980 / 0.860 / 0.744 and 82% recall, at about 21
    images/s end to end against 28, and a fit of 79 s against 59 s. Large,
    low-contrast defects ("uneven" regions) look normal up close and stand out
    at 128 px. It is not the default because small defects on small images
    suffer: on the demo surfaces (160 px) image AUROC fell from 0.927 to 0.866
    (stone 0.906 to 0.722), the context score outweighing the fine one.

    ``mirror_bank`` puts mirrored copies of the training images (``lr``, ``ud`` or
    ``both``) into the fine bank, each patch recorded at its place on its own
    image. ``auto`` (the default) is none here; a few-shot fit (``Detector.fit``
    with 8 to 63 good images) sets it to the mirrors its calibration finds the part
    allows, and refits: at 8 good images mean image AUROC 0.806 against 0.796
    (casting 0.698 against 0.663, magnetic-tile 0.708 against 0.694, no set more
    than 0.001 lower), at 16 0.844 against 0.839; at 2 and 4 it lowered casting
    by 0.015 and 0.026, so smaller fits keep none (``benchmarks/fewshot.py``,
    three draws; test-set figures).

    >>> model = PatchCore(coreset_ratio=0.02).fit(good_images)   # doctest: +SKIP
    >>> result = model.score(new_images)                         # doctest: +SKIP
    >>> result.scores, result.maps[0].shape                      # doctest: +SKIP
    """

    name = "patchcore"
    summary = "memory bank of pretrained patch features + nearest neighbour (default, best general)"
    exportable = True
    onnx_scoring = "patch embedding in torch, nearest neighbour in faiss (not in ONNX)"
    low_precision = True
    learns_masks = True
    leave_one_out = True
    tile_settings: ClassVar[dict[str, Any]] = {"photometric": "none", "context_size": 0}
    _built_from_settings = ("_extractor", "_index", "_context_index", "_global_index")

    def __init__(
        self,
        backbone: str = "efficientnet-lite2",
        layers: list[str] | None = None,
        image_size: int = 256,
        keep_aspect: bool | str = "auto",
        photometric: str = "standardise",
        neighbourhood: int = 3,
        position_weight: float = 30.0,
        grid_stride: int = 8,
        coreset_ratio: float = 0.01,
        min_bank: int = 2048,
        max_bank: int = 20000,
        max_fit_patches: int = 1_000_000,
        nn_search: str = "auto",
        global_weight: float = 1.0,
        reference_k: int = 5,
        reference_global: float = 0.75,
        sigma: float = 12.0,
        context_size: int = 0,
        context_layers: list[str] | None = None,
        context_neighbourhood: int = 7,
        context_coreset_ratio: float = 0.02,
        context_map_weight: float = 0.3,
        mirror_bank: str = "auto",
        batch_size: int = 4,
        seed: int = 0,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.image_size = image_size
        self.keep_aspect = keep_aspect
        self.photometric = photometric
        self.neighbourhood = neighbourhood
        self.position_weight = position_weight
        self.grid_stride = grid_stride
        self.coreset_ratio = coreset_ratio
        self.min_bank = min_bank
        self.max_bank = max_bank
        self.max_fit_patches = max_fit_patches
        self.nn_search = nn_search
        self.global_weight = global_weight
        self.reference_k = reference_k
        self.reference_global = reference_global
        self.sigma = sigma
        self.context_size = context_size
        self.context_layers = context_layers
        self.context_neighbourhood = context_neighbourhood
        self.context_coreset_ratio = context_coreset_ratio
        self.context_map_weight = context_map_weight
        self.mirror_bank = mirror_bank
        self.batch_size = batch_size
        self.seed = seed
        self._extractor: FeatureExtractor | None = None
        self._index: NearestNeighbours | None = None
        self._context_index: NearestNeighbours | None = None
        self._global_index: NearestNeighbours | None = None
        self._ref_index: NearestNeighbours | None = None
        # where the context bank's patches came from: held after fit for
        # score_left_out, not stored in model files
        self._context_origin: np.ndarray | None = None

    # -- parts ------------------------------------------------------------------
    def _validate(self) -> None:
        if not 0 < self.coreset_ratio <= 1:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")
        if self.keep_aspect not in (True, False, "auto"):
            raise ConfigError(f"keep_aspect must be true, false or auto, got {self.keep_aspect!r}")
        if self.global_weight < 0:
            raise ConfigError(f"global_weight must be >= 0, got {self.global_weight}")
        if not isinstance(self.reference_k, int) or self.reference_k < 0:
            raise ConfigError(f"reference_k must be an integer >= 0, got {self.reference_k!r}")
        if not 0 <= self.reference_global <= 1:
            raise ConfigError(f"reference_global must be in [0, 1], got {self.reference_global}")
        if self.mirror_bank not in _MIRRORS:
            raise ConfigError(
                f"mirror_bank must be one of {', '.join(_MIRRORS)}, got {self.mirror_bank!r}"
            )
        if self.nn_search not in ("auto", "exact", "hnsw"):
            raise ConfigError(
                f"nn_search must be 'auto', 'exact' or 'hnsw', got {self.nn_search!r}"
            )
        if self.position_weight < 0:
            raise ConfigError(f"position_weight must be >= 0, got {self.position_weight}")
        if self.max_bank < 1:
            raise ConfigError(f"max_bank must be >= 1, got {self.max_bank}")
        if self.min_bank < 0:
            raise ConfigError(f"min_bank must be >= 0, got {self.min_bank}")
        check_mode(self.photometric)
        if self.context_size != 0 and self.context_size < 32:
            raise ConfigError(f"context_size must be 0 (off) or >= 32, got {self.context_size}")
        if not 0 < self.context_coreset_ratio <= 1:
            raise ConfigError(
                f"context_coreset_ratio must be in (0, 1], got {self.context_coreset_ratio}"
            )
        if not 0 <= self.context_map_weight <= 1:
            raise ConfigError(
                f"context_map_weight must be in [0, 1], got {self.context_map_weight}"
            )
        for label, nb in (
            ("neighbourhood", self.neighbourhood),
            ("context_neighbourhood", self.context_neighbourhood),
        ):
            if nb < 1 or nb % 2 == 0:
                raise ConfigError(f"{label} must be an odd number >= 1, got {nb}")
        if self.max_fit_patches < 1:
            raise ConfigError(f"max_fit_patches must be >= 1, got {self.max_fit_patches}")

    def _settings_layers(self) -> tuple[list[str], list[str]]:
        """(fine, context) layers the settings name, defaults filled in; no context
        layers without a context scale."""
        named = isinstance(self.backbone, str)
        fine = self.layers
        if fine is None and named:
            fine = default_layers(self.backbone)
        context = None
        if self.context_size:
            context = self.context_layers
            if context is None:
                context = [f"blocks.{e}" for e in stage_ends(self.backbone)[2:5]] if named else fine
        return list(fine or []), list(context or [])

    def _layer_names(self) -> tuple[list[str], list[str]]:
        """(fine, context) layers: those the model was fitted (or loaded) with, else
        the settings'."""
        if hasattr(self, "layers_"):
            return self.layers_, self.context_layers_ or []
        return self._settings_layers()

    def _backbone_layers(self) -> list[str]:
        """One backbone pass serves both scales: the union of their layers."""
        fine, context = self._layer_names()
        return list(dict.fromkeys(fine + context))

    @property
    def extractor(self) -> FeatureExtractor:
        """The backbone, built on first use for :meth:`_backbone_layers`."""
        if self._extractor is None:
            self._extractor = load_backbone(self.backbone, self._backbone_layers() or None)
        return self._extractor

    def _drop_stale_extractor(self) -> None:
        """Forget a backbone built for other layers than the model's (settings changed)."""
        if self._extractor is not None and list(self._extractor.layers) != self._backbone_layers():
            self._extractor = None

    def _scale(self, scale: str) -> tuple[int, list[int], int]:
        """(input side, indices of the scale's layers among the extractor's, neighbourhood)."""
        fx = self.extractor
        fine, context = self._layer_names()
        if scale == _FINE:
            side, layers, nb = self.image_size, fine, self.neighbourhood
        else:
            side, layers, nb = self.context_size, context, self.context_neighbourhood
        return side, [fx.layers.index(layer) for layer in layers], nb

    def _sizes(self, images: Sequence[Image], scale: str = "fine") -> list[tuple[int, int]]:
        """Network input size (h, w) of each image at ``scale`` (as ``feature_batches``
        sizes them)."""
        side, _, _ = self._scale(scale)
        multiple = max(self.extractor.strides)
        own, aspect = self.keep_aspect is True, self.input_aspect
        return [fit_size(h, w, side, multiple, own, aspect) for h, w in image_shapes(images)]

    @property
    def input_aspect(self) -> float | None:
        """The working aspect (w / h) every image is resized to, learned from the
        training images with ``keep_aspect="auto"``; None otherwise."""
        return getattr(self, "input_aspect_", None)

    def _iter_embeddings(
        self, images: Sequence[Image], progress: Progress | None, stage: str, scale: str = "fine"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(image index, patch embeddings (h, w, C)) at ``scale``; only one batch of
        embeddings is alive at a time."""
        side, picks, nb = self._scale(scale)
        fx = self.extractor
        # about the same pixels per batch at both scales: small batches of small
        # inputs leave the cores waiting on per-call overhead
        batch = max(1, round(self.batch_size * (self.image_size / side) ** 2))
        batches = feature_batches(
            fx,
            images,
            side,
            batch,
            keep_aspect=self.keep_aspect is True,
            aspect=self.input_aspect,
            photometric=self.photometric_,
            progress=progress,
            stage=stage,
        )
        with torch.inference_mode():
            for idx, maps in batches:
                chosen = [maps[k] for k in picks]
                k = picks[0]
                h, w = (n * fx.strides[k] // self.grid_stride for n in maps[k].shape[-2:])
                emb = patch_embedding(chosen, nb, (h, w))
                emb = with_position(emb, self.position_weight)
                emb = emb.permute(0, 2, 3, 1).contiguous().numpy()
                yield from zip(idx, emb, strict=True)

    def _embed_batches(
        self, images: Sequence[Image], progress: Progress | None, stage: str, scale: str = "fine"
    ) -> dict[int, np.ndarray]:
        """Patch embeddings (h, w, C) per image index."""
        return dict(self._iter_embeddings(images, progress, stage, scale))

    def _patch_quota(
        self, images: Sequence[Image], scale: str = "fine"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Patches on each image's grid, and how many of them enter the coreset.

        All of them while the total fits in ``max_fit_patches``; above it, the
        same fraction of every image (at least one patch), so the pool held in
        memory stays at about ``max_fit_patches`` x (4 x features + 12) bytes
        whatever the number of images.
        """
        grids = np.array(
            [
                (h // self.grid_stride) * (w // self.grid_stride)
                for h, w in self._sizes(images, scale)
            ],
            dtype=np.int64,
        )
        total = int(grids.sum())
        if total <= self.max_fit_patches:
            return grids, grids.copy()
        quota = np.floor(grids * (self.max_fit_patches / total)).astype(np.int64)
        return grids, np.clip(quota, 1, grids)

    def _sample_patches(self, i: int, n_grid: int, n_keep: int) -> np.ndarray:
        """Sorted indices of the patches of image ``i`` kept for the coreset:
        a random subset seeded by (seed, i), so the result does not depend on
        batching or on the other images."""
        if n_keep >= n_grid:
            return np.arange(n_grid)
        rng = np.random.default_rng([self.seed, i])
        return np.sort(rng.choice(n_grid, size=n_keep, replace=False))

    # -- contract ---------------------------------------------------------------
    def fit(self, images: Sequence[Image], progress: Progress | None = None) -> PatchCore:
        """Fill the memory bank(s) by greedy coreset over the training patches.

        Embeddings are computed batch by batch and written straight into one
        pool; above ``max_fit_patches`` patches in all, each image contributes a
        seeded random sample of its patches (the same fraction for every image)
        so memory stays bounded on large training sets (see ``_patch_quota``).
        With a context scale, a second bank is filled the same way from the
        images at ``context_size``.
        """
        self._validate()
        images = check_images(images)
        self.layers_, context = self._settings_layers()
        self.context_layers_ = context if self.context_size else None
        self.photometric_ = self.photometric
        self._drop_stale_extractor()
        self.input_aspect_ = (
            working_aspect(image_shapes(images)) if self.keep_aspect == "auto" else None
        )
        mirrors = _MIRRORS[self.mirror_bank]
        fine = _Mirrored(images, mirrors) if mirrors else images
        bank, origin, descriptors, self.fit_patches_, queries = self._fit_bank(
            fine, _FINE, self.coreset_ratio, progress
        )
        descriptors = descriptors[: len(images)]  # the images', not their copies'
        self.memory_bank_, self.bank_origin_ = bank, origin
        self.context_bank_ = self._context_origin = None
        if self.context_size:
            # the whole-image evidence comes from the context scale, which sees more of the part
            self.context_bank_, self._context_origin, descriptors, _, _ = self._fit_bank(
                images, _CONTEXT, self.context_coreset_ratio, progress
            )
        self.n_train_images_ = len(images)
        self._index = self._context_index = self._global_index = None
        self.nn_search_, self.nn_recall_ = self._choose_search(queries)
        self.mask_head_: MaskHead | None = None  # see fit_mask_head
        self.mask_gain_ = 0.0
        self._fit_global(np.stack(descriptors), images)
        return self

    def fit_mask_head(
        self,
        defects: Sequence[Image],
        masks: Sequence[np.ndarray],
        goods: Sequence[Image],
        *,
        weight: float = 15.0,
        hidden: int = 32,
        steps: int = 800,
        max_goods: int = 200,
        progress: Progress | None = None,
    ) -> PatchCore:
        """Learn from labelled defect masks where defects are (semi-supervised maps).

        A :class:`~defectkit.methods.parts.mask_head.MaskHead` is trained on the
        fine patch features of ``defects`` (their ``masks``: bool, image size) against
        up to ``max_goods`` of ``goods`` (the good images the bank came from), and its
        probability, upsampled, joins the fine map with a gain of ``weight`` times
        the good images' patch-score spread (99th percentile minus median). Image
        scores follow the map's peak as before, so thresholds must be calibrated
        after this (:meth:`Detector.fit <defectkit.detector.Detector.fit>` does).
        On magnetic-tile with 5 masks per type (25 images) pixel AUROC went from
        0.833 to 0.921 and AUPRO from 0.761 to 0.841 on the rest of the test set
        (``benchmarks/labelled.py``, with the re-scorer of ``--defects`` too).
        """
        self._require_fitted()
        MaskHeadSettings(weight=weight, hidden=hidden, steps=steps, max_goods=max_goods)  # checks
        defects = check_images(defects)
        goods = check_images(goods)
        check_masks(image_shapes(defects), masks)
        step = max(1, -(-len(goods) // max_goods))
        goods = take(goods, range(0, len(goods), step))
        embedded = self._embed_batches(defects, progress, "mask head: defects")
        features = [self._strip_position(embedded[i]) for i in range(len(defects))]
        grids = [
            grid_mask(np.asarray(m, bool), f.shape[:2])
            for m, f in zip(masks, features, strict=True)
        ]
        good_features, distances = [], []
        nn_index = self._nn(_FINE)
        for _, e in self._iter_embeddings(goods, progress, "mask head: good images"):
            distances.append(nn_index.search(e.reshape(-1, e.shape[-1]), 1)[0][:, 0])
            good_features.append(self._strip_position(e))
        d = np.concatenate(distances)
        spread = float(np.percentile(d, 99) - np.median(d)) or 1.0
        self.mask_head_ = train_mask_head(
            features, grids, good_features, hidden=hidden, steps=steps, seed=self.seed
        )
        self.mask_gain_ = float(weight * spread)
        return self

    def _strip_position(self, e: np.ndarray) -> np.ndarray:
        return e[..., :-2] if self.position_weight > 0 else e

    def _mask_probability(self, e: np.ndarray) -> np.ndarray | None:
        """The mask head's defect probability per grid cell, or None without a head."""
        head = getattr(self, "mask_head_", None)
        if head is None:
            return None
        x = torch.from_numpy(np.ascontiguousarray(self._strip_position(e))).permute(2, 0, 1)
        with torch.inference_mode():
            return torch.sigmoid(head(x[None]))[0, 0].numpy()

    def _fit_bank(
        self, images: Sequence[Image], scale: str, ratio: float, progress: Progress | None
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], tuple[int, int], np.ndarray]:
        """(bank, its patches' (image, row, col), image descriptors, (patches on the
        grids, patches in the pool), pool patches left out of the bank to check the
        search on, for the fine scale with ``nn_search="auto"``) at ``scale``."""
        grids, quota = self._patch_quota(images, scale)
        offsets = np.concatenate([[0], np.cumsum(quota)])
        total = int(offsets[-1])
        feats: np.ndarray | None = None
        origin = np.empty((total, 3), dtype=np.int32)  # (image, row, col) on the patch grid
        descriptors: list[np.ndarray] = [np.empty(0)] * len(images)
        stage = "features" if scale == _FINE else f"features ({scale})"
        if total < grids.sum():
            stage += f" (coreset pool: {total:,} of {int(grids.sum()):,} patches)"
        for i, e in self._iter_embeddings(images, progress, stage, scale):
            if feats is None:
                feats = np.empty((total, e.shape[-1]), dtype=np.float32)
            descriptors[i] = self._descriptor(e)
            h, w = e.shape[:2]
            take = self._sample_patches(i, h * w, int(quota[i]))
            lo, hi = offsets[i], offsets[i + 1]
            feats[lo:hi] = e.reshape(-1, e.shape[-1])[take]
            rows, cols = np.divmod(take, w)
            src, flip = images.source(i) if isinstance(images, _Mirrored) else (i, None)
            if flip == "lr":  # where the patch lies on its own image's grid
                cols = w - 1 - cols
            elif flip == "ud":
                rows = h - 1 - rows
            origin[lo:hi] = np.stack([np.full(len(take), src), rows, cols], axis=1)
        assert feats is not None
        n_keep = max(1, round(int(grids.sum()) * ratio))
        if scale == _FINE:  # a handful of images: their patches are not redundant
            n_keep = max(n_keep, min(self.min_bank, total))
        n_keep = int(min(self.max_bank, n_keep))
        label = "coreset" if scale == _FINE else f"coreset ({scale})"
        keep = greedy_coreset(
            feats,
            n_keep,
            seed=self.seed,
            progress=None if progress is None else lambda d, t: progress(label, d, t),
        )
        check = np.empty(0, np.int64)
        if scale == _FINE and self.nn_search == "auto":  # only the fine bank's search is checked
            left_out = np.setdiff1d(np.arange(total), keep)
            rng = np.random.default_rng(self.seed)
            check = rng.choice(left_out, size=min(_SEARCH_CHECK, len(left_out)), replace=False)
        return feats[keep], origin[keep], descriptors, (int(grids.sum()), total), feats[check]

    def _descriptor(self, e: np.ndarray) -> np.ndarray:
        """Whole-image descriptor: mean and spread of the patch features."""
        e = self._strip_position(e)
        flat = e.reshape(-1, e.shape[-1])
        return np.concatenate([flat.mean(0), flat.std(0)]).astype(np.float32)

    def _fit_global(self, descriptors: np.ndarray, images: Sequence[Image]) -> None:
        """The whole-image score that joins the patch score, and the scales' map levels.

        Patch distances miss defects that change a part everywhere a little
        (uneven lighting, fine cracks spread over the surface); the distance of
        the image's standardised descriptor to the nearest good image catches
        them. Both are brought to one scale by their medians on good images:
        leave-one-out descriptor distances, and patch scores of a sample of the
        training images. On magnetic-tile this lifted image AUROC from 0.929
        to 0.947 (pixel maps unchanged). The same sample gives each scale's
        typical map level and spread (median, 99th percentile - median), which
        put the fine map in the context map's units before they are blended.
        """
        self.global_mean_ = descriptors.mean(0)
        self.global_std_ = _floored_std(descriptors.std(0))
        self.global_bank_ = ((descriptors - self.global_mean_) / self.global_std_).astype(
            np.float32
        )
        self.global_ref_ = 0.0
        self.local_ref_ = 0.0
        self.map_refs_ = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
        self.ref_bank_ = np.zeros((0, self.global_bank_.shape[1]), np.float32)
        self.ref_peaks_ = np.zeros(0, np.float32)
        self.ref_spread_ = np.zeros(0, np.float32)
        self.ref_images_ = np.zeros(0, np.int64)
        self._ref_index = None
        n = len(images)
        global_on = self.global_weight > 0 and len(descriptors) >= 3
        refs_on = (
            self.reference_k > 0
            and not self.context_size
            and n >= _REF_PER_NEIGHBOUR * self.reference_k
        )
        if not (global_on or refs_on or self.context_size):
            return
        if global_on or refs_on:
            # each training image's descriptor distance to its nearest other image
            others = self._global_nn().search(self.global_bank_, 2)[0][:, 1]
        if refs_on:
            pool = np.unique(np.linspace(0, n - 1, min(n, _REF_POOL)).round().astype(np.int64))
            local, left = self._reference_peaks(take(images, pool), pool)
            self.ref_bank_, self.ref_images_ = self.global_bank_[pool], pool
            self.ref_peaks_ = left.astype(np.float32)
            self.ref_spread_ = others[pool].astype(np.float32)
        else:
            step = max(1, n // 100)
            fine, context, _, _ = self._raw_maps(take(images, range(0, n, step)))
            if self.context_size:
                refs = []
                for maps in (fine, context):
                    values = np.concatenate([m.ravel()[:: max(1, m.size // 4096)] for m in maps])
                    level = float(np.median(values))
                    refs += [level, float(np.percentile(values, 99)) - level or 1.0]
                self.map_refs_ = np.array(refs, np.float32)
            local = np.array([float(m.max()) for m in (context if self.context_size else fine)])
        if global_on:
            self.global_ref_ = float(np.median(others)) or 1.0
            self.local_ref_ = float(np.median(local)) or 1.0

    def _reference_peaks(
        self, images: Sequence[Image], sources: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fine-map peaks of training images ``images`` (training indices
        ``sources``) scored as fitted, and left out: each patch's nearest bank patch
        from another training image (exact search where the bank's nearest
        :data:`_LEFT_OUT_K` are all its own)."""
        shapes = image_shapes(images)
        nn_index, origin = self._nn(), self.bank_origin_[:, 0]
        plain = np.empty(len(images), np.float32)
        left = np.empty(len(images), np.float32)
        for i, e in self._iter_embeddings(images, None, "reference"):
            h, w, dim = e.shape
            q = e.reshape(-1, dim)
            dist, idx = nn_index.search(q, _LEFT_OUT_K)
            own = (idx < 0) | (origin[np.maximum(idx, 0)] == sources[i])
            best = np.where(own, np.inf, dist).min(1)
            missing = ~np.isfinite(best)
            keep = origin != sources[i]
            if missing.any() and keep.any():
                sub = NearestNeighbours(self.memory_bank_[keep])
                best[missing] = sub.search(q[missing], 1)[0][:, 0]
            best = np.where(np.isfinite(best), best, dist[:, 0])
            plain[i] = upsample_map(dist[:, 0].reshape(h, w), shapes[i], self.sigma).max()
            left[i] = upsample_map(best.reshape(h, w), shapes[i], self.sigma).max()
        return plain, left

    def _reference_factors(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Per image, the factors on its patch peak and on its whole-image distance;
        None without a pool. The first is the pool's median leave-one-out peak over
        the median peak of the image's ``reference_k`` most similar pool images; the
        second, to the power ``reference_global``, the pool's median distance from
        an image to its nearest other training image over those images' median
        (floored at half the pool's: duplicated training images are 0 apart).
        ``g``: the images' standardised descriptors."""
        if self.reference_k <= 0 or self.context_size or len(self.ref_peaks_) == 0:
            return None
        if self._ref_index is None:
            self._ref_index = NearestNeighbours(self.ref_bank_)
        _, near = self._ref_index.search(g, self.reference_k)
        typical = np.median(self.ref_peaks_[near], axis=1)
        level = float(np.median(self.ref_peaks_))
        local = level / np.maximum(typical, 1e-6 * max(level, 1e-12))
        spread = np.ones(len(g))
        if self.reference_global > 0:
            pool = float(np.median(self.ref_spread_))
            if pool > 0:
                own = np.maximum(np.median(self.ref_spread_[near], axis=1), 0.5 * pool)
                spread = (pool / own) ** self.reference_global
        return local.astype(np.float32), spread.astype(np.float32)

    def _choose_search(self, queries: np.ndarray) -> tuple[str, float | None]:
        """(search, HNSW recall on ``queries``): with ``nn_search="auto"``, HNSW
        where it finds the true nearest bank patch for at least
        :data:`_MIN_RECALL` of training patches left out of the bank, else exact.
        The fine bank's index built for the check is kept for the search chosen.

        HNSW (efSearch 16) matched exact search on the square suite sets, but on
        visa-fryum at its own 3:2 aspect (a 6,144-patch bank) it missed the nearest
        patch so often that image AUROC from the map peak fell from 0.962 to 0.590;
        the check costs well under a second per fit.
        """
        if self.nn_search != "auto":
            return self.nn_search, None
        exact = NearestNeighbours(self.memory_bank_)
        if len(queries) == 0:
            self._index = exact
            return "exact", None
        approx = NearestNeighbours(self.memory_bank_, approximate=True)
        d_exact, _ = exact.search(queries, 1)
        d_approx, _ = approx.search(queries, 1)
        recall = float(np.mean(d_approx[:, 0] <= d_exact[:, 0] * (1 + 1e-4) + 1e-5))
        search = "hnsw" if recall >= _MIN_RECALL else "exact"
        self._index = approx if search == "hnsw" else exact
        return search, round(recall, 4)

    def fit_notes(self) -> list[str]:
        notes = []
        aspect = self.input_aspect
        if aspect is not None:
            h, w = fit_size(1, 1, self.image_size, max(self.extractor.strides), False, aspect)
            why = "one shape kept" if aspect != 1.0 else "mixed shapes, squashed to a square"
            notes.append(f"working size {w}x{h} px from the training images ({why})")
        recall = getattr(self, "nn_recall_", None)
        if recall is not None:
            notes.append(
                f"nearest-neighbour search: {self.search} (HNSW found the true nearest "
                f"patch for {recall:.1%} of training patches left out of the bank)"
            )
        return notes

    @property
    def search(self) -> str:
        """The nearest-neighbour search in use: ``exact`` or ``hnsw`` (``nn_search``,
        or what ``auto`` chose at fit)."""
        chosen = getattr(self, "nn_search_", None)
        return chosen or ("hnsw" if self.nn_search == "auto" else self.nn_search)

    def _nn(self, scale: str = "fine") -> NearestNeighbours:
        approximate = self.search == "hnsw"
        if scale == _CONTEXT:
            if self._context_index is None:
                self._context_index = NearestNeighbours(self.context_bank_, approximate=approximate)
            return self._context_index
        if self._index is None:
            self._index = NearestNeighbours(self.memory_bank_, approximate=approximate)
        return self._index

    def _global_nn(self) -> NearestNeighbours:
        """Exact search over the good images' descriptors, built once (not per batch)."""
        if self._global_index is None:
            self._global_index = NearestNeighbours(self.global_bank_)
        return self._global_index

    def score(self, images: Sequence[Image], progress: Progress | None = None) -> ScoreResult:
        """Image scores and maps. Without a context scale, the image score is the
        map's peak times the reference pool's factor (``extras["reference_factor"]``;
        1 without a pool, and then never below the peak) plus the whole-image
        evidence. With a context scale, the image score is the
        context map's maximum plus the whole-image evidence, or the fine map's
        maximum in the context map's units where that is higher; the map blends
        both scales: ``(1 - context_map_weight)`` of the fine map, in the context
        map's units, plus ``context_map_weight`` of the context map."""
        self._require_fitted()
        images = check_images(images)
        fine, context, extras, descriptors = self._raw_maps(images, progress)
        if self.context_size:
            fl, fs, cl, cs = (float(v) for v in self.map_refs_)
            w = self.context_map_weight
            fine = [cl + cs * (f - fl) / fs for f in fine]  # in the context map's units
            maps = [(1 - w) * f + w * c for f, c in zip(fine, context, strict=True)]
            local = np.array([c.max() for c in context], dtype=np.float32)
        else:
            maps = fine
            local = np.array([f.max() for f in fine], dtype=np.float32)
        # standardised whole-image descriptors: for the pool and the whole-image term
        g = ((np.stack(descriptors) - self.global_mean_) / self.global_std_).astype(np.float32)
        factors = self._reference_factors(g)
        if factors is not None:
            local = (local * factors[0]).astype(np.float32)
            for i, f in enumerate(factors[0]):
                extras[i]["reference_factor"] = round(float(f), 4)
        scores = local
        if self.global_weight > 0 and self.global_ref_ > 0:
            gd, _ = self._global_nn().search(g, 1)
            bonus = self.global_weight * self.local_ref_ * gd[:, 0] / self.global_ref_
            if factors is not None and self.reference_global > 0:
                bonus = bonus * factors[1]
            for i in range(len(bonus)):
                extras[i]["global_distance"] = round(float(gd[i, 0] / self.global_ref_), 4)
            # in map units: the patch score plus the whole-image evidence
            scores = (local + bonus).astype(np.float32)
        if factors is None:
            # never below the fine scale's peak either (a small defect that the context
            # scale's 128 px cannot see), nor the map's, so no region tops its image
            peaks = [m.max() for m in maps]
            if self.context_size:
                peaks = [max(p, f.max()) for p, f in zip(peaks, fine, strict=True)]
            scores = np.maximum(scores, np.array(peaks)).astype(np.float32)
        maps = [m.astype(np.float32, copy=False) for m in maps]
        return ScoreResult(scores=scores, maps=maps, extras=extras)

    def score_left_out(
        self,
        images: Sequence[Image],
        queries: Sequence[tuple[int, Image]],
        progress: Progress | None = None,
    ) -> ScoreResult:
        """Each query ``(i, image)`` scored against the banks without training image
        ``i``'s patches and without its whole-image descriptor (exact search): what
        fitting without it would give, but for the coreset drawn with it and the
        score references of the full fit. ``images``: the training images, as
        fitted (right after :meth:`fit`; a loaded model has no context origins)."""
        self._require_fitted()
        if len(images) != self.n_train_images_ or self.n_train_images_ < 2:
            raise ConfigError(
                f"leave-one-out scoring needs the {self.n_train_images_} training images "
                f"(at least 2), got {len(images)}"
            )
        if self.context_size and self._context_origin is None:
            raise ConfigError("leave-one-out scoring with a context scale needs a fresh fit")
        sources = np.array([i for i, _ in queries], dtype=np.int64)
        if len(sources) and (sources.min() < 0 or sources.max() >= len(images)):
            raise ConfigError(f"leave-one-out: training image index out of 0..{len(images) - 1}")
        n = len(queries)
        scores = np.empty(n, np.float32)
        maps: list[np.ndarray] = [np.empty(0)] * n
        extras: list[dict[str, Any]] = [{} for _ in range(n)]
        saved = (
            self.memory_bank_, self.bank_origin_, self.context_bank_, self.global_bank_,
            self._index, self._context_index, self._global_index,
            self.ref_bank_, self.ref_peaks_, self.ref_spread_, self._ref_index,
        )  # fmt: skip
        bank, origin, context, global_bank = saved[:4]
        ref_bank, ref_peaks, ref_spread = saved[7:10]
        done = 0
        try:
            for src in np.unique(sources):
                keep = origin[:, 0] != src
                if not keep.any():
                    raise ConfigError(
                        f"leave-one-out: every memory patch came from training image {src}"
                    )
                self.memory_bank_, self.bank_origin_ = bank[keep], origin[keep]
                self._index = NearestNeighbours(self.memory_bank_)
                if context is not None:
                    assert self._context_origin is not None
                    ckeep = self._context_origin[:, 0] != src
                    if not ckeep.any():
                        raise ConfigError(
                            f"leave-one-out: every context patch came from training image {src}"
                        )
                    self.context_bank_ = context[ckeep]
                    self._context_index = NearestNeighbours(self.context_bank_)
                self.global_bank_ = np.delete(global_bank, src, axis=0)
                self._global_index = None
                rkeep = self.ref_images_ != src
                self.ref_bank_, self.ref_peaks_ = ref_bank[rkeep], ref_peaks[rkeep]
                self.ref_spread_ = ref_spread[rkeep]
                self._ref_index = None
                rows = np.flatnonzero(sources == src)
                res = self.score([queries[j][1] for j in rows])
                for r, j in enumerate(rows):
                    scores[j], maps[j], extras[j] = res.scores[r], res.maps[r], res.extras[r]
                done += len(rows)
                if progress is not None:
                    progress("leave-one-out", done, n)
        finally:
            (
                self.memory_bank_, self.bank_origin_, self.context_bank_, self.global_bank_,
                self._index, self._context_index, self._global_index,
                self.ref_bank_, self.ref_peaks_, self.ref_spread_, self._ref_index,
            ) = saved  # fmt: skip
        return ScoreResult(scores=scores, maps=maps, extras=extras)

    def _grid_distances(
        self, images: Sequence[Image], scale: str, progress: Progress | None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """(image index, patch distance grid (h, w), nearest bank row per patch,
        image descriptor or None where the other scale gives it, mask head
        probability grid or None) at ``scale``."""
        bank = self.memory_bank_ if scale == _FINE else self.context_bank_
        assert bank is not None
        nn_index = self._nn(scale)
        for i, e in self._iter_embeddings(images, progress, "score", scale):
            h, w, dim = e.shape
            if dim != bank.shape[1]:
                layers = self._layer_names()[0 if scale == _FINE else 1]
                raise ModelFileError(
                    f"patchcore model: {scale} memory bank has {bank.shape[1]} features per "
                    f"patch but backbone {self.backbone!r} layers {layers} give {dim}"
                )
            dist, nearest = nn_index.search(e.reshape(-1, dim), 1)
            # the whole-image descriptor comes from the context scale when there is one
            wanted = scale == _CONTEXT or not self.context_size
            yield (
                i,
                dist[:, 0].reshape(h, w),
                nearest[:, 0],
                self._descriptor(e) if wanted else None,
                self._mask_probability(e) if scale == _FINE else None,
            )

    def _raw_maps(
        self, images: Sequence[Image], progress: Progress | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[dict[str, Any]], list[np.ndarray]]:
        """Fine maps, context maps (empty without a context scale), evidence and the
        descriptors the whole-image score uses."""
        n = len(images)
        shapes = image_shapes(images)
        fine: list[np.ndarray] = [np.empty(0)] * n
        extras: list[dict[str, Any]] = [{} for _ in range(n)]
        descriptors: list[np.ndarray] = [np.empty(0)] * n
        for i, grid, nearest, desc, head in self._grid_distances(images, _FINE, progress):
            h, w = grid.shape
            fine[i] = upsample_map(grid, shapes[i], self.sigma)
            if head is not None:
                fine[i] += self.mask_gain_ * upsample_map(head, shapes[i], _MASK_SIGMA)
            if desc is not None:
                descriptors[i] = desc
            worst = int(np.argmax(grid))
            src = self.bank_origin_[int(nearest[worst])]
            extras[i] = {
                "worst_patch": [worst // w, worst % w],
                "grid": [h, w],
                "nearest_good": {
                    "train_index": int(src[0]),
                    "grid_row": int(src[1]),
                    "grid_col": int(src[2]),
                },
            }
        context: list[np.ndarray] = []
        if self.context_size:
            context = [np.empty(0)] * n
            for i, grid, _, desc, _ in self._grid_distances(images, _CONTEXT, None):
                context[i] = upsample_map(grid, shapes[i], self.sigma)
                assert desc is not None
                descriptors[i] = desc
        return fine, context, extras, descriptors

    # -- persistence ------------------------------------------------------------
    def learned_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        arrays = {
            "memory_bank": self.memory_bank_,
            "bank_origin": self.bank_origin_,
            "global_bank": self.global_bank_,
            "global_mean": self.global_mean_,
            "global_std": self.global_std_,
            "map_refs": self.map_refs_,
            "ref_bank": self.ref_bank_,
            "ref_peaks": self.ref_peaks_,
            "ref_spread": self.ref_spread_,
            "ref_images": self.ref_images_,
        }
        if self.context_bank_ is not None:
            arrays["context_bank"] = self.context_bank_
        head = getattr(self, "mask_head_", None)
        mask_head = None
        if head is not None:
            for k, v in head.state_dict().items():
                arrays[f"mask_head.{k}"] = v.numpy().astype(np.float32)
            mask_head = {
                "channels": int(head.mean.shape[1]),
                "hidden": int(head.reduce.out_channels),
                "gain": self.mask_gain_,
            }
        return (
            arrays,
            {
                "mask_head": mask_head,
                "n_train_images": self.n_train_images_,
                "layers": self.layers_,
                "context_layers": self.context_layers_,
                "context_size": self.context_size,
                "global_ref": self.global_ref_,
                "local_ref": self.local_ref_,
                "fit_patches": list(self.fit_patches_),
                "photometric": self.photometric_,
                "input_aspect": self.input_aspect_,
                "nn_search": self.search,
                "nn_recall": getattr(self, "nn_recall_", None),
            },
        )

    def load_learned_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        bank = arrays.get("memory_bank")
        origin = arrays.get("bank_origin")
        if bank is None or bank.ndim != 2 or bank.dtype != np.float32 or len(bank) == 0:
            raise ModelFileError("patchcore model: memory_bank missing or malformed")
        if origin is None or origin.shape != (len(bank), 3):
            raise ModelFileError("patchcore model: bank_origin missing or malformed")
        if not np.all(np.isfinite(bank)):
            raise ModelFileError("patchcore model: memory_bank holds NaN or infinite values")
        self.memory_bank_ = bank
        self.bank_origin_ = origin.astype(np.int32)
        self.n_train_images_ = int(info.get("n_train_images", 0))
        fp = info.get("fit_patches")  # absent in files written before it was recorded
        self.fit_patches_ = (int(fp[0]), int(fp[1])) if fp else (0, 0)
        self.photometric_ = mode_from_file(info, "patchcore")
        aspect = info.get("input_aspect")  # absent in files written before it existed
        if aspect is not None and not (
            isinstance(aspect, int | float) and math.isfinite(aspect) and aspect > 0
        ):
            raise ModelFileError(f"patchcore model: input_aspect malformed ({aspect!r})")
        self.input_aspect_ = None if aspect is None else float(aspect)
        # files written before the context scale existed have none (and their settings
        # no context_size: the default, 0)
        fitted_context = int(info.get("context_size", 0))
        if fitted_context != self.context_size:
            raise ModelFileError(
                f"patchcore model: fitted with context_size {fitted_context}, the settings "
                f"say {self.context_size}"
            )
        context = arrays.get("context_bank")
        refs = arrays.get("map_refs", np.array([0.0, 1.0, 0.0, 1.0], np.float32))
        if self.context_size:
            if context is None or context.ndim != 2 or context.dtype != np.float32:
                raise ModelFileError("patchcore model: context_bank missing or malformed")
            if len(context) == 0 or not np.all(np.isfinite(context)):
                raise ModelFileError("patchcore model: context_bank empty or not finite")
        if refs.shape != (4,) or not np.all(np.isfinite(refs)) or refs[1] <= 0 or refs[3] <= 0:
            raise ModelFileError("patchcore model: map_refs malformed")
        self.context_bank_ = context if self.context_size else None
        # the layers it was fitted with (files that record none: the settings')
        fine, context_layers = self._settings_layers()
        self.layers_ = loaded_layers(info, "layers", "patchcore") or fine
        self.context_layers_ = (
            (loaded_layers(info, "context_layers", "patchcore") or context_layers)
            if self.context_size
            else None
        )
        self._drop_stale_extractor()
        search = info.get("nn_search")  # absent in files written before it was chosen
        if search not in (None, "exact", "hnsw"):
            raise ModelFileError(f"patchcore model: nn_search malformed ({search!r})")
        self.nn_search_ = search
        recall = info.get("nn_recall")
        self.nn_recall_ = float(recall) if isinstance(recall, int | float) else None
        self.map_refs_ = refs.astype(np.float32)
        self.mask_head_, self.mask_gain_ = _loaded_mask_head(arrays, info.get("mask_head"))
        self._context_index = None
        self._index = None
        self._global_index = None
        gb, gm, gs = arrays.get("global_bank"), arrays.get("global_mean"), arrays.get("global_std")
        if gb is None:  # written before the whole-image score existed
            gb = np.zeros((1, 1), np.float32)
            gm, gs = np.zeros(1, np.float32), np.ones(1, np.float32)
            info = {**info, "global_ref": 0.0, "local_ref": 0.0}
        if (
            gm is None
            or gs is None
            or gb.ndim != 2
            or gm.shape != (gb.shape[1],)
            or gs.shape != gm.shape
        ):
            raise ModelFileError("patchcore model: global descriptor arrays malformed")
        if not (np.all(np.isfinite(gb)) and np.all(np.isfinite(gm)) and np.all(gs > 0)):
            raise ModelFileError("patchcore model: global descriptor arrays hold bad values")
        floored = _floored_std(gs)
        if np.any(floored != gs):  # written before the floor: re-standardise the bank
            gb = (gb * (gs / floored)).astype(np.float32)
            gs = floored
        self.global_bank_, self.global_mean_, self.global_std_ = gb, gm, gs
        self.global_ref_ = float(info.get("global_ref", 0.0))
        self.local_ref_ = float(info.get("local_ref", 0.0))
        # files written before the reference pool existed have none: peaks as they are
        rb = arrays.get("ref_bank", np.zeros((0, gb.shape[1]), np.float32))
        rp = arrays.get("ref_peaks", np.zeros(0, np.float32))
        ri = arrays.get("ref_images", np.zeros(0, np.int64))
        shapes_ok = rb.ndim == 2 and rb.shape[1] == gb.shape[1] and rp.shape == ri.shape
        if not shapes_ok or rp.shape != (len(rb),):
            raise ModelFileError("patchcore model: reference pool arrays malformed")
        if not (np.all(np.isfinite(rb)) and np.all(np.isfinite(rp)) and np.all(rp >= 0)):
            raise ModelFileError("patchcore model: reference pool arrays hold bad values")
        self.ref_bank_ = rb.astype(np.float32)
        self.ref_peaks_ = rp.astype(np.float32)
        # files written before the pool kept whole-image spreads: all 0, which reads
        # every whole-image distance as it is
        rs = arrays.get("ref_spread", np.zeros(rp.shape, np.float32))
        if rs.shape != rp.shape or not np.all(np.isfinite(rs)) or np.any(rs < 0):
            raise ModelFileError("patchcore model: reference pool spreads malformed")
        self.ref_spread_ = rs.astype(np.float32)
        self.ref_images_ = ri.astype(np.int64)
        self._ref_index = None


def _loaded_mask_head(arrays: dict[str, np.ndarray], part: Any) -> tuple[MaskHead | None, float]:
    """The mask head of a model file and its gain; (None, 0) for files without one."""
    if part is None:
        return None, 0.0
    try:
        channels, hidden, gain = int(part["channels"]), int(part["hidden"]), float(part["gain"])
    except (TypeError, KeyError, ValueError):
        raise ModelFileError("patchcore model: mask_head settings malformed") from None
    if not (channels >= 1 and hidden >= 1 and np.isfinite(gain) and gain > 0):
        raise ModelFileError("patchcore model: mask_head settings out of range")
    head = MaskHead(channels, hidden)
    state = {}
    for name, param in head.state_dict().items():
        arr = arrays.get(f"mask_head.{name}")
        if arr is None or arr.shape != tuple(param.shape) or not np.all(np.isfinite(arr)):
            raise ModelFileError(f"patchcore model: mask_head.{name} missing or malformed")
        state[name] = torch.from_numpy(np.ascontiguousarray(arr, np.float32))
    head.load_state_dict(state)
    head.eval()
    return head, gain


class _Mirrored(Sequence[Image]):
    """The images, then each mirrored copy of them (``"lr"``: left to right, ``"ud"``:
    top to bottom), made when asked for; ``source`` gives a copy's image and flip."""

    def __init__(self, images: Sequence[Image], flips: Sequence[str]) -> None:
        self._images, self._flips = images, tuple(flips)

    def __len__(self) -> int:
        return len(self._images) * (1 + len(self._flips))

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each image and copy, without making the copies."""
        return image_shapes(self._images) * (1 + len(self._flips))

    def source(self, index: int) -> tuple[int, str | None]:
        k, i = divmod(index, len(self._images))
        return i, (None if k == 0 else self._flips[k - 1])

    def __getitem__(self, index: int) -> Image:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        i, flip = self.source(index)
        image = self._images[i]
        if flip is None:
            return image
        return np.ascontiguousarray(image[:, ::-1] if flip == "lr" else image[::-1])

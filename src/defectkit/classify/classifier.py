"""The defect-type classifier: transfer learning from a pretrained backbone.

Not an anomaly model: it learns from labelled images of each class (``fit(images,
labels)``) and says which class a new image most likely shows, with calibrated
probabilities. The same verbs otherwise: the constructor stores settings, learned
state ends in ``_`` and travels as arrays + JSON in a defectkit model file.

How it learns (all seeded, so the same data gives the same model):

1. a stratified share of the training images (``val_fraction``) is held out for
   validation, unless validation images are given;
2. every training image and ``augment_copies`` augmented copies of it
   (:class:`~defectkit.classify.augment.Augmentation`) pass once through the
   frozen backbone; their pooled features
   (:class:`~defectkit.classify.features.PooledFeatures`) are kept, so the head
   trains in seconds;
3. a softmax head learns on the standardised features, with class weights
   against imbalance and early stopping on the validation loss; with ``refit`` it
   then relearns on training + validation images for the number of epochs early
   stopping chose;
4. optionally (``fine_tune=N``) the last N blocks of the backbone train with the
   head, on their frozen inputs kept from step 2;
5. a temperature fitted on the validation images scales the logits, so the
   probabilities are calibrated.

>>> clf = DefectClassifier(seed=0).fit(images, labels)      # doctest: +SKIP
>>> clf.predict(new_images), clf.predict_proba(new_images)  # doctest: +SKIP
(['scratch', ...], array([[0.02, 0.97, 0.01], ...]))
>>> clf.save("types.dkm"); DefectClassifier.load("types.dkm")   # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from defectkit.classify.augment import Augmentation
from defectkit.classify.features import POOLINGS, PooledFeatures, classifier_layers
from defectkit.classify.finetune import (
    TunedBlocks,
    fine_tune,
    frozen_inputs,
    lite_network,
    tuned_block_indices,
)
from defectkit.classify.head import HeadTraining, fit_temperature, train_head
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods.base import Image, Progress, check_images
from defectkit.model_file import ModelFile, read_model, write_model
from defectkit.params import Params

__all__ = ["CLASSIFIER_METHOD", "DefectClassifier", "is_classifier_file"]

#: the ``method`` a stand-alone classifier model file names
CLASSIFIER_METHOD = "classifier"
_PREFIX = "classifier."


def is_classifier_file(info: dict[str, Any]) -> bool:
    """Whether a model file's JSON describes a stand-alone classifier."""
    return info.get("method") == CLASSIFIER_METHOD


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out items: ``floor(n_c * fraction)`` of each class, at
    random (seeded), always leaving at least one item of a class in training."""
    held = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(math.floor(len(idx) * fraction), len(idx) - 1)
        if k > 0:
            held[rng.permutation(idx)[:k]] = True
    return held


class DefectClassifier(Params):
    """Defect-type classifier on pretrained EfficientNet-Lite features (see the module doc).

    Settings: ``backbone``; ``layers`` (default: ends of the last two stages);
    ``image_size`` (square input side); ``pooling`` (of ``mean``, ``std``, ``max``);
    ``augment_copies`` per training image and the augmentation ranges (``flips``,
    ``max_rotation`` degrees, ``brightness``, ``contrast``, ``noise``);
    ``class_weight`` (``"balanced"`` or None); ``val_fraction``; ``refit``; the
    head's ``l2``, ``lr``, ``max_epochs``, ``patience``; ``fine_tune`` (last blocks
    to train, 0 = frozen backbone), ``fine_tune_lr``, ``fine_tune_epochs``;
    ``batch_size``; ``seed``.
    """

    name: ClassVar[str] = CLASSIFIER_METHOD
    summary: ClassVar[str] = (
        "defect-type classifier: pretrained pooled features + calibrated softmax head "
        "(fits on labelled images, not an anomaly model)"
    )

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        layers: list[str] | None = None,
        image_size: int = 224,
        pooling: list[str] | None = None,
        augment_copies: int = 2,
        flips: bool = True,
        max_rotation: float = 10.0,
        brightness: float = 0.1,
        contrast: float = 0.15,
        noise: float = 0.02,
        class_weight: str | None = "balanced",
        val_fraction: float = 0.15,
        refit: bool = True,
        l2: float = 0.01,
        lr: float = 1e-3,
        max_epochs: int = 300,
        patience: int = 20,
        fine_tune: int = 0,
        fine_tune_lr: float = 1e-4,
        fine_tune_epochs: int = 10,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.image_size = image_size
        self.pooling = pooling
        self.augment_copies = augment_copies
        self.flips = flips
        self.max_rotation = max_rotation
        self.brightness = brightness
        self.contrast = contrast
        self.noise = noise
        self.class_weight = class_weight
        self.val_fraction = val_fraction
        self.refit = refit
        self.l2 = l2
        self.lr = lr
        self.max_epochs = max_epochs
        self.patience = patience
        self.fine_tune = fine_tune
        self.fine_tune_lr = fine_tune_lr
        self.fine_tune_epochs = fine_tune_epochs
        self.batch_size = batch_size
        self.seed = seed
        self._features: PooledFeatures | None = None

    # -- settings ----------------------------------------------------------------
    def _settings_layers(self) -> list[str]:
        """The layers the settings name, defaults filled in."""
        return list(self.layers) if self.layers is not None else classifier_layers(self.backbone)

    def _validate(self) -> None:
        if self.class_weight not in (None, "none", "balanced"):
            raise ConfigError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("augment_copies", "fine_tune"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("max_epochs", "patience", "fine_tune_epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "fine_tune_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.l2 >= 0:
            raise ConfigError(f"l2 must be >= 0, got {self.l2}")
        _ = self.augmentation  # checks its ranges
        if self.fine_tune:
            layers = self.features.layers
            blocks = [n for n in layers if n.startswith("blocks.")]
            ordered = sorted(blocks, key=lambda n: int(n.split(".")[1]))
            if blocks != layers or blocks != ordered:
                raise ConfigError(
                    f"fine_tune needs layers 'blocks.N' in increasing order, got {layers}"
                )
            tuned_block_indices(layers, self.fine_tune)

    @property
    def features(self) -> PooledFeatures:
        """The pooled-feature part (backbone loaded on first use), on the layers the
        classifier was fitted (or loaded) with, else the settings'. It holds the
        fine-tuned blocks of a fitted classifier, so only ``fit`` starts it afresh."""
        if self._features is None:
            self._features = PooledFeatures(
                self.backbone,
                self.layers_ if hasattr(self, "layers_") else self._settings_layers(),
                self.image_size,
                self.pooling if self.pooling is not None else POOLINGS,
                self.batch_size,
            )
        return self._features

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(
            flips=bool(self.flips),
            max_rotation=float(self.max_rotation),
            brightness=float(self.brightness),
            contrast=float(self.contrast),
            noise=float(self.noise),
        )

    # -- fitting -----------------------------------------------------------------
    def fit(
        self,
        images: Sequence[Image],
        labels: Sequence[str],
        *,
        val_images: Sequence[Image] | None = None,
        val_labels: Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> DefectClassifier:
        """Learn the classes of ``labels`` (one per image); return ``self``.

        Validation images (for early stopping and the temperature) are
        ``val_images`` when given, else a stratified ``val_fraction`` of
        ``images``. Needs at least two classes.
        """
        t0 = time.perf_counter()
        # a fresh backbone on the settings' layers: a fine-tuned one must not carry over
        self._features = None
        self.layers_ = self._settings_layers()
        self._validate()
        images = check_images(images, min_count=2)
        labels = [str(lab) for lab in labels]
        if len(labels) != len(images):
            raise ConfigError(f"{len(labels)} labels for {len(images)} images; give one each")
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ConfigError(f"a classifier needs images of at least 2 classes, got {classes}")
        y_all = np.array([classes.index(lab) for lab in labels], dtype=np.int64)
        if val_images is not None:
            val_images = check_images(val_images) if len(val_images) else []
            val_labels = [str(lab) for lab in (val_labels or [])]
            if len(val_labels) != len(val_images):
                raise ConfigError(
                    f"{len(val_labels)} validation labels for {len(val_images)} images"
                )
            foreign = sorted(set(val_labels) - set(classes))
            if foreign:
                raise ConfigError(f"validation classes {foreign} have no training images")
            train_imgs, y = list(images), y_all
            val_imgs = list(val_images)
            y_val = np.array([classes.index(lab) for lab in val_labels], dtype=np.int64)
        else:
            held = stratified_holdout(y_all, self.val_fraction, self.seed)
            train_imgs = [im for im, h in zip(images, held, strict=True) if not h]
            val_imgs = [im for im, h in zip(images, held, strict=True) if h]
            y, y_val = y_all[~held], y_all[held]
        self.classes_ = classes

        if self.fine_tune:
            head_info, tune_info, val_logits = self._fit_tuned(
                train_imgs, y, val_imgs, y_val, progress
            )
        else:
            head_info, val_logits = self._fit_frozen(train_imgs, y, val_imgs, y_val, progress)
            tune_info = None
        self.temperature_ = fit_temperature(val_logits, y_val) if len(y_val) else 1.0
        val_acc = float(np.mean(val_logits.argmax(1) == y_val)) if len(y_val) else None
        self.training_ = {
            "n_train": len(train_imgs),
            "n_val": len(val_imgs),
            "n_augmented": len(train_imgs) * self.augment_copies,
            "class_counts": {c: int(np.sum(y_all == i)) for i, c in enumerate(classes)},
            "val_accuracy": val_acc,
            "head": _training_dict(head_info),
            "fine_tune": None if tune_info is None else _training_dict(tune_info),
            "refit": bool(self.refit and len(y_val) and not self.fine_tune),
            "temperature": round(self.temperature_, 6),
            "fit_seconds": round(time.perf_counter() - t0, 2),
        }
        return self

    def _pooled(
        self,
        train_imgs: list[Image],
        val_imgs: list[Image],
        progress: Progress | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pooled features of the training images and their augmented copies (in the
        order image 0, its copies, image 1, ...) and of the validation images."""
        jobs = [(i, c) for i in range(len(train_imgs)) for c in range(self.augment_copies + 1)]
        total = len(jobs) + len(val_imgs)
        feats = np.empty((len(jobs), self.features.dim), dtype=np.float32)
        aug = self.augmentation
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            batch = [
                train_imgs[i] if c == 0 else aug(train_imgs[i], self._rng(i, c)) for i, c in chunk
            ]
            feats[start : start + len(chunk)] = self.features(batch)
            if progress is not None:
                progress("features", start + len(chunk), total)
        done = len(jobs)
        val = np.empty((len(val_imgs), self.features.dim), dtype=np.float32)
        for start in range(0, len(val_imgs), self.batch_size):
            chunk = val_imgs[start : start + self.batch_size]
            val[start : start + len(chunk)] = self.features(chunk)
            if progress is not None:
                progress("features", done + start + len(chunk), total)
        return feats, val

    def _rng(self, index: int, copy: int) -> np.random.Generator:
        """One stream per (image, copy): the same copy whatever the batch size."""
        return np.random.default_rng([self.seed, index, copy])

    def _standardise_from(self, feats: np.ndarray) -> None:
        self.feature_mean_ = feats.mean(0).astype(np.float32)
        std = feats.std(0)
        self.feature_scale_ = np.where(std > 1e-6, std, 1.0).astype(np.float32)

    def _standardise(self, feats: np.ndarray) -> np.ndarray:
        return (feats - self.feature_mean_) / self.feature_scale_

    def _head_settings(self) -> dict[str, Any]:
        return {
            "class_weight": None if self.class_weight in (None, "none") else self.class_weight,
            "l2": self.l2,
            "lr": self.lr,
            "patience": self.patience,
            "batch_size": 64,
            "seed": self.seed,
        }

    def _train_head(
        self,
        x: np.ndarray,
        y: np.ndarray,
        xv: np.ndarray,
        yv: np.ndarray,
        progress: Progress | None,
    ) -> tuple[torch.nn.Linear, HeadTraining, np.ndarray]:
        n_classes = len(self.classes_)
        report = None if progress is None else (lambda d, t: progress("train head", d, t))
        head, info = train_head(
            x,
            y,
            n_classes,
            x_val=xv if len(yv) else None,
            y_val=yv if len(yv) else None,
            max_epochs=self.max_epochs,
            progress=report,
            **self._head_settings(),
        )
        with torch.no_grad():
            val_logits = head(torch.from_numpy(xv)).numpy() if len(yv) else np.zeros((0, n_classes))
        return head, info, val_logits

    def _fit_frozen(
        self,
        train_imgs: list[Image],
        y: np.ndarray,
        val_imgs: list[Image],
        y_val: np.ndarray,
        progress: Progress | None,
    ) -> tuple[HeadTraining, np.ndarray]:
        feats, val = self._pooled(train_imgs, val_imgs, progress)
        y_rep = np.repeat(y, self.augment_copies + 1)
        self._standardise_from(feats)
        x, xv = self._standardise(feats), self._standardise(val)
        head, info, val_logits = self._train_head(x, y_rep, xv, y_val, progress)
        if self.refit and len(y_val):
            # relearn on all labelled images for the epochs early stopping chose
            head, _ = train_head(
                np.concatenate([x, xv]),
                np.concatenate([y_rep, y_val]),
                len(self.classes_),
                max_epochs=max(1, info.best_epoch),
                **self._head_settings(),
            )
        self._set_head(head)
        return info, val_logits

    def _set_head(self, head: torch.nn.Linear) -> None:
        self.head_weight_ = head.weight.detach().numpy().astype(np.float32).copy()
        self.head_bias_ = head.bias.detach().numpy().astype(np.float32).copy()

    def _fit_tuned(
        self,
        train_imgs: list[Image],
        y: np.ndarray,
        val_imgs: list[Image],
        y_val: np.ndarray,
        progress: Progress | None,
    ) -> tuple[HeadTraining, HeadTraining, np.ndarray]:
        fx = self.features.extractor
        blocks = tuned_block_indices(fx.layers, self.fine_tune)
        tuned = TunedBlocks(fx, blocks, self.features.pooling)
        pooling = self.features.pooling
        aug = self.augmentation

        def inputs(imgs: list[Image], copies: int, offset: int, total: int):
            jobs = [(i, c) for i in range(len(imgs)) for c in range(copies + 1)]
            cuts, earlies, pooled = [], [], []
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start : start + self.batch_size]
                batch = self.features.batch(
                    [imgs[i] if c == 0 else aug(imgs[i], self._rng(i, c)) for i, c in chunk]
                )
                cut, early = frozen_inputs(fx, batch, blocks[0], pooling)
                with torch.no_grad():
                    pooled.append(tuned.features(cut, early))
                cuts.append(cut)
                earlies.append(early)
                if progress is not None:
                    progress("features", offset + start + len(chunk), total)
            if not jobs:
                return None
            return torch.cat(cuts), torch.cat(earlies), torch.cat(pooled).numpy()

        total = len(train_imgs) * (self.augment_copies + 1) + len(val_imgs)
        cut, early, feats = inputs(train_imgs, self.augment_copies, 0, total)
        val_in = inputs(val_imgs, 0, total - len(val_imgs), total)
        y_rep = np.repeat(y, self.augment_copies + 1)
        self._standardise_from(feats)
        x = self._standardise(feats)
        xv = self._standardise(val_in[2]) if val_in else np.zeros((0, x.shape[1]), np.float32)
        head, head_info, _ = self._train_head(x, y_rep, xv, y_val, progress)
        tuned.set_head(head, self.feature_mean_, self.feature_scale_)
        report = None if progress is None else (lambda d, t: progress("fine-tune", d, t))
        tune_info = fine_tune(
            tuned,
            cut,
            early,
            y_rep,
            len(self.classes_),
            val=None if val_in is None else (val_in[0], val_in[1], y_val),
            class_weight=self._head_settings()["class_weight"],
            lr=self.fine_tune_lr,
            l2=self.l2,
            max_epochs=self.fine_tune_epochs,
            patience=self.patience,
            batch_size=self.batch_size,
            seed=self.seed,
            progress=report,
        )
        tuned.copy_into(fx)
        assert tuned.head is not None
        self._set_head(tuned.head)
        self.tuned_blocks_ = {
            f"block.{i}.{name}": p.detach().numpy().astype(np.float32).copy()
            for i, block in zip(tuned.indices, tuned.blocks, strict=True)
            for name, p in block.named_parameters()
        }
        if val_in is None:
            return head_info, tune_info, np.zeros((0, len(self.classes_)))
        with torch.no_grad():
            val_logits = torch.cat(
                [
                    tuned(val_in[0][s : s + self.batch_size], val_in[1][s : s + self.batch_size])
                    for s in range(0, len(y_val), self.batch_size)
                ]
            ).numpy()
        return head_info, tune_info, val_logits

    # -- use -----------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "head_weight_")

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise ConfigError("DefectClassifier is not fitted: call fit() first")

    def logits(self, images: Sequence[Image], progress: Progress | None = None) -> np.ndarray:
        """Temperature-scaled logits (n, classes)."""
        self._require_fitted()
        images = check_images(images, min_count=0)
        if not images:
            return np.zeros((0, len(self.classes_)), dtype=np.float64)
        feats = self.features(images, progress, stage="classify")
        z = self._standardise(feats).astype(np.float64) @ self.head_weight_.T.astype(np.float64)
        return (z + self.head_bias_) / self.temperature_

    def predict_proba(
        self, images: Sequence[Image], progress: Progress | None = None
    ) -> np.ndarray:
        """Calibrated class probabilities (n, classes), columns in ``classes_`` order."""
        z = self.logits(images, progress)
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    def predict(self, images: Sequence[Image], progress: Progress | None = None) -> list[str]:
        """The most likely class of each image."""
        p = self.predict_proba(images, progress)
        return [self.classes_[i] for i in p.argmax(1)]

    # -- learned state -------------------------------------------------------------
    def learned_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON-able values that make up the fitted classifier."""
        self._require_fitted()
        arrays = {
            "feature_mean": self.feature_mean_,
            "feature_scale": self.feature_scale_,
            "head_weight": self.head_weight_,
            "head_bias": self.head_bias_,
            **getattr(self, "tuned_blocks_", {}),
        }
        info = {
            "classes": list(self.classes_),
            "temperature": float(self.temperature_),
            "layers": list(self.features.layers),
            "training": self.training_,
        }
        return arrays, info

    def load_learned_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        """Inverse of :meth:`learned_state`; checks shapes and values."""
        classes = info.get("classes")
        if (
            not isinstance(classes, list)
            or len(classes) < 2
            or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)
        ):
            raise ModelFileError("classifier: classes missing or malformed")
        t = info.get("temperature")
        if not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ModelFileError(f"classifier: temperature must be a number > 0, got {t!r}")
        needed = ("feature_mean", "feature_scale", "head_weight", "head_bias")
        for key in needed:
            a = arrays.get(key)
            if a is None or a.dtype != np.float32 or not np.all(np.isfinite(a)):
                raise ModelFileError(f"classifier: {key} missing, not float32 or not finite")
        mean, scale = arrays["feature_mean"], arrays["feature_scale"]
        weight, bias = arrays["head_weight"], arrays["head_bias"]
        d, c = mean.shape[0] if mean.ndim == 1 else -1, len(classes)
        bad = scale.shape != (d,) or weight.shape != (c, d) or bias.shape != (c,)
        if bad or np.any(scale <= 0):
            raise ModelFileError(
                f"classifier: inconsistent shapes (mean {mean.shape}, scale {scale.shape}, "
                f"weight {weight.shape}, bias {bias.shape}) for {c} classes"
            )
        layers = info.get("layers")  # the layers it was fitted with
        if isinstance(layers, list):
            self.layers_ = [str(n) for n in layers]
        else:
            self.layers_ = self._settings_layers()
        if self._features is not None and self._features.layers != self.layers_:
            self._features = None
        if self.features.dim != d:
            raise ModelFileError(
                f"classifier: {d} features per image stored, but backbone {self.backbone!r} "
                f"layers {self.features.layers} with pooling {self.features.pooling} give "
                f"{self.features.dim}"
            )
        tuned = {k: v for k, v in arrays.items() if k.startswith("block.")}
        if tuned:
            self._load_tuned(tuned)
        self.classes_ = list(classes)
        self.temperature_ = float(t)
        self.feature_mean_, self.feature_scale_ = mean, scale
        self.head_weight_, self.head_bias_ = weight, bias
        self.training_ = dict(info.get("training") or {})

    def _load_tuned(self, tuned: dict[str, np.ndarray]) -> None:
        net = lite_network(self.features.extractor)
        params: dict[str, torch.nn.Parameter] = {}
        for i, block in enumerate(net._blocks):
            for name, p in block.named_parameters():
                params[f"block.{i}.{name}"] = p
        with torch.no_grad():
            for key, value in tuned.items():
                p = params.get(key)
                if p is None or tuple(p.shape) != value.shape or not np.all(np.isfinite(value)):
                    raise ModelFileError(f"classifier: fine-tuned weight {key} does not fit")
                p.copy_(torch.from_numpy(value))
        self.tuned_blocks_ = dict(tuned)

    # -- model files -----------------------------------------------------------------
    def to_file_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON, arrays under ``classifier.``) to store this classifier in a model file."""
        arrays, state = self.learned_state()
        return (
            {"params": self.get_params(), "state": state},
            {f"{_PREFIX}{k}": v for k, v in arrays.items()},
        )

    @classmethod
    def from_file_parts(
        cls, info: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> DefectClassifier:
        """Inverse of :meth:`to_file_parts`; arrays without the prefix are ignored."""
        if not isinstance(info, dict):
            raise ModelFileError("classifier description is not a JSON object")
        params = dict(info.get("params") or {})
        try:
            cls.check_params(params)
        except ConfigError as e:
            raise ModelFileError(f"classifier: {e}") from None
        clf = cls(**params)
        own = {k.removeprefix(_PREFIX): v for k, v in arrays.items() if k.startswith(_PREFIX)}
        clf.load_learned_state(own, dict(info.get("state") or {}))
        return clf

    def save(self, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write a stand-alone classifier model file (atomic, like every model write)."""
        part, arrays = self.to_file_parts()
        info = {
            "method": CLASSIFIER_METHOD,
            "classifier": part,
            "threshold": None,
            "pixel_threshold": None,
            "provenance": dict(provenance or {}),
        }
        return write_model(path, ModelFile(info=info, arrays=arrays))

    @classmethod
    def load(cls, path: str | Path) -> DefectClassifier:
        """Read a stand-alone classifier model file (or the classifier of a bundle)."""
        return cls.from_model_file(read_model(path), path)

    @classmethod
    def from_model_file(cls, mf: ModelFile, path: str | Path) -> DefectClassifier:
        part = mf.info.get("classifier")
        if part is None:
            raise ModelFileError(
                f"{path}: holds the anomaly model {mf.info.get('method')!r} without a "
                "defect-type classifier"
            )
        try:
            clf = cls.from_file_parts(part, mf.arrays)
        except ModelFileError as e:
            raise ModelFileError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ModelFileError(f"{path}: classifier description is invalid ({e})") from None
        clf.provenance_ = dict(mf.info.get("provenance") or {})
        clf.provenance_["defectkit_version"] = mf.info.get("defectkit_version")
        return clf

    def describe(self) -> dict[str, Any]:
        """What the fitted classifier holds, for ``defectkit info``."""
        self._require_fitted()
        return {
            "classes": list(self.classes_),
            "params": self.get_params(),
            "layers": list(self.features.layers),
            "temperature": self.temperature_,
            "fine_tuned_blocks": sorted(
                {int(k.split(".")[1]) for k in getattr(self, "tuned_blocks_", {})}
            ),
            "training": self.training_,
        }


def _training_dict(info: HeadTraining) -> dict[str, Any]:
    return {
        "epochs": info.epochs,
        "best_epoch": info.best_epoch,
        "best_val_loss": None if info.best_val_loss is None else round(info.best_val_loss, 6),
        "stopped_early": info.stopped_early,
    }

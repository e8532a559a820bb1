"""Semi-supervised detection: a few labelled defective images re-weigh the evidence.

An anomaly model fitted on good images gives one kind of evidence (how unlike
good patches the worst patch is). A handful of labelled defective images can
say how much to trust it next to two other kinds:

1. ``anomaly``: the anomaly model's image score;
2. ``global``: how far the whole image is from the nearest good image, in pooled
   pretrained features (:class:`~defectkit.classify.features.PooledFeatures`):
   catches what no single patch shows (uneven texture or brightness across a part);
3. ``defect_affinity``: how close the image is to the nearest labelled defective
   image in the same features (minus sign: closer = more defective).

Each is standardised on held-out good images (the calibration images, which the
anomaly model never saw), and a logistic regression with balanced class
weights learns their weights from those good images against the labelled
defects. The re-scored value is the regression's log-odds, mapped linearly so
that the held-out good images have the same mean and spread as under the
anomaly score (thresholds and overlays keep their familiar range).

Never worse than the anomaly model alone, as far as the labelled images can
tell: the regression's k-fold cross-validated AUROC on them (each fold's
defect affinity measured against that fold's training defects only) must beat
the anomaly score's AUROC on the same images, else no re-scorer is used.
The image threshold is then calibrated on the held-out good images' out-of-fold
re-scored values, so it keeps the conformal false-alarm-rate guarantee
approximately (cross-conformal).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from defectkit.classify.features import POOLINGS, PooledFeatures, classifier_layers
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods.base import Image, Progress
from defectkit.methods.parts.coreset import greedy_coreset
from defectkit.params import Params

__all__ = ["EVIDENCE", "DefectRescorer", "RescoreFit"]

#: the evidence the re-scorer weighs, in column order
EVIDENCE: tuple[str, ...] = ("anomaly", "global", "defect_affinity")
#: fewest held-out good and labelled defective images to learn from
MIN_GOOD, MIN_DEFECT = 5, 3


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _nearest(a: np.ndarray, b: np.ndarray, batch: int = 512) -> np.ndarray:
    """Euclidean distance from each row of ``a`` to its nearest row of ``b``."""
    out = np.empty(len(a), dtype=np.float64)
    for s in range(0, len(a), batch):
        out[s : s + batch] = np.sqrt(_sq_dists(a[s : s + batch], b).min(1))
    return out


def _z(ref: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (1 when there is no spread) to standardise with."""
    sd = float(np.std(ref))
    return float(np.mean(ref)), sd if sd > 1e-12 else 1.0


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from defectkit.metrics import image_auroc

    return float(image_auroc(y, s))


@dataclass
class RescoreFit:
    """What fitting found: whether re-scoring helps, and the figures that decided it."""

    used: bool
    anomaly_auroc: float  # of the anomaly score on the labelled images
    cv_auroc: float  # cross-validated, of the re-scored value on the same images
    n_good: int
    n_defect: int
    good_oof: np.ndarray  # out-of-fold re-scored values of the held-out good images

    def to_dict(self) -> dict[str, Any]:
        return {
            "used": self.used,
            "labelled_anomaly_auroc": round(self.anomaly_auroc, 6),
            "labelled_cv_auroc": round(self.cv_auroc, 6),
            "n_good": self.n_good,
            "n_defect": self.n_defect,
        }


class DefectRescorer(Params):
    """Learned re-scoring of an anomaly model from a few labelled defective images.

    A :class:`~defectkit.detector.Detector` that keeps one also sets
    ``unsupervised_threshold_``: the anomaly model's own image threshold, on the
    maps' scale, which still bounds where maps are cut into regions.

    >>> r = DefectRescorer()                                              # doctest: +SKIP
    >>> fit = r.fit(fit_good_images, cal_images, cal_scores, defect_images, defect_scores)
    >>> r.rescore(scores, images) if fit.used else scores                 # doctest: +SKIP
    """

    _built_from_settings = ("_features",)

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        layers: list[str] | None = None,
        image_size: int = 224,
        pooling: list[str] | None = None,
        regularisation: float = 0.1,
        folds: int = 5,
        max_goods: int = 2000,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.image_size = image_size
        self.pooling = pooling
        self.regularisation = regularisation
        self.folds = folds
        self.max_goods = max_goods
        self.batch_size = batch_size
        self.seed = seed
        self._features: PooledFeatures | None = None

    @classmethod
    def _settings_owner(cls) -> str:
        return "re-scorer"

    def _settings_layers(self) -> list[str]:
        """The layers the settings name, defaults filled in."""
        return list(self.layers) if self.layers is not None else classifier_layers(self.backbone)

    @property
    def features(self) -> PooledFeatures:
        """The pooled-feature part, on the layers the re-scorer was fitted (or
        loaded) with, else the settings'."""
        if self._features is None:
            self._features = PooledFeatures(
                self.backbone,
                self.layers_ if hasattr(self, "layers_") else self._settings_layers(),
                self.image_size,
                self.pooling if self.pooling is not None else POOLINGS,
                self.batch_size,
            )
        return self._features

    def _standardised(self, images: Sequence[Image], progress: Progress | None) -> np.ndarray:
        feats = self.features(images, progress, stage="re-score features")
        return ((feats - self.feature_mean_) / self.feature_scale_).astype(np.float32)

    # -- fitting --------------------------------------------------------------------
    def fit(
        self,
        good_images: Sequence[Image],
        cal_images: Sequence[Image],
        cal_scores: np.ndarray,
        defect_images: Sequence[Image],
        defect_scores: np.ndarray,
        progress: Progress | None = None,
    ) -> RescoreFit:
        """Learn from ``good_images`` (those the anomaly model was fitted on: the
        ``global`` reference), ``cal_images`` (held-out good images) with their
        anomaly scores, and labelled ``defect_images`` with theirs."""
        if not (self.regularisation > 0 and math.isfinite(self.regularisation)):
            raise ConfigError(f"regularisation must be > 0, got {self.regularisation}")
        if self.folds < 2 or self.max_goods < 1:
            raise ConfigError(
                f"need folds >= 2 and max_goods >= 1, got {self.folds} and {self.max_goods}"
            )
        if len(cal_images) < MIN_GOOD or len(defect_images) < MIN_DEFECT:
            raise ConfigError(
                f"semi-supervised re-scoring needs at least {MIN_GOOD} held-out good images "
                f"and {MIN_DEFECT} labelled defective images, got {len(cal_images)} and "
                f"{len(defect_images)} (hold out more good images for calibration, or give "
                "more defective ones)"
            )
        self.layers_ = self._settings_layers()
        if self._features is not None and self._features.layers != self.layers_:
            self._features = None  # built for other layers (settings changed since)
        good = self.features(good_images, progress, stage="re-score features")
        self.feature_mean_ = good.mean(0).astype(np.float32)
        sd = good.std(0)
        self.feature_scale_ = np.where(sd > 1e-6, sd, 1.0).astype(np.float32)
        good = ((good - self.feature_mean_) / self.feature_scale_).astype(np.float32)
        if len(good) > self.max_goods:
            good = good[greedy_coreset(good, self.max_goods, seed=self.seed)]
        self.good_bank_ = good
        cal = self._standardised(cal_images, progress)
        defects = self._standardised(defect_images, progress)
        self.defect_bank_ = defects

        cal_scores = np.asarray(cal_scores, np.float64)
        defect_scores = np.asarray(defect_scores, np.float64)
        n_g, n_d = len(cal), len(defects)
        y = np.r_[np.zeros(n_g), np.ones(n_d)]
        anomaly = np.r_[cal_scores, defect_scores]
        glob = np.r_[_nearest(cal, good), _nearest(defects, good)]
        # distances of every labelled item to every labelled defect (never to itself)
        to_defect = np.sqrt(_sq_dists(np.concatenate([cal, defects]), defects))
        to_defect[np.arange(n_g, n_g + n_d), np.arange(n_d)] = np.inf

        def stats_of(train: np.ndarray) -> tuple[np.ndarray, tuple]:
            """Defects of ``train`` (the affinity reference) and standardisation
            statistics from the good items of ``train``."""
            train_def = train[train >= n_g] - n_g
            goods = train[train < n_g]
            aff = to_defect[np.ix_(goods, train_def)].min(1)
            return train_def, (_z(anomaly[goods]), _z(glob[goods]), _z(aff))

        def matrix(rows: np.ndarray, train_def: np.ndarray, stats: tuple) -> np.ndarray:
            aff = to_defect[np.ix_(rows, train_def)].min(1)
            (am, asd), (gm, gsd), (fm, fsd) = stats
            return np.stack(
                [(anomaly[rows] - am) / asd, (glob[rows] - gm) / gsd, -(aff - fm) / fsd], 1
            )

        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold

        def regression() -> LogisticRegression:
            return LogisticRegression(C=self.regularisation, class_weight="balanced")

        k = min(self.folds, n_d, n_g)
        oof = np.empty(n_g + n_d, dtype=np.float64)
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=self.seed)
        for train, test in splitter.split(np.zeros(len(y)), y):
            train_def, stats = stats_of(train)
            m = regression().fit(matrix(train, train_def, stats), y[train])
            oof[test] = m.decision_function(matrix(test, train_def, stats))
        cv_auroc = _auroc(y, oof)
        anomaly_auroc = _auroc(y, anomaly)

        everything = np.arange(n_g + n_d)
        all_def, stats = stats_of(everything)
        final = regression().fit(matrix(everything, all_def, stats), y)
        self.affinity_stats_ = np.array(stats[2], np.float64)
        self.anomaly_stats_ = np.array(stats[0], np.float64)
        self.global_stats_ = np.array(stats[1], np.float64)
        self.coef_ = final.coef_[0].astype(np.float64)
        self.intercept_ = float(final.intercept_[0])
        # map log-odds to the anomaly score's range on good images (out-of-fold values)
        self.output_stats_ = np.array(_z(oof[:n_g]), np.float64)
        self.fit_ = RescoreFit(
            used=bool(cv_auroc > anomaly_auroc),
            anomaly_auroc=anomaly_auroc,
            cv_auroc=cv_auroc,
            n_good=n_g,
            n_defect=n_d,
            good_oof=self._to_score_range(oof[:n_g]),
        )
        return self.fit_

    def _to_score_range(self, log_odds: np.ndarray) -> np.ndarray:
        om, osd = self.output_stats_
        am, asd = self.anomaly_stats_
        return am + asd * (np.asarray(log_odds, np.float64) - om) / osd

    # -- use ------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "coef_")

    def evidence(
        self, scores: np.ndarray, images: Sequence[Image], progress: Progress | None = None
    ) -> np.ndarray:
        """(n, 3) standardised evidence, columns :data:`EVIDENCE`."""
        if not self.is_fitted:
            raise ConfigError("DefectRescorer is not fitted: call fit() first")
        feats = self._standardised(images, progress) if len(images) else None
        if feats is None:
            return np.zeros((0, len(EVIDENCE)))
        am, asd = self.anomaly_stats_
        gm, gsd = self.global_stats_
        fm, fsd = self.affinity_stats_
        glob = _nearest(feats, self.good_bank_)
        aff = _nearest(feats, self.defect_bank_)
        s = np.asarray(scores, np.float64)
        return np.stack([(s - am) / asd, (glob - gm) / gsd, -(aff - fm) / fsd], 1)

    def rescore(
        self, scores: np.ndarray, images: Sequence[Image], progress: Progress | None = None
    ) -> np.ndarray:
        """Re-scored values (the anomaly score's range), one per image."""
        e = self.evidence(scores, images, progress)
        return self._to_score_range(e @ self.coef_ + self.intercept_)

    # -- learned state ------------------------------------------------------------------
    _ARRAYS = (
        "feature_mean_",
        "feature_scale_",
        "good_bank_",
        "defect_bank_",
        "anomaly_stats_",
        "global_stats_",
        "affinity_stats_",
        "output_stats_",
        "coef_",
    )

    def learned_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {name.rstrip("_"): getattr(self, name) for name in self._ARRAYS}
        info = {
            "intercept": self.intercept_,
            "layers": list(self.features.layers),
            "evidence": list(EVIDENCE),
            "fit": self.fit_.to_dict() if hasattr(self, "fit_") else getattr(self, "summary_", {}),
        }
        return arrays, info

    def load_learned_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        for name in self._ARRAYS:
            a = arrays.get(name.rstrip("_"))
            if a is None or not np.all(np.isfinite(a)):
                raise ModelFileError(f"re-scorer: {name.rstrip('_')} missing or not finite")
            setattr(self, name, a)
        d = self.feature_mean_.shape
        n = len(EVIDENCE)
        if (
            len(d) != 1
            or self.feature_scale_.shape != d
            or self.good_bank_.ndim != 2
            or self.good_bank_.shape[1] != d[0]
            or self.defect_bank_.ndim != 2
            or self.defect_bank_.shape[1] != d[0]
            or self.coef_.shape != (n,)
            or any(getattr(self, s).shape != (2,) for s in self._ARRAYS[4:8])
        ):
            raise ModelFileError("re-scorer: arrays of inconsistent shapes")
        layers = info.get("layers")  # the layers it was fitted with
        self.layers_ = (
            [str(x) for x in layers] if isinstance(layers, list) else self._settings_layers()
        )
        if self._features is not None and self._features.layers != self.layers_:
            self._features = None
        if self.features.dim != d[0]:
            raise ModelFileError(
                f"re-scorer: {d[0]} features per image stored, but its backbone gives "
                f"{self.features.dim}"
            )
        intercept = info.get("intercept")
        if not isinstance(intercept, (int, float)) or not math.isfinite(intercept):
            raise ModelFileError("re-scorer: intercept missing or not a number")
        self.intercept_ = float(intercept)
        self.summary_ = dict(info.get("fit") or {})

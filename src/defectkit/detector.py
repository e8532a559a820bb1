"""A detector is what a model file holds: a fitted method, its decision
threshold and where it came from. It turns scores into OK/NG decisions."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectkit import __version__
from defectkit.decide.calibration import Threshold, threshold_for_false_alarm_rate
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods import AnomalyModel, ScoreResult, get_method
from defectkit.methods.base import Image, Progress
from defectkit.model_file import ModelFile, read_model, write_model

MODEL_SUFFIX = ".dkm"


def split_for_calibration(
    n: int, fraction: float, seed: int, min_fit: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, calibration): a seeded random hold-out of good images."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"calibration fraction must be in [0, 1), got {fraction}")
    n_cal = round(n * fraction)
    if n - n_cal < min_fit:
        n_cal = max(0, n - min_fit)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_cal:]), np.sort(order[:n_cal])


class Detector:
    """A fitted anomaly model plus its threshold.

    >>> det = Detector.fit(good_images, method="patchcore")   # doctest: +SKIP
    >>> det.save("part.dkm"); det = Detector.load("part.dkm")  # doctest: +SKIP
    >>> det.inspect(new_images)                                # doctest: +SKIP
    """

    def __init__(
        self,
        model: AnomalyModel,
        threshold: Threshold | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.threshold = threshold
        self.info = dict(info or {})

    @classmethod
    def fit(
        cls,
        images: Sequence[Image],
        method: str = "patchcore",
        params: dict[str, Any] | None = None,
        *,
        false_alarm_rate: float = 0.01,
        calibration_fraction: float = 0.1,
        calibration_images: Sequence[Image] | None = None,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> Detector:
        """Fit ``method`` on good images and calibrate its threshold on good images
        held out from fitting (or on ``calibration_images`` when given)."""
        model_cls = get_method(method)
        params = dict(params or {})
        model_cls.check_params(params)
        model = model_cls(**params)
        if calibration_images is None:
            fit_idx, cal_idx = split_for_calibration(len(images), calibration_fraction, seed)
            fit_set = [images[i] for i in fit_idx]
            cal_set = [images[i] for i in cal_idx]
        else:
            fit_set, cal_set = list(images), list(calibration_images)
        if not fit_set:
            raise ConfigError("no good images to fit on")
        t0 = time.perf_counter()
        model.fit(fit_set, progress=progress)
        fit_s = time.perf_counter() - t0
        threshold = None
        if cal_set:
            cal_scores = model.score(cal_set, progress=progress).scores
            threshold = threshold_for_false_alarm_rate(cal_scores, false_alarm_rate)
        info = {
            "n_fit_images": len(fit_set),
            "n_calibration_images": len(cal_set),
            "fit_seconds": round(fit_s, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
        }
        return cls(model, threshold, info)

    # -- use --------------------------------------------------------------------
    def score(self, images: Sequence[Image], progress: Progress | None = None) -> ScoreResult:
        return self.model.score(images, progress=progress)

    def decide(self, scores: np.ndarray) -> np.ndarray | None:
        """True where a score means NG; None when no threshold is set."""
        if self.threshold is None:
            return None
        return np.asarray(scores) >= self.threshold.value

    # -- files ------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        arrays, state = self.model.learned_state()
        info = {
            "method": self.model.name,
            "params": self.model.get_params(),
            "state": state,
            "threshold": None if self.threshold is None else self.threshold.to_dict(),
            "provenance": self.info,
        }
        return write_model(
            path, ModelFile(info=info, arrays={f"method.{k}": v for k, v in arrays.items()})
        )

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        mf = read_model(path)
        info = mf.info
        try:
            model_cls = get_method(str(info["method"]))
            params = dict(info.get("params") or {})
            model_cls.check_params(params)
            model = model_cls(**params)
            arrays = {k.removeprefix("method."): v for k, v in mf.arrays.items()}
            model.load_learned_state(arrays, dict(info.get("state") or {}))
            thr = info.get("threshold")
            threshold = None if thr is None else Threshold.from_dict(thr)
        except ModelFileError as e:
            raise ModelFileError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ModelFileError(f"{path}: model description is invalid ({e})") from None
        info_prov = dict(info.get("provenance") or {})
        info_prov["defectkit_version"] = info.get("defectkit_version")
        return cls(model, threshold, info_prov)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.model.name,
            "params": self.model.get_params(),
            "threshold": None if self.threshold is None else self.threshold.to_dict(),
            **self.info,
            "defectkit_version_running": __version__,
        }

"""Settings as objects: frozen dataclasses checked once, when made, with the
messages the command line shows. The CLI builds them from its flags; Python
callers make them directly.

>>> settings = FitSettings(method="patchcore", params={"coreset_ratio": 0.02})  # doctest: +SKIP
>>> result = pipeline.fit(settings, FitData(Path("parts/bolt")))               # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from defectkit.data.files import DEFAULT_IMAGE_MEMORY
from defectkit.decide.defaults import DEFAULT_MAX_FALSE_REGIONS, DEFAULT_MIN_AREA, FEW_SHOT_BELOW
from defectkit.errors import ConfigError
from defectkit.tiling import Tiling


def _frozen(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


def check_method_params(model_cls: Any, params: Mapping[str, Any]) -> None:
    """Setting values, not only names, checked before any image is read: the
    method's own ``_validate`` where it has one, and the backbone's name."""
    model_cls.check_params(dict(params))
    try:
        model = model_cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {model_cls.name!r}: bad setting ({e})") from None
    validate = getattr(model, "_validate", None)
    if callable(validate):
        validate()
    backbone = params.get("backbone")
    if isinstance(backbone, str):
        from defectkit.backbones import stage_ends

        stage_ends(backbone)  # ConfigError naming the known backbones


def check_classifier_params(params: Mapping[str, Any]) -> None:
    from defectkit.classify.classifier import DefectClassifier

    DefectClassifier.check_params(dict(params))
    DefectClassifier(**params)._validate()


@dataclass(frozen=True)
class CalibrationSettings:
    """How the thresholds are set from held-out good images."""

    #: target false-alarm rate of the image threshold
    false_alarm_rate: float = 0.01
    #: share of the good images held out to calibrate (unused with calibration images)
    calibration_fraction: float = 0.1
    #: pixel threshold: allowed defect regions per good image
    max_false_regions: float = DEFAULT_MAX_FALSE_REGIONS
    #: regions smaller than this many px are dropped as specks
    min_region_area: int = DEFAULT_MIN_AREA
    #: fewer good images than this: all fitted, thresholds from leave-one-out scores
    #: (few-shot mode, methods tagged ``leave_one_out``); 0: never
    few_shot_below: int = FEW_SHOT_BELOW

    def __post_init__(self) -> None:
        if not 0 <= self.calibration_fraction < 1:
            raise ConfigError(
                f"--calibration-fraction must be in [0, 1), got {self.calibration_fraction}"
            )
        if not 0 < self.false_alarm_rate < 1:
            raise ConfigError(f"--false-alarm-rate must be in (0, 1), got {self.false_alarm_rate}")
        if not (self.max_false_regions >= 0 and math.isfinite(self.max_false_regions)):
            raise ConfigError(f"--max-false-regions must be >= 0, got {self.max_false_regions}")
        if self.min_region_area < 1:
            raise ConfigError(f"--min-region-area must be >= 1 pixel, got {self.min_region_area}")
        if self.few_shot_below < 0:
            raise ConfigError(f"--few-shot-below must be >= 0, got {self.few_shot_below}")


@dataclass(frozen=True)
class FitSettings:
    """Everything ``fit`` decides, apart from the data.

    ``tiling`` fits on tiles (the model then scores in them); ``min_defect_px``
    lets fit choose tiles where whole images would shrink a defect of that size
    below one feature cell. ``mask_head`` settings apply with defect masks;
    ``classifier`` settings (a mapping, maybe empty) also fit a defect-type
    classifier; None fits none. ``image_memory_gib``: GiB of decoded good images
    held while fitting (above it they are read from their files when needed).
    """

    method: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    tiling: Tiling | None = None
    min_defect_px: int | None = None
    mask_head: Mapping[str, Any] = field(default_factory=dict)
    classifier: Mapping[str, Any] | None = None
    image_memory_gib: float = DEFAULT_IMAGE_MEMORY / 2**30

    def __post_init__(self) -> None:
        from defectkit.methods import DEFAULT_METHOD, get_method
        from defectkit.methods.parts.mask_head import check_settings

        method = self.method or DEFAULT_METHOD
        object.__setattr__(self, "method", method)
        model_cls = get_method(method)
        params = dict(self.params)
        if "seed" in inspect.signature(model_cls).parameters:
            params.setdefault("seed", self.seed)
        check_method_params(model_cls, params)
        object.__setattr__(self, "params", _frozen(params))
        check_settings(dict(self.mask_head))
        object.__setattr__(self, "mask_head", _frozen(self.mask_head))
        if self.classifier is not None:
            clf = {"seed": self.seed, **self.classifier}
            check_classifier_params(clf)
            object.__setattr__(self, "classifier", _frozen(clf))
        if self.min_defect_px is not None:
            if self.tiling is not None:
                raise ConfigError(
                    "--min-defect-px sets the tile size itself: give it or --tile, not both"
                )
            if self.min_defect_px < 1:
                raise ConfigError(f"the smallest defect must be >= 1 px, got {self.min_defect_px}")
        if not (self.image_memory_gib >= 0 and math.isfinite(self.image_memory_gib)):
            raise ConfigError(f"--image-memory must be >= 0 GiB, got {self.image_memory_gib}")

    @property
    def image_memory(self) -> int:
        """``image_memory_gib`` in bytes."""
        return int(self.image_memory_gib * 2**30)


@dataclass(frozen=True)
class FitData:
    """Where ``fit`` finds its images: good images (an MVTec layout's train/good or
    a folder), and optionally separate calibration images, a few labelled defects
    (semi-supervised), their masks, and a manifest of labelled defect types."""

    data: Path
    calibration_dir: Path | None = None
    defects: Path | None = None
    defect_masks: Path | None = None
    manifest: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifest", resolve_manifest(self.manifest, self.data))


def resolve_manifest(manifest: Path | None, data: Path) -> Path | None:
    """``manifest`` as given, or inside ``data`` when only there."""
    if manifest is None or manifest.exists() or manifest.is_absolute():
        return manifest
    inside = data / manifest
    return inside if inside.exists() else manifest

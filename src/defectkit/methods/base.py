"""The estimator contract every method follows.

A method's constructor only stores settings (:class:`~defectkit.params.Params`:
``get_params``, ``set_params``), and nothing rewrites them later. ``fit`` learns
from good images and returns ``self``; ``score`` returns image scores and
anomaly maps at each input's own resolution. Learned state, and whatever is
derived from the settings (default layers resolved), lives in attributes ending
in ``_`` and travels to and from a model file through ``learned_state`` /
``load_learned_state`` as plain arrays, so loading a model never runs code.

Images are ``numpy`` arrays, ``uint8``, shape ``(H, W, 3)``, RGB (see
``defectkit.data.images``). Sizes may differ between images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from defectkit.data.files import ImageFiles
from defectkit.errors import ConfigError, ImageError, ModelFileError
from defectkit.params import Params

Image = np.ndarray
#: progress callback: (stage, done, total)
Progress = Callable[[str, int, int], None]


@dataclass
class ScoreResult:
    """What ``score`` returns: one score and one map per input image.

    ``scores[i]`` is higher for more anomalous images; ``maps[i]`` has the shape
    ``(H_i, W_i)`` of input ``i``. ``extras`` carries method-specific evidence
    (e.g. the nearest good patch of a memory-bank method), one entry per image.
    """

    scores: np.ndarray
    maps: list[np.ndarray]
    extras: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scores)


class AnomalyModel(Params, ABC):
    """Base class of every anomaly-detection method.

    >>> from defectkit.methods import get_method
    >>> model = get_method("patchcore")(coreset_ratio=0.05)  # doctest: +SKIP
    >>> model.fit(good_images).score(new_images).scores      # doctest: +SKIP
    """

    #: registry name, e.g. ``"patchcore"``
    name: ClassVar[str] = ""
    #: one-line summary shown by ``defectkit methods``
    summary: ClassVar[str] = ""

    # -- tags: what the method can do, read by the entry points (never name lists) --
    #: its backbone exports to ONNX (``defectkit export``; scoring is a frozen
    #: backbone plus arithmetic on its features, read through ``extractor``)
    exportable: ClassVar[bool] = False
    #: what of an exportable method's scoring runs outside ONNX (in its bundle's manifest)
    onnx_scoring: ClassVar[str] = ""
    #: its backbone may score in bfloat16 (``--precision``; measured where set)
    low_precision: ClassVar[bool] = False
    #: learns where defects are from labelled masks (``fit_mask_head``)
    learns_masks: ClassVar[bool] = False
    #: settings a model fitted on tiles takes unless the user chose them: whole-part
    #: settings that would treat each tile as a part (see :mod:`defectkit.tiling`)
    tile_settings: ClassVar[dict[str, Any]] = {}
    #: scores its training images as if fitted without each (``score_left_out``) at
    #: the cost of a search, not a refit: a fit on a few good images then
    #: calibrates on all of them (:mod:`defectkit.decide.few_shot`)
    leave_one_out: ClassVar[bool] = False

    @abstractmethod
    def fit(self, images: Sequence[Image]) -> AnomalyModel:
        """Learn what good looks like from ``images``; return ``self``."""

    @abstractmethod
    def score(self, images: Sequence[Image]) -> ScoreResult:
        """Score ``images``; needs a fitted model."""

    def score_left_out(
        self,
        images: Sequence[Image],
        queries: Sequence[tuple[int, Image]],
        progress: Progress | None = None,
    ) -> ScoreResult:
        """Score each query ``(i, image)`` as if fitted without training image ``i``;
        ``images`` are the training images, as fitted. For methods tagged
        ``leave_one_out``."""
        raise ConfigError(f"method {self.name!r} cannot score with a training image left out")

    def fit_notes(self) -> list[str]:
        """What the fitted method chose from its training images by itself (input
        geometry, search), one line each, for ``fit`` to say; none by default."""
        return []

    # -- learned state ----------------------------------------------------------
    @abstractmethod
    def learned_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON-able values that make up the fitted model."""

    @abstractmethod
    def load_learned_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        """Inverse of ``learned_state``; must not trust its input blindly."""

    @property
    def is_fitted(self) -> bool:
        return any(k.endswith("_") and not k.startswith("_") for k in vars(self))

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise ConfigError(f"{type(self).__name__} is not fitted: call fit() first")


def loaded_array(
    arrays: dict[str, np.ndarray],
    key: str,
    shape: tuple[int, ...] | None,
    owner: str,
    *,
    detail: str = "",
    positive: bool = False,
) -> np.ndarray:
    """One array of a model file, checked before use (a model file is untrusted):
    present, of ``shape`` (when given), finite, and > 0 where ``positive``."""
    arr = arrays.get(key)
    if arr is None or (shape is not None and arr.shape != shape):
        raise ModelFileError(
            f"{owner} model: {key} missing or not of shape {shape}"
            + (f" ({detail})" if detail else "")
        )
    if not np.all(np.isfinite(arr)):
        raise ModelFileError(f"{owner} model: {key} holds NaN or infinite values")
    if positive and np.any(arr <= 0):
        raise ModelFileError(f"{owner} model: {key} must be positive")
    return arr


def loaded_layers(info: dict[str, Any], key: str, owner: str) -> list[str] | None:
    """Backbone layer names a model file's learned state records under ``key`` (the
    layers the model was fitted with), checked; None where it records none."""
    layers = info.get(key)
    if layers is None:
        return None
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ModelFileError(f"{owner} model: {key} must be a list of layer names")
    return list(layers)


def check_images(images: Sequence[Image], *, min_count: int = 1) -> Sequence[Image]:
    """Validate images passed to the Python API; name the index of a bad one.

    An :class:`~defectkit.data.files.ImageFiles` stays one (its files decode to
    uint8 RGB already); only the recorded sizes are checked, so nothing is
    decoded here.
    """
    if isinstance(images, ImageFiles):
        for i, (h, w) in enumerate(images.shapes):
            if h < 8 or w < 8:
                raise ImageError(str(images.paths[i]), f"image too small: {w}x{h} (min 8x8)")
        if len(images) < min_count:
            raise ImageError(None, f"need at least {min_count} image(s), got {len(images)}")
        return images
    if isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object:
        images = [images]
    out: list[Image] = []
    for i, img in enumerate(images):
        where = f"image #{i}"
        if not isinstance(img, np.ndarray):
            raise ImageError(where, f"expected a numpy array, got {type(img).__name__}")
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
            raise ImageError(where, f"expected shape (H, W, 3), got {img.shape}")
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        elif img.shape[2] == 4:
            img = img[:, :, :3]
        if img.shape[0] < 8 or img.shape[1] < 8:
            raise ImageError(where, f"image too small: {img.shape[1]}x{img.shape[0]} (min 8x8)")
        if img.dtype != np.uint8:
            if not np.issubdtype(img.dtype, np.number):
                raise ImageError(where, f"unsupported dtype {img.dtype}")
            if not np.all(np.isfinite(img)):
                raise ImageError(where, "contains NaN or infinite values")
            if np.issubdtype(img.dtype, np.floating):
                if img.min() < 0 or img.max() > 1:
                    raise ImageError(where, "float images must lie in [0, 1]")
                img = np.round(img * 255).astype(np.uint8)
            elif img.dtype == np.uint16:
                img = (img // 257).astype(np.uint8)
            else:
                raise ImageError(where, f"unsupported dtype {img.dtype}")
        out.append(np.ascontiguousarray(img))
    if len(out) < min_count:
        raise ImageError(None, f"need at least {min_count} image(s), got {len(out)}")
    return out

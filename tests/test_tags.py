"""Capabilities are tags on the method classes, and the entry points honour them:
export, lower precision, mask heads and tiled fits read the tag, never a list."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from defectkit.detector import Detector, _check_mask_head
from defectkit.errors import ConfigError
from defectkit.export.onnx_bundle import ExportError, check_exportable, exportable_methods
from defectkit.methods import available_methods
from defectkit.tiling import tile_params

METHODS = sorted(available_methods().items())


@pytest.mark.parametrize(("name", "cls"), METHODS, ids=[n for n, _ in METHODS])
def test_export_follows_the_exportable_tag(name: str, cls: type) -> None:
    det = Detector(cls())
    if cls.exportable:
        check_exportable(det)  # no error: the method can be exported
        assert name in exportable_methods() and cls.onnx_scoring
    else:
        with pytest.raises(ExportError, match=f"method {name!r} cannot be exported"):
            check_exportable(det)


@pytest.mark.parametrize(("name", "cls"), METHODS, ids=[n for n, _ in METHODS])
def test_lower_precision_follows_the_low_precision_tag(name: str, cls: type) -> None:
    det = Detector(cls())
    if cls.low_precision:
        assert hasattr(cls(), "extractor")
        return  # bfloat16 itself depends on the CPU: see test_precision.py
    with pytest.raises(ConfigError, match=f"is for the backbone methods .*not {name}"):
        det.set_precision("bfloat16")


@pytest.mark.parametrize(("name", "cls"), METHODS, ids=[n for n, _ in METHODS])
def test_defect_masks_follow_the_learns_masks_tag(name: str, cls: type) -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[4:8, 4:8] = True
    if cls.learns_masks:
        assert callable(getattr(cls, "fit_mask_head", None))
        _check_mask_head(cls(), [image], [mask], {})  # accepted
    else:
        with pytest.raises(ConfigError, match=f"not {name}"):
            _check_mask_head(cls(), [image], [mask], {})


@pytest.mark.parametrize(("name", "cls"), METHODS, ids=[n for n, _ in METHODS])
def test_tiled_fits_take_the_tile_settings_tag(name: str, cls: type) -> None:
    known = inspect.signature(cls.__init__).parameters
    assert set(cls.tile_settings) <= set(known)  # each is a setting of the method
    assert tile_params(name, {}) == dict(cls.tile_settings)
    chosen = {k: known[k].default for k in cls.tile_settings}
    assert tile_params(name, chosen) == chosen  # the user's choice wins

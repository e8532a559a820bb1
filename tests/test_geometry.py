"""Input geometry from the data: a model learns one working aspect from its
training images (keep_aspect="auto"), keeps it in its file, and every image it
scores is resized to that one size."""

from __future__ import annotations

import numpy as np
import pytest

from defectkit.data.synthetic import make_surface
from defectkit.detector import Detector
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods.parts.resize import UNIFORM_ASPECT, fit_size, working_aspect
from defectkit.methods.patchcore import PatchCore


def test_uniform_shapes_keep_their_aspect_and_varied_ones_are_squashed() -> None:
    assert working_aspect([(500, 1250)] * 5) == pytest.approx(2.5)
    assert working_aspect([(256, 512), (250, 512), (260, 512)]) == pytest.approx(512 / 256)
    # crops in both orientations: one square working size
    assert working_aspect([(100, 260), (260, 100), (200, 200)]) == 1.0
    assert working_aspect([(100, 100), (100, round(100 * UNIFORM_ASPECT) + 1)]) == 1.0
    assert working_aspect([(100, 100), (100, 110)]) == pytest.approx(1.05)
    assert working_aspect([]) == 1.0


def test_one_working_aspect_gives_every_image_the_same_size() -> None:
    # a 500 x 1250 part at side 256: 256 across, 2.5 times that along
    h, w = fit_size(500, 1250, 256, 32, False, aspect=2.5)
    assert (h, w) == (256, 640)
    assert fit_size(100, 100, 256, 32, False, aspect=2.5) == (h, w)  # whatever its own shape
    assert fit_size(1250, 500, 256, 32, False, aspect=0.4) == (640, 256)
    assert fit_size(500, 1250, 256, 32, False) == (256, 256)  # squashed without an aspect
    assert fit_size(500, 1250, 256, 32, True) == (160, 416)  # each its own, area ~256^2
    assert fit_size(10, 1000, 256, 32, False, aspect=100.0) == (256, 1024)  # capped at 4:1


def _elongated(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [make_surface("fabric", (48, 144), rng) for _ in range(n)]


@pytest.fixture(scope="module")
def auto_model() -> PatchCore:
    rng = np.random.default_rng(5)
    return PatchCore(image_size=96, coreset_ratio=0.1, keep_aspect="auto").fit(_elongated(8, rng))


def test_auto_learns_the_aspect_and_scores_on_a_non_square_grid(auto_model: PatchCore) -> None:
    assert auto_model.input_aspect_ == pytest.approx(3.0)
    res = auto_model.score(_elongated(2, np.random.default_rng(6)))
    grid = res.extras[0]["grid"]
    assert grid == [12, 36]  # not squashed: 96 px high, 3 times that wide, stride 8
    assert res.maps[0].shape == (48, 144)
    squashed = PatchCore(image_size=96, coreset_ratio=0.1, keep_aspect=False).fit(
        _elongated(8, np.random.default_rng(5))
    )
    assert squashed.score(_elongated(1, np.random.default_rng(6))).extras[0]["grid"] == [12, 12]


def test_the_default_keeps_one_shape_and_squashes_mixed_ones() -> None:
    """The working geometry comes from the data by default: images of one elongated
    shape keep it; crops in both orientations are squashed to a square."""
    model = PatchCore(image_size=96, coreset_ratio=0.1)
    assert model.keep_aspect == "auto"
    model.fit(_elongated(4, np.random.default_rng(5)))
    assert model.input_aspect_ == pytest.approx(3.0)
    rng = np.random.default_rng(8)
    mixed = _elongated(2, rng) + [np.ascontiguousarray(im.transpose(1, 0, 2)) for im in
                                  _elongated(2, rng)]  # fmt: skip
    assert PatchCore(image_size=96, coreset_ratio=0.1).fit(mixed).input_aspect_ == 1.0


def test_the_working_aspect_travels_with_the_model_file(auto_model: PatchCore, tmp_path) -> None:
    det = Detector(auto_model)
    path = det.save(tmp_path / "m.dkm")
    back = Detector.load(path).model
    assert back.input_aspect_ == auto_model.input_aspect_
    images = _elongated(2, np.random.default_rng(7))
    np.testing.assert_array_equal(back.score(images).scores, auto_model.score(images).scores)


def test_bad_aspect_settings_and_files_are_refused(auto_model: PatchCore, tmp_path) -> None:
    with pytest.raises(ConfigError, match="keep_aspect must be true, false or auto"):
        PatchCore(keep_aspect="wide").fit(_elongated(2, np.random.default_rng(0)))
    arrays, state = auto_model.learned_state()
    for bad in (-1.0, float("nan"), "wide"):
        with pytest.raises(ModelFileError, match="input_aspect malformed"):
            PatchCore(keep_aspect="auto").load_learned_state(arrays, {**state, "input_aspect": bad})

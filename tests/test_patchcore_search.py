"""PatchCore's nearest-neighbour search: with ``nn_search="auto"`` (the default)
fit checks HNSW against exact search on training patches left out of the bank
and searches exactly where HNSW misses; the choice travels in the model file."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from defectkit.detector import Detector
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods import patchcore
from defectkit.methods.patchcore import PatchCore

# min_bank 0: a bank of every patch leaves none out to check the search on
FAST = {"image_size": 64, "coreset_ratio": 0.1, "min_bank": 0}


def _brute_force(model: PatchCore, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true nearest bank distance, the model's distance) of every patch of ``image``."""
    e = model._embed_batches([image], None, "test")[0]
    q = e.reshape(-1, e.shape[-1])
    d, _ = model._nn().search(q, 1)
    return cdist(q, model.memory_bank_).min(1), d[:, 0]


@pytest.mark.parametrize(("min_recall", "chosen"), [(1.01, "exact"), (0.0, "hnsw")])
def test_auto_search_keeps_hnsw_only_where_its_recall_holds(
    surface_set: dict[str, list[np.ndarray]],
    monkeypatch: pytest.MonkeyPatch,
    min_recall: float,
    chosen: str,
) -> None:
    monkeypatch.setattr(patchcore, "_MIN_RECALL", min_recall)
    model = PatchCore(**FAST).fit(surface_set["train"])
    assert model.nn_search == "auto"  # the setting is never rewritten
    assert model.search == model.nn_search_ == chosen
    assert model.nn_recall_ is not None and 0.0 <= model.nn_recall_ <= 1.0
    true, got = _brute_force(model, surface_set["bad"][0])
    if chosen == "exact":
        np.testing.assert_allclose(got, true, rtol=1e-4, atol=1e-4)
    else:  # never closer than the true neighbour
        assert np.all(got >= true * (1 - 1e-4) - 1e-4)


def test_a_measured_recall_decides_and_is_reported(
    surface_set: dict[str, list[np.ndarray]],
) -> None:
    model = PatchCore(**FAST).fit(surface_set["train"])
    want = "hnsw" if model.nn_recall_ >= patchcore._MIN_RECALL else "exact"
    assert model.search == want
    fixed = PatchCore(**FAST, nn_search="exact").fit(surface_set["train"])
    assert fixed.search == "exact" and fixed.nn_recall_ is None  # nothing to check


def test_the_chosen_search_travels_in_the_model_file(
    surface_set: dict[str, list[np.ndarray]], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setattr(patchcore, "_MIN_RECALL", 1.01)  # force exact
    model = PatchCore(**FAST).fit(surface_set["train"])
    Detector(model).save(tmp_path / "m.dkm")
    monkeypatch.setattr(patchcore, "_MIN_RECALL", 0.0)  # loading does not choose again
    loaded = Detector.load(tmp_path / "m.dkm").model
    assert loaded.search == "exact" and loaded.nn_recall_ == model.nn_recall_
    images = surface_set["bad"][:2]
    np.testing.assert_allclose(loaded.score(images).scores, model.score(images).scores, rtol=1e-6)


def test_files_without_a_chosen_search_use_the_setting(
    surface_set: dict[str, list[np.ndarray]],
) -> None:
    model = PatchCore(**FAST, nn_search="hnsw").fit(surface_set["train"])
    arrays, info = model.learned_state()
    del info["nn_search"], info["nn_recall"]
    old = PatchCore(**FAST, nn_search="hnsw")
    old.load_learned_state(arrays, info)
    assert old.search == "hnsw"
    bad = PatchCore(**FAST)
    with pytest.raises(ModelFileError, match="nn_search malformed"):
        bad.load_learned_state(arrays, {**info, "nn_search": "fast"})
    with pytest.raises(ConfigError, match="nn_search must be 'auto', 'exact' or 'hnsw'"):
        PatchCore(nn_search="fast")._validate()


def test_fit_says_which_geometry_and_search_it_chose(demo_root, tmp_path) -> None:
    from typer.testing import CliRunner

    from defectkit.cli import app

    out = str(tmp_path / "m.dkm")
    args = ["fit", str(demo_root), "--out", out, "-q", "-p", "image_size=64"]
    res = CliRunner().invoke(app, [*args, "-p", "coreset_ratio=0.1", "-p", "min_bank=0"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "working size 64x64 px from the training images" in text
    model = Detector.load(tmp_path / "m.dkm").model
    assert f"nearest-neighbour search: {model.search} (HNSW found the true nearest" in text

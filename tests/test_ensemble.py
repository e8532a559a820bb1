"""Score fusion (method "ensemble"): members fitted on the same good images, each
standardised on reference images held out from them, then added."""

from __future__ import annotations

import numpy as np
import pytest

from defectkit.detector import Detector
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods.ensemble import Ensemble

MEMBERS = {"patchcore": {"image_size": 96, "coreset_ratio": 0.1}, "padim": {"image_size": 96}}


@pytest.fixture(scope="module")
def fitted(surface_set: dict) -> Ensemble:
    return Ensemble(member_params=MEMBERS, reference_fraction=0.2).fit(surface_set["train"])


def test_the_fused_score_is_the_sum_of_standardised_member_scores(
    fitted: Ensemble, surface_set: dict
) -> None:
    images = surface_set["good"] + surface_set["bad"]
    res = fitted.score(images)
    expected = np.zeros(len(images))
    for member, (loc, scale) in zip(fitted.members_, fitted.refs_, strict=True):
        expected += (member.score(images).scores - loc) / scale
    np.testing.assert_allclose(res.scores, expected, rtol=1e-5, atol=1e-5)
    # each member's score tops its own map, so the sum tops the summed map
    for score, amap in zip(res.scores, res.maps, strict=True):
        assert score >= amap.max() - 1e-4
    assert res.scores[6:].min() > np.median(res.scores[:6])


def test_members_fit_without_the_reference_images(fitted: Ensemble) -> None:
    assert [m.name for m in fitted.members_] == ["patchcore", "padim"]
    assert len(fitted.fit_index_) == 16  # 20 training images, 20% held out
    assert fitted.members_[0].n_train_images_ == 16
    assert np.all(fitted.refs_[:, 1] > 0)
    again = Ensemble(member_params=MEMBERS, reference_fraction=0.2, seed=1)
    assert not np.array_equal(again._reference_split(20)[0], fitted.fit_index_)


def test_closest_good_points_into_the_ensembles_own_images(
    fitted: Ensemble, surface_set: dict
) -> None:
    extra = fitted.score(surface_set["bad"][:1]).extras[0]
    own = extra["members"]["patchcore"]["nearest_good"]["train_index"]
    assert extra["nearest_good"]["train_index"] == fitted.fit_index_[own]
    paths = [{"path": f"/good/{i}.png", "width": 112, "height": 96} for i in range(20)]
    found = Detector(fitted, info={"fit_images": paths}).closest_good(extra)
    assert found["path"] == f"/good/{fitted.fit_index_[own]}.png"


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"members": ["patchcore"]}, "two or more distinct"),
        ({"members": ["padim", "padim"]}, "two or more distinct"),
        ({"members": ["patchcore", "ensemble"]}, "cannot hold another ensemble"),
        ({"member_params": {"kmeans": {}}}, "not in the ensemble"),
        ({"member_params": {"padim": {"nope": 1}}}, "no setting"),
        ({"reference_fraction": 1.0}, "reference_fraction"),
    ],
)
def test_bad_settings_fail_before_any_work(params: dict, match: str, surface_set: dict) -> None:
    with pytest.raises(ConfigError, match=match):
        Ensemble(**params).fit(surface_set["train"])


def test_malformed_files_are_refused(fitted: Ensemble) -> None:
    arrays, state = fitted.learned_state()
    for bad in (
        {**arrays, "refs": np.array([[1.0, 0.0], [1.0, 1.0]])},
        {**arrays, "refs": np.ones((3, 2))},
        {k: v for k, v in arrays.items() if k != "fit_index"},
    ):
        with pytest.raises(ModelFileError, match="ensemble model"):
            Ensemble().load_learned_state(bad, state)
    with pytest.raises(ModelFileError, match="members"):
        Ensemble().load_learned_state(arrays, {"members": state["members"][:1]})


def test_export_refuses_an_ensemble_by_name(fitted: Ensemble) -> None:
    from defectkit.export.onnx_bundle import ExportError, check_exportable

    with pytest.raises(ExportError, match="'ensemble' cannot be exported"):
        check_exportable(Detector(fitted))

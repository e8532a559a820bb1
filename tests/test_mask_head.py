"""The mask head: learned from a few labelled defect masks, alone (on feature grids)
and inside PatchCore and a Detector (maps, thresholds, model files, export)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from defectkit.decide.calibration import threshold_for_false_alarm_rate
from defectkit.detector import Detector, split_for_calibration
from defectkit.errors import ConfigError, ModelFileError
from defectkit.export.onnx_bundle import ExportError, check_exportable
from defectkit.methods.parts.mask_head import (
    MaskHead,
    MaskHeadSettings,
    check_settings,
    grid_mask,
    train_mask_head,
)
from defectkit.metrics import image_auroc
from defectkit.model_file import ModelFile, read_model, write_model

FAST = {"image_size": 96, "coreset_ratio": 0.1}
HEAD = {"steps": 150}


def _grids(n: int, rng: np.random.Generator, shifted: bool) -> tuple[list, list]:
    """12x12x8 noise grids; ``shifted`` ones carry +1.5 in channel 0 over a band
    of rows whose position varies, marked by the mask."""
    xs, ms = [], []
    for _ in range(n):
        x = rng.normal(0, 1, (12, 12, 8)).astype(np.float32)
        m = np.zeros((12, 12), np.float32)
        if shifted:
            top = int(rng.integers(0, 8))
            m[top : top + 4] = 1
            x[..., 0] += 1.5 * m
        xs.append(x)
        ms.append(m)
    return xs, ms


def _probability(head: MaskHead, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.sigmoid(head(torch.from_numpy(x).permute(2, 0, 1)[None]))[0, 0].numpy()


def test_head_learns_where_a_shift_in_one_feature_is() -> None:
    rng = np.random.default_rng(0)
    defects, masks = _grids(12, rng, shifted=True)
    goods, _ = _grids(40, rng, shifted=False)
    head = train_mask_head(defects, masks, goods, hidden=8, steps=300, seed=1)
    new, new_masks = _grids(8, rng, shifted=True)
    probs = [_probability(head, x) for x in new]
    auroc = image_auroc(np.concatenate(new_masks).ravel() > 0, np.concatenate(probs).ravel())
    assert auroc > 0.9
    fresh_goods, _ = _grids(8, rng, shifted=False)
    assert np.mean([_probability(head, x).mean() for x in fresh_goods]) < 0.2


def test_training_is_seeded_and_leaves_the_global_rng_alone() -> None:
    rng = np.random.default_rng(2)
    defects, masks = _grids(4, rng, shifted=True)
    goods, _ = _grids(6, rng, shifted=False)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_mask_head(defects, masks, goods, hidden=4, steps=20, seed=5)
    after = torch.rand(1)
    b = train_mask_head(defects, masks, goods, hidden=4, steps=20, seed=5)
    assert before == after
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_grids_of_several_sizes_train_together() -> None:
    rng = np.random.default_rng(3)
    defects = [rng.normal(0, 1, (*s, 4)).astype(np.float32) for s in ((6, 8), (8, 6))]
    masks = [np.ones(d.shape[:2], np.float32) for d in defects]
    head = train_mask_head(defects, masks, [np.zeros((7, 7, 4), np.float32)], hidden=4, steps=5)
    assert _probability(head, defects[1]).shape == (8, 6)


def test_grid_mask_is_the_share_of_each_cell() -> None:
    mask = np.zeros((40, 80), bool)
    mask[:, :30] = True  # 3/4 of the second cell column of 20 px
    share = grid_mask(mask, (2, 4))
    np.testing.assert_allclose(share, [[1, 0.5, 0, 0], [1, 0.5, 0, 0]])


def test_settings_are_checked() -> None:
    check_settings({"weight": 2, "hidden": 8, "steps": 10, "max_goods": 3})
    check_settings({})
    cases = [
        ({"depth": 3}, r"no setting\(s\) \['depth'\]"),
        ({"weight": 0}, "weight must be a number > 0"),
        ({"steps": 0.5}, "steps must be a whole number >= 1"),
        ({"hidden": True}, "hidden must be a whole number >= 1"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_settings(settings)


def test_settings_defaults_are_fit_mask_heads() -> None:
    from defectkit.methods.patchcore import PatchCore

    sig = inspect.signature(PatchCore.fit_mask_head).parameters
    assert dataclasses.asdict(MaskHeadSettings()) == {
        f.name: sig[f.name].default for f in dataclasses.fields(MaskHeadSettings)
    }


def test_bad_training_inputs_are_refused() -> None:
    x = [np.zeros((4, 4, 2), np.float32)]
    with pytest.raises(ValueError, match="one mask each"):
        train_mask_head(x, [], x)
    with pytest.raises(ValueError, match="good grids"):
        train_mask_head(x, [np.zeros((4, 4), np.float32)], [])


# -- in PatchCore and a Detector -------------------------------------------------------
@pytest.fixture(scope="module")
def pair(surface_set: dict) -> dict:
    """The same detector fitted without and with masks of the first 4 defects."""
    train, bad, masks = surface_set["train"], surface_set["bad"], surface_set["masks"]
    plain = Detector.fit(train, "patchcore", FAST, calibration_fraction=0.25, few_shot_below=0)
    taught = Detector.fit(
        train,
        "patchcore",
        FAST,
        calibration_fraction=0.25,
        defect_images=bad[:4],
        defect_masks=masks[:4],
        mask_head_params=HEAD,
    )
    return {"plain": plain, "taught": taught, "new": bad[4:], "new_masks": masks[4:]}


def test_the_head_adds_to_the_maps_where_the_defects_are(pair: dict, surface_set: dict) -> None:
    plain, taught = pair["plain"], pair["taught"]
    assert taught.model.mask_head_ is not None and taught.model.mask_gain_ > 0
    # same bank (same images and seed): the maps differ by the head's term alone
    np.testing.assert_array_equal(taught.model.memory_bank_, plain.model.memory_bank_)
    added = [
        a - b
        for a, b in zip(taught.score(pair["new"]).maps, plain.score(pair["new"]).maps, strict=True)
    ]
    assert min(a.min() for a in added) >= -1e-4
    truth = np.concatenate([m.ravel() for m in pair["new_masks"]])
    assert image_auroc(truth, np.concatenate([a.ravel() for a in added])) > 0.85
    info = taught.info["mask_head"]
    assert info["n_defect_images"] == 4 and info["params"] == HEAD
    assert info["n_defect_pixels"] == sum(int(m.sum()) for m in surface_set["masks"][:4])


def test_thresholds_are_calibrated_with_the_head(pair: dict, surface_set: dict) -> None:
    taught = pair["taught"]
    _, cal_idx = split_for_calibration(len(surface_set["train"]), 0.25, seed=0)
    cal = taught.model.score([surface_set["train"][i] for i in cal_idx])
    expected = threshold_for_false_alarm_rate(cal.scores, 0.01)
    assert taught.threshold.value == pytest.approx(expected.value)
    # scores are never below the map's peak, which now holds the head's term
    new = taught.score(pair["new"])
    assert all(s >= m.max() - 1e-4 for s, m in zip(new.scores, new.maps, strict=True))


def test_model_file_round_trip_and_tampering(pair: dict, tmp_path) -> None:
    taught = pair["taught"]
    path = taught.save(tmp_path / "taught.dkm")
    back = Detector.load(path)
    a, b = taught.score(pair["new"]), back.score(pair["new"])
    np.testing.assert_array_equal(a.scores, b.scores)
    for x, y in zip(a.maps, b.maps, strict=True):
        np.testing.assert_array_equal(x, y)
    mf = read_model(path)
    assert mf.info["state"]["mask_head"]["gain"] == pytest.approx(taught.model.mask_gain_)
    broken = dict(mf.arrays)
    del broken["method.mask_head.out.weight"]
    write_model(tmp_path / "broken.dkm", ModelFile(arrays=broken, info=mf.info))
    with pytest.raises(ModelFileError, match=r"mask_head\.out\.weight"):
        Detector.load(tmp_path / "broken.dkm")
    info = {**mf.info, "state": {**mf.info["state"], "mask_head": {"channels": 3}}}
    write_model(tmp_path / "bad_info.dkm", ModelFile(arrays=mf.arrays, info=info))
    with pytest.raises(ModelFileError, match="mask_head settings"):
        Detector.load(tmp_path / "bad_info.dkm")


def test_export_refuses_a_model_with_a_head(pair: dict) -> None:
    check_exportable(pair["plain"])
    with pytest.raises(ExportError, match="mask head"):
        check_exportable(pair["taught"])


def test_masks_are_checked_before_fitting(surface_set: dict) -> None:
    train, bad, masks = surface_set["train"], surface_set["bad"], surface_set["masks"]
    cases = [
        ({"defect_images": bad[:2], "defect_masks": masks[:1]}, "1 defect masks for 2"),
        ({"defect_images": bad[:1], "defect_masks": [masks[0][:50]]}, "defect mask 0 is"),
        (
            {
                "defect_images": bad[:1],
                "defect_masks": masks[:1],
                "mask_head_params": {"steps": -1},
            },
            "steps must be",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            Detector.fit(train, "patchcore", FAST, calibration_fraction=0.25, **kwargs)
    with pytest.raises(ConfigError, match="not padim"):
        Detector.fit(
            train, "padim", {"image_size": 64}, defect_images=bad[:1], defect_masks=masks[:1]
        )

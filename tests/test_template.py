"""Fixed-layout boards (data.layouts), registration and the golden template."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from defectkit.data.datasets import read_mvtec
from defectkit.data.layouts import (
    LAYOUT_DEFECT_KINDS,
    generate_layout_dataset,
    make_layout,
    render_board,
)
from defectkit.errors import ConfigError, DatasetError, ModelFileError
from defectkit.methods.parts import register as reg
from defectkit.methods.template import Template, compare_pair


def _board(layout, key, defect=None, **kw):
    return render_board(layout, np.random.default_rng(key), defect, **kw)


# -- generator ---------------------------------------------------------------------
def test_same_seed_same_board_and_every_defect_has_a_mask() -> None:
    layout = make_layout(seed=5)
    a, _ = _board(layout, [1, 2])
    b, _ = _board(make_layout(seed=5), [1, 2])
    np.testing.assert_array_equal(a, b)
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    for i, kind in enumerate(LAYOUT_DEFECT_KINDS):
        img, mask = _board(layout, [7, i], kind)
        assert mask.dtype == bool and 4 <= mask.sum() < 0.05 * mask.size, kind
        # the masked pixels really changed, the rest did not: compare with the
        # defect-free twin (same generator state)
        twin, no_mask = _board(layout, [7, i], None)
        assert not no_mask.any()
        diff = np.abs(img.astype(int) - twin.astype(int)).max(axis=2)
        assert diff[mask].mean() > 20, kind
        assert np.mean(diff[~mask] > 24) < 0.001, kind
    with pytest.raises(ConfigError, match="unknown layout defect"):
        _board(layout, [0], "dent")


def test_photos_move_by_at_most_the_requested_shift_and_angle() -> None:
    layout = make_layout(seed=1)
    ref, _ = _board(layout, [0], max_shift=0, max_angle=0)
    g_ref = cv2.cvtColor(ref, cv2.COLOR_RGB2GRAY).astype(np.float32)
    for k in range(6):
        img, _ = _board(layout, [1, k])
        warp = reg.estimate_rigid(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32), g_ref)
        angle = math.degrees(math.atan2(warp[1, 0], warp[0, 0]))
        centre = np.array([127.5, 127.5])
        moved_centre = warp[:, :2] @ centre + warp[:, 2]
        assert abs(angle) <= 2.1
        assert np.hypot(*(moved_centre - centre)) <= 10.5


def test_dataset_is_mvtec_layout(tmp_path) -> None:
    root = generate_layout_dataset(tmp_path, seed=2, n_train=3, n_test_good=2, n_test_per_defect=1)
    ds = read_mvtec(root)
    assert sorted(ds.defect_types) == sorted(LAYOUT_DEFECT_KINDS)
    assert all(s.mask_path is not None for s in ds.test if s.label == 1)
    generate_layout_dataset(tmp_path, seed=2, n_train=1, n_test_good=0, n_test_per_defect=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DatasetError, match="refusing"):
        generate_layout_dataset(tmp_path, category="mine", n_train=1)


# -- registration ------------------------------------------------------------------
def test_registration_recovers_shift_and_rotation() -> None:
    layout = make_layout(seed=4)
    ref, _ = _board(layout, [0], max_shift=0, max_angle=0)
    g = cv2.cvtColor(ref, cv2.COLOR_RGB2GRAY).astype(np.float32)
    centre = (127.5, 127.5)
    mat = cv2.getRotationMatrix2D(centre, 1.7, 1.0)
    mat[:, 2] += (6.0, -7.0)
    moved = cv2.warpAffine(g, mat, (256, 256), borderMode=cv2.BORDER_REFLECT)
    warp = reg.estimate_rigid(moved, g)
    back = reg.to_reference(moved, warp, g.shape)
    inner = (slice(20, -20), slice(20, -20))
    assert np.abs(back - g)[inner].mean() < 3.0
    assert np.abs(moved - g)[inner].mean() > 15.0


# -- template ----------------------------------------------------------------------
def _found(amap: np.ndarray, mask: np.ndarray, threshold: float) -> bool:
    """Detected (above every good image's score) where the defect is."""
    region = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    return bool(amap.max() > threshold and amap[region].max() > threshold)


@pytest.fixture(scope="module")
def boards() -> dict:
    layout = make_layout(seed=11)
    return {
        "layout": layout,
        "train": [_board(layout, [11, 1, i])[0] for i in range(20)],
        "good": [_board(layout, [11, 2, i])[0] for i in range(10)],
        "bad": [
            (kind, *_board(layout, [11, 10 + k, i], kind))
            for k, kind in enumerate(LAYOUT_DEFECT_KINDS)
            for i in range(6)
        ],
    }


def test_template_finds_at_least_90_percent_of_inserted_defects(boards: dict) -> None:
    model = Template().fit(boards["train"])
    threshold = float(model.score(boards["good"]).scores.max())
    res = model.score([img for _, img, _ in boards["bad"]])
    found = [
        _found(m, mask, threshold) for m, (_, _, mask) in zip(res.maps, boards["bad"], strict=True)
    ]
    assert np.mean(found) >= 0.9, dict(zip([k for k, _, _ in boards["bad"]], found, strict=True))
    for kind in LAYOUT_DEFECT_KINDS:  # every kind, not just the easy ones
        assert (
            np.mean([f for f, (k, _, _) in zip(found, boards["bad"], strict=True) if k == kind])
            >= 0.5
        )


def test_pair_mode_compares_an_image_with_its_own_template(boards: dict) -> None:
    template = boards["train"][0]
    good = [compare_pair(img, template) for img in boards["good"][:5]]
    threshold = max(float(m.max()) for m in good)
    assert all(m.shape == (256, 256) and m.dtype == np.float32 for m in good)
    found = [_found(compare_pair(img, template), mask, threshold) for _, img, mask in boards["bad"]]
    assert np.mean(found) >= 0.9


def test_template_map_is_on_the_input_grid(boards: dict) -> None:
    """The map follows the board in the image, not the reference: the peak sits on the defect."""
    model = Template().fit(boards["train"][:8])
    for kind, img, mask in boards["bad"][:: len(boards["bad"]) // 4]:
        amap = model.score([img]).maps[0]
        y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
        ys, xs = np.nonzero(mask)
        assert np.min(np.hypot(ys - y, xs - x)) <= 4, kind


def test_template_refuses_malformed_state(boards: dict) -> None:
    model = Template(max_side=256).fit(boards["train"][:3])
    arrays, info = model.learned_state()
    fresh = Template(max_side=256)
    with pytest.raises(ModelFileError, match="spread"):
        fresh.load_learned_state({**arrays, "spread": arrays["spread"][:-1]}, info)
    with pytest.raises(ModelFileError, match="NaN"):
        bad = arrays["reference"].copy()
        bad[0, 0, 0] = np.nan
        fresh.load_learned_state({**arrays, "reference": bad}, info)
    with pytest.raises(ModelFileError, match="max_side"):
        Template(max_side=64).load_learned_state(arrays, info)

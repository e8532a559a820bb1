"""The synthetic demo data: deterministic, plausible, readable as MVTec AD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from defectkit.data import read_mvtec
from defectkit.data.images import load_image, load_mask
from defectkit.data.synthetic import (
    DEFECT_KINDS,
    SURFACE_KINDS,
    add_defect,
    generate_demo,
    make_surface,
)
from defectkit.errors import ConfigError, DatasetError, ImageError

SMALL = {"size": (64, 80), "n_train": 3, "n_test_good": 2, "n_test_per_defect": 1}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default demo, generated once for the module."""
    return generate_demo(tmp_path_factory.mktemp("demo"), seed=0)


# -- surfaces --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SURFACE_KINDS)
def test_surfaces_vary_but_look_alike(kind: str) -> None:
    images = [make_surface(kind, (96, 128), np.random.default_rng(i)) for i in range(4)]
    for img in images:
        assert img.dtype == np.uint8 and img.shape == (96, 128, 3)
        assert img.flags["C_CONTIGUOUS"]
        assert 8 < img.std() < 80, "textured, not flat and not pure noise"
    assert not np.array_equal(images[0], images[1])
    means = np.array([img.reshape(-1, 3).mean(axis=0) for img in images])
    assert np.ptp(means, axis=0).max() < 45, "one kind keeps its colour"
    other = next(k for k in SURFACE_KINDS if k != kind)
    other_mean = make_surface(other, (96, 128), np.random.default_rng(0)).reshape(-1, 3).mean(0)
    assert np.abs(other_mean - means.mean(0)).max() > 15, "kinds differ from each other"


def test_surface_is_deterministic_and_checks_arguments() -> None:
    a = make_surface("stone", 64, np.random.default_rng(5))
    b = make_surface("stone", 64, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="unknown surface kind 'wood'"):
        make_surface("wood", 64, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="at least 32x32"):
        make_surface("stone", (16, 64), np.random.default_rng(0))


# -- defects ---------------------------------------------------------------------------
@pytest.mark.parametrize("surface", SURFACE_KINDS)
@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_is_visible_small_and_masked_where_it_changed(surface: str, kind: str) -> None:
    for seed in range(4):
        rng = np.random.default_rng(seed)
        good = make_surface(surface, (160, 160), rng)
        bad, mask = add_defect(good, kind, rng)
        assert bad.dtype == np.uint8 and bad.shape == good.shape
        assert mask.dtype == bool and mask.shape == good.shape[:2]
        assert 0 < mask.mean() < 0.04, f"{kind}: {mask.mean():.2%} of the area"
        diff = np.abs(bad.astype(int) - good.astype(int)).max(axis=2)
        assert diff[mask].mean() > 25, "the defect must be visible"
        near = ndimage.binary_dilation(mask, iterations=3)
        assert diff[~near].max() == 0, "nothing changes away from the mask"
        assert diff[mask].sum() > 0.8 * diff.sum(), "the change lies in the mask"


@pytest.mark.parametrize("kind", ["scratch", "crack"])
def test_lines_are_thin(kind: str) -> None:
    rng = np.random.default_rng(3)
    good = make_surface("brushed_metal", 160, rng)
    _, mask = add_defect(good, kind, rng)
    eroded = ndimage.binary_erosion(mask, iterations=2)
    assert eroded.sum() < 0.1 * mask.sum(), "a scratch or crack is a few pixels wide"


def test_add_defect_leaves_input_alone_and_scales_with_size() -> None:
    rng = np.random.default_rng(0)
    good = make_surface("fabric", (320, 480), rng)
    before = good.copy()
    bad, mask = add_defect(good, "hole", rng)
    np.testing.assert_array_equal(good, before)
    assert bad.shape == (320, 480, 3) and 0 < mask.mean() < 0.04


def test_add_defect_checks_arguments() -> None:
    rng = np.random.default_rng(0)
    img = make_surface("stone", 64, rng)
    with pytest.raises(ConfigError, match="unknown defect kind 'dent'"):
        add_defect(img, "dent", rng)
    with pytest.raises(ImageError, match="uint8"):
        add_defect(img.astype(np.float32), "spot", rng)
    with pytest.raises(ImageError, match="32x32"):
        add_defect(img[:20], "spot", rng)


# -- demo datasets -----------------------------------------------------------------
def test_generate_demo_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    a = generate_demo(tmp_path / "a", seed=7, **SMALL)
    b = generate_demo(tmp_path / "b", seed=7, **SMALL)
    c = generate_demo(tmp_path / "c", seed=8, **SMALL)
    assert list(a) == list(SURFACE_KINDS)
    for category in a:
        files_a, files_b = _files(a[category]), _files(b[category])
        assert files_a == files_b
        assert files_a != _files(c[category])
        assert "seed: 7" in files_a["README.txt"].decode()


def test_demo_layout_is_readable_as_mvtec(demo: dict[str, Path]) -> None:
    assert set(demo) == set(SURFACE_KINDS)
    for category, root in demo.items():
        assert root.name == category
        ds = read_mvtec(root)
        assert len(ds.train) == 40
        assert ds.train[0].name == "000.png"
        assert sum(s.label == 0 for s in ds.test) == 12
        assert ds.defect_types == sorted(DEFECT_KINDS)
        bad = [s for s in ds.test if s.label == 1]
        assert len(bad) == 6 * len(DEFECT_KINDS)
        for sample in bad:
            assert sample.mask_path is not None
            assert sample.mask_path.name == f"{sample.path.stem}_mask.png"
        image = load_image(bad[0].path)
        assert image.shape == (160, 160, 3)
        assert bad[0].mask_path is not None
        with_mask = np.asarray(load_mask(bad[0].mask_path, image.shape))
        assert with_mask.any()
        readme = (root / "README.txt").read_text()
        assert category in readme and "seed: 0" in readme


def test_demo_masks_are_0_and_255(demo: dict[str, Path]) -> None:
    from PIL import Image

    for root in demo.values():
        for mask_path in sorted((root / "ground_truth").rglob("*_mask.png"))[:6]:
            with Image.open(mask_path) as img:
                values = set(np.unique(np.asarray(img)).tolist())
            assert values == {0, 255}


def test_demo_images_are_not_duplicated(demo: dict[str, Path]) -> None:
    root = demo["fabric"]
    blobs = [p.read_bytes() for p in sorted(root.rglob("*.png")) if "ground_truth" not in p.parts]
    assert len(set(blobs)) == len(blobs)


def test_regenerate_replaces_an_earlier_demo(tmp_path: Path) -> None:
    small = {**SMALL, "categories": ("stone",)}
    (tmp_path / "stone").mkdir()  # an empty folder may be filled
    generate_demo(tmp_path, seed=1, **{**small, "n_train": 5})
    generate_demo(tmp_path, seed=1, **small)
    assert len(list((tmp_path / "stone" / "train" / "good").iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["stone"], "no partial folders left"


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "stone").mkdir()
    (tmp_path / "stone" / "precious.png").write_bytes(b"mine")
    with pytest.raises(DatasetError, match="not written by generate_demo"):
        generate_demo(tmp_path, categories=("stone",), **SMALL)
    assert (tmp_path / "stone" / "precious.png").read_bytes() == b"mine"


def test_generate_demo_checks_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown demo categories"):
        generate_demo(tmp_path, categories=("wood",))
    with pytest.raises(ConfigError, match="seed"):
        generate_demo(tmp_path, seed=-1)
    with pytest.raises(ConfigError, match="n_train"):
        generate_demo(tmp_path, n_train=0)
    assert list(tmp_path.iterdir()) == []

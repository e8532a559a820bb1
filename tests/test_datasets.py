"""Listing images and reading MVTec AD style datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from defectkit.data.datasets import (
    IMAGE_EXTENSIONS,
    MVTecDataset,
    Sample,
    fit_images,
    is_image_file,
    is_mvtec,
    list_images,
    read_mvtec,
)
from defectkit.data.images import load_image, load_mask, save_png
from defectkit.errors import DatasetError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MAGNETIC_TILE = SHARED_DATA / "magnetic-tile"


def _png(path: Path, value: int = 0) -> Path:
    return save_png(path, np.full((8, 8, 3), value, dtype=np.uint8))


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


# -- list_images -------------------------------------------------------------------
def test_extensions() -> None:
    for ext in ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "gif", "pgm", "ppm", "pnm"):
        assert f".{ext}" in IMAGE_EXTENSIONS
        assert is_image_file(f"a.{ext.upper()}")
    assert not is_image_file("a.txt") and not is_image_file("png")


def test_walk_is_sorted_by_path_parts_and_recursive(tmp_path: Path) -> None:
    for rel in ["b.png", "a.png", "sub/c.jpg", "a-b/x.png", "sub/deeper/d.PNG", "A.tif"]:
        _touch(tmp_path / rel)
    paths, problems = list_images(tmp_path)
    assert problems == []
    rel = [p.relative_to(tmp_path).as_posix() for p in paths]
    # sorted part by part: folder "a-b" comes after file "a.png", "sub/..." as a unit
    assert rel == ["A.tif", "a-b/x.png", "a.png", "b.png", "sub/c.jpg", "sub/deeper/d.PNG"]
    flat, _ = list_images([tmp_path], recursive=False)
    assert [p.name for p in flat] == ["A.tif", "a.png", "b.png"]


def test_walk_skips_hidden_and_non_images(tmp_path: Path) -> None:
    for rel in ["ok.png", ".hidden.png", "._ok.png", ".cache/x.png", "notes.txt", "x.png.bak"]:
        _touch(tmp_path / rel)
    paths, problems = list_images(tmp_path)
    assert [p.name for p in paths] == ["ok.png"] and problems == []


def test_explicit_files_are_kept_whatever_their_extension(tmp_path: Path) -> None:
    odd = _touch(tmp_path / "scan.raw")
    hidden = _touch(tmp_path / ".x.png")
    folder_img = _touch(tmp_path / "dir" / "a.png")
    paths, problems = list_images([odd, hidden, tmp_path / "dir", odd])
    assert paths == [odd, hidden, folder_img]  # exact duplicates dropped
    assert problems == []


def test_empty_inputs(tmp_path: Path) -> None:
    assert list_images([]) == ([], [])
    assert list_images(tmp_path) == ([], [])


def test_missing_inputs_are_problems(tmp_path: Path) -> None:
    good = _touch(tmp_path / "a.png")
    missing = tmp_path / "missing.png"
    broken = tmp_path / "broken.png"
    broken.symlink_to(tmp_path / "nowhere.png")
    paths, problems = list_images([good, missing, broken])
    assert paths == [good]
    assert problems == [(missing, "does not exist"), (broken, "broken symbolic link")]


def test_paths_are_returned_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path / "data" / "a.png")
    monkeypatch.chdir(tmp_path)
    paths, _ = list_images(["data", "data/a.png"])
    assert paths == [Path("data/a.png")]
    assert not paths[0].is_absolute()


def test_symlink_loop_is_safe(tmp_path: Path) -> None:
    _touch(tmp_path / "root" / "a.png")
    _touch(tmp_path / "root" / "sub" / "b.png")
    (tmp_path / "root" / "sub" / "loop").symlink_to(tmp_path / "root", target_is_directory=True)
    (tmp_path / "root" / "self").symlink_to(".", target_is_directory=True)
    paths, problems = list_images(tmp_path / "root")
    assert sorted(p.name for p in paths) == ["a.png", "b.png"]
    assert problems == []


def test_symlinked_folder_is_followed(tmp_path: Path) -> None:
    _touch(tmp_path / "elsewhere" / "z.png")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    paths, _ = list_images(tmp_path / "root")
    assert paths == [tmp_path / "root" / "linked" / "z.png"]


def test_unreadable_subfolder_is_a_problem(tmp_path: Path) -> None:
    _touch(tmp_path / "ok.png")
    locked = tmp_path / "locked"
    _touch(locked / "x.png")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading a folder")
        paths, problems = list_images(tmp_path)
    finally:
        locked.chmod(0o755)
    assert [p.name for p in paths] == ["ok.png"]
    assert problems == [(locked, "cannot read folder: permission denied")]


# -- MVTec layout --------------------------------------------------------------------
def _tiny_mvtec(root: Path, *, with_test: bool = True) -> Path:
    for i in range(3):
        _png(root / "train" / "good" / f"{i:03d}.png")
    _touch(root / "train" / "good" / "readme.txt")
    if with_test:
        _png(root / "test" / "good" / "000.png")
        _png(root / "test" / "good" / "001.png")
        _png(root / "test" / "scratch" / "000.png")
        _png(root / "test" / "scratch" / "001.png")  # no mask: allowed
        _png(root / "test" / "dent" / "007.png")
        save_png(root / "ground_truth" / "scratch" / "000_mask.png", np.eye(8, dtype=bool))
        save_png(root / "ground_truth" / "dent" / "007_mask.png", np.eye(8, dtype=bool))
        (root / "test" / ".ipynb_checkpoints").mkdir()
    return root


def test_read_tiny_mvtec(tmp_path: Path) -> None:
    root = _tiny_mvtec(tmp_path / "cat")
    assert is_mvtec(root) and not is_mvtec(tmp_path)
    ds = read_mvtec(root)
    assert isinstance(ds, MVTecDataset) and ds.root == root
    assert [p.name for p in ds.train] == ["000.png", "001.png", "002.png"]
    assert ds.defect_types == ["dent", "scratch"]
    gt = root / "ground_truth"
    assert ds.test == [
        Sample(root / "test" / "dent" / "007.png", 1, "dent", gt / "dent" / "007_mask.png"),
        Sample(root / "test" / "good" / "000.png", 0, "good", None),
        Sample(root / "test" / "good" / "001.png", 0, "good", None),
        Sample(
            root / "test" / "scratch" / "000.png", 1, "scratch", gt / "scratch" / "000_mask.png"
        ),
        Sample(root / "test" / "scratch" / "001.png", 1, "scratch", None),
    ]
    with pytest.raises(AttributeError):
        ds.test[0].label = 0  # type: ignore[misc]  # Sample is frozen


def test_mask_without_suffix_is_found(tmp_path: Path) -> None:
    root = _tiny_mvtec(tmp_path / "cat")
    (root / "ground_truth" / "dent" / "007_mask.png").rename(
        root / "ground_truth" / "dent" / "007.png"
    )
    dent = [s for s in read_mvtec(root).test if s.defect_type == "dent"]
    assert dent[0].mask_path == root / "ground_truth" / "dent" / "007.png"


def test_read_mvtec_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset folder not found: .*nowhere"):
        read_mvtec(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match=r"flat is not an MVTec-style dataset: no train/good"):
        read_mvtec(tmp_path / "flat")
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    _touch(tmp_path / "empty" / "train" / "good" / "notes.txt")
    with pytest.raises(DatasetError, match=r"no images in .*empty/train/good"):
        read_mvtec(tmp_path / "empty")
    no_test = _tiny_mvtec(tmp_path / "fit_only", with_test=False)
    with pytest.raises(DatasetError, match=r"no test folder .*fit_only/test"):
        read_mvtec(no_test)
    ds = read_mvtec(no_test, require_test=False)
    assert len(ds.train) == 3 and ds.test == [] and ds.defect_types == []
    (no_test / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no test images"):
        read_mvtec(no_test)


def test_fit_images(tmp_path: Path) -> None:
    root = _tiny_mvtec(tmp_path / "cat")
    assert fit_images(root) == read_mvtec(root).train
    plain = tmp_path / "plain"
    _png(plain / "b.png")
    _png(plain / "sub" / "a.png")
    assert fit_images(plain) == [plain / "b.png", plain / "sub" / "a.png"]
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="no images found under"):
        fit_images(tmp_path / "none")
    with pytest.raises(DatasetError, match="folder not found"):
        fit_images(tmp_path / "missing")
    with pytest.raises(DatasetError, match="not a folder"):
        fit_images(plain / "b.png")


# -- real data -------------------------------------------------------------------------
@pytest.mark.shared_data
@pytest.mark.skipif(
    not MAGNETIC_TILE.is_dir(), reason=f"shared data not present at {MAGNETIC_TILE}"
)
def test_read_magnetic_tile() -> None:
    ds = read_mvtec(MAGNETIC_TILE)
    assert len(ds.train) == 762
    good = [s for s in ds.test if s.label == 0]
    bad = [s for s in ds.test if s.label == 1]
    assert len(good) == 190 and len(bad) == 392
    assert ds.defect_types == ["blowhole", "break", "crack", "fray", "uneven"]
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in bad)
    assert all(s.defect_type == "good" and s.mask_path is None for s in good)
    # a sample of each type loads, and its mask matches its size
    for defect_type in ds.defect_types:
        sample = next(s for s in bad if s.defect_type == defect_type)
        image = load_image(sample.path)
        assert sample.mask_path is not None
        mask = load_mask(sample.mask_path, image.shape)
        assert mask.shape == image.shape[:2]
    assert load_image(ds.train[0]).dtype == np.uint8

"""Labelled dataset readers: class folders, CSV manifests, MVTec defect types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_dataset

from defectkit.data.images import save_png
from defectkit.data.labelled import (
    MVTEC_TYPE_SPLIT,
    LabelledImage,
    class_counts,
    class_names,
    first_per_class,
    mvtec_type_split,
    read_class_folders,
    read_labelled,
    read_manifest,
    read_mvtec_types,
    select,
)
from defectkit.errors import DatasetError


def _png(path: Path) -> Path:
    return save_png(path, np.zeros((8, 8, 3), dtype=np.uint8))


# -- class folders -------------------------------------------------------------------
def test_class_folders_one_item_per_image_sorted(tmp_path: Path) -> None:
    for rel in ["scratch/b.png", "scratch/a.png", "spot/x.png", "spot/deeper/y.png", "good/g.png"]:
        _png(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    items = read_class_folders(tmp_path, exclude=("good",))
    assert [(it.path.relative_to(tmp_path).as_posix(), it.class_name) for it in items] == [
        ("scratch/a.png", "scratch"),
        ("scratch/b.png", "scratch"),
        ("spot/deeper/y.png", "spot"),
        ("spot/x.png", "spot"),
    ]
    assert all(it.split is None for it in items)
    assert class_counts(items) == {"scratch": 2, "spot": 2}
    assert class_names(read_class_folders(tmp_path)) == ["good", "scratch", "spot"]


def test_class_folders_refuse_loose_images_and_empty_roots(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png")
    _png(tmp_path / "loose.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) directly in the folder.*loose.png"):
        read_class_folders(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="one subfolder per class"):
        read_class_folders(empty)
    with pytest.raises(DatasetError, match="not found"):
        read_class_folders(tmp_path / "nowhere")


# -- manifest --------------------------------------------------------------------------
def _manifest(root: Path, text: str) -> Path:
    csv = root / "split.csv"
    csv.write_text(text, encoding="utf-8")
    return csv


def test_manifest_paths_are_relative_to_the_csv(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "images" / name)
    absolute = _png(tmp_path / "elsewhere" / "d.png")
    csv = _manifest(
        tmp_path,
        "\ufeffimage, class ,split,comment\n"  # BOM, spaces, an extra column
        "images/a.png,crack,train,x\n"
        "images/b.png,spot,TEST,\n"
        "\n"
        f"{absolute},spot,val,\n"
        "images/c.png,crack,train,\n",
    )
    items = read_manifest(csv)
    assert items[0] == LabelledImage(tmp_path / "images" / "a.png", "crack", "train")
    assert [it.split for it in items] == ["train", "test", "val", "train"]
    assert items[2].path == absolute
    assert [it.class_name for it in select(items, "train")] == ["crack", "crack"]


def test_manifest_without_a_split_column(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    items = read_manifest(_manifest(tmp_path, "image,class\na.png,crack\n"))
    assert items == [LabelledImage(tmp_path / "a.png", "crack", None)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("path,label\na.png,x\n", r"missing column\(s\) \['image', 'class'\]"),
        ("image,class,split\na.png,x,training\n", r"line 2: a.png: split 'training' is not one"),
        ("image,class,split\na.png,x,\n", "line 2: a.png: split empty is not one of train"),
        ("image,class,split\nmissing.png,x,train\n", r"line 2: image missing.png not found"),
        ("image,class,split\na.png,,train\n", "line 2: a.png: empty class"),
        ("image,class,split\n,x,train\n", "line 2: empty image"),
        ("image,class,split\na.png,x,train\na.png,y,test\n", "line 3: .*listed twice.*line 2"),
        ("image,class,split\n", "lists no images"),
    ],
)
def test_manifest_errors_name_the_row(tmp_path: Path, text: str, message: str) -> None:
    _png(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=message):
        read_manifest(_manifest(tmp_path, text))


def test_manifest_reports_every_bad_row_up_to_five(tmp_path: Path) -> None:
    rows = "".join(f"m{i}.png,x,train\n" for i in range(8))
    with pytest.raises(DatasetError, match=r"8 bad row\(s\): line 2: .*line 6: .*and 3 more"):
        read_manifest(_manifest(tmp_path, "image,class,split\n" + rows))
    with pytest.raises(DatasetError, match="not found"):
        read_manifest(tmp_path / "absent.csv")


# -- MVTec defect types ---------------------------------------------------------------
def test_mvtec_types_fixed_split_every_second_image(demo_root: Path) -> None:
    items = read_mvtec_types(demo_root)
    assert class_names(items) == ["crack", "hole", "scratch", "spot"]
    assert "good" not in {it.class_name for it in items}
    for cls in class_names(items):
        own = sorted((it for it in items if it.class_name == cls), key=lambda it: it.path.name)
        assert [it.split for it in own] == ["train", "test", "train"]  # 3 per type
    assert "sorted by file name" in MVTEC_TYPE_SPLIT
    assert read_labelled(demo_root) == items


def test_mvtec_type_split_is_stratified_and_order_free() -> None:
    paths = {"a": [Path(f"x/{n}.png") for n in "dcba"], "b": [Path("y/1.png")]}
    split = mvtec_type_split(paths)
    assert [split[Path(f"x/{n}.png")] for n in "abcd"] == ["train", "test", "train", "test"]
    assert split[Path("y/1.png")] == "train"


def test_first_per_class_keeps_the_order() -> None:
    items = [LabelledImage(Path(f"{c}{i}"), c, None) for i in range(4) for c in "ab"]
    picked = first_per_class(items, 2)
    assert [str(it.path) for it in picked] == ["a0", "b0", "a1", "b1"]


def test_read_labelled_picks_the_layout(tmp_path: Path) -> None:
    _png(tmp_path / "c1" / "a.png")
    _png(tmp_path / "c2" / "b.png")
    assert class_names(read_labelled(tmp_path)) == ["c1", "c2"]
    csv = _manifest(tmp_path, "image,class,split\nc1/a.png,z,test\n")
    assert read_labelled(tmp_path, csv)[0].class_name == "z"


# -- real data ----------------------------------------------------------------------------
@pytest.mark.shared_data
def test_neu_det_manifest() -> None:
    root = shared_dataset("neu-det")
    items = read_manifest(root / "split.csv")
    assert len(items) == 1800
    assert len(select(items, "train")) == 1440 and len(select(items, "test")) == 360
    assert class_counts(select(items, "test")) == {
        c: 60
        for c in (
            "crazing",
            "inclusion",
            "patches",
            "pitted_surface",
            "rolled-in_scale",
            "scratches",
        )
    }


@pytest.mark.shared_data
def test_magnetic_tile_types() -> None:
    items = read_mvtec_types(shared_dataset("magnetic-tile"))
    assert class_counts(items) == {
        "blowhole": 115,
        "break": 85,
        "crack": 57,
        "fray": 32,
        "uneven": 103,
    }
    assert class_counts(select(items, "train")) == {
        "blowhole": 58,
        "break": 43,
        "crack": 29,
        "fray": 16,
        "uneven": 52,
    }

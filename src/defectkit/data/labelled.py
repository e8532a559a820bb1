"""Labelled images for supervised work: which class (defect type) each image shows.

Three layouts are read, each into a list of :class:`LabelledImage`:

* class per folder, ``DATA/<class>/*`` (subfolders of a class folder count too)::

      scratches/001.png  inclusion/017.png  ...

  No split is assigned (``split`` is None).
* a CSV manifest with a header ``image,class,split`` (as NEU-DET's ``split.csv``);
  ``image`` paths are relative to the CSV's folder (absolute paths are kept),
  ``split`` is ``train``, ``val`` or ``test``. The ``split`` column may be left
  out (then every split is None); other columns are ignored.
* the defect types of an MVTec-layout test set: ``test/<type>/*`` without
  ``test/good``, split by :data:`MVTEC_TYPE_SPLIT` (a fixed stratified split).

>>> items = read_manifest("../shared/data/neu-det/split.csv")   # doctest: +SKIP
>>> len(select(items, "train")), class_names(items)[:2]         # doctest: +SKIP
(1440, ['crazing', 'inclusion'])
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from defectkit.data.datasets import is_image_file, is_mvtec, list_images, read_mvtec
from defectkit.errors import DatasetError

__all__ = [
    "MVTEC_TYPE_SPLIT",
    "SPLITS",
    "LabelledImage",
    "class_counts",
    "class_names",
    "first_per_class",
    "mvtec_type_split",
    "read_class_folders",
    "read_labelled",
    "read_manifest",
    "read_mvtec_types",
    "select",
]

PathLike = str | os.PathLike[str]

#: split names a manifest may use
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: the fixed stratified split of an MVTec test set's defect types, in words
MVTEC_TYPE_SPLIT = (
    "per defect type, images sorted by file name: the 1st, 3rd, 5th, ... are 'train', "
    "the 2nd, 4th, 6th, ... are 'test'"
)

#: how many problem rows of a manifest an error message names
_SHOW_PROBLEMS = 5


@dataclass(frozen=True)
class LabelledImage:
    """One image and its class; ``split`` is ``train``/``val``/``test`` or None."""

    path: Path
    class_name: str
    split: str | None = None


def class_names(items: Iterable[LabelledImage]) -> list[str]:
    """Sorted distinct class names."""
    return sorted({it.class_name for it in items})


def select(items: Iterable[LabelledImage], split: str | None) -> list[LabelledImage]:
    """The items of one split (``None``: those without a split)."""
    return [it for it in items if it.split == split]


def first_per_class(items: Iterable[LabelledImage], n: int) -> list[LabelledImage]:
    """The first ``n`` items of each class, in the order given (a fixed pick, e.g. the
    few labelled defects of a semi-supervised experiment)."""
    seen: Counter[str] = Counter()
    out: list[LabelledImage] = []
    for it in items:
        if seen[it.class_name] < n:
            seen[it.class_name] += 1
            out.append(it)
    return out


# -- class per folder ------------------------------------------------------------
def read_class_folders(root: PathLike, *, exclude: Sequence[str] = ()) -> list[LabelledImage]:
    """``root/<class>/...`` -> one item per image, in sorted order; no split.

    Folders named in ``exclude`` (e.g. ``("good",)``) and hidden folders are
    skipped; images directly in ``root`` belong to no class and are refused.
    """
    root = Path(root)
    _check_folder(root)
    items: list[LabelledImage] = []
    loose: list[Path] = []
    for entry in sorted(os.listdir(root)):
        path = root / entry
        if entry.startswith("."):
            continue
        if not path.is_dir():
            if path.is_file() and is_image_file(entry):
                loose.append(path)
            continue
        if entry in exclude:
            continue
        paths, _ = list_images([path])
        items.extend(LabelledImage(p, entry, None) for p in paths)
    if loose:
        raise DatasetError(
            f"{root}: {len(loose)} image(s) directly in the folder (e.g. {loose[0].name}) "
            "have no class; put each image in a folder named after its class (DATA/<class>/)"
        )
    if not items:
        raise DatasetError(
            f"no labelled images in {root}: expected one subfolder per class (DATA/<class>/*)"
        )
    return items


# -- CSV manifest ----------------------------------------------------------------
def read_manifest(csv_path: PathLike) -> list[LabelledImage]:
    """Read an ``image,class,split`` manifest; every bad row is named by its line.

    Raises :class:`DatasetError` for a missing file or header column, an empty
    image or class, a split other than ``train``/``val``/``test``, an image that
    does not exist and an image listed twice.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(
            f"manifest {csv_path} not found" if not csv_path.exists() else f"{csv_path}: not a file"
        )
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            if not header:
                raise DatasetError(
                    f"manifest {csv_path} is empty (expected a header image,class,split)"
                )
            missing = [c for c in ("image", "class") if c not in header]
            if missing:
                raise DatasetError(
                    f"manifest {csv_path}: missing column(s) {missing} in the header "
                    f"{reader.fieldnames}; expected image,class,split"
                )
            reader.fieldnames = header
            has_split = "split" in header
            items: list[LabelledImage] = []
            problems: list[str] = []
            first_line: dict[Path, int] = {}
            for row in reader:
                line = reader.line_num
                image = (row.get("image") or "").strip()
                cls = (row.get("class") or "").strip()
                split = (row.get("split") or "").strip().lower() if has_split else None
                if not image and not cls and not split:
                    continue  # a blank line
                if not image:
                    problems.append(f"line {line}: empty image")
                    continue
                if not cls:
                    problems.append(f"line {line}: {image}: empty class")
                    continue
                if has_split and split not in SPLITS:
                    shown = repr(split) if split else "empty"
                    problems.append(
                        f"line {line}: {image}: split {shown} is not one of {', '.join(SPLITS)}"
                    )
                    continue
                path = Path(image) if Path(image).is_absolute() else base / image
                if not path.is_file():
                    problems.append(f"line {line}: image {image} not found ({path})")
                    continue
                key = Path(os.path.normpath(path))
                if key in first_line:
                    problems.append(
                        f"line {line}: image {image} is listed twice (first on line "
                        f"{first_line[key]})"
                    )
                    continue
                first_line[key] = line
                items.append(LabelledImage(path, cls, split))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"manifest {csv_path} cannot be read ({e})") from None
    if problems:
        more = len(problems) - _SHOW_PROBLEMS
        raise DatasetError(
            f"manifest {csv_path}: {len(problems)} bad row(s): "
            + "; ".join(problems[:_SHOW_PROBLEMS])
            + (f"; and {more} more" if more > 0 else "")
        )
    if not items:
        raise DatasetError(f"manifest {csv_path} lists no images")
    return items


# -- MVTec test set defect types ----------------------------------------------------
def mvtec_type_split(paths_by_type: dict[str, Sequence[Path]]) -> dict[Path, str]:
    """The fixed stratified split (:data:`MVTEC_TYPE_SPLIT`): path -> ``train``/``test``."""
    out: dict[Path, str] = {}
    for paths in paths_by_type.values():
        for i, p in enumerate(sorted(paths, key=lambda q: q.name)):
            out[p] = "train" if i % 2 == 0 else "test"
    return out


def read_mvtec_types(root: PathLike) -> list[LabelledImage]:
    """The defective test images of an MVTec layout, class = ``test/<type>`` folder,
    split by :data:`MVTEC_TYPE_SPLIT`; ``test/good`` is left out."""
    ds = read_mvtec(root)
    by_type: dict[str, list[Path]] = defaultdict(list)
    for s in ds.test:
        if s.label == 1:
            by_type[s.defect_type].append(s.path)
    if not by_type:
        raise DatasetError(f"{root}: no defect-type folders test/<type>/ besides test/good")
    split = mvtec_type_split(by_type)
    return [
        LabelledImage(p, t, split[p])
        for t in sorted(by_type)
        for p in sorted(by_type[t], key=lambda q: q.name)
    ]


# -- any layout ------------------------------------------------------------------
def read_labelled(data: PathLike, manifest: PathLike | None = None) -> list[LabelledImage]:
    """A manifest when given; else an MVTec layout's defect types; else class folders."""
    if manifest is not None:
        return read_manifest(manifest)
    root = Path(data)
    _check_folder(root)
    if is_mvtec(root):
        return read_mvtec_types(root)
    return read_class_folders(root)


def class_counts(items: Iterable[LabelledImage]) -> dict[str, int]:
    """Images per class, sorted by class name."""
    return dict(sorted(Counter(it.class_name for it in items).items()))


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise DatasetError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a folder: {root}")

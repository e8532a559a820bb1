"""Finding images on disk and reading dataset layouts (MVTec AD style).

An MVTec AD style dataset (one product category) looks like::

    root/
      train/good/*.png                    defect-free images to learn from
      test/good/*.png                     defect-free images to evaluate on
      test/<defect type>/*.png            defective images
      ground_truth/<defect type>/<stem>_mask.png   pixel masks (optional)
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from defectkit.errors import DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MVTecDataset",
    "Sample",
    "fit_images",
    "is_image_file",
    "is_mvtec",
    "list_images",
    "read_mvtec",
]

#: file suffixes taken as images when walking folders (compared in lower case)
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm", ".pnm"}
)

PathLike = str | os.PathLike[str]


def is_image_file(path: PathLike) -> bool:
    """True if the name has an image extension (any case); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# -- listing -------------------------------------------------------------------
def list_images(
    inputs: PathLike | Iterable[PathLike], *, recursive: bool = True, report_empty: bool = False
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders into a list of image paths.

    Returns ``(paths, problems)``. Files named explicitly are kept whatever their
    extension, so a bad one gets its own error when loaded. Folders are walked
    (recursively by default) in sorted order, keeping files with an image
    extension (and image-named symbolic links that lead nowhere, so that loading
    them reports the broken link) and skipping hidden files and folders (names
    starting with ``.``);
    symbolic links to folders are followed once, so link loops end. ``problems``
    lists inputs that do not exist and folders that cannot be read, with a reason;
    with ``report_empty``, also folders named in ``inputs`` that hold no image file
    (so that ``inspect some_folder`` with nothing in it is not a silent success).
    Paths are returned as found (not resolved), so callers can map them back to
    their inputs; exact duplicates are dropped.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def keep(p: Path) -> None:
        if p not in seen:
            seen.add(p)
            paths.append(p)

    for item in inputs:
        p = Path(item)
        if os.path.isdir(p):
            found: list[Path] = []
            n_problems = len(problems)
            _walk(p, found, problems, recursive=recursive, visited=set())
            if report_empty and not found and len(problems) == n_problems:
                problems.append((p, f"a folder with no image files (extensions: {_ext_list()})"))
            found.sort(key=lambda f: f.parts)
            for f in found:
                keep(f)
        elif os.path.exists(p):
            keep(p)  # an explicit file (or FIFO, ...): load_image gives the verdict
        elif os.path.islink(p):
            problems.append((p, _link_problem(p)))
        else:
            problems.append((p, _missing_reason(p)))
    return paths, problems


def _link_problem(p: Path) -> str:
    """Why a symbolic link leads nowhere: a loop, or a missing target."""
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (too many levels of symbolic links)"
    return "broken symbolic link"


def _missing_reason(p: Path) -> str:
    try:
        os.stat(p)
    except PermissionError:
        return "permission denied"
    except (OSError, ValueError):
        pass
    return "does not exist"


def _walk(
    folder: Path,
    found: list[Path],
    problems: list[tuple[Path, str]],
    *,
    recursive: bool,
    visited: set[tuple[int, int]],
) -> None:
    try:
        st = folder.stat()
    except OSError as exc:
        problems.append((folder, f"cannot read folder: {exc.strerror or exc}"))
        return
    key = (st.st_dev, st.st_ino)
    if key in visited:  # a symlink loop, or the same folder reached twice
        return
    visited.add(key)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except PermissionError:
        problems.append((folder, "cannot read folder: permission denied"))
        return
    except OSError as exc:
        problems.append((folder, f"cannot read folder: {exc.strerror or exc}"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        try:
            is_dir = entry.is_dir()  # follows symlinks
            is_file = not is_dir and entry.is_file()
        except OSError as exc:
            if exc.errno == errno.ELOOP and is_image_file(entry.name):
                found.append(path)  # a link loop: loading it says so
            continue
        if is_dir:
            if recursive:
                _walk(path, found, problems, recursive=True, visited=visited)
        elif is_file and is_image_file(entry.name):
            found.append(path)
        elif entry.is_symlink() and is_image_file(entry.name) and not os.path.exists(path):
            # listed, not dropped: whoever reads the folder (fit, evaluate, report,
            # inspect) then reports "broken symbolic link" for it like any bad file
            found.append(path)


# -- MVTec AD layout ----------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One test image with its ground truth."""

    path: Path
    label: int  # 0 good, 1 defect
    defect_type: str  # "good" or the test/<type> folder name
    mask_path: Path | None  # None for good images and defective images without a mask


@dataclass
class MVTecDataset:
    """One category of an MVTec AD style dataset."""

    root: Path
    train: list[Path]
    test: list[Sample]

    @property
    def defect_types(self) -> list[str]:
        """Sorted names of the defect types present in ``test`` (``"good"`` excluded)."""
        return sorted({s.defect_type for s in self.test if s.label == 1})


def is_mvtec(root: PathLike) -> bool:
    """True if ``root`` looks like an MVTec AD style dataset (it has ``train/good``)."""
    return os.path.isdir(Path(root) / "train" / "good")


def read_mvtec(root: PathLike, *, require_test: bool = True) -> MVTecDataset:
    """Read an MVTec AD style dataset folder (see the module docstring).

    Masks are looked up at ``ground_truth/<type>/<stem>_mask.png`` (the MVTec
    naming), then ``ground_truth/<type>/<stem>.png``; a defective image without a
    mask gets ``mask_path=None``. With ``require_test=False`` a missing or empty
    ``test`` folder is allowed (for fitting only).
    """
    root = Path(root)
    if not os.path.exists(root):
        raise DatasetError(f"dataset folder not found: {root}")
    if not os.path.isdir(root):
        raise DatasetError(f"dataset path is not a folder: {root}")
    train_dir = root / "train" / "good"
    if not os.path.isdir(train_dir):
        raise DatasetError(
            f"{root} is not an MVTec-style dataset: no train/good folder "
            "(expected train/good, test/<type>, ground_truth/<type>)"
        )
    train = _images_in(train_dir)
    if not train:
        raise DatasetError(f"no images in {train_dir} (extensions: {_ext_list()})")

    test_dir = root / "test"
    test: list[Sample] = []
    if os.path.isdir(test_dir):
        for type_dir in _subfolders(test_dir):
            defect_type = type_dir.name
            label = 0 if defect_type == "good" else 1
            for img in _images_in(type_dir):
                mask = None if label == 0 else _find_mask(root, defect_type, img)
                test.append(Sample(img, label, defect_type, mask))
    if require_test:
        if not os.path.isdir(test_dir):
            raise DatasetError(f"no test folder {test_dir} (pass require_test=False to only fit)")
        if not test:
            raise DatasetError(f"no test images in {test_dir}/<type>/ folders")
    return MVTecDataset(root=root, train=train, test=test)


def fit_images(root: PathLike) -> list[Path]:
    """The good images to fit on: ``train/good`` of an MVTec layout, else every image
    under the folder (refused when the folder has ``test/`` or ``ground_truth/``: an
    MVTec layout missing its ``train/good``, whose defects must not be fitted on)."""
    root = Path(root)
    if not os.path.exists(root):
        raise DatasetError(f"folder not found: {root}")
    if not os.path.isdir(root):
        raise DatasetError(f"not a folder: {root}")
    if is_mvtec(root):
        return read_mvtec(root, require_test=False).train
    marks = [d for d in ("test", "ground_truth") if os.path.isdir(root / d)]
    if marks:
        # an MVTec layout without train/good: walking it would fit on its defects
        raise DatasetError(
            f"{root} has {' and '.join(d + '/' for d in marks)} but no train/good folder: "
            "an MVTec-style dataset needs train/good with defect-free images to fit on"
        )
    paths, problems = list_images([root])
    if not paths:
        detail = f"; {problems[0][0]}: {problems[0][1]}" if problems else ""
        raise DatasetError(f"no images found under {root} (extensions: {_ext_list()}){detail}")
    return paths


def _images_in(folder: Path) -> list[Path]:
    paths, _ = list_images([folder], recursive=False)
    return paths


def _subfolders(folder: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise DatasetError(f"cannot read folder {folder}: {exc.strerror or exc}") from None
    return [folder / n for n in names if not n.startswith(".") and os.path.isdir(folder / n)]


def _find_mask(root: Path, defect_type: str, image: Path) -> Path | None:
    folder = root / "ground_truth" / defect_type
    for candidate in (folder / f"{image.stem}_mask.png", folder / f"{image.stem}.png"):
        if os.path.isfile(candidate):
            return candidate
    return None


def _ext_list() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))

"""Training images read from disk on use (``data/files.py``): the same fit as with
decoded images held in memory, bad files still reported, nothing decoded twice
just to learn an image's size, and ``fit --image-memory`` choosing between them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fit

from defectkit.data.files import ImageFiles, image_batches, image_shapes, load_within, take
from defectkit.data.images import load_image, save_png
from defectkit.detector import Detector
from defectkit.errors import ImageError
from defectkit.methods.padim import PaDiM
from defectkit.methods.patchcore import PatchCore


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, surface_set) -> list[Path]:
    """The 20 training surfaces as PNG files, one a different size."""
    out = tmp_path_factory.mktemp("files")
    paths = []
    for i, img in enumerate(surface_set["train"]):
        if i == 3:
            img = img[:80, :90]
        paths.append(out / f"{i:02d}.png")
        save_png(paths[-1], img)
    return paths


def test_image_files_decode_on_access_and_slice_without_decoding(files: list[Path]) -> None:
    seq = ImageFiles(files)
    assert len(seq) == 20
    np.testing.assert_array_equal(seq[3], load_image(files[3]))
    assert seq[-1].shape == (96, 112, 3)
    part = seq[2:6]
    assert isinstance(part, ImageFiles) and part.paths == files[2:6]
    sub = take(seq, [5, 3])
    assert isinstance(sub, ImageFiles) and sub.paths == [files[5], files[3]]
    assert image_shapes(sub) == [(96, 112), (80, 90)]
    arrays = [np.full((9, 9, 3), v, np.uint8) for v in range(3)]
    picked = take(arrays, [2, 0])
    assert isinstance(picked, list) and [int(a[0, 0, 0]) for a in picked] == [2, 0]
    with pytest.raises(IndexError):
        seq[20]


def test_recorded_shapes_are_used_and_a_changed_file_is_named(
    files: list[Path], tmp_path: Path
) -> None:
    copy = tmp_path / "a.png"
    copy.write_bytes(files[0].read_bytes())
    seq = ImageFiles([copy], [(96, 112)])
    assert image_shapes(seq) == [(96, 112)]
    save_png(copy, np.zeros((50, 60, 3), np.uint8))
    with pytest.raises(ImageError, match=r"a\.png.*changed since it was first read"):
        seq[0]
    copy.unlink()
    with pytest.raises(ImageError, match=r"a\.png"):
        seq[0]
    # without recorded shapes they are read once, from the files
    assert ImageFiles(files[3:5]).shapes == [(80, 90), (96, 112)]


def test_load_within_keeps_images_under_the_budget_else_reads_files(
    files: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths = [*files[:5], bad, *files[5:]]
    held, ok, errors = load_within(paths, 1 << 30)
    assert isinstance(held, list) and len(held) == 20 and ok == files
    assert [p for p, _ in errors] == [bad]
    one = 96 * 112 * 3
    lazy, ok2, errors2 = load_within(paths, 4 * one)  # over budget at the fifth image
    assert isinstance(lazy, ImageFiles) and lazy.paths == files and ok2 == ok
    assert errors2 == errors
    assert image_shapes(lazy) == image_shapes(held)
    for a, b in zip(held, lazy, strict=True):
        np.testing.assert_array_equal(a, b)
    assert isinstance(load_within(files[:1], 0)[0], ImageFiles)
    unbounded, _, errors3 = load_within(paths, None)
    assert isinstance(unbounded, list) and len(unbounded) == 20 and errors3 == errors
    with pytest.raises(ValueError, match="budget"):
        load_within(files, -1)


def test_headers_decide_before_decoding_and_decoded_sizes_after(
    files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from defectkit.data import files as files_module

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert files_module._header_bytes(files[0]) == 96 * 112 * 3
    assert files_module._header_bytes(files[3]) == 80 * 90 * 3
    assert files_module._header_bytes(bad) == 0
    # the headers alone say "too large": files, although the decoded images would fit
    monkeypatch.setattr(files_module, "_header_bytes", lambda p: 1 << 40)
    lazy, ok, errors = load_within([*files, bad], 1 << 30)
    assert isinstance(lazy, ImageFiles) and ok == files and [p for p, _ in errors] == [bad]
    # headers that understate: the decoded sizes still switch to files
    monkeypatch.setattr(files_module, "_header_bytes", lambda p: 0)
    assert isinstance(load_within(files, 4 * 96 * 112 * 3)[0], ImageFiles)
    assert isinstance(load_within(files, 1 << 30)[0], list)


def test_batches_come_in_order_with_read_ahead(files: list[Path]) -> None:
    seq = ImageFiles(files)
    batches = [[0, 1, 2], [5], [19, 3]]
    got = list(image_batches(seq, batches))
    assert [len(b) for b in got] == [3, 1, 2]
    np.testing.assert_array_equal(got[2][1], load_image(files[3]))
    listed = list(image_batches([load_image(p) for p in files], batches))
    for a, b in zip(got, listed, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("method", "passes"),
    [
        # the patch bank, then the whole-image score's sample (here: every image)
        (lambda: PatchCore(image_size=96, coreset_ratio=0.1), 2),
        # both scales' banks, then the sample scored at both scales
        (lambda: PatchCore(image_size=96, coreset_ratio=0.1, context_size=64), 4),
        (lambda: PaDiM(image_size=96), 2),  # its two scales
    ],
    ids=["patchcore", "patchcore-context", "padim"],
)
def test_fit_on_files_equals_fit_on_decoded_images(
    method, passes: int, files: list[Path], surface_set, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = [load_image(p) for p in files]
    a = method().fit(decoded)
    reads = []
    real = ImageFiles.__getitem__

    def counted(self, index):
        if not isinstance(index, slice):
            reads.append(index)
        return real(self, index)

    monkeypatch.setattr(ImageFiles, "__getitem__", counted)
    b = method().fit(ImageFiles(files, [im.shape[:2] for im in decoded]))
    # read as the method walks them, never once more just to learn their sizes
    assert sorted(reads) == sorted(list(range(len(files))) * passes)
    test = surface_set["good"] + surface_set["bad"]
    ra, rb = a.score(test), b.score(test)
    np.testing.assert_array_equal(ra.scores, rb.scores)
    for x, y in zip(ra.maps, rb.maps, strict=True):
        np.testing.assert_array_equal(x, y)


def test_detector_fit_on_files_matches_and_records_sizes(files: list[Path]) -> None:
    decoded = [load_image(p) for p in files]
    params = {"image_size": 96, "coreset_ratio": 0.1}
    a = Detector.fit(decoded, "patchcore", params, paths=files, calibration_fraction=0.25)
    b = Detector.fit(ImageFiles(files), "patchcore", params, paths=files, calibration_fraction=0.25)
    assert a.threshold.value == b.threshold.value
    assert a.pixel_threshold.value == b.pixel_threshold.value
    assert a.info["fit_images"] == b.info["fit_images"]
    assert {(f["height"], f["width"]) for f in b.info["fit_images"]} <= {(96, 112), (80, 90)}


def test_cli_fit_image_memory_zero_reads_files_and_gives_the_same_model(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from defectkit.cli import app

    seen: list[type] = []
    real_fit = Detector.fit.__func__

    def spy(cls, images, *args, **kwargs):
        seen.append(type(images))
        return real_fit(cls, images, *args, **kwargs)

    monkeypatch.setattr(Detector, "fit", classmethod(spy))
    args = ["-p", "image_size=96", "-p", "coreset_ratio=0.1"]
    held = cli_fit(demo_root, tmp_path / "held.dkm", *args)
    lazy = cli_fit(demo_root, tmp_path / "lazy.dkm", *args, "--image-memory", "0")
    assert seen == [list, ImageFiles]
    a, b = Detector.load(held), Detector.load(lazy)
    assert a.threshold.value == b.threshold.value
    assert a.pixel_threshold == b.pixel_threshold  # its maps waited on disk
    np.testing.assert_array_equal(a.model.memory_bank_, b.model.memory_bank_)

    res = CliRunner().invoke(
        app, ["fit", str(demo_root), "--out", str(tmp_path / "x.dkm"), "--image-memory", "-1"]
    )
    assert res.exit_code != 0 and "--image-memory must be >= 0" in res.output


def test_saved_maps_give_the_same_pixel_threshold(tmp_path: Path) -> None:
    from defectkit.decide.calibration import pixel_threshold_for_false_regions
    from defectkit.decide.map_store import SavedMaps, map_shapes

    rng = np.random.default_rng(5)
    maps = []
    for i in range(12):
        m = rng.normal(0, 1, (60 + i, 70)).astype(np.float32)
        m[10:20, 10 + i : 25 + i] += 4 * rng.random()  # a blob of varying height
        maps.append(m)
    saved = SavedMaps(tmp_path)
    for m in maps:
        saved.append(m)
    assert len(saved) == 12 and map_shapes(saved) == [m.shape for m in maps]
    wide = SavedMaps(tmp_path / "f64")
    (tmp_path / "f64").mkdir()
    wide.append(maps[0].astype(np.float64) / 3)
    assert wide[0].dtype == np.float64  # kept as given: no rounding on the way
    np.testing.assert_array_equal(saved[7], maps[7])
    for target in (0.0, 0.3, 2.0):
        a = pixel_threshold_for_false_regions(maps, target, min_area=5, cap=3.5)
        b = pixel_threshold_for_false_regions(saved, target, min_area=5, cap=3.5)
        assert a == b


def test_detector_keeps_calibration_maps_on_disk_above_the_budget(
    files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    import defectkit.detector as detector_module
    from defectkit.decide import map_store

    decoded = [load_image(p) for p in files]
    params = {"image_size": 96, "coreset_ratio": 0.1}
    a = Detector.fit(decoded, "patchcore", params, calibration_fraction=0.4, few_shot_below=0)
    written: list[Path] = []
    real_append = map_store.SavedMaps.append

    def spy(self, amap):
        real_append(self, amap)
        written.append(self.paths[-1])

    monkeypatch.setattr(map_store.SavedMaps, "append", spy)
    monkeypatch.setattr(detector_module, "_MAP_CHUNK", 4)  # 8 calibration images: 2 chunks
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    b = Detector.fit(
        ImageFiles(files),
        "patchcore",
        params,
        calibration_fraction=0.4,
        map_memory=0,
        few_shot_below=0,
    )
    assert len(written) == 8 and all(p.parent.parent == tmp_path for p in written)
    assert not any(p.exists() for p in written) and not list(tmp_path.iterdir())  # cleaned up
    assert a.threshold == b.threshold
    assert a.pixel_threshold == b.pixel_threshold

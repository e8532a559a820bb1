"""Image loading: every mode becomes uint8 (H, W, 3) RGB; every bad file an ImageError."""

from __future__ import annotations

import errno
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectkit.data import images as images_module
from defectkit.data.images import decode_image_bytes, load_image, load_mask, save_png
from defectkit.errors import ImageError

W, H = 24, 16


def _gradient(mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, W, dtype=np.float64)[None, :].repeat(H, 0)
    rgb = np.stack([x, x[::-1], np.full_like(x, 128)], axis=2).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def _noisy_rgb(w: int = 128, h: int = 96, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _check_rgb(arr: np.ndarray, h: int = H, w: int = W) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (h, w, 3)
    assert arr.flags["C_CONTIGUOUS"]


# -- modes ---------------------------------------------------------------------
FILE_MODES = [
    ("1", "png"),
    ("L", "png"),
    ("LA", "png"),
    ("P", "png"),
    ("PA", "tiff"),
    ("RGB", "png"),
    ("RGB", "jpg"),
    ("RGB", "bmp"),
    ("RGB", "webp"),
    ("RGB", "ppm"),
    ("L", "pgm"),
    ("RGBA", "png"),
    ("CMYK", "tiff"),
    ("CMYK", "jpg"),
    ("YCbCr", "tiff"),
    ("I;16", "png"),
    ("I;16", "tiff"),
    ("I;16B", "tiff"),
    ("I", "tiff"),
    ("F", "tiff"),
    ("LAB", "tiff"),
]


@pytest.mark.parametrize(("mode", "ext"), FILE_MODES)
def test_every_mode_loads_as_rgb_uint8(tmp_path: Path, mode: str, ext: str) -> None:
    img = _gradient("L") if mode.startswith("I") or mode == "F" else _gradient()
    img = img.convert(mode) if mode not in ("I;16", "I;16B") else _sixteen_bit(mode)
    path = _save(img, tmp_path / f"img.{ext}")
    with Image.open(path) as check:
        # make sure the file really is in the mode under test
        assert check.mode == mode or (ext == "jpg" and mode in ("RGB", "CMYK"))
    _check_rgb(load_image(path))


def _sixteen_bit(mode: str) -> Image.Image:
    arr = (np.arange(H * W).reshape(H, W) * 150).astype(np.uint16)
    img = Image.fromarray(arr)
    return img if mode == "I;16" else img.convert(mode)


def test_gray_is_repeated_to_three_channels(tmp_path: Path) -> None:
    arr = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    path = _save(Image.fromarray(arr), tmp_path / "g.png")
    out = load_image(path)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], arr)


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    arr = np.zeros((H, W, 4), dtype=np.uint8)
    arr[..., :3] = 200
    arr[:, : W // 2, 3] = 255  # left opaque
    arr[:, W // 2 :, 3] = 0  # right fully transparent
    out = load_image(_save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png"))
    assert (out[:, : W // 2] == 200).all()
    assert (out[:, W // 2 :] == 0).all()


def test_palette_with_transparency_is_composited(tmp_path: Path) -> None:
    img = Image.new("P", (W, H), 1)
    img.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    img.info["transparency"] = 1
    out = load_image(_save(img, tmp_path / "p.png", transparency=1))
    assert (out == 0).all()
    opaque = Image.new("P", (W, H), 1)
    opaque.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    out = load_image(_save(opaque, tmp_path / "q.png"))
    assert tuple(out[0, 0]) == (250, 10, 10)


def test_sixteen_bit_is_scaled_by_257_not_stretched(tmp_path: Path) -> None:
    arr = np.zeros((H, W), dtype=np.uint16)
    arr[0, :4] = [0, 257 * 100, 1000, 65535]
    arr[1:] = 257 * 20  # a dark image stays dark: no per-image stretch
    out = load_image(_save(Image.fromarray(arr), tmp_path / "16.png"))
    assert list(out[0, :4, 0]) == [0, 100, 3, 255]
    assert (out[1:] == 20).all()


def test_float_in_unit_range_is_scaled(tmp_path: Path) -> None:
    arr = np.full((H, W), 0.5, dtype=np.float32)
    arr[0, 0], arr[0, 1] = 0.0, 1.0
    out = load_image(_save(Image.fromarray(arr, "F"), tmp_path / "f.tiff"))
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[5, 5, 0] == 128


def test_float_outside_unit_range_is_clipped_as_intensity(tmp_path: Path) -> None:
    arr = np.full((H, W), 100.4, dtype=np.float32)
    arr[0, 0], arr[0, 1] = -10.0, 300.0
    out = load_image(_save(Image.fromarray(arr, "F"), tmp_path / "f.tiff"))
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[5, 5, 0] == 100


def test_32bit_int_is_taken_as_16bit_range(tmp_path: Path) -> None:
    arr = np.full((H, W), 257 * 50, dtype=np.int32)
    arr[0, 0], arr[0, 1] = -5, 100_000
    out = load_image(_save(Image.fromarray(arr, "I"), tmp_path / "i.tiff"))
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[5, 5, 0] == 50


@pytest.mark.parametrize("mode", ["La", "RGBa", "HSV", "PA"])
def test_modes_without_a_common_file_format(mode: str) -> None:
    # These only arise from plugins or conversions; check the conversion itself.
    img = _gradient("RGBA").convert(mode) if mode != "HSV" else _gradient().convert("HSV")
    _check_rgb(images_module._to_rgb(img, "x"))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((10, 20, 3), dtype=np.uint8)  # stored 20 wide, 10 high
    arr[:, :10] = (255, 0, 0)  # left half red
    arr[:, 10:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(Image.fromarray(arr), tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.shape == (20, 10, 3)
    assert out[2, 5, 0] > 200 and out[2, 5, 2] < 60  # stored left is displayed top
    assert out[17, 5, 2] > 200 and out[17, 5, 0] < 60


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (W, H), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_image(path)
    _check_rgb(out)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_uppercase_extension_and_wrong_extension_still_decode(tmp_path: Path) -> None:
    path = _save(_gradient(), tmp_path / "IMG.PNG")
    _check_rgb(load_image(path))
    wrong = tmp_path / "really_png.jpg"
    wrong.write_bytes(path.read_bytes())  # content decides, not the name
    _check_rgb(load_image(wrong))


def test_accepts_str_paths(tmp_path: Path) -> None:
    path = _save(_gradient(), tmp_path / "s.png")
    _check_rgb(load_image(str(path)))


# -- failures ------------------------------------------------------------------
def _problem(path: Path | str, *, match: str, **kwargs: object) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert str(path) in str(err), "the message must name the file"
    assert err.path == str(path)
    assert match in err.problem, err.problem
    return err


def test_missing_file(tmp_path: Path) -> None:
    _problem(tmp_path / "nope.png", match="file not found")


def test_broken_symlink(tmp_path: Path) -> None:
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "gone.png")
    _problem(link, match="broken symbolic link")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    _problem(folder, match="is a directory")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    _problem(path, match="empty file (0 bytes)")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("batch 42: all parts OK\nsecond line\n")
    _problem(path, match="not an image: looks like a text file")


def test_html_page_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "download.jpg"
    path.write_text("<!DOCTYPE html>\n<html><head><title>404</title></head></html>")
    _problem(path, match="not an image: looks like an HTML page")


def test_zip_renamed_png(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.txt", "hello")
    path = tmp_path / "archive.png"
    path.write_bytes(buf.getvalue())
    _problem(path, match="not an image: looks like a ZIP archive")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(bytes(range(256)) * 4)
    _problem(path, match="not an image")


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    full = _save(_noisy_rgb(), tmp_path / f"full.{fmt}")
    data = full.read_bytes()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    _problem(path, match="truncated or corrupt")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow's TIFF reader
@pytest.mark.parametrize("fmt", ["png", "jpg", "gif", "tiff", "webp"])
@pytest.mark.parametrize("keep", [2, 8, 40])
def test_file_cut_inside_the_header_is_truncated_not_unknown(
    tmp_path: Path, fmt: str, keep: int
) -> None:
    data = _save(_noisy_rgb(), tmp_path / f"full.{fmt}").read_bytes()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[:keep])
    _problem(path, match="truncated or corrupt")


def test_corrupt_png_checksum(tmp_path: Path) -> None:
    data = bytearray(_save(_noisy_rgb(), tmp_path / "ok.png").read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 20] ^= 0xFF  # flip bits inside the compressed data
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    _problem(path, match="truncated or corrupt")


def test_too_large_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _save(_noisy_rgb(128, 96), tmp_path / "big.png")
    err = _problem(path, match="image too large", max_pixels=128 * 96 - 1)
    assert "128x96" in err.problem
    _check_rgb(load_image(path, max_pixels=128 * 96), 96, 128)


def test_decompression_bomb_from_pillow_is_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    data = io.BytesIO()
    _noisy_rgb(64, 64).save(data, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises above 2x this
    with pytest.raises(ImageError, match="image too large"):
        decode_image_bytes(data.getvalue(), "bomb.png")


def test_too_small(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (7, 20)), tmp_path / "tiny.png")
    _problem(path, match="image too small: 7x20")
    _check_rgb(load_image(_save(Image.new("RGB", (8, 8)), tmp_path / "ok.png")), 8, 8)


def test_permission_denied_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Works as root too: simulate the OS refusing to open the file.
    path = _save(_gradient(), tmp_path / "locked.png")

    def refuse(name: str, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(images_module, "open", refuse, raising=False)
    _problem(path, match="permission denied")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_permission_denied_for_real(tmp_path: Path) -> None:
    """A real EACCES: chmod 000 when not root; as root (which ignores file modes), a
    forked child drops to user 'nobody' and reads a file in a root-only folder."""
    path = _save(_gradient(), tmp_path / "locked.png")
    if os.geteuid() != 0:
        path.chmod(0)
        try:
            _problem(path, match="permission denied")
        finally:
            path.chmod(0o644)
        return
    tmp_path.chmod(0o700)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            try:
                load_image(path)
                answer = "loaded"
            except ImageError as exc:
                answer = exc.problem
            os.write(write_end, answer.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fp:
        answer = fp.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        pytest.skip("running as root and could not drop privileges to test a real EACCES")
    assert answer == "permission denied"


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    _problem(fifo, match="not a regular file")  # must not block


# -- bytes -----------------------------------------------------------------------
def test_decode_bytes_same_rules() -> None:
    buf = io.BytesIO()
    _gradient().save(buf, format="PNG")
    _check_rgb(decode_image_bytes(buf.getvalue()))
    with pytest.raises(ImageError, match=r"<upload>: empty file \(0 bytes\)"):
        decode_image_bytes(b"")
    with pytest.raises(ImageError, match=r"part7\.png: not an image: looks like an HTML page"):
        decode_image_bytes(b"<html><body>Login</body></html>", "part7.png")
    with pytest.raises(ImageError, match="image too large"):
        decode_image_bytes(buf.getvalue(), max_pixels=10)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image_bytes(buf.getvalue()[:60])


# -- masks -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "RGB", "1", "P", "I;16"])
def test_mask_any_positive_value_is_defect(tmp_path: Path, mode: str) -> None:
    arr = np.zeros((H, W), dtype=np.uint16 if mode == "I;16" else np.uint8)
    arr[2:5, 3:9] = 1 if mode in ("L", "I;16") else 255
    img = Image.fromarray(arr)
    if mode not in ("L", "I;16"):
        img = img.convert(mode)
    path = _save(img, tmp_path / "m.png")
    mask = load_mask(path, (H, W, 3))
    assert mask.dtype == bool and mask.shape == (H, W)
    assert mask.sum() == 3 * 6 and mask[2:5, 3:9].all()


def test_mask_colour_channel_only(tmp_path: Path) -> None:
    arr = np.zeros((H, W, 3), dtype=np.uint8)
    arr[0, 0, 2] = 40  # only blue
    mask = load_mask(_save(Image.fromarray(arr), tmp_path / "m.png"), (H, W))
    assert mask[0, 0] and mask.sum() == 1


def test_mask_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    path = _save(Image.new("L", (W, H)), tmp_path / "m.png")
    with pytest.raises(ImageError) as info:
        load_mask(path, (H + 1, W))
    assert str(path) in str(info.value)
    assert f"{W}x{H}" in info.value.problem and f"{W}x{H + 1}" in info.value.problem


def test_mask_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        load_mask(tmp_path / "none_mask.png", (H, W))


# -- saving ----------------------------------------------------------------------
def test_save_png_round_trip_and_atomic(tmp_path: Path) -> None:
    rgb = np.asarray(_noisy_rgb(32, 16))
    out = save_png(tmp_path / "sub" / "x.png", rgb)
    np.testing.assert_array_equal(load_image(out), rgb)
    mask = np.zeros((16, 32), dtype=bool)
    mask[3:6, 4:10] = True
    save_png(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "L" and set(np.unique(np.asarray(img))) == {0, 255}
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png", mask.shape), mask)
    save_png(tmp_path / "x16.png", np.full((8, 8), 65535, dtype=np.uint16))
    assert (load_image(tmp_path / "x16.png") == 255).all()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "m.png",
        "x.png",
        "x16.png",
    ]


def test_save_png_replaces_and_leaves_no_temp_on_error(tmp_path: Path) -> None:
    target = tmp_path / "x.png"
    save_png(target, np.zeros((8, 8), dtype=np.uint8))
    save_png(target, np.full((8, 8), 9, dtype=np.uint8))
    assert (load_image(target) == 9).all()
    with pytest.raises(ImageError, match="uint8, uint16 or bool"):
        save_png(target, np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(ImageError, match="shape"):
        save_png(target, np.zeros((8, 8, 2), dtype=np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]

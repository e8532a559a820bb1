"""Image loading and validation: every file becomes a uint8 ``(H, W, 3)`` RGB array.

Every way a file can be unusable (missing, empty, not an image, truncated, too
large, ...) raises :class:`~defectkit.errors.ImageError` naming the file and the
problem, so one bad file on a production line gives a message an operator can act
on instead of a traceback.

Conversion rules, chosen so that brightness stays comparable between images (no
per-image stretching):

* EXIF orientation is applied, so the array looks like the photo in a viewer.
* Animated or multi-page files (GIF, APNG, WebP, TIFF): the first frame.
* Alpha (``RGBA``, ``LA``, ``PA``, palette transparency) is composited on black:
  a transparent pixel becomes black, whatever colour it stored.
* Palette, 1-bit, CMYK, YCbCr, LAB and HSV images are converted to RGB.
* 16-bit images are scaled linearly by ``1/257`` (floor), so 65535 -> 255; the
  same rule as :func:`defectkit.methods.base.check_images` uses for uint16 arrays.
* 32-bit integer images (mode ``I``) are taken to hold 16-bit values: clipped to
  ``[0, 65535]`` then scaled like 16-bit images.
* Float images (mode ``F``): if every value lies in ``[0, 1]`` they are scaled by
  255; otherwise values are taken as 0-255 intensities and clipped to that
  range. NaN becomes 0.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from defectkit.atomic import temp_sibling
from defectkit.errors import ImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MIN_SIDE",
    "decode_image_bytes",
    "load_image",
    "load_mask",
    "save_png",
]

#: default limit on width * height, checked before any pixel is decoded
DEFAULT_MAX_PIXELS = 40_000_000
#: smallest accepted width and height, in pixels
MIN_SIDE = 8


# -- public API ----------------------------------------------------------------
def load_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as a contiguous uint8 ``(H, W, 3)`` RGB array.

    Raises :class:`ImageError` for any file that cannot be used.

    >>> load_image("part_001.png").shape  # doctest: +SKIP
    (480, 640, 3)
    """
    name = os.fspath(path)
    with _open_file(name) as fp:
        img = _decode(fp, name, max_pixels)
    return _to_rgb(img, name)


def decode_image_bytes(
    data: bytes | bytearray | memoryview,
    name: str = "<upload>",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Like :func:`load_image`, for the bytes of an uploaded file; ``name`` labels errors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(name, f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError(name, "empty file (0 bytes)")
    img = _decode(io.BytesIO(bytes(data)), name, max_pixels)
    return _to_rgb(img, name)


def load_mask(
    path: str | os.PathLike[str],
    shape: tuple[int, ...],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read a defect mask as a bool ``(H, W)`` array: True where any channel is > 0.

    ``shape`` is the shape of the image the mask belongs to (``(H, W)`` or
    ``(H, W, C)``); a mask of another size raises :class:`ImageError`.
    """
    name = os.fspath(path)
    with _open_file(name) as fp:
        img = _decode(fp, name, max_pixels)
    mask = _to_bool(img, name)
    want_h, want_w = int(shape[0]), int(shape[1])
    if mask.shape != (want_h, want_w):
        h, w = mask.shape
        raise ImageError(
            name,
            f"mask size {w}x{h} does not match image size {want_w}x{want_h} (width x height)",
        )
    return mask


def save_png(path: str | os.PathLike[str], array: np.ndarray, *, compress_level: int = 6) -> Path:
    """Write ``array`` as a PNG, atomically: readers never see a half-written file.

    Accepts uint8 ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``, uint16 ``(H, W)``
    (a 16-bit PNG) and bool ``(H, W)`` (written as 0/255). Missing parent folders
    are created. ``compress_level`` is zlib's 0-9 (1 is several times faster,
    files a little larger). Returns the path written.
    """
    target = Path(path)
    img = _array_to_pil(np.asarray(array))
    # same folder, so os.replace is a rename on one file system; no sweep for
    # leftovers: overlays are many small files in one folder
    tmp = temp_sibling(target, sweep=False)
    try:
        with open(tmp, "xb") as fp:
            img.save(fp, format="PNG", compress_level=compress_level)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


# -- opening -------------------------------------------------------------------
def _open_file(name: str) -> BinaryIO:
    """Open ``name`` for reading, turning every OS-level failure into ImageError."""
    try:
        st = os.stat(name)
    except ValueError:  # e.g. a NUL byte in the name
        raise ImageError(name, "invalid file name") from None
    except OSError as exc:
        raise ImageError(name, _os_problem(exc, name)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(name, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        # FIFOs and devices would block or never end.
        raise ImageError(name, "not a regular file")
    if st.st_size == 0:
        raise ImageError(name, "empty file (0 bytes)")
    try:
        return open(name, "rb")  # the caller closes it
    except OSError as exc:
        raise ImageError(name, _os_problem(exc, name)) from None


def _os_problem(exc: OSError, name: str) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(name):
            return "file not found (broken symbolic link)"
        return "file not found"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EISDIR:
        return "is a directory, not an image file"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    return f"cannot read file: {exc.strerror or exc}"


def _decode(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Open, check size from the header, fully decode, apply EXIF orientation."""
    try:
        img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(name, f"image too large: {exc}") from None
    except UnidentifiedImageError:
        fp.seek(0)
        raise ImageError(name, _describe_non_image(fp.read(1024))) from None
    except Exception as exc:
        raise ImageError(name, f"truncated or corrupt image data ({_brief(exc)})") from None

    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            name,
            f"image too large: {width}x{height} = {width * height:,} pixels (limit {max_pixels:,})",
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(name, f"image too small: {width}x{height} px (min {MIN_SIDE} px a side)")
    try:
        img.load()  # full decode: this is where truncation shows
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(name, f"image too large: {exc}") from None
    except MemoryError:
        raise ImageError(name, "image too large to decode in memory") from None
    except Exception as exc:
        raise ImageError(name, f"truncated or corrupt image data ({_brief(exc)})") from None

    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img  # unreadable EXIF: keep the stored orientation rather than fail


def _brief(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


#: signatures that identify an image format; a file that starts with one (or, when
#: shorter, with part of one) but cannot be opened is a damaged image, not "not an image"
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "WebP"),
)


def _describe_non_image(head: bytes) -> str:
    """Say what a file that Pillow cannot identify is, to help find the mistake."""
    for signature, fmt in _SIGNATURES:
        starts = head.startswith(signature) or (len(head) >= 2 and signature.startswith(head))
        # RIFF also wraps WAV and AVI: require WEBP where the header has got that far
        if starts and (fmt != "WebP" or b"WEBP".startswith(head[8:12])):
            return f"truncated or corrupt image data (a {fmt} file with a damaged header)"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "not an image: looks like a ZIP archive (or an Office document)"
    if head.startswith(b"%PDF"):
        return "not an image: looks like a PDF document"
    if head.startswith(b"\x1f\x8b"):
        return "not an image: looks like a gzip archive"
    if head.startswith((b"Rar!", b"7z\xbc\xaf")):
        return "not an image: looks like a compressed archive"
    if stripped.startswith((b"<!doctype html", b"<html")) or b"<html" in stripped:
        return "not an image: looks like an HTML page (a saved web page or an error page?)"
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in stripped):
        return "not an image: SVG vector graphics are not supported (export it as PNG)"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1"):
        return "image format not supported: HEIC/HEIF (convert it to PNG or JPEG)"
    if _looks_like_text(head):
        return "not an image: looks like a text file"
    return "not an image: file format not recognised"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte character may be cut at the end of the sample
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return bool(text) and all(c.isprintable() or c in "\t\r\n\f" for c in text)


# -- conversion ----------------------------------------------------------------
def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    mode = img.mode
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode

    if mode == "RGB":
        arr = np.asarray(img, dtype=np.uint8)
    elif mode in ("L", "1"):
        arr = _gray(np.asarray(img.convert("L"), dtype=np.uint8))
    elif mode in ("RGBA", "LA"):
        a = np.asarray(img, dtype=np.uint16)
        colour, alpha = a[..., :-1], a[..., -1:]
        arr = ((colour * alpha + 127) // 255).astype(np.uint8)  # composite on black
        if arr.shape[2] == 1:
            arr = _gray(arr[..., 0])
    elif mode in ("RGBa", "La"):  # premultiplied alpha: already composited on black
        arr = np.asarray(img, dtype=np.uint8)[..., :-1]
        if arr.shape[2] == 1:
            arr = _gray(arr[..., 0])
    elif mode.startswith("I;16"):
        arr = _gray((np.asarray(img).astype(np.uint32) // 257).astype(np.uint8))
    elif mode == "I":
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        arr = _gray((values // 257).astype(np.uint8))
    elif mode == "F":
        arr = _gray(_float_to_uint8(np.asarray(img, dtype=np.float64)))
    else:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        try:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except Exception:
            raise ImageError(name, f"unsupported image mode {mode!r}") from None

    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(name, f"unsupported image mode {mode!r}")
    return np.ascontiguousarray(arr)


def _gray(arr: np.ndarray) -> np.ndarray:
    return np.repeat(arr[:, :, None], 3, axis=2)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8)


def _to_bool(img: Image.Image, name: str) -> np.ndarray:
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" else "RGB")
        mode = img.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        values = np.asarray(img)
        return np.ascontiguousarray(np.nan_to_num(values) > 0)
    if mode in ("RGB", "RGBA", "LA", "RGBa", "La", "RGBX"):
        values = np.asarray(img)[..., : 1 if mode in ("LA", "La") else 3]
        return np.ascontiguousarray((values > 0).any(axis=2))
    try:
        return np.ascontiguousarray(np.asarray(img.convert("L")) > 0)
    except Exception:
        raise ImageError(name, f"unsupported mask image mode {mode!r}") from None


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2 and arr.dtype == np.uint16:
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.dtype != np.uint8:
        raise ImageError(None, f"save_png needs uint8, uint16 or bool data, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(arr))
    raise ImageError(None, f"save_png needs shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")

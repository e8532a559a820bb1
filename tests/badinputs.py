"""A corpus of bad (and awkward but valid) input files, generated at test time.

Nothing binary is committed: :func:`build_corpus` writes every case into a
folder from one good image. Each :class:`Case` records what should happen to
it: ``"ok"`` (the file loads as an RGB image) or a regular expression that the
error message must match. Messages come from
:func:`defectkit.data.images.load_image` (one file) and
:func:`defectkit.data.datasets.list_images` (inputs that are not files), so the
same fragments hold for the CLI, the Python API and the service.

Kinds of case:

- ``"content"``: the bytes are the problem; the same bytes uploaded to the
  service give the same verdict.
- ``"fs"``: the file system is the problem or the point (names, links,
  folders, permissions, FIFOs); nothing to upload.

``walk`` is the outcome when the file is met while walking a dataset folder
(fit, evaluate and report read folders): ``None`` means the same as ``expect``;
``"ignored"`` means it is not taken as an image at all: a name without an image
extension, a sub-folder, a FIFO.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

OK = "ok"
IGNORED = "ignored"

TRUNCATED = "truncated or corrupt image data"
TOO_LARGE = "image too large"
TOO_SMALL = "image too small"


class Unsupported(Exception):
    """A case this system cannot create (it is left out, with a note)."""


@dataclass(frozen=True)
class Case:
    """One input file and the outcome it should get."""

    name: str
    build: Callable[[Path, np.ndarray], Path]  # (folder, good RGB image) -> path written
    expect: str  # "ok" or a regex the error message must match
    kind: str = "content"  # "content" (uploadable bytes) or "fs" (file-system case)
    walk: str | None = None  # outcome when met walking a folder, when not ``expect``
    shape: tuple[int, int] | None = None  # (H, W) after loading, when not the base's
    needs_nonroot: bool = False  # root reads any file: the case cannot fail as root

    @property
    def ok(self) -> bool:
        return self.expect == OK

    def walk_outcome(self) -> str:
        return self.expect if self.walk is None else self.walk


@dataclass(frozen=True)
class Built:
    """A case written to disk."""

    case: Case
    path: Path

    def data(self) -> bytes:
        return self.path.read_bytes()


# -- encoders ------------------------------------------------------------------
def encode(img: Image.Image | np.ndarray, fmt: str, **kwargs: object) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose (valid, checksummed) header claims ``width`` x ``height``:
    a decompression bomb as far as a header-trusting reader knows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_claiming(base: np.ndarray, width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to claim another size."""
    data = bytearray(encode(base, "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims ``width`` x ``height`` (one 1x1 frame)."""
    frame = encode(Image.new("P", (1, 1)), "GIF")
    return frame[:6] + struct.pack("<HH", width, height) + frame[10:]


def exif_rotated_jpeg(base: np.ndarray) -> bytes:
    """A JPEG stored landscape with EXIF orientation 6 (viewers turn it 90 degrees)."""
    img = Image.fromarray(base[:24, :40])
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes())


def animated_gif(base: np.ndarray) -> bytes:
    frames = [Image.fromarray(base), Image.fromarray(255 - base)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def multipage_tiff(base: np.ndarray) -> bytes:
    frames = [Image.fromarray(base), Image.fromarray(255 - base)]
    return encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("image.png", b"not really")
    return buf.getvalue()


def _gray(base: np.ndarray) -> np.ndarray:
    return base.mean(axis=2)


# -- case builders ---------------------------------------------------------------
def _bytes(name: str, make: Callable[[np.ndarray], bytes]) -> Callable[[Path, np.ndarray], Path]:
    def build(folder: Path, base: np.ndarray) -> Path:
        path = folder / name
        path.write_bytes(make(base))
        return path

    return build


def _cut(fmt: str, keep: float) -> Callable[[np.ndarray], bytes]:
    def make(base: np.ndarray) -> bytes:
        data = encode(base, fmt)
        return data[: int(len(data) * keep)]

    return make


def _symlink_loop(folder: Path, _base: np.ndarray) -> Path:
    link = folder / "loop.png"
    os.symlink(link.name, link)  # points at itself
    return link


def _broken_symlink(folder: Path, _base: np.ndarray) -> Path:
    link = folder / "broken_link.png"
    os.symlink("no_such_target.png", link)
    return link


def _good_symlink(folder: Path, base: np.ndarray) -> Path:
    target = folder / "link_target.data"  # no image extension: only the link is walked
    target.write_bytes(encode(base, "PNG"))
    link = folder / "good_link.png"
    os.symlink(target.name, link)
    return link


def _folder_named_png(folder: Path, _base: np.ndarray) -> Path:
    path = folder / "folder.png"
    path.mkdir()
    return path


def _unreadable(folder: Path, base: np.ndarray) -> Path:
    path = folder / "unreadable.png"
    path.write_bytes(encode(base, "PNG"))
    path.chmod(0)
    return path


def _fifo(folder: Path, _base: np.ndarray) -> Path:
    if not hasattr(os, "mkfifo"):
        raise Unsupported("no FIFOs on this system")
    path = folder / "fifo.png"
    os.mkfifo(path)
    return path


def _named(name: str | bytes) -> Callable[[Path, np.ndarray], Path]:
    """A good PNG under an awkward name (``bytes``: not valid UTF-8)."""

    def build(folder: Path, base: np.ndarray) -> Path:
        raw = os.fsencode(folder) + b"/" + (name if isinstance(name, bytes) else name.encode())
        try:
            with open(raw, "wb") as f:
                f.write(encode(base, "PNG"))
        except OSError as e:  # e.g. macOS refuses names that are not UTF-8 (EILSEQ)
            raise Unsupported(f"this file system refuses the name ({e.strerror})") from None
        return Path(os.fsdecode(raw))

    return build


def _missing(folder: Path, _base: np.ndarray) -> Path:
    return folder / "does_not_exist.png"


def _rgba(base: np.ndarray) -> bytes:
    alpha = np.full((*base.shape[:2], 1), 200, np.uint8)
    return encode(np.concatenate([base, alpha], axis=2), "PNG")


def _palette_transparent(base: np.ndarray) -> bytes:
    img = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def _tiff16(base: np.ndarray) -> bytes:
    return encode(Image.fromarray((_gray(base) * 257).astype(np.uint16)), "TIFF")


def _png16(base: np.ndarray) -> bytes:
    return encode(Image.fromarray((_gray(base) * 257).astype(np.uint16)), "PNG")


def _tiff_float(base: np.ndarray) -> bytes:
    return encode(Image.fromarray((_gray(base) / 255.0).astype(np.float32)), "TIFF")


def _tiff_float_nan(base: np.ndarray) -> bytes:
    values = (_gray(base) / 255.0).astype(np.float32)
    values[:4, :4] = np.nan
    values[-4:, -4:] = np.inf
    return encode(Image.fromarray(values), "TIFF")


def _tiff_int32(base: np.ndarray) -> bytes:
    return encode(Image.fromarray((_gray(base) * 257).astype(np.int32)), "TIFF")


def _corrupt_png_crc(base: np.ndarray) -> bytes:
    data = bytearray(encode(base, "PNG"))
    data[data.index(b"IDAT") + 20] ^= 0xFF
    return bytes(data)


def _trailing_garbage(base: np.ndarray) -> bytes:
    return encode(base, "PNG") + b"\x00garbage after IEND" * 10


HTML = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>\n"
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>'


def _const(data: bytes) -> Callable[[np.ndarray], bytes]:
    return lambda _base: data


CASES: list[Case] = [
    # -- empty, truncated, corrupt
    Case("zero_byte", _bytes("zero.png", _const(b"")), "empty file"),
    Case("truncated_png", _bytes("cut.png", _cut("PNG", 0.5)), TRUNCATED),
    Case("truncated_jpeg", _bytes("cut.jpg", _cut("JPEG", 0.5)), TRUNCATED),
    Case("png_cut_in_header", _bytes("cut_header.png", _cut("PNG", 0.004)), TRUNCATED),
    Case("jpeg_magic_only", _bytes("magic.jpg", _const(b"\xff\xd8\xff")), TRUNCATED),
    Case("gif_magic_only", _bytes("magic.gif", _const(b"GIF89a")), TRUNCATED),
    Case("png_bad_crc", _bytes("bad_crc.png", _corrupt_png_crc), TRUNCATED),
    Case("png_trailing_garbage", _bytes("trailing.png", _trailing_garbage), OK),
    # -- not images at all
    Case("text_as_png", _bytes("notes.png", _const(b"part 17: OK\nshift B\n" * 20)), "text file"),
    Case("html_as_png", _bytes("page.png", _const(HTML)), "HTML page"),
    Case("zip_as_png", _bytes("archive.png", lambda _b: zip_bytes()), "ZIP archive"),
    Case("pdf_as_png", _bytes("doc.png", _const(b"%PDF-1.7\n%\xe2\xe3\n1 0 obj\n")), "PDF"),
    Case("gzip_as_png", _bytes("data.png", _const(b"\x1f\x8b\x08\x00" + bytes(20))), "gzip"),
    Case("svg_as_png", _bytes("vector.png", _const(SVG)), "SVG"),
    Case("random_bytes", _bytes("noise.png", _const(bytes(range(256))[::-1] * 8)), "not an image"),
    # -- wrong extension, valid content
    Case("jpeg_named_png", _bytes("really_jpeg.png", lambda b: encode(b, "JPEG")), OK),
    Case("png_named_jpg", _bytes("really_png.jpg", lambda b: encode(b, "PNG")), OK),
    Case("png_named_txt", _bytes("image.txt", lambda b: encode(b, "PNG")), OK, walk=IGNORED),
    Case("png_no_extension", _bytes("image", lambda b: encode(b, "PNG")), OK, walk=IGNORED),
    # -- sizes
    Case(
        "one_by_one",
        _bytes("1x1.png", lambda _b: encode(Image.new("RGB", (1, 1)), "PNG")),
        TOO_SMALL,
    ),
    Case(
        "thin_strip",
        _bytes("strip.png", lambda _b: encode(Image.new("L", (500, 3)), "PNG")),
        TOO_SMALL,
    ),
    Case("smallest_ok", _bytes("8x8.png", lambda b: encode(b[:8, :8], "PNG")), OK, shape=(8, 8)),
    Case("bomb_png_header", _bytes("bomb.png", lambda _b: png_claiming(20000, 20000)), TOO_LARGE),
    Case("bomb_png_wide", _bytes("wide.png", lambda _b: png_claiming(2_000_000, 30)), TOO_LARGE),
    Case(
        "bomb_jpeg_header", _bytes("bomb.jpg", lambda b: jpeg_claiming(b, 30000, 30000)), TOO_LARGE
    ),
    Case("bomb_gif_screen", _bytes("bomb.gif", lambda _b: gif_claiming(20000, 20000)), TOO_LARGE),
    # -- unusual but valid encodings
    Case("tiff_16bit", _bytes("gray16.tif", _tiff16), OK),
    Case("png_16bit", _bytes("gray16.png", _png16), OK),
    Case("tiff_float", _bytes("float.tif", _tiff_float), OK),
    Case("tiff_float_nan_inf", _bytes("float_nan.tif", _tiff_float_nan), OK),
    Case("tiff_int32", _bytes("int32.tif", _tiff_int32), OK),
    Case("tiff_multipage", _bytes("pages.tif", multipage_tiff), OK),
    Case(
        "cmyk_jpeg",
        _bytes("cmyk.jpg", lambda b: encode(Image.fromarray(b).convert("CMYK"), "JPEG")),
        OK,
    ),
    Case(
        "gray_jpeg",
        _bytes("gray.jpg", lambda b: encode(Image.fromarray(b).convert("L"), "JPEG")),
        OK,
    ),
    Case(
        "palette_png",
        _bytes("palette.png", lambda b: encode(Image.fromarray(b).convert("P"), "PNG")),
        OK,
    ),
    Case("palette_transparent_png", _bytes("palette_t.png", _palette_transparent), OK),
    Case("alpha_png", _bytes("rgba.png", _rgba), OK),
    Case(
        "gray_alpha_png",
        _bytes("la.png", lambda b: encode(Image.fromarray(b).convert("LA"), "PNG")),
        OK,
    ),
    Case(
        "bilevel_png",
        _bytes("bilevel.png", lambda b: encode(Image.fromarray(b).convert("1"), "PNG")),
        OK,
    ),
    Case("animated_gif", _bytes("anim.gif", animated_gif), OK),
    Case("exif_rotated_jpeg", _bytes("rotated.jpg", exif_rotated_jpeg), OK, shape=(40, 24)),
    Case("bmp", _bytes("plain.bmp", lambda b: encode(b, "BMP")), OK),
    Case("webp", _bytes("lossless.webp", lambda b: encode(b, "WEBP", lossless=True)), OK),
    Case("uppercase_ext", _bytes("SHOUT.PNG", lambda b: encode(b, "PNG")), OK),
    # -- names and the file system
    Case("non_utf8_name", _named(b"caf\xe9_latin1.png"), OK, kind="fs"),
    Case("unicode_name", _named("ネジ_部品 ü.png"), OK, kind="fs"),
    Case("newline_in_name", _named("two\nlines.png"), OK, kind="fs"),
    Case("markup_in_name", _named("[bold]rich [link=x]markup[red].png"), OK, kind="fs"),
    Case("very_long_name", _named("L" * 250 + ".png"), OK, kind="fs"),
    Case("good_symlink", _good_symlink, OK, kind="fs"),
    Case("symlink_loop", _symlink_loop, "symbolic link loop", kind="fs"),
    Case("broken_symlink", _broken_symlink, "broken symbolic link", kind="fs"),
    Case("missing_file", _missing, "not found|does not exist", kind="fs", walk=IGNORED),
    Case("folder_named_png", _folder_named_png, "directory|folder", kind="fs", walk=IGNORED),
    Case("fifo", _fifo, "not a regular file", kind="fs", walk=IGNORED),
    Case("unreadable", _unreadable, "permission denied", kind="fs", needs_nonroot=True),
]

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def active_cases() -> list[Case]:
    """The cases that can behave as recorded here: as root, a file without read
    permission is still readable, so that case is left out (and reported as such)."""
    return [c for c in CASES if not (c.needs_nonroot and IS_ROOT)]


def build_corpus(folder: Path, base: np.ndarray, cases: list[Case] | None = None) -> list[Built]:
    """Write every case into ``folder`` (created); returns them in order."""
    folder.mkdir(parents=True, exist_ok=True)
    built: list[Built] = []
    for c in active_cases() if cases is None else cases:
        try:
            built.append(Built(c, c.build(folder, base)))
        except Unsupported as e:
            note = f"{c.name}: not run ({e})"
            if note not in NOTES:
                NOTES.append(note)
    return built


#: outcomes seen by the robustness tests: OUTCOMES[case][entry point] = cell text;
#: tests/conftest.py prints them as a table at the end of the run
OUTCOMES: dict[str, dict[str, str]] = {}
NOTES: list[str] = []


def record(case: str, entry: str, outcome: str) -> None:
    OUTCOMES.setdefault(case, {})[entry] = outcome


def outcome_table() -> str:
    """The cases x entry points table, as plain text."""
    entries: list[str] = []
    for row in OUTCOMES.values():
        entries += [e for e in row if e not in entries]
    width = max(len(c) for c in OUTCOMES)
    cols = [max(len(e), *(len(r.get(e, "")) for r in OUTCOMES.values())) for e in entries]
    head = (
        "case".ljust(width)
        + "  "
        + "  ".join(e.ljust(w) for e, w in zip(entries, cols, strict=True))
    )
    lines = [head, "-" * len(head)]
    for case, row in OUTCOMES.items():
        cells = "  ".join(row.get(e, "-").ljust(w) for e, w in zip(entries, cols, strict=True))
        lines.append(case.ljust(width) + "  " + cells)
    return "\n".join(lines + NOTES)

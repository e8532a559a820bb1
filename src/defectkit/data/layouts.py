"""Synthetic fixed-layout parts: PCB-like boards with traces, pads, chips and
silkscreen text, photographed with a small random shift and rotation, with
inserted defects and their masks.

For golden-template methods (``template``) and anything that assumes every
part has the same layout. A :class:`Layout` is one board design, fixed by its
seed; :func:`render_board` draws one photo of it: shifted by up to
``max_shift`` px (in each direction, at most that far in all), rotated by up to
``max_angle`` degrees about the image centre, with its own lighting and noise.
Defects (:data:`LAYOUT_DEFECT_KINDS`):

- ``"missing_pad"``: a pad (or chip pin) is absent;
- ``"short"``: a solder bridge between two neighbouring pads, or a stray blob;
- ``"cut_trace"``: a gap across a trace;
- ``"scratch"``: a thin bright or dark line across the board, 50-100% opaque.

A defect's mask is where the defective board differs visibly (by 24 grey
levels or more) from the same board without it, before noise, so it is exact
whatever the defect covers. Defects other than faint scratches are drawn at
full contrast, so real boards (solder-mask glare, dust, component tolerances)
are harder than these.
Drawing uses OpenCV; one seed gives the same pixels with the same numpy and
OpenCV versions.

>>> layout = make_layout(seed=3)
>>> rng = np.random.default_rng(0)
>>> image, mask = render_board(layout, rng, defect="cut_trace")
>>> image.shape, mask.dtype, bool(0 < mask.mean() < 0.05)
((256, 256, 3), dtype('bool'), True)
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from defectkit.data.images import save_png
from defectkit.data.synthetic import _README_MARK, _check_replaceable
from defectkit.errors import ConfigError

__all__ = [
    "LAYOUT_DEFECT_KINDS",
    "Layout",
    "generate_layout_dataset",
    "make_layout",
    "render_board",
]

LAYOUT_DEFECT_KINDS: tuple[str, ...] = ("missing_pad", "short", "cut_trace", "scratch")
GENERATOR_VERSION = 1

_BOARD = (28.0, 92.0, 48.0)  # solder mask, RGB
_TRACE = (52.0, 138.0, 64.0)  # copper under the mask
_PAD = (206.0, 172.0, 92.0)  # gold finish
_SOLDER = (196.0, 196.0, 188.0)
_CHIP = (34.0, 34.0, 38.0)
_INK = (232.0, 232.0, 222.0)  # silkscreen
#: grey-level change that counts as visible for a defect mask
_VISIBLE = 24.0


@dataclass(frozen=True)
class Pad:
    x: float
    y: float
    rx: float
    ry: float
    round: bool


@dataclass
class Layout:
    """One board design in canvas coordinates (the image plus ``margin`` each side)."""

    height: int
    width: int
    margin: int
    traces: list[tuple[np.ndarray, int]] = field(default_factory=list)
    pads: list[Pad] = field(default_factory=list)
    chips: list[tuple[int, int, int, int]] = field(default_factory=list)
    marks: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # x, y, glyph bits

    @property
    def canvas(self) -> tuple[int, int]:
        return self.height + 2 * self.margin, self.width + 2 * self.margin


def _free(
    box: tuple[float, float, float, float], taken: list[tuple[float, ...]], gap: float
) -> bool:
    x0, y0, x1, y1 = box
    return all(
        x1 + gap <= a0 or a1 + gap <= x0 or y1 + gap <= b0 or b1 + gap <= y0
        for a0, b0, a1, b1 in taken
    )


def make_layout(size: int | tuple[int, int] = 256, seed: int = 0) -> Layout:
    """A random board design for images of ``size`` (``(h, w)`` or one int), fixed by ``seed``."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if h < 128 or w < 128:
        raise ConfigError(f"board images need at least 128x128 px, got {w}x{h}")
    rng = np.random.default_rng([seed, 0x5CB])
    margin = 24
    lay = Layout(h, w, margin)
    lo_x, hi_x, lo_y, hi_y = margin + 8, margin + w - 8, margin + 8, margin + h - 8
    taken: list[tuple[float, ...]] = []
    scale = min(h, w) / 256
    # chips with pins on their long sides
    for _ in range(40):
        if len(lay.chips) >= 2 + int(rng.integers(0, 2)):
            break
        bw, bh = int(rng.integers(36, 56) * scale), int(rng.integers(18, 28) * scale)
        if rng.random() < 0.5:
            bw, bh = bh, bw
        x0 = int(rng.integers(lo_x + 10, hi_x - bw - 10))
        y0 = int(rng.integers(lo_y + 10, hi_y - bh - 10))
        box = (x0 - 9, y0 - 9, x0 + bw + 9, y0 + bh + 9)
        if not _free(box, taken, 6):
            continue
        taken.append(box)
        lay.chips.append((x0, y0, x0 + bw, y0 + bh))
        horizontal = bw >= bh
        n_pins = max(3, int((bw if horizontal else bh) / (9 * scale)))
        length = bw if horizontal else bh
        for k in range(n_pins):
            t = (k + 0.5) / n_pins * length
            for side in (-1, 1):
                if horizontal:
                    px, py = x0 + t, (y0 - 5 if side < 0 else y0 + bh + 5)
                    lay.pads.append(Pad(px, py, 2.2 * scale, 3.5 * scale, False))
                else:
                    px, py = (x0 - 5 if side < 0 else x0 + bw + 5), y0 + t
                    lay.pads.append(Pad(px, py, 3.5 * scale, 2.2 * scale, False))
    # free pads
    for _ in range(200):
        if len([p for p in lay.pads if p.round or p.rx == p.ry]) >= 12:
            break
        r = float(rng.uniform(3.5, 6.0) * scale)
        x, y = float(rng.uniform(lo_x + 6, hi_x - 6)), float(rng.uniform(lo_y + 6, hi_y - 6))
        box = (x - r, y - r, x + r, y + r)
        if not _free(box, taken, 10):
            continue
        taken.append(box)
        lay.pads.append(Pad(x, y, r, r, bool(rng.random() < 0.6)))
    # traces: Manhattan routes between pads
    pads = lay.pads
    for _ in range(14):
        a, b = rng.choice(len(pads), 2, replace=False)
        pa, pb = pads[int(a)], pads[int(b)]
        if math.hypot(pa.x - pb.x, pa.y - pb.y) < 30 * scale:
            continue
        corner = (pb.x, pa.y) if rng.random() < 0.5 else (pa.x, pb.y)
        pts = np.array([[pa.x, pa.y], corner, [pb.x, pb.y]], dtype=np.float64)
        lay.traces.append((pts, int(rng.integers(2, 4) * max(1.0, scale))))
    # silkscreen text: rows of 3x5 glyphs
    for _ in range(60):
        if len(lay.marks) >= 4:
            break
        n_chars = int(rng.integers(3, 6))
        px = max(1, round(2 * scale))
        tw, th = n_chars * 4 * px, 5 * px
        x0 = int(rng.integers(lo_x, hi_x - tw))
        y0 = int(rng.integers(lo_y, hi_y - th))
        box = (x0 - 2, y0 - 2, x0 + tw + 2, y0 + th + 2)
        if not _free(box, taken, 4):
            continue
        taken.append(box)
        glyphs = rng.random((5, n_chars * 4)) < 0.55
        glyphs[:, 3::4] = False  # a blank column between characters
        lay.marks.append((x0, y0, np.kron(glyphs, np.ones((px, px), dtype=bool))))
    return lay


def _pt(x: float, y: float) -> tuple[int, int]:
    return round(x * 16), round(y * 16)  # 4 fractional bits for cv2 drawing


def _draw_pad(canvas: np.ndarray, p: Pad, colour: tuple[float, ...]) -> None:
    if p.round:
        cv2.ellipse(canvas, _pt(p.x, p.y), _pt(p.rx, p.ry), 0, 0, 360, colour, -1, cv2.LINE_AA, 4)
    else:
        cv2.rectangle(
            canvas, _pt(p.x - p.rx, p.y - p.ry), _pt(p.x + p.rx, p.y + p.ry), colour, -1,
            cv2.LINE_AA, 4,
        )  # fmt: skip


def _draw(layout: Layout, skip_pad: int | None = None) -> np.ndarray:
    canvas = np.empty((*layout.canvas, 3), dtype=np.float32)
    canvas[:] = _BOARD
    for pts, width in layout.traces:
        cv2.polylines(
            canvas, [np.round(pts * 16).astype(np.int32)], False, _TRACE, width, cv2.LINE_AA, 4
        )
    for i, p in enumerate(layout.pads):
        if i != skip_pad:
            _draw_pad(canvas, p, _PAD)
    for x0, y0, x1, y1 in layout.chips:
        cv2.rectangle(canvas, (x0, y0), (x1, y1), _CHIP, -1)
        cv2.circle(canvas, (x0 + 4, y0 + 4), 2, (90.0, 90.0, 94.0), -1, cv2.LINE_AA)
    for x0, y0, bits in layout.marks:
        region = canvas[y0 : y0 + bits.shape[0], x0 : x0 + bits.shape[1]]
        region[bits] = _INK
    return canvas


def _add_defect(
    layout: Layout, canvas: np.ndarray, kind: str, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``kind`` on a copy of ``canvas`` (design coordinates)."""
    m = layout.margin
    inside = [
        i
        for i, p in enumerate(layout.pads)
        if m + 12 < p.x < m + layout.width - 12 and m + 12 < p.y < m + layout.height - 12
    ]
    if kind == "missing_pad":
        return _draw(layout, skip_pad=int(rng.choice(inside)))
    out = canvas.copy()
    if kind == "short":
        pads = layout.pads
        pairs = [
            (i, j)
            for i in inside
            for j in inside
            if i < j and 4 < math.hypot(pads[i].x - pads[j].x, pads[i].y - pads[j].y) < 14
        ]
        if pairs and rng.random() < 0.7:
            i, j = pairs[int(rng.integers(len(pairs)))]
            a, b = pads[i], pads[j]
            thick = max(3, round(0.9 * min(a.rx, a.ry, b.rx, b.ry) * 2))
            cv2.line(out, _pt(a.x, a.y), _pt(b.x, b.y), _SOLDER, thick, cv2.LINE_AA, 4)
        else:
            x = float(rng.uniform(m + 16, m + layout.width - 16))
            y = float(rng.uniform(m + 16, m + layout.height - 16))
            r = float(rng.uniform(3.0, 6.0))
            axes = _pt(r, r * rng.uniform(0.6, 1.0))
            tilt = float(rng.uniform(0, 180))
            cv2.ellipse(out, _pt(x, y), axes, tilt, 0, 360, _SOLDER, -1, cv2.LINE_AA, 4)
        return out
    if kind == "cut_trace":
        segments = []
        for pts, width in layout.traces:
            for a, b in itertools.pairwise(pts):
                length = float(np.hypot(*(b - a)))
                if length > 24:
                    segments.append((a, b, length, width))
        a, b, length, width = segments[int(rng.integers(len(segments)))]
        for _ in range(20):
            t = float(rng.uniform(8 / length, 1 - 8 / length))
            c = a + t * (b - a)
            if m + 12 < c[0] < m + layout.width - 12 and m + 12 < c[1] < m + layout.height - 12:
                break
        d = (b - a) / length
        n = np.array([-d[1], d[0]])
        gap = float(rng.uniform(3.0, 5.0)) / 2
        half = width / 2 + 1.5
        quad = np.array([c - d * gap - n * half, c + d * gap - n * half,
                         c + d * gap + n * half, c - d * gap + n * half])  # fmt: skip
        cv2.fillConvexPoly(out, np.round(quad * 16).astype(np.int32), _BOARD, cv2.LINE_AA, 4)
        return out
    if kind == "scratch":
        length = float(rng.uniform(30, 70)) * min(layout.height, layout.width) / 256
        angle = float(rng.uniform(0, math.pi))
        d = np.array([math.cos(angle), math.sin(angle)])
        c = np.array(
            [rng.uniform(m + 10 + length / 2, m + layout.width - 10 - length / 2),
             rng.uniform(m + 10 + length / 2, m + layout.height - 10 - length / 2)]
        )  # fmt: skip
        bend = np.array([-d[1], d[0]]) * rng.uniform(-0.15, 0.15) * length
        t = np.linspace(0, 1, 16)[:, None]
        pts = (
            (1 - t) ** 2 * (c - d * length / 2)
            + 2 * (1 - t) * t * (c + bend)
            + t**2 * (c + d * length / 2)
        )
        colour = (214.0, 190.0, 140.0) if rng.random() < 0.6 else (10.0, 30.0, 14.0)
        drawn = out.copy()
        cv2.polylines(
            drawn, [np.round(pts * 16).astype(np.int32)], False, colour, 2, cv2.LINE_AA, 4
        )
        opacity = float(rng.uniform(0.5, 1.0))  # faint scratches too
        return out + opacity * (drawn - out)
    raise ConfigError(f"unknown layout defect {kind!r}; known: {list(LAYOUT_DEFECT_KINDS)}")


def render_board(
    layout: Layout,
    rng: np.random.Generator,
    defect: str | None = None,
    *,
    max_shift: float = 10.0,
    max_angle: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One photo of ``layout``: uint8 ``(H, W, 3)`` RGB and a bool defect mask.

    The board is shifted by up to ``max_shift`` px (the shift vector's length)
    and rotated by up to ``max_angle`` degrees about the image centre; lighting
    and noise vary. ``defect`` is None or one of :data:`LAYOUT_DEFECT_KINDS`.
    Two generators in the same state give the same photo with and without the
    defect (the defect-free twin).
    """
    if defect is not None and defect not in LAYOUT_DEFECT_KINDS:
        raise ConfigError(f"unknown layout defect {defect!r}; known: {list(LAYOUT_DEFECT_KINDS)}")
    # the photo's own randomness first, so the same generator state with and
    # without a defect gives the same photo apart from the defect
    h, w = layout.height, layout.width
    angle = float(rng.uniform(-max_angle, max_angle))
    r = max_shift * math.sqrt(float(rng.random()))
    phi = float(rng.uniform(0, 2 * math.pi))
    theta = float(rng.uniform(0, 2 * math.pi))
    level, slope = float(rng.uniform(0.94, 1.06)), float(rng.uniform(0.0, 0.08))
    noise = rng.normal(0.0, 2.5, (h, w, 3))
    good = _draw(layout)
    canvas, changed = good, np.zeros(good.shape[:2], dtype=bool)
    if defect is not None:
        for _ in range(50):  # e.g. a dark scratch over a dark chip shows nothing: again
            canvas = _add_defect(layout, good, defect, rng)
            changed = np.abs(canvas - good).max(axis=2) >= _VISIBLE
            if changed.sum() >= 8:
                break
    # rigid motion of the board in the image
    m = layout.margin
    centre = (m + (w - 1) / 2, m + (h - 1) / 2)
    mat = cv2.getRotationMatrix2D(centre, angle, 1.0)
    mat[:, 2] += (r * math.cos(phi) - m, r * math.sin(phi) - m)  # shift, then crop the margin
    img = cv2.warpAffine(canvas, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpAffine(changed.astype(np.float32), mat, (w, h), flags=cv2.INTER_LINEAR) >= 0.5
    # lighting and sensor noise
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx - w / 2) * math.cos(theta) + (yy - h / 2) * math.sin(theta)) / max(h, w)
    img = img * (level * (1.0 + slope * ramp))[:, :, None] + noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


def generate_layout_dataset(
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    size: int | tuple[int, int] = 256,
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_per_defect: int = 8,
    category: str = "pcb",
) -> Path:
    """Write an MVTec AD layout dataset of one board design under ``out/<category>/``.

    ``train/good``, ``test/good``, ``test/<defect>`` for each of
    :data:`LAYOUT_DEFECT_KINDS` and ``ground_truth/<defect>/<stem>_mask.png``.
    Built aside and swapped in; a folder not written by a defectkit generator
    is never overwritten. Returns the dataset folder.
    """
    if n_train < 1 or n_test_good < 0 or n_test_per_defect < 0:
        raise ConfigError("need n_train >= 1, n_test_good >= 0 and n_test_per_defect >= 0")
    layout = make_layout(size, seed)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / category
    _check_replaceable(dest)
    tmp = root / f".{category}.partial-{uuid.uuid4().hex[:8]}"
    try:
        for split, n in (("train", n_train), ("test", n_test_good)):
            for i in range(n):
                rng = np.random.default_rng([seed, 1 if split == "train" else 2, i])
                image, _ = render_board(layout, rng)
                save_png(tmp / split / "good" / f"{i:03d}.png", image, compress_level=1)
        for k, kind in enumerate(LAYOUT_DEFECT_KINDS):
            for i in range(n_test_per_defect):
                rng = np.random.default_rng([seed, 10 + k, i])
                image, mask = render_board(layout, rng, kind)
                save_png(tmp / "test" / kind / f"{i:03d}.png", image, compress_level=1)
                save_png(tmp / "ground_truth" / kind / f"{i:03d}_mask.png", mask, compress_level=1)
        (tmp / "README.txt").write_text(
            f"{_README_MARK}: {category} (fixed-layout boards)\n\n"
            f"Synthetic PCB-like boards made by defectkit.data.layouts (generator version "
            f"{GENERATOR_VERSION}), for demos and tests; not real data.\nseed: {seed}\n"
            f"shift <= 10 px, rotation <= 2 degrees between images\n"
            f"Regenerate with: defectkit.data.layouts.generate_layout_dataset(out, seed={seed})\n",
            encoding="utf-8",
        )
        if os.path.lexists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dest

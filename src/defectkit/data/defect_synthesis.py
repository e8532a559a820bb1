"""Synthetic defects pasted onto good images: the training signal of
self-supervised methods (DRAEM, CutPaste), reusable by any code that needs
defective examples of a part it only has good images of.

:func:`synthesize_defect` draws one or more defects of the kinds in
:data:`SYNTH_KINDS` and returns ``(image_with_defect, mask)``:

- ``scratch``, ``crack``, ``hole``: the demo generator's painters
  (:func:`defectkit.data.synthetic.add_defect`), at a random opacity so faint
  defects appear too;
- ``stain``: a ragged blob, darker or lighter (tinted on colour images), with a
  soft inside; from small spots to large uneven regions (up to ~15 % of the area);
- ``cut_paste``: a rectangle, a thin "scar" or a blob cut from another good
  image (``sources``) or another place of the same one, rotated, scaled and
  colour-jittered, pasted elsewhere (CutPaste);
- ``texture_swap``: a noise-shaped region filled with a strongly transformed
  texture (zoomed, rotated, inverted, posterised, blurred ...) of a good image,
  blended at a random opacity (DRAEM's anomaly source, without an external
  texture set).

The mask marks the pixels the defect changed (its shape); nothing farther than
a few pixels from the mask changes. Grey images (all channels equal) stay grey,
so a colour cast never gives a defect away. Everything is drawn from the
``numpy`` ``Generator`` passed in; OpenCV warps and blurs are deterministic, so
one seed gives the same pixels on every run.

>>> rng = np.random.default_rng(0)
>>> good = np.full((128, 128, 3), 120, np.uint8)
>>> bad, mask = synthesize_defect(good, rng)
>>> bad.shape, mask.shape, mask.dtype, bool(mask.any())
((128, 128, 3), (128, 128), dtype('bool'), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from defectkit.data.synthetic import _noise_field, add_defect
from defectkit.errors import ConfigError, ImageError

__all__ = ["SYNTH_KINDS", "draw_kind", "paint_defect", "synthesize_defect"]

SYNTH_KINDS: tuple[str, ...] = ("scratch", "crack", "stain", "hole", "cut_paste", "texture_swap")

_Painter = Callable[
    [np.ndarray, np.random.Generator, Sequence[np.ndarray]], tuple[np.ndarray, np.ndarray]
]


# -- helpers -------------------------------------------------------------------------
def _is_grey(image: np.ndarray) -> bool:
    return bool(
        np.array_equal(image[:, :, 0], image[:, :, 1])
        and np.array_equal(image[:, :, 0], image[:, :, 2])
    )


def _blob(
    shape: tuple[int, int], rng: np.random.Generator, area: tuple[float, float], ragged: float
) -> np.ndarray:
    """A bool mask of one ragged elliptic blob covering about ``area`` (fractions) of ``shape``."""
    h, w = shape
    target = rng.uniform(*area) * h * w
    aspect = math.exp(rng.uniform(-0.9, 0.9))
    ry = math.sqrt(target / math.pi / aspect)
    rx = ry * aspect
    ry, rx = min(ry, 0.45 * h), min(rx, 0.45 * w)
    ry, rx = max(ry, 2.0), max(rx, 2.0)
    reach = max(rx, ry) * (1.0 + ragged) + 2
    cy = rng.uniform(min(ry, h / 2), max(h - ry, h / 2))
    cx = rng.uniform(min(rx, w / 2), max(w - rx, w / 2))
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, h)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, w)
    yy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
    phi = rng.uniform(0, math.pi)
    c, s = math.cos(phi), math.sin(phi)
    a, b = xx * c + yy * s, -xx * s + yy * c
    d = np.sqrt((a / rx) ** 2 + (b / ry) ** 2)
    scale = max(min(rx, ry) / 2.5, 1.5)
    d = d + ragged * _noise_field((y1 - y0, x1 - x0), rng, scale) / 1.2
    out = np.zeros(shape, bool)
    out[y0:y1, x0:x1] = d < 1.0
    if not out.any():
        out[int(cy), int(cx)] = True
    return out


def _feather(mask: np.ndarray, sigma: float = 0.7) -> np.ndarray:
    """Soft alpha (0..1) from a hard mask: edges blend over about a pixel."""
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def _jitter(patch: np.ndarray, rng: np.random.Generator, grey: bool) -> np.ndarray:
    """Brightness, contrast and (colour images) per-channel gain, float in/out."""
    mean = patch.mean()
    out = (patch - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-30, 30)
    if not grey:
        out = out * rng.uniform(0.85, 1.15, 3)
    return out


def _source(
    image: np.ndarray, sources: Sequence[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """Another good image (resized to ``image``'s size) or ``image`` itself."""
    if sources and rng.random() < 0.75:
        src = sources[int(rng.integers(len(sources)))]
        if src.shape[:2] != image.shape[:2]:
            src = cv2.resize(src, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
        return src
    return image


def _visible(
    base: np.ndarray,
    fill: np.ndarray,
    region: np.ndarray,
    rng: np.random.Generator,
    opacity: float = 1.0,
) -> np.ndarray:
    """Shift ``fill`` when, blended at ``opacity``, it would barely differ from ``base``
    inside ``region`` (plain background pasted onto plain background is a defect no
    one can see)."""
    if opacity * np.abs(fill[region] - base[region]).mean() < 6.0:
        fill = fill + rng.choice([-1.0, 1.0]) * rng.uniform(15, 35) / opacity
    return fill


# -- painters ------------------------------------------------------------------------
def _demo_painter(kind: str) -> _Painter:
    def paint(
        image: np.ndarray, rng: np.random.Generator, _sources: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        painted, mask = add_defect(image, kind, rng)
        base = image.astype(np.float64)
        opacity = rng.uniform(0.45, 1.0)
        return base + opacity * (painted.astype(np.float64) - base), mask

    return paint


def _stain(
    image: np.ndarray, rng: np.random.Generator, _sources: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    shape = image.shape[:2]
    area = (0.002, 0.02) if rng.random() < 0.5 else (0.02, 0.15)
    mask = _blob(shape, rng, area, ragged=rng.uniform(0.1, 0.5))
    # soft inside: full strength in the middle, fading toward the edge
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    depth = max(float(inside.max()), 1.0)
    alpha = np.clip(inside / (depth * rng.uniform(0.3, 1.0)), 0.0, 1.0)
    alpha = np.maximum(alpha, 0.35 * mask) * _feather(mask)
    base = image.astype(np.float64)
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(18, 60)
    target = base + delta
    if not _is_grey(image) and rng.random() < 0.5:
        target = base * rng.uniform(0.55, 1.0, 3)
    return base + alpha[:, :, None] * (target - base), mask


def _hard_shape(
    shape: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A rectangle, a thin scar or a blob, and its bounding box (y0, y1, x0, x1)."""
    h, w = shape
    style = rng.choice(["rect", "scar", "blob"])
    if style == "blob":
        mask = _blob(shape, rng, (0.003, 0.05), ragged=0.3)
    else:
        if style == "rect":
            area = rng.uniform(0.003, 0.05) * h * w
            aspect = math.exp(rng.uniform(-1.2, 1.2))
        else:
            area = rng.uniform(0.001, 0.006) * h * w
            aspect = rng.uniform(6, 14)  # long and thin
            aspect = aspect if rng.random() < 0.5 else 1 / aspect
        ph = int(np.clip(round(math.sqrt(area / aspect)), 2, h // 2))
        pw = int(np.clip(round(math.sqrt(area * aspect)), 2, w // 2))
        rect = np.zeros((ph + 4, pw + 4), np.uint8)
        rect[2:-2, 2:-2] = 1
        angle = rng.uniform(-45, 45)
        side = math.ceil(math.hypot(ph, pw)) + 4
        m = cv2.getRotationMatrix2D(((pw + 3) / 2, (ph + 3) / 2), angle, 1.0)
        m[:, 2] += [(side - pw - 4) / 2, (side - ph - 4) / 2]
        rot = cv2.warpAffine(rect, m, (side, side), flags=cv2.INTER_NEAREST) > 0
        side_y, side_x = min(side, h), min(side, w)
        rot = rot[:side_y, :side_x]
        y = int(rng.integers(0, h - side_y + 1))
        x = int(rng.integers(0, w - side_x + 1))
        mask = np.zeros(shape, bool)
        mask[y : y + side_y, x : x + side_x] = rot
        if not mask.any():
            mask[y + side_y // 2, x + side_x // 2] = True
    ys, xs = np.nonzero(mask)
    return mask, (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)


def _cut_paste(
    image: np.ndarray, rng: np.random.Generator, sources: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    shape = image.shape[:2]
    h, w = shape
    grey = _is_grey(image)
    mask, (y0, y1, x0, x1) = _hard_shape(shape, rng)
    bh, bw = y1 - y0, x1 - x0
    # the content: a transformed window of a source, taken from a random place
    src = _source(image, sources, rng).astype(np.float32)
    scale = rng.uniform(0.7, 1.4)
    angle = rng.uniform(0, 360)
    sy, sx = rng.uniform(0, h), rng.uniform(0, w)
    m = cv2.getRotationMatrix2D((sx, sy), angle, scale)
    m[:, 2] += [x0 + bw / 2 - sx, y0 + bh / 2 - sy]  # source point lands on the box centre
    fill = cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    base = image.astype(np.float64)
    fill = _jitter(fill.astype(np.float64), rng, grey)
    fill = _visible(base, fill, mask, rng)
    alpha = _feather(mask)[:, :, None]
    return base + alpha * (fill - base), mask


def _texture(src: np.ndarray, rng: np.random.Generator, grey: bool) -> np.ndarray:
    """A strongly transformed version of a good image, same size, float."""
    h, w = src.shape[:2]
    zoom = math.exp(rng.uniform(math.log(0.3), math.log(3.0)))
    m = cv2.getRotationMatrix2D((rng.uniform(0, w), rng.uniform(0, h)), rng.uniform(0, 360), zoom)
    tex = cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    tex = tex.astype(np.float64)
    op = rng.choice(["invert", "posterise", "contrast", "blur", "sharpen", "gamma"])
    if op == "invert":
        tex = 255.0 - tex
    elif op == "posterise":
        step = float(rng.choice([32, 64, 96]))
        tex = np.floor(tex / step) * step + step / 2
    elif op == "contrast":
        tex = (tex - tex.mean()) * rng.uniform(1.8, 3.0) + tex.mean()
    elif op == "blur":
        s = rng.uniform(2.0, 5.0)
        tex = cv2.GaussianBlur(tex, (0, 0), s, borderType=cv2.BORDER_REFLECT)
    elif op == "sharpen":
        blur = cv2.GaussianBlur(tex, (0, 0), 1.5, borderType=cv2.BORDER_REFLECT)
        tex = tex + rng.uniform(1.5, 3.0) * (tex - blur)
    else:
        tex = 255.0 * (np.clip(tex, 0, 255) / 255.0) ** rng.uniform(0.4, 2.5)
    return _jitter(tex, rng, grey)


def _texture_swap(
    image: np.ndarray, rng: np.random.Generator, sources: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    shape = image.shape[:2]
    mask = _blob(shape, rng, (0.003, 0.08), ragged=rng.uniform(0.3, 0.9))
    base = image.astype(np.float64)
    fill = _texture(_source(image, sources, rng), rng, _is_grey(image))
    opacity = rng.uniform(0.4, 1.0)
    fill = _visible(base, fill, mask, rng, opacity)
    alpha = (opacity * _feather(mask))[:, :, None]
    return base + alpha * (fill - base), mask


_PAINTERS: dict[str, _Painter] = {
    "scratch": _demo_painter("scratch"),
    "crack": _demo_painter("crack"),
    "stain": _stain,
    "hole": _demo_painter("hole"),
    "cut_paste": _cut_paste,
    "texture_swap": _texture_swap,
}


# -- public --------------------------------------------------------------------------
def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(None, f"{what} needs uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 32:
        raise ImageError(None, f"{what} needs at least 32x32 px, got {image.shape[:2]}")
    return image


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in _PAINTERS]
    if not kinds or unknown:
        raise ConfigError(
            f"unknown or no defect kinds {unknown or list(kinds)}; known: {list(SYNTH_KINDS)}"
        )
    return kinds


def draw_kind(rng: np.random.Generator, kinds: Sequence[str] = SYNTH_KINDS) -> str:
    """One kind drawn uniformly from ``kinds``."""
    kinds = _check_kinds(kinds)
    return kinds[int(rng.integers(len(kinds)))]


def paint_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    sources: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` on a copy of ``image``: ``(uint8 image, bool mask)``.

    ``sources`` are other good images (any size) that ``cut_paste`` and
    ``texture_swap`` may take content from; without them they use ``image``.
    """
    image = _check_image(image, "paint_defect")
    (kind,) = _check_kinds((kind,))
    out, mask = _PAINTERS[kind](image, rng, sources)
    if _is_grey(image):
        out = np.repeat(out.mean(axis=2, keepdims=True), 3, axis=2)
    out = np.ascontiguousarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
    return out, np.ascontiguousarray(mask, dtype=bool)


def synthesize_defect(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    kinds: Sequence[str] = SYNTH_KINDS,
    sources: Sequence[np.ndarray] = (),
    max_defects: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with 1..``max_defects`` random defects of ``kinds``, and their joint mask.

    Kinds are drawn uniformly (:func:`draw_kind`); see the module docstring for
    what each paints. The size and channels of ``image`` are kept.
    """
    if max_defects < 1:
        raise ConfigError(f"max_defects must be >= 1, got {max_defects}")
    kinds = _check_kinds(kinds)
    out = _check_image(image, "synthesize_defect")
    mask = np.zeros(out.shape[:2], bool)
    for _ in range(int(rng.integers(1, max_defects + 1))):
        out, m = paint_defect(out, draw_kind(rng, kinds), rng, sources)
        mask |= m
    return out, mask

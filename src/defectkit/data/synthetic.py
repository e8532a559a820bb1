"""Synthetic inspection images: textured surfaces and pasted defects.

The built-in demo data (``defectkit demo``), test fixtures, and the defect source
of self-supervised methods. Everything is drawn from a ``numpy`` random
``Generator`` and computed with plain ``numpy`` arithmetic (no OpenCV, no
threads), so one seed gives the same pixels on every run with the same numpy
and Pillow versions.

>>> rng = np.random.default_rng(0)
>>> good = make_surface("fabric", (160, 160), rng)
>>> bad, mask = add_defect(good, "scratch", rng)
>>> bad.shape, mask.dtype, bool(0 < mask.mean() < 0.05)
((160, 160, 3), dtype('bool'), True)
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from defectkit.data.images import save_png
from defectkit.errors import ConfigError, DatasetError, ImageError

__all__ = ["DEFECT_KINDS", "SURFACE_KINDS", "add_defect", "generate_demo", "make_surface"]

SURFACE_KINDS: tuple[str, ...] = ("brushed_metal", "fabric", "stone")
DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "crack", "hole")
#: bump when the generator's output changes, so old demo folders can be told apart
GENERATOR_VERSION = 1
_README_MARK = "defectkit synthetic demo dataset"

Size = int | tuple[int, int]


# -- noise helpers -------------------------------------------------------------
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Open (broadcastable) pixel coordinate grids ``yy`` (h, 1) and ``xx`` (1, w)."""
    return (
        np.arange(h, dtype=np.float64)[:, None],
        np.arange(w, dtype=np.float64)[None, :],
    )


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3 - 2 * t)


def _noise_field(
    shape: tuple[int, int],
    rng: np.random.Generator,
    scale: float | tuple[float, float],
) -> np.ndarray:
    """Smooth value noise with features about ``scale`` px (std about 1.2).

    ``scale`` may be ``(along_x, along_y)`` for streaks. A random lattice phase
    makes every call differ. Separable: interpolate lattice rows, then columns.
    """
    sx, sy = (scale, scale) if isinstance(scale, (int, float)) else scale
    offset = rng.uniform(0, 1, 2)
    v = np.arange(shape[0]) / sy + offset[1]
    u = np.arange(shape[1]) / sx + offset[0]
    lattice = rng.standard_normal((int(v[-1]) + 2, int(u[-1]) + 2))
    i, j = v.astype(np.intp), u.astype(np.intp)
    tv, tu = _smoothstep(v - i)[:, None], _smoothstep(u - j)
    rows = lattice[i] + (lattice[i + 1] - lattice[i]) * tv
    left, right = rows[:, j], rows[:, j + 1]
    # smoothstep mixing of independent normals loses variance; 1.6 restores most of it
    return 1.6 * (left + (right - left) * tu)


def _lighting(shape: tuple[int, int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A linear lighting gradient in a random direction, in [-amplitude, amplitude]."""
    h, w = shape
    yy, xx = _grid(h, w)
    phi = rng.uniform(0, 2 * math.pi)
    ramp = ((xx - w / 2) * math.cos(phi) + (yy - h / 2) * math.sin(phi)) / (0.5 * max(h, w))
    return amplitude * rng.uniform(0.4, 1.0) * ramp


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.round(values), 0, 255).astype(np.uint8))


# -- surfaces ------------------------------------------------------------------
def _brushed_metal(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    gray = (
        rng.uniform(135, 160)
        + 9.0 * _noise_field(shape, rng, (60.0, 0.7))  # fine streaks
        + 6.0 * _noise_field(shape, rng, (140.0, 3.0))  # broad streaks
        + 4.0 * _noise_field(shape, rng, 50.0)  # uneven finish
        + _lighting(shape, rng, 16.0)
        + rng.normal(0.0, 2.0, shape)
    )
    tint = np.array([0.97, 1.0, 1.04]) * rng.uniform(0.99, 1.01, 3)
    return _to_uint8(gray[:, :, None] * tint)


def _fabric(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    yy, xx = _grid(h, w)
    period = 8.0 * rng.uniform(0.97, 1.03)
    # threads wander a little, so the weave is periodic but not machine-perfect
    u = (xx + rng.uniform(0, period)) / period + 0.12 * _noise_field(shape, rng, 30.0)
    v = (yy + rng.uniform(0, period)) / period + 0.12 * _noise_field(shape, rng, 30.0)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    iu_i, iv_i = iu.astype(np.intp), iv.astype(np.intp)
    iu_i -= iu_i.min()
    iv_i -= iv_i.min()
    warp_on_top = (iu_i + iv_i) % 2 == 0  # plain weave
    across_u, across_v = np.sin(np.pi * fu), np.sin(np.pi * fv)
    warp = across_u * (0.6 + 0.4 * across_v)
    weft = across_v * (0.6 + 0.4 * across_u)
    thread_warp = rng.normal(0.0, 0.05, iu_i.max() + 1)[iu_i]
    thread_weft = rng.normal(0.0, 0.05, iv_i.max() + 1)[iv_i]
    shade = np.where(warp_on_top, warp + thread_warp, weft + thread_weft)
    shade = 0.35 + 0.65 * shade + rng.normal(0.0, 0.04, shape)
    colour = np.array([70.0, 100.0, 150.0]) * rng.uniform(0.97, 1.03, 3)  # denim blue
    light = 1.0 + _lighting(shape, rng, 0.12)
    return _to_uint8((shade * light)[:, :, None] * colour * 1.35)


def _stone(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    t = (
        _noise_field(shape, rng, 48.0)
        + 0.55 * _noise_field(shape, rng, 20.0)
        + 0.3 * _noise_field(shape, rng, 9.0)
        + 0.18 * _noise_field(shape, rng, 4.0)
        + 0.12 * _noise_field(shape, rng, 1.5)
    )
    t = np.clip(0.5 + 0.2 * t, 0.0, 1.0)
    # colour ramp: dark brown-grey -> sand -> pale cream
    stops = np.array([0.0, 0.5, 1.0])
    ramp = np.array([[95.0, 84.0, 76.0], [178.0, 160.0, 136.0], [222.0, 212.0, 194.0]])
    ramp = ramp * rng.uniform(0.97, 1.03, 3)
    rgb = np.stack([np.interp(t, stops, ramp[:, c]) for c in range(3)], axis=2)
    grains = _noise_field(shape, rng, 1.3) > 2.3  # small dark mineral grains
    rgb[grains] *= 0.75
    rgb += _lighting(shape, rng, 12.0)[:, :, None] + rng.normal(0.0, 2.0, (*shape, 1))
    return _to_uint8(rgb)


_SURFACES: dict[str, Callable[[tuple[int, int], np.random.Generator], np.ndarray]] = {
    "brushed_metal": _brushed_metal,
    "fabric": _fabric,
    "stone": _stone,
}


def _check_size(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    h, w = int(h), int(w)
    if h < 32 or w < 32:
        raise ConfigError(f"synthetic images need at least 32x32 px, got {w}x{h}")
    return h, w


def make_surface(kind: str, size: Size, rng: np.random.Generator) -> np.ndarray:
    """A defect-free textured surface as uint8 ``(H, W, 3)`` RGB.

    ``kind`` is one of :data:`SURFACE_KINDS`; ``size`` is ``(height, width)`` or
    one int for a square. Each call varies phase, lighting and noise, but images
    of one kind look alike.
    """
    if kind not in _SURFACES:
        raise ConfigError(f"unknown surface kind {kind!r}; known: {list(SURFACE_KINDS)}")
    return _SURFACES[kind](_check_size(size), rng)


# -- defects -------------------------------------------------------------------
def _polyline_coverage(
    points: np.ndarray, width: float, shape: tuple[int, int], out: np.ndarray
) -> None:
    """Anti-aliased coverage (0..1) of a polyline of ``width`` px, max-ed into ``out``."""
    h, w = shape
    pad = width / 2 + 2
    x0 = max(math.floor(points[:, 0].min() - pad), 0)
    x1 = min(math.ceil(points[:, 0].max() + pad) + 1, w)
    y0 = max(math.floor(points[:, 1].min() - pad), 0)
    y1 = min(math.ceil(points[:, 1].max() + pad) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    py, px = _grid(y1 - y0, x1 - x0)
    px += x0
    py += y0
    dist = np.full((y1 - y0, x1 - x0), np.inf)
    for (ax, ay), (bx, by) in itertools.pairwise(points):
        dx, dy = bx - ax, by - ay
        length2 = max(dx * dx + dy * dy, 1e-12)  # a zero-length step is a point
        t = np.clip(((px - ax) * dx + (py - ay) * dy) / length2, 0.0, 1.0)
        np.minimum(dist, np.hypot(px - ax - t * dx, py - ay - t * dy), out=dist)
    cover = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)
    np.maximum(out[y0:y1, x0:x1], cover, out=out[y0:y1, x0:x1])


def _centre(shape: tuple[int, int], margin: float, rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    mx, my = min(margin, w / 2 - 1), min(margin, h / 2 - 1)
    return np.array([rng.uniform(mx, w - mx), rng.uniform(my, h - my)])


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shape = img.shape[:2]
    side = min(shape)
    length = rng.uniform(0.3, 0.55) * side
    angle = rng.uniform(0, math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    mid = _centre(shape, length / 2 + 2, rng)
    start, end = mid - direction * length / 2, mid + direction * length / 2
    bend = mid + normal * rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0.0, 1.0, 24)[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end  # quadratic Bezier
    cover = np.zeros(shape)
    _polyline_coverage(points, rng.uniform(1.0, 2.0) * max(1.0, side / 160), shape, cover)
    alpha = cover * rng.uniform(0.85, 1.0)
    base = img.astype(np.float64)
    bright = rng.random() < 0.5 and base[cover > 0].mean() < 170
    target = base + (255 - base) * 0.75 if bright else base * 0.3
    return _blend(base, target, alpha), alpha >= 0.25


def _crack(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shape = img.shape[:2]
    h, w = shape
    side = min(shape)
    step = 2.5 * max(1.0, side / 160)
    width = rng.uniform(1.0, 1.8) * max(1.0, side / 160)
    cover = np.zeros(shape)

    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        pts = [start]
        for _ in range(steps):
            heading += rng.normal(0.0, 0.35)
            nxt = pts[-1] + step * np.array([math.cos(heading), math.sin(heading)])
            pts.append(np.clip(nxt, [1.0, 1.0], [w - 2.0, h - 2.0]))
        return np.array(pts)

    n_steps = int(rng.integers(18, 30))
    trunk = walk(_centre(shape, step * n_steps / 2, rng), rng.uniform(0, 2 * math.pi), n_steps)
    _polyline_coverage(trunk, width, shape, cover)
    for _ in range(int(rng.integers(1, 3))):
        i = int(rng.integers(2, len(trunk) - 2))
        d = trunk[i + 1] - trunk[i - 1]
        heading = math.atan2(d[1], d[0]) + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        branch = walk(trunk[i], heading, int(rng.integers(n_steps // 4, n_steps // 2 + 1)))
        _polyline_coverage(branch, max(1.0, 0.7 * width), shape, cover)
    alpha = cover * rng.uniform(0.85, 1.0)
    base = img.astype(np.float64)
    return _blend(base, base * rng.uniform(0.25, 0.4), alpha), alpha >= 0.25


def _spot(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shape = img.shape[:2]
    scale = max(1.0, min(shape) / 160)
    ra = rng.uniform(5.0, 10.0) * scale
    rb = ra * rng.uniform(0.6, 1.0)
    angle = rng.uniform(0, math.pi)
    cx, cy = _centre(shape, ra * 1.4, rng)
    yy, xx = _grid(*shape)
    c, s = math.cos(angle), math.sin(angle)
    a, b = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    d = np.sqrt((a / ra) ** 2 + (b / rb) ** 2)
    # ragged outline: the radius wobbles with the angle only, so the stain stays one
    # piece (no detached specks outside the mask)
    theta = np.arctan2(b / rb, a / ra)
    wobble = sum(
        rng.uniform(0.0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5)
    )
    d /= np.clip(1.0 + wobble, 0.8, 1.25)
    edge = np.clip((1.15 - d) / 0.45, 0.0, 1.0)
    alpha = edge * edge * (3 - 2 * edge) * rng.uniform(0.75, 0.95)
    # a stain darkens, shifting toward brown (more loss in blue than in red)
    tint = np.array([0.62, 0.5, 0.36]) * rng.uniform(0.9, 1.05)
    base = img.astype(np.float64)
    return _blend(base, base * tint, alpha), alpha >= 0.3


def _hole(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shape = img.shape[:2]
    scale = max(1.0, min(shape) / 160)
    r = rng.uniform(3.5, 6.5) * scale
    rim = max(1.5, 0.35 * r)
    cx, cy = _centre(shape, r + rim + 2, rng)
    yy, xx = _grid(*shape)
    d = np.hypot(xx - cx, yy - cy)
    inside = np.clip(r + 0.5 - d, 0.0, 1.0)
    ring = np.clip(1.0 - np.abs(d - (r + rim / 2)) / (rim / 2), 0.0, 1.0) * (1 - inside)
    base = img.astype(np.float64)
    dark = (base * 0.12 + 18.0 * np.clip(d / r, 0, 1)[:, :, None]) * rng.uniform(0.8, 1.1)
    out = _blend(base, dark, inside)
    out = _blend(out, out + (255 - out) * 0.45, ring * rng.uniform(0.7, 1.0))
    return out, (inside >= 0.25) | (ring >= 0.25)


def _blend(base: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[:, :, None]
    return base * (1 - a) + target * a


_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
    "hole": _hole,
}


def add_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint a synthetic defect on a copy of ``image``.

    ``kind`` is one of :data:`DEFECT_KINDS`: ``"scratch"`` (thin bright or dark
    curved line), ``"spot"`` (soft brownish stain), ``"crack"`` (dark branching
    line), ``"hole"`` (dark pit with a bright rim). Sizes scale with the image
    (designed at 160 px); a defect covers at most a few % of the area. Returns
    ``(defective_image, mask)``: uint8 RGB and a bool ``(H, W)`` array marking
    the pixels the defect visibly changed.
    """
    if kind not in _DEFECTS:
        raise ConfigError(f"unknown defect kind {kind!r}; known: {list(DEFECT_KINDS)}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(
            None, f"add_defect needs uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}"
        )
    if min(image.shape[:2]) < 32:
        raise ImageError(None, f"add_defect needs at least 32x32 px, got {image.shape[:2]}")
    out, mask = _DEFECTS[kind](image, rng)
    return _to_uint8(out), np.ascontiguousarray(mask)


# -- demo datasets -------------------------------------------------------------
def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """One independent stream per image, so counts and order don't shift other images."""
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index]
    return np.random.default_rng(key)


def generate_demo(
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    categories: Sequence[str] = ("brushed_metal", "fabric", "stone"),
    size: Size = (160, 160),
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_per_defect: int = 6,
) -> dict[str, Path]:
    """Write one MVTec AD layout dataset per surface category under ``out/<category>/``.

    Each holds ``train/good``, ``test/good``, ``test/<defect>`` for every kind
    in :data:`DEFECT_KINDS`, ``ground_truth/<defect>/<stem>_mask.png`` (0/255) and
    a ``README.txt``. The same arguments give byte-identical files. A category
    folder is built aside and swapped in, so an earlier demo folder is replaced
    whole; a folder that was not written by this function is never overwritten.
    Returns category -> dataset folder.

    >>> paths = generate_demo("demo_data", seed=0)  # doctest: +SKIP
    >>> read_mvtec(paths["fabric"]).defect_types     # doctest: +SKIP
    ['crack', 'hole', 'scratch', 'spot']
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    shape = _check_size(size)
    if isinstance(categories, str):
        categories = (categories,)
    unknown = [c for c in categories if c not in _SURFACES]
    if unknown:
        raise ConfigError(f"unknown demo categories {unknown}; known: {list(SURFACE_KINDS)}")
    if n_train < 1 or n_test_good < 0 or n_test_per_defect < 0:
        raise ConfigError("need n_train >= 1, n_test_good >= 0 and n_test_per_defect >= 0")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    for category in dict.fromkeys(categories):  # unique, in order
        dest = out / category
        _check_replaceable(dest)
        tmp = out / f".{category}.partial-{uuid.uuid4().hex[:8]}"
        try:
            _write_category(
                tmp, category, int(seed), shape, n_train, n_test_good, n_test_per_defect
            )
            if os.path.lexists(dest):
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        result[category] = dest
    return result


def _check_replaceable(dest: Path) -> None:
    if not os.path.lexists(dest):
        return
    if os.path.isdir(dest) and not os.path.islink(dest):
        with os.scandir(dest) as entries:
            if next(entries, None) is None:
                return  # an empty folder
        readme = dest / "README.txt"
        try:
            if _README_MARK in readme.read_text(encoding="utf-8", errors="replace"):
                return
        except OSError:
            pass
    raise DatasetError(
        f"{dest} exists and was not written by generate_demo; refusing to overwrite it "
        "(choose another output folder or remove it)"
    )


def _save(path: Path, array: np.ndarray) -> None:
    save_png(path, array, compress_level=1)  # speed over size for the demo


def _write_category(
    root: Path,
    category: str,
    seed: int,
    shape: tuple[int, int],
    n_train: int,
    n_test_good: int,
    n_test_per_defect: int,
) -> None:
    for i in range(n_train):
        _save(
            root / "train" / "good" / f"{i:03d}.png",
            make_surface(category, shape, _rng(seed, category, "train", i)),
        )
    for i in range(n_test_good):
        _save(
            root / "test" / "good" / f"{i:03d}.png",
            make_surface(category, shape, _rng(seed, category, "test/good", i)),
        )
    for defect in DEFECT_KINDS:
        for i in range(n_test_per_defect):
            rng = _rng(seed, category, f"test/{defect}", i)
            image, mask = add_defect(make_surface(category, shape, rng), defect, rng)
            _save(root / "test" / defect / f"{i:03d}.png", image)
            _save(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    h, w = shape
    readme = f"""{_README_MARK}: {category}

Synthetic {category.replace("_", " ")} surfaces made by defectkit.data.synthetic
(generator version {GENERATOR_VERSION}), for demos and tests; not real data.
seed: {seed}
image size: {w}x{h} px (width x height), RGB PNG
train/good: {n_train} defect-free images
test/good: {n_test_good} defect-free images
test/<defect>: {n_test_per_defect} images each of {", ".join(DEFECT_KINDS)}
ground_truth/<defect>/<name>_mask.png: pixel masks, 0 = good, 255 = defect
Regenerate with: defectkit.data.synthetic.generate_demo(out, seed={seed})
"""
    (root / "README.txt").write_text(readme, encoding="utf-8")

"""Map post-processing: the reduced-size blur in upsample_map stays close to
blurring the full-size map, and top_mean means what it says."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from defectkit.methods.parts.maps import top_mean, upsample_map


def _full_size(grid: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    h, w = shape
    up = cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)
    s = sigma * min(h, w) / 256.0
    return cv2.GaussianBlur(up, (0, 0), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT)


@pytest.mark.parametrize("shape", [(400, 400), (230, 600), (600, 250), (1200, 900), (96, 64)])
@pytest.mark.parametrize("sigma", [4.0, 12.0, 16.0])
def test_upsample_map_matches_full_size_blur(shape: tuple[int, int], sigma: float) -> None:
    rng = np.random.default_rng(sum(shape))
    grid = rng.gamma(2.0, 5.0, (32, 32)).astype(np.float32)
    grid[10:12, 5:9] += 40.0  # one defect-like peak
    got = upsample_map(grid, shape, sigma)
    ref = _full_size(grid, shape, sigma)
    assert got.shape == shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 0.015 * (ref.max() - ref.min())
    peak_got = np.array(np.unravel_index(got.argmax(), shape))
    peak_ref = np.array(np.unravel_index(ref.argmax(), shape))
    assert np.abs(peak_got - peak_ref).max() <= max(2, min(shape) // 100)


def test_upsample_map_without_blur_is_bilinear() -> None:
    grid = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = upsample_map(grid, (30, 40), 0.0)
    np.testing.assert_array_equal(got, cv2.resize(grid, (40, 30), interpolation=cv2.INTER_LINEAR))


def test_top_mean() -> None:
    amap = np.arange(100, dtype=np.float32).reshape(10, 10)
    assert top_mean(amap, 0.05) == pytest.approx(np.mean([95, 96, 97, 98, 99]))
    assert top_mean(amap, 0.0) == 99.0  # at least one value

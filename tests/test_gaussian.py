"""Gaussian parts: streaming estimate, Mahalanobis distance, packed storage."""

from __future__ import annotations

import numpy as np
import pytest

from defectkit.methods.parts.gaussian import (
    GaussianAccumulator,
    mahalanobis,
    pack_symmetric,
    unpack_symmetric,
)


def _data(seed: int = 0, n: int = 400, p: int = 3, c: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((p, c, c))
    x = np.einsum("npc,pcd->npd", rng.standard_normal((n, p, c)), mix)
    return (x + 50.0).astype(np.float32)  # far from the origin: tests the shifted sums


def test_streaming_equals_numpy_covariance() -> None:
    x = _data()
    acc = GaussianAccumulator(3, 5)
    for chunk in np.array_split(x, 7):
        acc.add(chunk)
    mean, precision = acc.finalize(shrinkage=0.0)
    for p in range(3):
        xp = x[:, p].astype(np.float64)
        np.testing.assert_allclose(mean[p], xp.mean(0), rtol=1e-5)
        cov = np.cov(xp, rowvar=False)
        np.testing.assert_allclose(precision[p], np.linalg.inv(cov), rtol=1e-3, atol=1e-4)


def test_shrinkage_adds_a_ridge_relative_to_the_mean_variance() -> None:
    x = _data(1)
    acc = GaussianAccumulator(3, 5)
    acc.add(x)
    _, precision = acc.finalize(shrinkage=0.5)
    cov = np.cov(x[:, 0].astype(np.float64), rowvar=False)
    ridge = 0.5 * np.trace(cov) / 5
    np.testing.assert_allclose(precision[0], np.linalg.inv(cov + ridge * np.eye(5)), rtol=1e-3)


def test_constant_features_stay_invertible() -> None:
    acc = GaussianAccumulator(1, 3)
    x = np.zeros((10, 1, 3), np.float32)
    x[:, 0, 0] = np.arange(10)
    acc.add(x)
    mean, precision = acc.finalize(0.01)
    assert np.all(np.isfinite(precision))
    d = mahalanobis(np.ones((1, 1, 3), np.float32), mean, precision)
    assert np.isfinite(d).all() and d[0, 0] > 0


def test_mahalanobis_matches_the_formula() -> None:
    rng = np.random.default_rng(2)
    mean = rng.standard_normal((4, 3)).astype(np.float32)
    a = rng.standard_normal((4, 3, 3))
    precision = np.einsum("pij,pkj->pik", a, a).astype(np.float32) + np.eye(3, dtype=np.float32)
    x = rng.standard_normal((6, 4, 3)).astype(np.float32)
    d = mahalanobis(x, mean, precision)
    y = x - mean
    expected = np.sqrt(np.einsum("npc,pcd,npd->np", y, precision, y))
    np.testing.assert_allclose(d, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        mahalanobis(x[:, :3], mean, precision)


def test_pack_unpack_round_trip() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 6, 6)).astype(np.float32)
    sym = a + a.transpose(0, 2, 1)
    packed = pack_symmetric(sym)
    assert packed.shape == (2, 21)
    np.testing.assert_array_equal(unpack_symmetric(packed, 6), sym)
    with pytest.raises(ValueError, match="upper triangle"):
        unpack_symmetric(packed, 5)


def test_accumulator_refuses_wrong_shapes_and_too_few_samples() -> None:
    acc = GaussianAccumulator(2, 3)
    with pytest.raises(ValueError, match="expected samples"):
        acc.add(np.zeros((4, 3, 3)))
    acc.add(np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        acc.finalize()

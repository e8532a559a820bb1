"""Greedy k-center coreset: the batched selection equals plain greedy, copes with
duplicates, and covers the data far better than a random subset."""

from __future__ import annotations

import numpy as np
import pytest

from defectkit.methods.parts.coreset import greedy_coreset, random_projection


def naive_greedy(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Textbook greedy k-center in float64: k passes, each picking the farthest point."""
    x = np.asarray(x, dtype=np.float64)
    first = int(np.random.default_rng(seed).integers(len(x)))
    selected = [first]
    min_d = ((x - x[first]) ** 2).sum(1)
    while len(selected) < k:
        j = int(np.argmax(min_d))
        selected.append(j)
        min_d = np.minimum(min_d, ((x - x[j]) ** 2).sum(1))
    return np.asarray(selected)


def coverage_radius(x: np.ndarray, idx: np.ndarray) -> float:
    """Largest distance from any point to its nearest selected point."""
    x = np.asarray(x, dtype=np.float64)
    c = x[idx]
    d2 = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :]
    return float(np.sqrt(max(d2.min(1).max(), 0.0)))


@pytest.mark.parametrize(
    ("seed", "n", "dim", "k", "batch"),
    [
        (0, 300, 8, 40, 1),
        (1, 1000, 16, 100, 8),
        (2, 2000, 5, 300, 64),
        (3, 700, 32, 699, 16),  # all but one
        (4, 1500, 3, 200, 200),  # low dimension: many near-equal distances
        (5, 600, 12, 150, 7),  # batch not dividing k; n below the candidate count
    ],
)
def test_batched_equals_naive_greedy(seed, n, dim, k, batch):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    got = greedy_coreset(x, k, proj_dim=None, batch=batch, seed=seed)
    np.testing.assert_array_equal(got, naive_greedy(x, k, seed))


def test_equals_naive_on_data_far_from_origin():
    # post-ReLU features sit far from 0; float32 |x|^2 - 2x.c + |c|^2 must still order right
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((800, 16)) + 300.0).astype(np.float32)
    got = greedy_coreset(x, 80, proj_dim=None, batch=16, seed=9)
    np.testing.assert_array_equal(got, naive_greedy(x, 80, 9))


def test_equals_naive_on_projected_features():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1200, 96)).astype(np.float32)
    got = greedy_coreset(x, 120, proj_dim=24, batch=32, seed=4)
    projected = x.astype(np.float64) @ random_projection(96, 24, 4).astype(np.float64)
    np.testing.assert_array_equal(got, naive_greedy(projected, 120, 4))


def test_candidate_set_smaller_than_data():
    # n far above max(8 * batch, 512) candidates: the exactness check does real work
    x = np.random.default_rng(8).standard_normal((6000, 6)).astype(np.float32)
    got = greedy_coreset(x, 400, proj_dim=None, batch=64, seed=8)
    np.testing.assert_array_equal(got, naive_greedy(x, 400, 8))


@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("proj_dim", [None, 8])
def test_duplicates_give_unique_indices(offset, proj_dim):
    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((5, 32)).astype(np.float32) + offset
    x = np.repeat(distinct, 200, axis=0)
    idx = greedy_coreset(x, 50, proj_dim=proj_dim, batch=4, seed=1)
    assert len(idx) == 50
    assert len(np.unique(idx)) == 50
    assert idx.min() >= 0 and idx.max() < len(x)
    # the first five picks are the five distinct rows; the rest only fill up
    assert len(np.unique(x[idx[:5]], axis=0)) == 5


def test_all_rows_identical():
    x = np.ones((400, 10), dtype=np.float32)
    idx = greedy_coreset(x, 30, seed=3)
    assert len(np.unique(idx)) == 30
    assert set(idx.tolist()) <= set(range(400))


def test_few_distinct_rows_large_n():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4)).astype(np.float32)[rng.integers(0, 3, 3000)]
    idx = greedy_coreset(x, 700, proj_dim=None, batch=64, seed=0)
    assert len(np.unique(idx)) == 700
    assert coverage_radius(x, idx) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("n_select", [10, 11, 50])
def test_select_all_or_more_returns_everything(n_select):
    x = np.random.default_rng(0).standard_normal((10, 3))
    np.testing.assert_array_equal(greedy_coreset(x, n_select), np.arange(10))


def test_n_select_must_be_positive():
    x = np.zeros((10, 3), dtype=np.float32)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            greedy_coreset(x, bad)


def test_input_untouched_and_deterministic():
    x = (np.random.default_rng(2).standard_normal((500, 20)) + 5).astype(np.float32)
    before = x.copy()
    a = greedy_coreset(x, 60, proj_dim=None, seed=3)
    b = greedy_coreset(x, 60, proj_dim=None, seed=3)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64
    c = greedy_coreset(x, 60, proj_dim=None, seed=4)
    assert a[0] != c[0] or not np.array_equal(a, c)


def test_progress_reports_up_to_total():
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    calls = []
    greedy_coreset(x, 200, batch=16, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (200, 200)
    assert all(t == 200 for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    greedy_coreset(np.ones((100, 4)), 20, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (20, 20)  # also when duplicates end the search early


def test_coverage_far_better_than_random_on_clusters():
    rng = np.random.default_rng(0)
    centres = rng.uniform(-50, 50, size=(40, 8))
    sizes = rng.integers(5, 200, size=40)  # uneven clusters: random misses small ones
    x = np.concatenate(
        [c + rng.normal(scale=0.5, size=(s, 8)) for c, s in zip(centres, sizes, strict=True)]
    ).astype(np.float32)
    labels = np.repeat(np.arange(40), sizes)
    k = 60
    idx = greedy_coreset(x, k, seed=0)
    assert set(labels[idx].tolist()) == set(range(40))  # every cluster has a pick
    core = coverage_radius(x, idx)
    random_radii = [coverage_radius(x, rng.choice(len(x), k, replace=False)) for _ in range(20)]
    assert core < 0.25 * min(random_radii)

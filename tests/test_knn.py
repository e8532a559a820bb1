"""Nearest neighbours over a memory bank: exact search against brute force,
approximate search recall, and bad input refused."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from defectkit.methods.parts import knn
from defectkit.methods.parts.knn import NearestNeighbours


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    # OpenMP threads spinning on a busy 2-core machine make HNSW 10x slower.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 distances of every query to every bank row, stably sorted."""
    d = cdist(queries.astype(np.float64), bank.astype(np.float64))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


def random_data(seed: int, n_bank: int, n_query: int, dim: int, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    bank = (rng.standard_normal((n_bank, dim)) + offset).astype(np.float32)
    queries = (rng.standard_normal((n_query, dim)) + offset).astype(np.float32)
    return bank, queries


@pytest.mark.parametrize(
    ("seed", "n_bank", "n_query", "dim", "k"),
    [(0, 500, 200, 16, 1), (1, 300, 50, 3, 5), (2, 1000, 100, 64, 3), (3, 7, 20, 8, 7)],
)
def test_exact_equals_brute_force(seed, n_bank, n_query, dim, k):
    bank, queries = random_data(seed, n_bank, n_query, dim)
    dist, idx = NearestNeighbours(bank).search(queries, k=k)
    ref_d, ref_i = brute_force(bank, queries, k)
    assert dist.shape == idx.shape == (n_query, k)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(dist, axis=1) >= 0)  # nearest first


def test_exact_more_queries_than_chunk(monkeypatch):
    monkeypatch.setattr(knn, "_CHUNK", 64)  # same code path, small arrays
    bank, queries = random_data(4, 200, 64 * 3 + 17, 12)
    for k in (1, 4):
        dist, idx = NearestNeighbours(bank).search(queries, k=k)
        ref_d, ref_i = brute_force(bank, queries, k)
        np.testing.assert_array_equal(idx, ref_i)
        np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-4)


def test_exact_more_queries_than_real_chunk():
    bank, queries = random_data(5, 40, knn._CHUNK + 100, 4)
    dist, idx = NearestNeighbours(bank).search(queries, k=2)
    ref_d, ref_i = brute_force(bank, queries, 2)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-5, atol=1e-4)


def test_exact_far_from_origin():
    # post-ReLU features sit far from 0; small distances must stay accurate there
    rng = np.random.default_rng(6)
    bank = (rng.random((500, 152)) + 20).astype(np.float32)
    queries = (bank[:200] + rng.normal(scale=0.01, size=(200, 152))).astype(np.float32)
    dist, idx = NearestNeighbours(bank).search(queries)
    ref_d, ref_i = brute_force(bank, queries, 1)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-3, atol=1e-3)


def test_query_in_bank_has_zero_distance():
    bank, _ = random_data(7, 100, 1, 10)
    dist, idx = NearestNeighbours(bank).search(bank)
    np.testing.assert_array_equal(idx[:, 0], np.arange(100))
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=2e-3)
    assert np.all(dist >= 0)


def test_k_above_bank_size_is_capped():
    bank, queries = random_data(8, 5, 9, 3)
    _, idx = NearestNeighbours(bank).search(queries, k=50)
    assert idx.shape == (9, 5)
    assert all(sorted(row) == list(range(5)) for row in idx.tolist())


def test_float64_inputs_and_bank_untouched():
    bank, queries = random_data(9, 60, 10, 5, offset=3.0)
    bank64 = bank.astype(np.float64)
    before = bank64.copy()
    dist, idx = NearestNeighbours(bank64).search(queries.astype(np.float64), k=2)
    np.testing.assert_array_equal(bank64, before)
    assert dist.dtype == np.float32
    np.testing.assert_array_equal(idx, brute_force(bank, queries, 2)[1])


@pytest.mark.parametrize("approximate", [False, True])
def test_empty_queries(approximate):
    bank, _ = random_data(10, 30, 1, 6)
    dist, idx = NearestNeighbours(bank, approximate=approximate).search(np.zeros((0, 6)), k=3)
    assert dist.shape == idx.shape == (0, 3)


def test_approximate_recall():
    bank, queries = random_data(11, 2000, 400, 16)
    dist, idx = NearestNeighbours(bank, approximate=True).search(queries, k=1)
    ref_d, ref_i = brute_force(bank, queries, 1)
    assert dist.shape == idx.shape == (400, 1)
    assert np.mean(idx[:, 0] == ref_i[:, 0]) >= 0.95
    # the distance reported is the true distance to the index returned
    true = np.sqrt(((queries.astype(np.float64) - bank[idx[:, 0]]) ** 2).sum(1))
    np.testing.assert_allclose(dist[:, 0], true, rtol=1e-4, atol=1e-4)
    assert np.all(dist[:, 0] >= ref_d[:, 0] - 1e-4)  # never nearer than the true nearest


def test_approximate_k_neighbours():
    bank, queries = random_data(12, 1000, 200, 8)
    dist, idx = NearestNeighbours(bank, approximate=True).search(queries, k=5)
    _, ref_i = brute_force(bank, queries, 5)
    assert dist.shape == idx.shape == (200, 5)
    hits = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx, ref_i, strict=True)])
    assert hits >= 0.95
    assert np.all(np.diff(dist, axis=1) >= 0)


@pytest.mark.parametrize(
    "bank",
    [
        np.zeros((0, 4)),
        np.zeros((0,)),
        np.zeros(5),
        np.zeros((2, 3, 4)),
        np.array(1.0),
        np.array([[0.0, np.nan], [1.0, 1.0]]),
        np.array([[0.0, np.inf], [1.0, 1.0]]),
    ],
    ids=["no-rows", "empty-1d", "1d", "3d", "scalar", "nan", "inf"],
)
@pytest.mark.parametrize("approximate", [False, True])
def test_bad_banks(bank, approximate):
    with pytest.raises(ValueError, match="memory bank"):
        NearestNeighbours(bank, approximate=approximate)


@pytest.mark.parametrize("approximate", [False, True])
def test_bad_queries(approximate):
    bank, _ = random_data(13, 20, 1, 6)
    nn = NearestNeighbours(bank, approximate=approximate)
    for queries in (np.zeros((3, 5)), np.zeros(6), np.zeros((2, 3, 6))):
        with pytest.raises(ValueError, match="queries must have shape"):
            nn.search(queries)
    with pytest.raises(ValueError, match="k must be"):
        nn.search(np.zeros((3, 6)), k=0)

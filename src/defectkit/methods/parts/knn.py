"""Nearest-neighbour search over a memory bank.

Exact search is one matrix product per chunk of queries (``|q|^2 - 2 q.b + |b|^2``
through PyTorch's BLAS). Measured on the 2-core CI machine for 1,080 queries
against 9,000 x 152 bank rows: 19-31 ms, against 95 ms for faiss'
``IndexFlatL2`` (its bundled BLAS is slower here). For banks too large for
exact search, ``approximate=True`` builds a faiss HNSW graph instead. On
magnetic-tile (6,900-row bank, 1,024 queries an image) HNSW with M=16 and
efSearch=16 gave the same image/pixel AUROC and AUPRO as exact search to 1e-4,
at 5 ms instead of 68 ms an image.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

_CHUNK = 4096


class NearestNeighbours:
    """L2 nearest neighbours of query rows among ``bank`` rows."""

    def __init__(
        self, bank: np.ndarray, *, approximate: bool = False, hnsw_m: int = 16, ef_search: int = 16
    ) -> None:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"memory bank must be a non-empty 2-D array, got {bank.shape}")
        if not np.all(np.isfinite(bank)):
            raise ValueError("memory bank holds NaN or infinite values")
        self.bank = bank
        self._hnsw: faiss.Index | None = None
        if approximate:
            self._hnsw = faiss.IndexHNSWFlat(bank.shape[1], hnsw_m)
            self._hnsw.hnsw.efSearch = ef_search
            # Parallel insertion makes the graph depend on thread timing; one
            # thread keeps it (and so every score) identical across runs and
            # across save/load. ~0.5 s for 10k rows.
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                self._hnsw.add(bank)
            finally:
                faiss.omp_set_num_threads(threads)
        else:
            # Centred on the bank mean (distances do not change): the expansion
            # |q|^2 - 2 q.b + |b|^2 loses float32 precision far from the origin,
            # e.g. 0.03 on a 0.12 distance for 152-D features around 5.
            mean = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
            self._mean = torch.from_numpy(mean)
            self._bank_t = torch.from_numpy(bank - mean)
            self._bank_sq = (self._bank_t * self._bank_t).sum(1)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (not squared) and indices, each of shape (n, k)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.bank.shape[1]:
            raise ValueError(
                f"queries must have shape (n, {self.bank.shape[1]}) like the bank, got {q.shape}"
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self.bank))
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if self._hnsw is not None:
            d2, idx = self._hnsw.search(q, k)
            return np.sqrt(np.maximum(d2, 0.0)), idx
        dists, idxs = [], []
        with torch.inference_mode():
            for s in range(0, len(q), _CHUNK):
                qt = torch.from_numpy(q[s : s + _CHUNK]) - self._mean
                d2 = torch.addmm(self._bank_sq[None, :], qt, self._bank_t.T, alpha=-2.0)
                d2 += (qt * qt).sum(1, keepdim=True)
                vals, ids = (
                    torch.topk(d2, k, dim=1, largest=False) if k > 1 else d2.min(1, keepdim=True)
                )
                dists.append(vals.clamp_min_(0).sqrt_().numpy())
                idxs.append(ids.numpy())
        return np.concatenate(dists), np.concatenate(idxs)

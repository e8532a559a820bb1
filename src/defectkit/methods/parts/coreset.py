"""Greedy k-center coreset selection (PatchCore's memory subsampling), made fast.

Plain greedy k-center picks one point at a time and then updates every point's
distance to its nearest pick: ``k`` passes over ``N`` points. Here the passes
are batched without changing the result: the farthest points so far form a small
candidate set; greedy picks are made inside it for as long as the best candidate
is still farther than the farthest point outside the set (so the pick is the
one plain greedy would make), and then all ``N`` distances are updated at once
with one matrix product. Distances use a random projection to a few dimensions
(as in PatchCore), and features are processed in chunks so memory stays at a
few hundred bytes per point.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def random_projection(dim_in: int, dim_out: int, seed: int) -> np.ndarray:
    """Gaussian Johnson-Lindenstrauss projection matrix (dim_in, dim_out)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_in, dim_out)) / np.sqrt(dim_out)).astype(np.float32)


def _sq_dist_to(x: np.ndarray, x_sq: np.ndarray, centres: np.ndarray) -> np.ndarray:
    c_sq = np.einsum("ij,ij->i", centres, centres)
    d = x @ (-2.0 * centres.T)
    d += x_sq[:, None]
    d += c_sq[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def greedy_coreset(
    features: np.ndarray,
    n_select: int,
    *,
    proj_dim: int | None = 64,
    batch: int = 64,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Indices of ``n_select`` rows of ``features`` chosen by greedy k-center.

    ``progress(done, total)`` is called after each batch of picks.
    """
    n = len(features)
    if n_select >= n:
        return np.arange(n)
    if n_select <= 0:
        raise ValueError("n_select must be positive")
    x = np.ascontiguousarray(features, dtype=np.float32)
    if proj_dim is not None and proj_dim < x.shape[1]:
        x = x @ random_projection(x.shape[1], proj_dim, seed)
    # Centre (distances do not change): |x|^2 - 2 x.c + |c|^2 loses float32
    # precision on features far from the origin (post-ReLU features are).
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    if np.may_share_memory(x, features):
        x = x - mean
    else:
        x -= mean
    x_sq = np.einsum("ij,ij->i", x, x)
    rng = np.random.default_rng(seed)
    first = int(rng.integers(n))
    min_d = _sq_dist_to(x, x_sq, x[first : first + 1])[:, 0]
    min_d[first] = 0.0  # exactly: rounding must not let a pick be picked again
    selected = [first]
    n_cand = max(8 * batch, 512)
    while len(selected) < n_select:
        m = min(batch, n_select - len(selected))
        c = min(n_cand, n)
        if c < n:
            part = np.argpartition(min_d, n - c - 1)
            cand, outside_max = part[n - c :], float(min_d[part[n - c - 1]])
        else:
            cand, outside_max = np.arange(n), -1.0
        cand_d = min_d[cand].copy()
        xc, xc_sq = x[cand], x_sq[cand]
        picks: list[int] = []
        for _ in range(m):
            j = int(np.argmax(cand_d))
            if cand_d[j] < outside_max or cand_d[j] <= 0.0:
                break  # the true next pick may lie outside the candidates
            picks.append(int(cand[j]))
            cand_d = np.minimum(cand_d, _sq_dist_to(xc, xc_sq, xc[j : j + 1])[:, 0])
            cand_d[j] = 0.0
        if picks:
            selected.extend(picks)
            np.minimum(min_d, _sq_dist_to(x, x_sq, x[picks]).min(axis=1), out=min_d)
            min_d[picks] = 0.0
        else:  # all remaining points coincide with picks
            rest = np.setdiff1d(np.arange(n), np.asarray(selected))
            selected.extend(rest[: n_select - len(selected)].tolist())
        if progress is not None:
            progress(len(selected), n_select)
    return np.asarray(selected[:n_select], dtype=np.int64)

"""Gaussian models of good features: one per position (PaDiM) or one for all
(texture statistics), learned in one streaming pass, scored by Mahalanobis
distance.

The estimate is the sample covariance plus a ridge of ``shrinkage`` times the
mean variance (a regularised estimate that keeps the inverse stable when there
are few images per position; scale-free, so the same value suits any
features). Sums are kept in float64 around a shift taken from the first batch,
so memory does not grow with the number of images and precision does not suffer
for features far from the origin.

>>> rng = np.random.default_rng(0)
>>> acc = GaussianAccumulator(positions=1, dim=3)
>>> acc.add(rng.standard_normal((500, 1, 3)))
>>> mean, precision = acc.finalize(shrinkage=0.0)
>>> bool(np.allclose(precision[0], np.eye(3), atol=0.25))
True
>>> d = mahalanobis(np.zeros((1, 1, 3), np.float32), mean, precision)
>>> d.shape
(1, 1)
"""

from __future__ import annotations

import numpy as np
import torch


class GaussianAccumulator:
    """Running sums for ``positions`` independent ``dim``-variate Gaussians.

    ``add(x)`` takes ``x`` of shape ``(n, positions, dim)``: ``n`` samples of
    every position (e.g. one image's patch grid per sample).
    """

    def __init__(self, positions: int, dim: int) -> None:
        if positions < 1 or dim < 1:
            raise ValueError(f"need positions >= 1 and dim >= 1, got {positions}, {dim}")
        self.positions = positions
        self.dim = dim
        self.count = 0
        self._shift: torch.Tensor | None = None
        self._sum = torch.zeros(positions, dim, dtype=torch.float64)
        self._outer = torch.zeros(positions, dim, dim, dtype=torch.float64)

    def add(self, x: np.ndarray | torch.Tensor) -> None:
        t = torch.as_tensor(x)
        if t.ndim != 3 or t.shape[1:] != (self.positions, self.dim):
            raise ValueError(
                f"expected samples of shape (n, {self.positions}, {self.dim}), got {tuple(t.shape)}"
            )
        t = t.to(torch.float64)
        if self._shift is None:
            self._shift = t.mean(0)
        t = t - self._shift
        self._sum += t.sum(0)
        self._outer += torch.einsum("npc,npd->pcd", t, t)
        self.count += t.shape[0]

    def finalize(self, shrinkage: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, precision)`` as float32: ``(P, C)`` and ``(P, C, C)``."""
        if self.count < 2 or self._shift is None:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        if shrinkage < 0:
            raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
        n = self.count
        m = self._sum / n
        cov = (self._outer - n * torch.einsum("pc,pd->pcd", m, m)) / (n - 1)
        cov = 0.5 * (cov + cov.transpose(1, 2))
        scale = torch.diagonal(cov, dim1=1, dim2=2).mean(1).clamp_min(1e-12)
        eye = torch.eye(self.dim, dtype=torch.float64)
        # a tiny absolute floor keeps constant features (zero variance) invertible
        cov = cov + (shrinkage * scale + 1e-9)[:, None, None] * eye
        # NumPy's LAPACK, not torch.linalg.inv: torch runs MKL's getrf nested in
        # its own OpenMP loop over the batch, and after torch.set_num_threads()
        # has been called twice that nested region waits forever for a thread
        # it never gets (seen on torch 2.13 CPU; tests/test_gaussian.py).
        precision = np.linalg.inv(cov.numpy())
        precision = 0.5 * (precision + precision.transpose(0, 2, 1))
        mean = m + self._shift
        return mean.float().numpy(), precision.astype(np.float32)


def mahalanobis(
    x: np.ndarray | torch.Tensor, mean: np.ndarray, precision: np.ndarray
) -> np.ndarray:
    """Mahalanobis distances ``(n, P)`` of samples ``(n, P, C)`` to per-position Gaussians."""
    t = torch.as_tensor(x, dtype=torch.float32)
    mu = torch.as_tensor(mean, dtype=torch.float32)
    prec = torch.as_tensor(precision, dtype=torch.float32)
    if t.ndim != 3 or t.shape[1:] != mu.shape or prec.shape != (*mu.shape, mu.shape[1]):
        raise ValueError(
            f"samples {tuple(t.shape)} do not fit mean {tuple(mu.shape)} and "
            f"precision {tuple(prec.shape)}"
        )
    with torch.inference_mode():
        y = t - mu
        # per position: (n, C) @ (C, C), batched over positions
        yp = torch.bmm(y.transpose(0, 1), prec).transpose(0, 1)
        d2 = (yp * y).sum(-1)
        return d2.clamp_min_(0).sqrt_().numpy()


def pack_symmetric(matrices: np.ndarray) -> np.ndarray:
    """Upper triangles ``(..., C*(C+1)/2)`` of symmetric ``(..., C, C)`` matrices."""
    c = matrices.shape[-1]
    iu = np.triu_indices(c)
    return np.ascontiguousarray(matrices[..., iu[0], iu[1]])


def unpack_symmetric(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_symmetric`."""
    if packed.shape[-1] != dim * (dim + 1) // 2:
        raise ValueError(f"{packed.shape[-1]} values do not fill a {dim}x{dim} upper triangle")
    out = np.zeros((*packed.shape[:-1], dim, dim), dtype=packed.dtype)
    iu = np.triu_indices(dim)
    out[..., iu[0], iu[1]] = packed
    out[..., iu[1], iu[0]] = packed
    return out

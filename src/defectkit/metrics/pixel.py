"""Pixel-level metrics: pixel AUROC and AUPRO over all pixels of all images.

Both metrics are exact: every distinct score is a threshold, as in the
official MVTec AD evaluation, not a coarse grid. They are built for ~10^8
pixels on a laptop: the scores are copied once, split into good and defect
pixels (in the maps' own precision, 4 bytes a pixel for float32 maps), sorted
in place, and the defect pixels are looked up in the sorted good pixels chunk
by chunk. No per-pixel index array over all pixels is ever built.

Masks: a pixel is defective where its mask is non-zero (0/1, 0/255 and bool
masks all work); ``None`` stands for an all-good mask. Image labels are not
used here: a "defective" image whose mask is empty is, pixel-wise, all good.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import cv2
import numpy as np

__all__ = ["aupro", "pixel_auroc"]

# Pixels per chunk when looking defect pixels up in the sorted good pixels
# (bounds the temporary arrays to ~100 MB whatever the data size).
_CHUNK = 1 << 22

Masks = Sequence[np.ndarray | None] | np.ndarray
Maps = Sequence[np.ndarray] | np.ndarray


def _check(masks: Masks, maps: Maps) -> np.dtype:
    """Validate the pairs; return the dtype the scores are compared in."""
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} anomaly maps; give one of each")
    dtypes = []
    for i, (mask, smap) in enumerate(zip(masks, maps, strict=True)):
        smap = np.asarray(smap)
        if smap.ndim != 2:
            raise ValueError(f"image {i}: anomaly map must be 2-D, got shape {smap.shape}")
        if mask is not None and np.shape(mask) != smap.shape:
            raise ValueError(
                f"image {i}: mask shape {np.shape(mask)} differs from anomaly map shape "
                f"{smap.shape}; resize one to the other first"
            )
        if not (np.issubdtype(smap.dtype, np.number) or smap.dtype == np.bool_):
            raise ValueError(f"image {i}: anomaly map has non-numeric dtype {smap.dtype}")
        if np.issubdtype(smap.dtype, np.complexfloating):
            raise ValueError(f"image {i}: anomaly map is complex")
        dtypes.append(smap.dtype)
    if not dtypes:
        return np.dtype(np.float32)
    dtype = np.result_type(*dtypes)
    # Scores of up to 16 bits (bool, uint8, int16, float16, ...) are exact in
    # float32, which takes the fast sort path in `_by_score`.
    return np.dtype(np.float32) if dtype.itemsize <= 2 else dtype


def _split(
    masks: Masks, maps: Maps, regions: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Copy every score once: (good scores, defect scores, region ids, n_regions).

    Good pixels are those whose mask is 0. With ``regions``, each mask's
    connected components are labelled (8-connected, as the official AUPRO code)
    and each defect pixel gets its global region index; otherwise region ids are
    None and n_regions is 0.
    """
    dtype = _check(masks, maps)
    n_defect = [0 if m is None else int(np.count_nonzero(m)) for m in masks]
    n_total = sum(int(np.size(a)) for a in maps)
    good = np.empty(n_total - sum(n_defect), dtype)
    defect = np.empty(sum(n_defect), dtype)
    region = np.empty(defect.size, np.int32) if regions else None
    g = d = n_regions = 0
    for mask, smap, k in zip(masks, maps, n_defect, strict=True):
        flat = np.asarray(smap).astype(dtype, copy=False).ravel()
        if k == 0:
            good[g : g + flat.size] = flat
            g += flat.size
            continue
        inside = np.asarray(mask) != 0
        np.compress(inside.ravel(), flat, out=defect[d : d + k])
        np.compress(~inside.ravel(), flat, out=good[g : g + flat.size - k])
        if region is not None:
            count, labels = cv2.connectedComponents(
                inside.view(np.uint8), connectivity=8, ltype=cv2.CV_32S
            )
            ids = region[d : d + k]
            np.compress(inside.ravel(), labels.ravel(), out=ids)
            ids += n_regions - 1  # OpenCV labels regions 1..count-1; 0 is background
            n_regions += count - 1
        g += flat.size - k
        d += k
    return good, defect, region, n_regions


def _reject_nan(sorted_scores: np.ndarray) -> None:
    """NaN sorts to an end, so a sorted array holds one iff an end element is NaN."""
    floating = np.issubdtype(sorted_scores.dtype, np.floating)
    if floating and sorted_scores.size and np.isnan(sorted_scores[[0, -1]]).any():
        raise ValueError("anomaly maps contain NaN; fix the method or mask those pixels")


_SIGN = np.uint32(0x80000000)


def _pack(scores: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Pack float32 scores and region ids into uint64 keys that sort by score.

    The float's bits are mapped to an unsigned integer of the same order (flip
    all bits of negatives, the sign bit of positives); -0.0 becomes 0.0 first
    so that equal floats get equal keys.
    """
    bits = (scores + np.float32(0.0)).view(np.uint32)
    bits ^= (np.uint32(0) - (bits >> np.uint32(31))) | _SIGN
    return (bits.astype(np.uint64) << np.uint64(32)) | region.astype(np.uint64)


def _unpack(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_pack`: (float32 scores, region ids)."""
    bits = (keys >> np.uint64(32)).astype(np.uint32)
    bits ^= ((bits >> np.uint32(31)) - np.uint32(1)) | _SIGN
    return bits.view(np.float32), keys.astype(np.uint32)


def _by_score(scores: np.ndarray, region: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (scores, region ids) of the defect pixels in chunks, each sorted by score.

    float32 scores are packed with their region into 8-byte keys and sorted once
    in place, several times faster than an argsort plus gathers; chunks then come
    in global order. Wider dtypes are argsorted chunk by chunk.
    """
    if scores.dtype == np.float32:
        keys = np.empty(scores.size, np.uint64)
        for start in range(0, scores.size, _CHUNK):
            stop = start + _CHUNK
            keys[start:stop] = _pack(scores[start:stop], region[start:stop])
        del scores, region  # the caller dropped its references: free them now
        keys.sort()
        for start in range(0, keys.size, _CHUNK):
            yield _unpack(keys[start : start + _CHUNK])
    else:
        for start in range(0, scores.size, _CHUNK):
            order = np.argsort(scores[start : start + _CHUNK])
            yield scores[start : start + _CHUNK][order], region[start : start + _CHUNK][order]


def _runs(sorted_chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a sorted array, and a flag at the first element of each run."""
    new = np.empty(sorted_chunk.size, np.bool_)
    new[:1] = True
    np.not_equal(sorted_chunk[1:], sorted_chunk[:-1], out=new[1:])
    return sorted_chunk[new], new


def _count_below(ref: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For sorted ``values``: ``#(ref < v) + #(ref <= v)`` per value, ties counted half twice.

    ``ref`` is sorted. Searching only the slice of ``ref`` the values span keeps
    the binary searches in cache.
    """
    lo = int(np.searchsorted(ref, values[0], "left"))
    hi = int(np.searchsorted(ref, values[-1], "right"))
    part = ref[lo:hi]
    counts = np.searchsorted(part, values, "left")
    counts += np.searchsorted(part, values, "right")
    counts += 2 * lo
    return counts


def pixel_auroc(masks: Masks, maps: Maps) -> float:
    """Pixel AUROC over all pixels of all images pooled (good images: all-zero mask).

    Exact, ties counted half (the Mann-Whitney statistic, equal to the ROC area
    of scikit-learn). ``masks[i]`` must have the shape of ``maps[i]``; sizes may
    differ between images. Returns NaN when no pixel is defective or none is good.
    Memory: about one copy of the scores, in the maps' own dtype.
    """
    good, defect, _, _ = _split(masks, maps, regions=False)
    n_pos, n_neg = defect.size, good.size
    if n_pos == 0 or n_neg == 0:
        return math.nan
    good.sort()
    defect.sort()
    _reject_nan(good)
    _reject_nan(defect)
    # Look the smaller set up in the larger one.
    queries, ref = (defect, good) if n_pos <= n_neg else (good, defect)
    twice = 0  # sum over queries of #(ref < q) + #(ref <= q), exact in Python ints
    for start in range(0, queries.size, _CHUNK):
        chunk = queries[start : start + _CHUNK]
        values, new = _runs(chunk)
        multiplicity = np.diff(np.flatnonzero(new), append=chunk.size)
        twice += int(np.dot(multiplicity, _count_below(ref, values)))
    if n_pos > n_neg:  # counted good-vs-defect: take the complement
        twice = 2 * n_pos * n_neg - twice
    return twice / (2 * n_pos * n_neg)


def aupro(masks: Masks, maps: Maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve (MVTec AD, Bergmann et al.).

    Regions are the 8-connected components of each mask. At a threshold t,
    PRO(t) is the mean over all regions of all images of the fraction of the
    region's pixels with score >= t, and FPR(t) the fraction of all good pixels
    (mask == 0, over all images) with score >= t. The curve (FPR, PRO) over every
    distinct score, starting at (0, 0), is integrated with the trapezoid rule for
    FPR in [0, fpr_limit] (interpolated linearly at the limit) and divided by
    ``fpr_limit``: 1.0 is perfect, random scores give about ``fpr_limit / 2`` and
    a constant map exactly that. Same value as the official MVTec evaluation code,
    without its index sort over all pixels. Memory: one copy of the scores plus
    8 bytes a defect pixel.

    A defective image whose mask is empty contributes no region; its pixels count
    as good pixels. Returns NaN when there is no region or no good pixel at all.

    >>> mask = np.zeros((4, 4), np.uint8)
    >>> mask[1:3, 1:3] = 1
    >>> aupro([mask], [mask.astype(np.float32)])
    1.0
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    good, defect, region, n_reg = _split(masks, maps, regions=True)
    if n_reg == 0 or good.size == 0:
        return math.nan
    assert region is not None
    size = np.bincount(region, minlength=n_reg)
    defect_by_score = _by_score(defect, region)
    del defect, region  # `_by_score` frees them once it has packed them
    good.sort()
    _reject_nan(good)
    n_good = good.size

    # The FPR limit is reached within the tie group of one good score, g_star:
    # FPR(> g_star) < fpr_limit <= FPR(>= g_star).
    g_star = good[min(n_good - 1, n_good - math.ceil(fpr_limit * n_good))]
    lo = int(np.searchsorted(good, g_star, "left"))
    hi = int(np.searchsorted(good, g_star, "right"))
    top = good[hi:]  # good pixels above g_star: the thresholds fully inside the limit

    # We integrate the deficit 1 - PRO (so that a perfect map gives exactly 1.0).
    # Over the good thresholds g > g_star, a defect pixel d adds to its region
    # (#top >= d) + (#top > d), in halves of a trapezoid: for d <= g_star that
    # is 2 * top.size. Per region we also count its pixels > and >= g_star.
    twice_deficit = np.zeros(n_reg)
    n_above = np.zeros(n_reg, np.int64)
    n_at_or_above = np.zeros(n_reg, np.int64)
    for scores, ids in defect_by_score:
        _reject_nan(scores)
        k_ge = int(np.searchsorted(scores, g_star, "left"))
        k_gt = int(np.searchsorted(scores, g_star, "right"))
        n_at_or_above += np.bincount(ids[k_ge:], minlength=n_reg)
        n_above += np.bincount(ids[k_gt:], minlength=n_reg)
        if k_gt == scores.size:
            continue
        values, new = _runs(scores[k_gt:])
        if top.size:
            per_value = 2 * top.size - _count_below(top, values)
            run_of_pixel = np.cumsum(new) - 1
            twice_deficit += np.bincount(ids[k_gt:], per_value[run_of_pixel], minlength=n_reg)
    twice_deficit += (size - n_above) * (2.0 * top.size)

    # PRO is a mean over regions of per-region fractions.
    deficit = float(np.mean(twice_deficit / size)) / (2.0 * n_good)
    # The last trapezoid, from (FPR(> g_star), PRO(> g_star)) towards
    # (FPR(>= g_star), PRO(>= g_star)), cut at fpr_limit.
    f0, f1 = (n_good - hi) / n_good, (n_good - lo) / n_good
    q0 = float(np.mean((size - n_above) / size))  # 1 - PRO(> g_star)
    q1 = float(np.mean((size - n_at_or_above) / size))  # 1 - PRO(>= g_star)
    width = max(0.0, fpr_limit - f0)
    q_limit = q0 + (q1 - q0) * width / (f1 - f0)
    deficit += 0.5 * (q0 + q_limit) * width
    return float(min(max(1.0 - deficit / fpr_limit, 0.0), 1.0))

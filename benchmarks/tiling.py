"""Tiled inspection of one 4096x4096 image: time per image, PyTorch and ONNX runtimes.

    python benchmarks/tiling.py [--tile 512] [--image-size 256] [--repeats 3] [--no-record]

A seamless 4096x4096 brushed-metal surface (mirrored copies of a 512 px
``make_surface``) with one ~10 px hole; PatchCore (lite0) fitted on the tiles of
one good 1024 px surface at the tile size, each tile shrunk to ``--image-size``
for the network (512 -> 256: the network sees every 2x2 pixels, so a 10 px
defect still covers a whole feature cell). Times are for ``score_tiled`` on the
whole image (tiles, maps, stitching), best and median of ``--repeats``, after
one warm-up run; the machine may be shared, so the load average is recorded,
and so is the process CPU time (all threads), which contention inflates less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _record import git_commit, machine, publish

from defectkit.data.synthetic import add_defect, make_surface
from defectkit.detector import Detector
from defectkit.export.onnx_bundle import export_onnx
from defectkit.export.runtime import load_onnx_detector
from defectkit.tiling import default_overlap, score_tiled, split_tiles, tile_boxes


def mirrored(rng: np.random.Generator, side: int) -> np.ndarray:
    a = make_surface("brushed_metal", (side, side), rng)
    top = np.concatenate([a, a[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--sigma", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    rng = np.random.default_rng(5)
    good = split_tiles([mirrored(rng, 512)], args.tile)
    params = {
        "backbone": "efficientnet-lite0",
        "image_size": args.image_size,
        "coreset_ratio": 0.05,
        "sigma": args.sigma,
    }
    det = Detector.fit(good, "patchcore", params, calibration_fraction=0.2)
    big = np.tile(mirrored(rng, 512), (4, 4, 1))
    y0, x0 = 2900, 1230
    crop, mask = add_defect(big[y0 : y0 + 64, x0 : x0 + 64], "hole", rng)
    big[y0 : y0 + 64, x0 : x0 + 64] = crop
    ys, xs = np.nonzero(mask)
    centre = (y0 + ys.mean(), x0 + xs.mean())
    n_tiles = len(tile_boxes(4096, 4096, args.tile, default_overlap(args.tile)))

    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(det, Path(tmp) / "bundle")
        runtimes = {"torch": det, "onnx": load_onnx_detector(Path(tmp) / "bundle")}
        for name, scorer in runtimes.items():
            res = score_tiled(scorer, [big], args.tile)  # warm-up
            times, cpu = [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                res = score_tiled(scorer, [big], args.tile)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            amap = res.maps[0]
            peak = np.unravel_index(int(np.argmax(amap)), amap.shape)
            off = float(np.hypot(peak[0] - centre[0], peak[1] - centre[1]))
            found = bool(det.decide(res.scores)[0]) and off < 32
            rows.append((name, min(times), statistics.median(times), min(cpu), off, found))
            print(
                f"{name}: best {min(times):.2f} s, median {statistics.median(times):.2f} s, "
                f"peak {off:.0f} px from the defect, found={found}"
            )
    load_after = os.getloadavg()

    lines = [
        "## Tiling: one 4096x4096 image (`score_tiled`)",
        "",
        f"- command: `python benchmarks/tiling.py --tile {args.tile} --image-size "
        f"{args.image_size}` (commit {git_commit()})",
        f"- machine: {machine()}; load average before/after {load_before[0]:.1f} / "
        f"{load_after[0]:.1f} (shared machine: other jobs ran at the same time)",
        f"- {n_tiles} tiles of {args.tile} px, overlap {default_overlap(args.tile)} px, "
        f"max stitching; patchcore {params}, fitted on {len(good)} tiles of one good "
        "1024 px surface",
        "- target: < 5 s per 4096x4096 image on 2 cores",
        "",
        "| runtime | best s / image | median s / image | CPU s / image (best) "
        "| peak to defect (px) | defect found |",
        "|---|---|---|---|---|---|",
    ]
    for name, best, med, cpu_s, off, found in rows:
        lines.append(
            f"| {name} | {best:.2f} | {med:.2f} | {cpu_s:.2f} | {off:.0f} | "
            f"{'yes' if found else 'no'} |"
        )
    publish("tiling", lines, record_it=not args.no_record)


if __name__ == "__main__":
    main()

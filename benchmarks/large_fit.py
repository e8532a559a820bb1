"""Large training set: fit PatchCore through the CLI on N generated good images
(default 10,000) and report fit time and peak RSS.

    python benchmarks/large_fit.py [--n 10000] [--crop 160] [--ext png|jpg]
        [--image-memory GIB] [-p image_size=256] [--no-record]

Images are magnetic-tile train/good images under the 8 flips/rotations, each
cropped at a seeded random place to ``--crop`` px (written to a temporary
folder; a source smaller than the crop is edge-padded, or with ``--upscale``
enlarged to it). Above ``max_fit_patches`` (default 1,000,000) patches in all,
PatchCore fits its coreset on a seeded random sample of every image's patches,
so the patch pool stays at about 1M x 170 floats (0.7 GB) whatever N is. The
decoded images are held by ``fit`` up to ``--image-memory`` GiB (default 1);
above that they are read from their files whenever needed. Each crop size is
recorded in its own BENCHMARKS.md section.

    python benchmarks/large_fit.py --n 3000 --crop 1024 --upscale --ext jpg
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _record import SHARED_DATA, git_commit, machine, publish, run_cli


def generate(
    src: Path,
    out: Path,
    n: int,
    crop: int,
    seed: int = 0,
    *,
    ext: str = "png",
    upscale: bool = False,
) -> None:
    """``n`` crops of the good images under the 8 dihedral transforms."""
    import cv2

    from defectkit.data import load_image
    from defectkit.data.images import save_png

    files = sorted((src / "train" / "good").iterdir())
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    cache: dict[int, np.ndarray] = {}
    for k in range(n):
        i = k % len(files)
        if i not in cache:
            cache[i] = load_image(files[i])
        img = cache[i]
        t = (k // len(files)) % 8
        img = np.rot90(img, t % 4)
        if t >= 4:
            img = img[:, ::-1]
        h, w = img.shape[:2]
        if upscale and min(h, w) < crop:  # enlarge so the shorter side is the crop
            f = crop / min(h, w)
            img = cv2.resize(img, (max(crop, round(w * f)), max(crop, round(h * f))))
        elif h < crop or w < crop:  # small images: pad by repetition of edge pixels
            img = np.pad(img, ((0, max(0, crop - h)), (0, max(0, crop - w)), (0, 0)), "edge")
        h, w = img.shape[:2]
        y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
        tile = np.ascontiguousarray(img[y : y + crop, x : x + crop])
        if ext == "png":
            save_png(out / f"{k:05d}.png", tile)
        else:  # the sources are JPEG files too
            cv2.imwrite(str(out / f"{k:05d}.jpg"), tile[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=10_000, help="training images")
    ap.add_argument("--crop", type=int, default=160, help="side of each generated image, px")
    ap.add_argument("--ext", choices=("png", "jpg"), default="png", help="file format")
    ap.add_argument("--upscale", action="store_true", help="enlarge sources smaller than a crop")
    ap.add_argument("--image-memory", type=float, default=None, help="fit --image-memory GiB")
    ap.add_argument("--param", "-p", action="append", default=[], help="PatchCore NAME=VALUE")
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "magnetic-tile")
    ap.add_argument("--no-record", action="store_true", help="print only")
    args = ap.parse_args()
    if not (args.data / "train" / "good").is_dir():
        raise SystemExit(f"dataset not found: {args.data} (needs ../shared/data/magnetic-tile)")

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "good"
        t0 = time.perf_counter()
        generate(args.data, images, args.n, args.crop, ext=args.ext, upscale=args.upscale)
        gen_s = time.perf_counter() - t0
        print(f"generated {args.n} images of {args.crop}x{args.crop} in {gen_s:.0f} s", flush=True)
        model = Path(tmp) / "model.dkm"
        fit_args = ["fit", str(images), "--method", "patchcore", "--out", str(model), "-q"]
        for p in args.param:
            fit_args += ["--param", p]
        if args.image_memory is not None:
            fit_args += ["--image-memory", str(args.image_memory)]
        fit = run_cli(fit_args)
        if fit.returncode != 0:
            raise SystemExit("fit failed")
        info = json.loads(run_cli(["info", str(model)]).stdout)
        from defectkit.detector import Detector

        pc = Detector.load(model).model
        on_grids, in_pool = pc.fit_patches_
        bank = pc.memory_bank_.shape
        model_mb = model.stat().st_size / 1024**2

    prov = info.get("provenance", info)
    n_fit = prov.get("n_fit_images", "?")
    n_cal = prov.get("n_calibration_images", "?")
    fit_only = prov.get("fit_seconds", float("nan"))
    exact_gb = on_grids * bank[1] * 4 / 1024**3
    settings = ", ".join(args.param) or "defaults"
    decoded_gb = args.n * args.crop**2 * 3 / 1024**3
    budget = 1.0 if args.image_memory is None else args.image_memory
    held = "held in memory" if decoded_gb <= budget else "read from their files when needed"
    lines = [
        f"Machine: {machine()} (shared with other jobs: timings are indicative). "
        f"Commit {git_commit()}.",
        "",
        f"`defectkit fit` (PatchCore, {settings}) on {args.n:,} generated good images "
        f"({args.crop}x{args.crop} crops of magnetic-tile train/good under the 8 "
        f"flips/rotations{', upscaled where smaller' if args.upscale else ''}; "
        f"{args.ext.upper()}): {n_fit} fit + {n_cal} calibration images.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| wall time (load, fit, calibrate, save) | {fit.seconds:.0f} s |",
        f"| PatchCore fit alone | {fit_only:.0f} s |",
        f"| peak RSS | {fit.peak_rss_gb:.2f} GB |",
        f"| patches on the grids | {on_grids:,} |",
        f"| patches in the coreset pool | {in_pool:,} |",
        f"| memory bank | {bank[0]:,} x {bank[1]} |",
        f"| pool if every patch were kept | {exact_gb:.1f} GB |",
        f"| decoded images | {decoded_gb:.1f} GB: {held} (--image-memory {budget:g} GiB) |",
        f"| model file | {model_mb:.1f} MB |",
    ]
    title = [f"## Large training set (PatchCore, {args.n:,} images of {args.crop} px)", ""]
    section = "large-fit" if args.crop == 160 else f"large-fit-{args.crop}px"
    publish(section, title + lines, record_it=not args.no_record)


if __name__ == "__main__":
    main()

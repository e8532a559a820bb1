"""Batch inspection on Ray: throughput of ``defectkit inspect --engine ray`` with 1
and 2 workers on the magnetic-tile test images, next to the local engine.

    python benchmarks/ray_inspect.py [--fit-images 150] [--no-record]

The model is PatchCore with default settings fitted on the first
``--fit-images`` train/good images (scoring cost per image is that of the full
model: the network dominates). Two figures per configuration: end to end
through the CLI (process start, Ray start, actor start and model loads, reading,
scoring, JSON out), and scoring alone on an already running Ray (actors
started and models loaded included, cluster start not).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _record import SHARED_DATA, git_commit, machine, record, run_cli


def in_process(model: Path, test: Path, workers_list: list[int]) -> dict[int, float]:
    """Seconds to score the test set on a running local Ray, per worker count
    (actor start and model loads included)."""
    import ray

    from defectkit.data.datasets import list_images
    from defectkit.scale.ray_engine import inspect_paths

    paths, _ = list_images(test)
    seconds: dict[int, float] = {}
    ray.init(num_cpus=max(workers_list), include_dashboard=False, log_to_driver=False)
    try:
        for w in workers_list:
            t0 = time.perf_counter()
            n = sum(t.num_rows for t in inspect_paths(model, paths, workers=w, batch_size=8))
            seconds[w] = time.perf_counter() - t0
            assert n == len(paths)
    finally:
        ray.shutdown()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "magnetic-tile")
    ap.add_argument("--fit-images", type=int, default=150)
    ap.add_argument("--limit", type=int, default=0, help="every k-th test image, about N (0: all)")
    ap.add_argument("--no-record", action="store_true", help="print only")
    args = ap.parse_args()
    test = args.data / "test"
    if not test.is_dir():
        raise SystemExit(f"dataset not found: {args.data} (needs ../shared/data/magnetic-tile)")
    files = sorted(p for p in test.rglob("*") if p.is_file())
    n_all = len(files)
    if args.limit and args.limit < len(files):
        files = files[:: -(-len(files) // args.limit)]
    n_test = len(files)

    with tempfile.TemporaryDirectory() as tmp:
        test = Path(tmp) / "test"  # links to the chosen images, in their type folders
        for f in files:
            (test / f.parent.name).mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), test / f.parent.name / f.name)
        good = Path(tmp) / "good"
        good.mkdir()
        for f in sorted((args.data / "train" / "good").iterdir())[: args.fit_images]:
            os.symlink(f.resolve(), good / f.name)
        model = Path(tmp) / "model.dkm"
        run_cli(["fit", str(good), "--out", str(model), "-q"])
        rows = []
        local = run_cli(["inspect", str(model), str(test), "-q"])
        rows.append(("local engine (torch threads: all cores)", local, None))
        for w in (1, 2):
            run = run_cli(
                ["inspect", str(model), str(test), "-q", "--engine", "ray", "--workers", str(w)]
            )
            rows.append((f"ray, {w} worker(s) x 1 CPU", run, w))
        for _, run, _ in rows:
            lines = [json.loads(x) for x in run.stdout.splitlines()]
            assert len(lines) == n_test and all(r["error"] is None for r in lines)
        warm = in_process(model, test, [1, 2])

    table = [
        "| engine | end to end (CLI) | images/s | peak RSS | on a running Ray | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, run, w in rows:
        warm_cells = "| |" if w is None else f"{warm[w]:.0f} s | {n_test / warm[w]:.1f} |"
        table.append(
            f"| {name} | {run.seconds:.0f} s | {n_test / run.seconds:.1f} | "
            f"{run.peak_rss_gb:.2f} GB | {warm_cells}"
        )
    text = "\n".join(
        [
            f"Machine: {machine()}; shared with other jobs and loaded while this ran, so the "
            f"figures are indicative only (with 2 cores, 2 workers cannot double 1). "
            f"Commit {git_commit()}.",
            "",
            f"{n_test} magnetic-tile test images (of {n_all}); PatchCore (defaults) fitted on "
            f"{args.fit_images} train/good images. Peak RSS: the largest process the CLI "
            "waited for (Ray's workers are not among them).",
            "",
            *table,
        ]
    )
    print(text)
    if not args.no_record:
        record("ray-inspect", "## Batch inspection on Ray\n\n" + text)


if __name__ == "__main__":
    main()

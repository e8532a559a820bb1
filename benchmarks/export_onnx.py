"""ONNX bundle vs PyTorch: inspect throughput and image AUROC on magnetic-tile.

    python benchmarks/export_onnx.py [--model tile.dkm] [--method patchcore] [--no-record]

Without --model it fits ``--method`` with its default settings
(``defectkit fit DATA --method M``), then ``defectkit export``s it. Figures:

- model time: both detectors (PyTorch, and the bundle in onnxruntime) in one
  process score the test set in batches of 16, alternating batch by batch so
  that a shared machine's changing load hits both alike; wall and process CPU
  seconds per image, images already in memory;
- end to end: ``defectkit inspect MODEL test/ -q`` wall time (process start,
  model load, image reading, scoring, JSON lines), once per runtime;
- image AUROC of each runtime's scores, and whether every OK/NG decision agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _record import git_commit, machine, model_arguments, model_for, publish, run_cli

from defectkit.data.batches import load_all
from defectkit.data.datasets import read_mvtec
from defectkit.detector import Detector
from defectkit.export.runtime import load_onnx_detector
from defectkit.metrics import image_auroc


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model_arguments(ap)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"dataset not found: {args.data} (needs ../shared/data/magnetic-tile)")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model, fit_note = model_for(args, tmp)
        bundle = Path(tmp) / "bundle"
        exp = run_cli(["export", str(model), "--format", "onnx", "--out", str(bundle)])
        size_mb = sum(p.stat().st_size for p in bundle.iterdir()) / 1e6

        ds = read_mvtec(args.data)
        images, _, errors = load_all([s.path for s in ds.test])
        if errors:
            raise SystemExit(f"unreadable test images: {errors[:3]}")
        labels = np.array([s.label for s in ds.test])
        dets = {"torch": Detector.load(model), "onnx": load_onnx_detector(bundle)}
        for det in dets.values():  # warm-up: lazy backbone load, index build
            det.score(images[:2])
        wall = dict.fromkeys(dets, 0.0)
        cpu = dict.fromkeys(dets, 0.0)
        scores: dict[str, list[np.ndarray]] = {k: [] for k in dets}
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            for name, det in dets.items():
                t0, c0 = time.perf_counter(), time.process_time()
                scores[name].append(det.score(chunk).scores)
                wall[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
        all_scores = {k: np.concatenate(v) for k, v in scores.items()}
        rel = float(
            np.max(np.abs(all_scores["onnx"] - all_scores["torch"]) / np.abs(all_scores["torch"]))
        )
        agree = bool(
            np.array_equal(
                dets["torch"].decide(all_scores["torch"]), dets["onnx"].decide(all_scores["onnx"])
            )
        )
        test_dir = str(args.data / "test")
        e2e = {
            "torch": run_cli(["inspect", str(model), test_dir, "-q"], stdout_to_devnull=True),
            "onnx": run_cli(
                ["inspect", str(bundle), test_dir, "-q", "--runtime", "onnx"],
                stdout_to_devnull=True,
            ),
        }
        params = json.dumps(dets["torch"].model.get_params())
    load_after = os.getloadavg()

    n = len(images)
    lines = [
        f"## Export: ONNX bundle vs PyTorch, `{args.method}` on magnetic-tile",
        "",
        f"- command: `python benchmarks/export_onnx.py --method {args.method}` (commit "
        f"{git_commit()}); model {fit_note}",
        f"- settings: {params}",
        f"- machine: {machine()}; load average before/after {load_before[0]:.1f} / "
        f"{load_after[0]:.1f} (a shared machine: other jobs ran at the same time, so wall "
        "times are inflated; CPU seconds are the steadier measure)",
        f"- export: {exp.seconds:.1f} s, bundle {size_mb:.1f} MB; {n} test images; max relative "
        f"score difference {rel:.1e}; OK/NG decisions {'all equal' if agree else 'DIFFER'}",
        "",
        "| runtime | model wall ms / image | model CPU ms / image | inspect wall s "
        "(end to end) | images / s (end to end) | image AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for name in dets:
        lines.append(
            f"| {name} | {1000 * wall[name] / n:.0f} | {1000 * cpu[name] / n:.0f} | "
            f"{e2e[name].seconds:.1f} | {n / e2e[name].seconds:.1f} | "
            f"{image_auroc(labels, all_scores[name]):.4f} |"
        )
    lines.append("")
    lines.append(
        f"- speed-up onnx / torch: model wall {wall['torch'] / wall['onnx']:.2f}x, model CPU "
        f"{cpu['torch'] / cpu['onnx']:.2f}x, end to end "
        f"{e2e['torch'].seconds / e2e['onnx'].seconds:.2f}x (target: >= 2x)"
    )
    publish(f"export-onnx-{args.method}", lines, record_it=not args.no_record)


if __name__ == "__main__":
    main()

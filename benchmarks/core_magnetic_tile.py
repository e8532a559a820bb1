"""Core benchmark: fit and evaluate the default method on magnetic-tile through
the CLI, and measure end-to-end inspect throughput.

    python benchmarks/core_magnetic_tile.py [--method patchcore] [--no-record]

Prints accuracy (image AUROC, pixel AUROC, AUPRO, ...), fit time and peak RSS,
inspect images/s over the whole test set (process start, model load, decoding,
scoring and JSON output included), and records them in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _record import SHARED_DATA, git_commit, machine, publish, run_cli

TARGETS = {"image_auroc": 0.96, "pixel_auroc": 0.90, "aupro": 0.80}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--method", default=None)
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "magnetic-tile")
    ap.add_argument(
        "--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone"
    )
    ap.add_argument("--param", "-p", action="append", default=[])
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"dataset not found: {args.data} (needs ../shared/data/magnetic-tile)")

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.dkm"
        fit_args = ["fit", str(args.data), "--out", str(model), "-q"]
        if args.method:
            fit_args += ["--method", args.method]
        for p in args.param:
            fit_args += ["--param", p]
        fit = run_cli(fit_args)
        ev = run_cli(["evaluate", str(model), str(args.data), "--format", "json", "-q"])
        metrics = json.loads(ev.stdout)
        n_test = metrics["n_good"] + metrics["n_defect"]
        insp = run_cli(
            ["inspect", str(model), str(args.data / "test"), "-q"], stdout_to_devnull=True
        )
        info = json.loads(run_cli(["info", str(model)]).stdout)
        model_mb = model.stat().st_size / 1024**2

    method = info["method"]
    rows = [
        ("image AUROC", f"{metrics['image_auroc']:.4f}", ">= 0.96"),
        ("pixel AUROC", f"{metrics['pixel_auroc']:.4f}", ">= 0.90"),
        ("AUPRO (30% FPR)", f"{metrics['aupro']:.4f}", ">= 0.80"),
        ("image AP", f"{metrics['image_ap']:.4f}", ""),
        ("image F1-max", f"{metrics['image_f1_max']:.4f}", ""),
        ("fit wall time (CLI, incl. decoding + calibration)", f"{fit.seconds:.1f} s", "<= 90 s"),
        ("fit peak RSS", f"{fit.peak_rss_gb:.2f} GB", "<= 3 GB"),
        ("inspect throughput (CLI end to end)", f"{n_test / insp.seconds:.1f} images/s", ">= 25"),
        ("evaluate wall time", f"{ev.seconds:.1f} s", ""),
        ("model file size", f"{model_mb:.1f} MiB", ""),
    ]
    thr = info.get("threshold") or {}
    recall = metrics.get("recall_per_type") or {}
    cmd_extra = f" --method {args.method}" if args.method else ""
    cmd_extra += "".join(f" -p {p}" for p in args.param)
    body = [
        f"## Core: `{method}` on magnetic-tile",
        "",
        f"- command: `python benchmarks/core_magnetic_tile.py{cmd_extra}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}",
        f"- machine: {machine()}",
        f"- settings: {json.dumps(info['params'])}",
        f"- split: train/good {info.get('n_fit_images')} fit + "
        f"{info.get('n_calibration_images')} held out for the threshold; "
        f"test {metrics['n_good']} good + {metrics['n_defect']} defective",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Recall per type at the calibrated threshold {thr.get('value', float('nan')):.4g} "
        f"(target false-alarm rate {thr.get('target')}): "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(recall.items())),
    ]
    publish(f"core-{method}", body, record_it=not args.no_record)


if __name__ == "__main__":
    main()

"""Decide-and-explain benchmark on magnetic-tile: the threshold calibrated for a
1% false-alarm rate on held-out *train* good images only, measured on the test
set, plus region-level results and the time of `defectkit report`.

    python benchmarks/decide_magnetic_tile.py [--model tile.dkm] [--no-record]

Without --model it first fits the default method (`defectkit fit DATA`). The
report command scores every test image once and prints its figures as JSON;
this script reads them, prints a table and records it in BENCHMARKS.md. Nothing
here is tuned on the test set.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _record import SHARED_DATA, git_commit, machine, publish, run_cli


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=None, help="reuse this model file")
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "magnetic-tile")
    ap.add_argument("--report", type=Path, default=None, help="keep the HTML report here")
    ap.add_argument("--no-record", action="store_true", help="print only")
    ap.add_argument("--note", default="", help="a line to record with the figures")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"dataset not found: {args.data} (needs ../shared/data/magnetic-tile)")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        fit_note = f"reused `{model}`"
        if model is None:
            model = Path(tmp) / "model.dkm"
            fit = run_cli(["fit", str(args.data), "--out", str(model), "-q"])
            fit_note = f"fitted here in {fit.seconds:.1f} s"
        html = args.report or Path(tmp) / "report.html"
        rep = run_cli(
            ["report", str(model), str(args.data), "--out", str(html), "--format", "json", "-q"]
        )
        s = json.loads(rep.stdout)
        info = json.loads(run_cli(["info", str(model)]).stdout)
        html_mb = html.stat().st_size / 1024**2

    cal = s["calibration"] or {}
    thr = info.get("threshold") or {}
    pthr = info.get("pixel_threshold") or {}
    reported = s["regions"]["reported"]
    alone = s["regions"]["pixel_threshold_only"]
    c = s["confusion"]
    rows = [
        (
            "false-alarm rate on test/good at the 1% threshold",
            f"{pct(s['false_alarm_rate'])} ({c['fp']}/{s['n_good']})",
            "<= 3%",
        ),
        (
            "calibrated 95% upper bound (Clopper-Pearson)",
            f"{pct(s['false_alarm_upper_calibrated'])} (from {cal.get('n_good')} held-out "
            "train good images)",
            "",
        ),
        ("bound covers the measured rate", "yes" if s["bound_covers"] else "no", "yes"),
        (
            "recall, all defective test images",
            f"{pct(s['recall'])} ({c['tp']}/{s['n_defect']})",
            ">= 80%",
        ),
        *(
            (
                f"recall {t}",
                f"{pct(r)} ({s['counts_per_type'][t][0]}/{s['counts_per_type'][t][1]})",
                "",
            )
            for t, r in s["recall_per_type"].items()
        ),
        (
            "region recall, as inspect reports (NG images only; IoU > 0.1)",
            f"{pct(reported['recall'])} ({reported['defective']['n_found']}/"
            f"{reported['defective']['n_truth']} ground-truth regions)",
            ">= 80%",
        ),
        (
            "false regions per good image, as inspect reports",
            f"{reported['false_regions_per_good_image']:.3f}",
            "<= 0.5",
        ),
        (
            "region recall, pixel threshold alone (every image)",
            f"{pct(alone['recall'])} ({alone['defective']['n_found']}/"
            f"{alone['defective']['n_truth']})",
            "",
        ),
        (
            "false regions per good image, pixel threshold alone",
            f"{alone['false_regions_per_good_image']:.3f}",
            "",
        ),
        ("image AUROC", f"{s['image_auroc']:.4f}", ""),
        (
            "`report` wall time (CLI end to end: start, model load, scoring, report)",
            f"{rep.seconds:.1f} s",
            "<= 60 s",
        ),
        ("  of which scoring 582 images", f"{s['seconds']['scoring']:.1f} s", ""),
        ("  of which analysis, plots, galleries", f"{s['seconds']['report']:.1f} s", ""),
        ("report peak RSS / HTML size", f"{rep.peak_rss_gb:.2f} GB / {html_mb:.2f} MiB", ""),
    ]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load = ", ".join(f"{x:.1f}" for x in load_before)
    body = [
        f"## Decide and explain: `{info['method']}` on magnetic-tile",
        "",
        "- command: `python benchmarks/decide_magnetic_tile.py"
        + (f" --model {args.model}`" if args.model else "`")
        + f" (model: {fit_note}, default settings: `defectkit fit {args.data.name} --out ...`)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}",
        f"- machine: {machine()}; OMP_NUM_THREADS={threads}; load average before the run "
        f"{load} (shared machine)",
        f"- image threshold {thr.get('value', float('nan')):.4g} (rule {thr.get('rule')}, target "
        f"{thr.get('target')}); pixel threshold {pthr.get('value', float('nan')):.4g} (<= "
        f"{pthr.get('target')} regions of >= {pthr.get('min_area_px')} px per held-out good "
        f"image, measured {pthr.get('false_regions_per_image', float('nan')):.3g}); "
        f"regions cut at {s['pixel_threshold']:.4g}",
        f"- test set: {s['n_good']} good + {s['n_defect']} defective images",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        "| figure | value | target |",
        "|---|---|---|",
        *[f"| {a} | {b} | {t} |" for a, b, t in rows],
    ]
    publish(f"decide-{info['method']}", body, record_it=not args.no_record)


if __name__ == "__main__":
    main()

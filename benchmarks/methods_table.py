"""One table over every registered method: fit, evaluate and inspect through the
CLI on magnetic-tile and on the synthetic demo data.

    python benchmarks/methods_table.py [--methods padim,kmeans] [--no-record]

For each method and dataset: ``defectkit fit`` (default settings), ``evaluate``
(image AUROC, pixel AUROC, AUPRO) and ``inspect`` over the test images
(images/s end to end: process start, model load, decoding, scoring, JSON out),
the model file's size and the largest peak RSS of the three commands. The demo
data (``generate_demo``, seed 0, three surfaces) is written to a temporary
folder; its row is the mean over the three surfaces.

Results are kept per (dataset, method) in ``benchmarks/methods_table.json`` so
a run over a subset of methods updates its rows and keeps the others; the whole
table is then written into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _record import REPO, SHARED_DATA, git_commit, machine, record, run_cli

RESULTS = REPO / "benchmarks" / "methods_table.json"
SECTION = "methods-table"


def measure(method: str, data: Path, work: Path) -> dict:
    """Fit, evaluate and inspect one method on one MVTec-layout dataset."""
    model = work / f"{method}.dkm"
    fit = run_cli(["fit", str(data), "--method", method, "--out", str(model), "-q"])
    ev = run_cli(["evaluate", str(model), str(data), "--format", "json", "-q"])
    metrics = json.loads(ev.stdout)
    n_test = metrics["n_good"] + metrics["n_defect"]
    insp = run_cli(["inspect", str(model), str(data / "test"), "-q"], stdout_to_devnull=True)
    row = {
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics.get("pixel_auroc"),
        "aupro": metrics.get("aupro"),
        "fit_s": fit.seconds,
        "inspect_ips": n_test / insp.seconds,
        "model_mib": model.stat().st_size / 1024**2,
        "peak_rss_gb": max(fit.peak_rss_gb, ev.peak_rss_gb, insp.peak_rss_gb),
        "measured": f"{time.strftime('%Y-%m-%d')} {git_commit()}",
    }
    model.unlink()
    return row


def _mean(rows: list[dict]) -> dict:
    out: dict = {"measured": rows[0]["measured"]}
    for key in rows[0]:
        if key == "measured":
            continue
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(results: dict) -> str:
    head = (
        "| method | image AUROC | pixel AUROC | AUPRO | fit s | inspect img/s | "
        "model MiB | peak RSS GB | measured (date, commit) |"
    )
    lines = []
    for dataset, title in (
        ("magnetic-tile", "magnetic-tile (train/good: 686 fit + 76 threshold; test 582)"),
        ("demo", "synthetic demo (mean of brushed_metal, fabric, stone; 160 px)"),
    ):
        rows = results.get(dataset, {})
        if not rows:
            continue
        lines += [f"### {title}", "", head, "|---|---|---|---|---|---|---|---|---|"]
        for method in sorted(rows):
            r = rows[method]
            lines.append(
                f"| {method} | {_fmt(r['image_auroc'], '.3f')} | {_fmt(r['pixel_auroc'], '.3f')} "
                f"| {_fmt(r['aupro'], '.3f')} | {_fmt(r['fit_s'], '.1f')} "
                f"| {_fmt(r['inspect_ips'], '.1f')} | {_fmt(r['model_mib'], '.2f')} "
                f"| {_fmt(r['peak_rss_gb'], '.2f')} | {r.get('measured', 'n/a')} |"
            )
        if dataset == "demo":
            lines += [
                "",
                "Image AUROC per surface (brushed_metal / fabric / stone): "
                + "; ".join(
                    f"{m} {' / '.join(format(v, '.3f') for v in rows[m]['per_surface'])}"
                    for m in sorted(rows)
                    if rows[m].get("per_surface")
                ),
            ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", default=None, help="comma-separated; default: all registered")
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "magnetic-tile")
    ap.add_argument("--skip-real", action="store_true", help="demo data only")
    ap.add_argument("--no-record", action="store_true", help="print only")
    ap.add_argument(
        "--render-only", action="store_true", help="rewrite the table from the stored rows"
    )
    args = ap.parse_args()

    from defectkit.data.synthetic import generate_demo
    from defectkit.methods import available_methods

    methods = sorted(available_methods()) if args.methods is None else args.methods.split(",")
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {sorted(available_methods())}")
    if not args.skip_real and not args.data.is_dir():
        raise SystemExit(f"dataset not found: {args.data} (or pass --skip-real)")

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.render_only:
        methods = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = generate_demo(work / "demo", seed=0) if methods else {}
        for method in methods:
            t0 = time.perf_counter()
            if not args.skip_real:
                row = measure(method, args.data, work)
                results.setdefault("magnetic-tile", {})[method] = row
                print(f"{method} magnetic-tile: {json.dumps(row)}", flush=True)
            per = [measure(method, path, work) for _, path in sorted(demo.items())]
            row = _mean(per)
            row["per_surface"] = [r["image_auroc"] for r in per]
            results.setdefault("demo", {})[method] = row
            print(f"{method} demo: {json.dumps(row)}", flush=True)
            print(f"{method}: {time.perf_counter() - t0:.0f} s", flush=True)
            if not args.no_record:
                # re-read first: a concurrent run over other methods may have saved rows
                saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
                for dataset, rows in results.items():
                    if dataset in ("magnetic-tile", "demo"):
                        saved.setdefault(dataset, {}).update(
                            {m: rows[m] for m in (method,) if m in rows}
                        )
                results = saved
                RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")

    body = "\n".join(
        [
            "## Methods table: every method, default settings, through the CLI",
            "",
            "- command: `python benchmarks/methods_table.py` (rows of a `--methods` run "
            "are merged into `benchmarks/methods_table.json`)",
            f"- last run: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}; "
            f"methods {', '.join(methods) or '(table re-rendered only)'}; each row says "
            "when and at which commit it was measured",
            f"- machine: {machine()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
            "- fit s: `defectkit fit` wall time (decoding, fitting, threshold calibration); "
            "inspect img/s: `defectkit inspect` over the test folder, end to end; "
            "peak RSS: largest of fit, evaluate and inspect",
            "",
            table(results),
        ]
    )
    print(body)
    if not args.no_record:
        record(SECTION, body)


if __name__ == "__main__":
    main()

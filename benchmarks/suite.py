"""The development suite: fit, evaluate and inspect through the CLI on every
anomaly set in ../shared/data, with the defaults or with given settings.

    python benchmarks/suite.py                                # defaults, every set
    python benchmarks/suite.py --method padim                 # another method
    python benchmarks/suite.py -p keep_aspect=true --label aspect   # an ablation row
    python benchmarks/suite.py --sets aitex,casting --no-record

For each set: ``defectkit fit SET`` (train/good, 10% held out for the
threshold at the 1% false-alarm target), ``defectkit evaluate`` (image AUROC,
pixel AUROC and AUPRO where the set has masks) and ``defectkit inspect`` over
test/ (end to end images/s; its decisions give the false-alarm rate on
test/good and the recall on the defective images at the calibrated threshold).
Also: fit wall time, the largest peak RSS of the three commands, the number of
held-out images that set the threshold and the 95% bound it states.

Rows are kept per variant (``--label``, else the method and settings) in
``benchmarks/suite_results.json``, so a run of one variant keeps the others;
the methods-by-sets table in BENCHMARKS.md is rendered from all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _record import REPO, SHARED_DATA, git_commit, machine, publish, record, run_cli

from defectkit.decide.calibration import threshold_for_false_alarm_rate

RESULTS = REPO / "benchmarks" / "suite_results.json"
SECTION = "suite-table"
#: the anomaly sets of the suite, in the order of the table
SETS = ("magnetic-tile", "mvtec-bottle", "visa-fryum", "aitex", "casting")
TARGET_FAR = 0.01


def _scores(lines: str) -> tuple[list[float], list[float], list[bool], list[bool]]:
    """Scores of test/good images and of the defective ones, and their is_defect
    decisions, from inspect's JSON lines; the class is the image's parent folder."""
    good, bad, good_ng, bad_ng = [], [], [], []
    for line in lines.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("error"):
            raise SystemExit(f"inspect failed on {rec['path']}: {rec['error']}")
        is_good = Path(rec["path"]).parent.name == "good"
        (good if is_good else bad).append(float(rec["score"]))
        (good_ng if is_good else bad_ng).append(bool(rec["is_defect"]))
    return good, bad, good_ng, bad_ng


def measure(data: Path, fit_args: list[str], work: Path) -> dict:
    """One set: fit, evaluate and inspect; the row of figures."""
    model = work / f"{data.name}.dkm"
    fit = run_cli(["fit", str(data), "--out", str(model), "-q", *fit_args])
    ev = run_cli(["evaluate", str(model), str(data), "--format", "json", "-q"])
    metrics = json.loads(ev.stdout)
    insp = run_cli(["inspect", str(model), str(data / "test"), "-q"])
    good_s, bad_s, good, bad = _scores(insp.stdout)
    info = json.loads(run_cli(["info", str(model), "--full"]).stdout)
    thr = info.get("threshold") or {}
    # the same held-out scores under the rule without a tail (their largest score
    # below the conformal rank), to compare the two on the same fit
    cal = info.get("calibration_scores") or []
    plain = threshold_for_false_alarm_rate(cal, TARGET_FAR, tail=False).value if cal else None
    row = {
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics.get("pixel_auroc"),
        "aupro": metrics.get("aupro"),
        "far_test_good": sum(good) / len(good),
        "recall": sum(bad) / len(bad),
        "far_test_good_no_tail": None
        if plain is None
        else sum(v >= plain for v in good_s) / len(good),
        "recall_no_tail": None if plain is None else sum(v >= plain for v in bad_s) / len(bad),
        "n_test_good": len(good),
        "n_calibration": thr.get("n_good"),
        "stated_far_bound": thr.get("false_alarm_upper"),
        "threshold_rule": thr.get("estimator") or thr.get("rule"),
        "fit_s": fit.seconds,
        "inspect_ips": (len(good) + len(bad)) / insp.seconds,
        "peak_rss_gb": max(fit.peak_rss_gb, ev.peak_rss_gb, insp.peak_rss_gb),
        "model_mib": model.stat().st_size / 1024**2,
        "params": info.get("params"),
        "measured": f"{time.strftime('%Y-%m-%d')} {git_commit()}",
        # kept so that another threshold rule can be judged on the same fit
        "scores": {"calibration": cal, "test_good": good_s, "test_defect": bad_s},
    }
    model.unlink()
    return row


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def summary(rows: dict[str, dict]) -> dict[str, float | None]:
    """Mean and worst over the sets of one variant (pixel figures: sets with masks)."""
    out: dict[str, float | None] = {}
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        vals = [r[key] for r in rows.values() if r.get(key) is not None]
        out[f"{key}_mean"] = statistics.fmean(vals) if vals else None
        out[f"{key}_worst"] = min(vals) if vals else None
    out["far_worst"] = max((r["far_test_good"] for r in rows.values()), default=None)
    return out


def table(results: dict) -> str:
    """Methods (and ablation variants) by sets."""
    sets = [s for s in SETS if any(s in entry["sets"] for entry in results.values())]
    head = (
        "| variant | "
        + " | ".join(f"{s} img / pix / PRO" for s in sets)
        + " | mean img | worst img | mean pix | mean PRO |"
    )
    lines = [head, "|" + "---|" * (len(sets) + 5)]
    for variant in sorted(results, key=lambda v: (v != "default", v)):
        rows = results[variant]["sets"]
        cells = []
        for s in sets:
            r = rows.get(s)
            cells.append(
                ""
                if r is None
                else f"{_fmt(r['image_auroc'])} / {_fmt(r['pixel_auroc'])} / {_fmt(r['aupro'])}"
            )
        sm = summary(rows)
        complete = "" if set(rows) >= set(sets) else " (partial)"
        lines.append(
            f"| {variant}{complete} | "
            + " | ".join(cells)
            + f" | {_fmt(sm['image_auroc_mean'])} | {_fmt(sm['image_auroc_worst'])} "
            f"| {_fmt(sm['pixel_auroc_mean'])} | {_fmt(sm['aupro_mean'])} |"
        )
    lines += ["", "Settings of each variant (fit arguments) and when it was measured:", ""]
    for variant in sorted(results, key=lambda v: (v != "default", v)):
        v = results[variant]
        when = sorted({r["measured"] for r in v["sets"].values()})
        lines.append(f"- {variant}: `{' '.join(v['fit_args']) or '(defaults)'}`; {', '.join(when)}")
    return "\n".join(lines)


def detail(variant: str, entry: dict) -> list[str]:
    """Every figure of one variant, a row per set."""
    head = (
        "| set | image AUROC | pixel AUROC | AUPRO | FAR test/good (target 1%) | threshold "
        "rule | FAR, largest-score rule | stated bound (n held out) | recall at threshold "
        "| fit s | inspect img/s | peak RSS GB |"
    )
    lines = [head, "|" + "---|" * 12]
    for s in SETS:
        r = entry["sets"].get(s)
        if r is None:
            continue
        bound = r.get("stated_far_bound")
        lines.append(
            f"| {s} | {_fmt(r['image_auroc'])} | {_fmt(r['pixel_auroc'])} | {_fmt(r['aupro'])} "
            f"| {r['far_test_good']:.1%} of {r['n_test_good']} | {r.get('threshold_rule')} "
            f"| {_fmt(r.get('far_test_good_no_tail'), '.1%')} "
            f"| {'n/a' if bound is None else format(bound, '.1%')} ({r.get('n_calibration')}) "
            f"| {r['recall']:.1%} | {r['fit_s']:.1f} | {r['inspect_ips']:.1f} "
            f"| {r['peak_rss_gb']:.2f} |"
        )
    sm = summary(entry["sets"])
    lines += [
        "",
        f"Mean / worst: image AUROC {_fmt(sm['image_auroc_mean'])} / "
        f"{_fmt(sm['image_auroc_worst'])}; pixel AUROC {_fmt(sm['pixel_auroc_mean'])} / "
        f"{_fmt(sm['pixel_auroc_worst'])}; AUPRO {_fmt(sm['aupro_mean'])} / "
        f"{_fmt(sm['aupro_worst'])}; worst false-alarm rate on test/good "
        f"{_fmt(sm['far_worst'], '.1%')} (target {TARGET_FAR:.0%}).",
    ]
    return lines


def calibration_rules(results: dict) -> list[str]:
    """False alarms on test/good and recall of the threshold rules, re-applied to
    every stored row's held-out scores: the tail rule (the library's) against the
    largest score alone (the rule before it)."""
    rows = [
        (v, s, r["scores"])
        for v, entry in sorted(results.items())
        for s, r in entry["sets"].items()
        if (r.get("scores") or {}).get("calibration")
    ]
    lines = [
        f"Every variant's and method's fit with stored scores ({len(rows)} fits); target "
        f"{TARGET_FAR:.0%} false alarms.",
        "",
        "| rule | mean false-alarm rate on test/good | worst | fits above 3% | mean recall |",
        "|---|---|---|---|---|",
    ]
    for label, tail in (("log-normal tail (default)", True), ("largest held-out score", False)):
        far, rec = [], []
        for _, _, sc in rows:
            t = threshold_for_false_alarm_rate(sc["calibration"], TARGET_FAR, tail=tail).value
            far.append(statistics.fmean(v >= t for v in sc["test_good"]))
            rec.append(statistics.fmean(v >= t for v in sc["test_defect"]))
        if rows:
            lines.append(
                f"| {label} | {statistics.fmean(far):.2%} | {max(far):.1%} "
                f"| {sum(f > 0.03 for f in far)} | {statistics.fmean(rec):.1%} |"
            )
    return lines


def leave_one_out(results: dict, base: str, candidates: list[str]) -> list[str]:
    """For each set: the candidate (``base`` among them) that the other sets choose
    by the rule (highest mean image AUROC, none of them more than 0.01 below
    ``base``), and what it gives on the set left out."""
    sets = [s for s in SETS if s in results[base]["sets"]]
    rows = {
        v: results[v]["sets"]
        for v in [base, *candidates]
        if v in results and all(s in results[v]["sets"] for s in sets)
    }
    missing = [v for v in candidates if v not in rows]
    auc = {v: {s: r[s]["image_auroc"] for s in sets} for v, r in rows.items()}
    lines = [
        f"Candidates: {', '.join(rows)} (base `{base}`); image AUROC."
        + (f" Not measured on every set, left out: {', '.join(missing)}." if missing else ""),
        "",
        "| set left out | chosen on the other sets | its mean there | on the set left out "
        f"| `{base}` there |",
        "|---|---|---|---|---|",
    ]
    for out in sets:
        rest = [s for s in sets if s != out]
        allowed = [v for v in auc if all(auc[v][s] >= auc[base][s] - 0.01 for s in rest)]
        best = max(allowed, key=lambda v: statistics.fmean(auc[v][s] for s in rest))
        mean = statistics.fmean(auc[best][s] for s in rest)
        lines.append(
            f"| {out} | {best} | {mean:.3f} | {auc[best][out]:.3f} | {auc[base][out]:.3f} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--method", default=None, help="method to fit (default: the default)")
    ap.add_argument("--param", "-p", action="append", default=[], help="method setting")
    ap.add_argument("--fit-arg", action="append", default=[], help="extra `fit` argument")
    ap.add_argument("--sets", default=None, help=f"comma-separated; default: {','.join(SETS)}")
    ap.add_argument("--label", default=None, help="name of this variant in the table")
    ap.add_argument("--data", type=Path, default=SHARED_DATA, help="folder holding the sets")
    ap.add_argument("--no-record", action="store_true", help="print only")
    ap.add_argument("--render-only", action="store_true", help="rewrite the table only")
    ap.add_argument(
        "--loo",
        default=None,
        help="BASE,V1,V2...: record which variant each set's leave-one-out choice picks",
    )
    args = ap.parse_args()

    sets = SETS if args.sets is None else tuple(args.sets.split(","))
    missing = [s for s in sets if not (args.data / s / "train").is_dir()]
    if missing and not args.render_only:
        raise SystemExit(f"suite sets not found under {args.data}: {', '.join(missing)}")
    fit_args = [] if args.method is None else ["--method", args.method]
    for p in args.param:
        fit_args += ["-p", p]
    for a in args.fit_arg:
        fit_args += a.split()
    variant = args.label or (" ".join(fit_args) if fit_args else "default")

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    entry = {"fit_args": fit_args, "sets": {}}
    if not args.render_only:
        with tempfile.TemporaryDirectory() as tmp:
            for s in sets:
                t0 = time.perf_counter()
                row = measure(args.data / s, fit_args, Path(tmp))
                entry["sets"][s] = row
                print(
                    f"{variant} {s} ({time.perf_counter() - t0:.0f} s): {json.dumps(row)}",
                    flush=True,
                )
                if not args.no_record:
                    # re-read first: another variant's run may have saved rows meanwhile
                    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
                    old = saved.get(variant, {"sets": {}})
                    if old.get("fit_args") != fit_args:
                        old = {"sets": {}}
                    saved[variant] = {"fit_args": fit_args, "sets": {**old["sets"], s: row}}
                    RESULTS.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
                    results = saved
        lines = [
            f"## Suite: `{variant}`",
            "",
            f"- command: `python benchmarks/suite.py{_command(args)}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}",
            f"- machine: {machine()}",
            "- each set: `defectkit fit SET` (train/good; 10% held out for the threshold), "
            "`evaluate`, `inspect SET/test` (images/s end to end; false alarms and recall "
            "from its decisions at the calibrated threshold)",
            "",
            *detail(variant, entry),
        ]
        slug = "".join(c if c.isalnum() else "-" for c in variant).strip("-")
        publish(f"suite-{slug}", lines, record_it=not args.no_record)
    body = "\n".join(
        [
            "## Suite table: methods and settings by set (image AUROC / pixel AUROC / AUPRO)",
            "",
            "- command: `python benchmarks/suite.py [--method M] [-p NAME=VALUE] [--label L]` "
            "(rows kept in `benchmarks/suite_results.json`; each variant's full figures "
            "in its own `Suite:` section)",
            f"- rendered: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}",
            "- these are test-set figures; a setting chosen by them is optimistic on the set "
            "it was chosen on",
            "- a variant's settings are its fit arguments on top of the defaults of the "
            "commit it was measured at: the PatchCore ablations (aspect, auto, ctx128, "
            "noglobal, nophoto, nopos, pw10, pw30, sigma6, size320) were measured against "
            "position_weight=100, squashed to 256 px square, HNSW search; `exact` and "
            "`exact-auto` against position_weight 30, square, HNSW; `former` is that "
            "last default (`keep_aspect=false`, `nn_search=hnsw`) measured beside "
            "`default`, which learns its working aspect and checks its search; "
            "`default-minbank` is the default once PatchCore kept at least 2,048 bank "
            "patches (`min_bank`), measured on mvtec-bottle alone: the only set whose 1% "
            "coreset was smaller (1,925 patches)",
            "- each row's model keeps its full settings: `defectkit info` (the script records "
            "them as `params`)",
            "",
            table(results),
        ]
    )
    print(body)
    if not args.no_record:
        record(SECTION, body)
    lines = [
        "## Suite: threshold rules on the stored fits",
        "",
        "- command: `python benchmarks/suite.py --render-only` (from the rows of the suite table)",
        f"- rendered: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}",
        "",
        *calibration_rules(results),
    ]
    publish("suite-calibration", lines, record_it=not args.no_record)
    if args.loo:
        base, *candidates = args.loo.split(",")
        lines = [
            "## Suite: leave one set out",
            "",
            f"- command: `python benchmarks/suite.py --render-only --loo {args.loo}`",
            f"- rendered: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}; from "
            "the rows of the suite table",
            "",
            *leave_one_out(results, base, candidates),
        ]
        publish("suite-loo", lines, record_it=not args.no_record)


def _command(args: argparse.Namespace) -> str:
    out = "" if args.method is None else f" --method {args.method}"
    out += "".join(f" -p {p}" for p in args.param)
    out += "".join(f" --fit-arg '{a}'" for a in args.fit_arg)
    out += "" if args.sets is None else f" --sets {args.sets}"
    out += "" if args.label is None else f" --label {args.label}"
    return out


if __name__ == "__main__":
    main()

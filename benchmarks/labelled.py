"""Labelled-defect benchmark: defect-type classification and semi-supervised detection.

    python benchmarks/labelled.py [--only neu,types,semi] [--no-record] [--note TEXT]

1. NEU-DET (`../shared/data/neu-det`, its split.csv: 1440 train / 360 test):
   `defectkit fit neu-det --method classifier --manifest split.csv`, timed end to end,
   then `defectkit evaluate ... --manifest split.csv` (the 360 'test' rows).
2. magnetic-tile defect types (5 types of test/<type>): `defectkit fit magnetic-tile
   --method classifier` on the fixed stratified split (per type, sorted by file name:
   1st, 3rd, 5th, ... train; 2nd, 4th, ... test; `MVTEC_TYPE_SPLIT`), evaluated on
   the test half.
3. semi-supervised detection on magnetic-tile: 5 labelled defective images per type
   (the first 5 by file name of each type's 'train' half, 25 in all) are moved out
   of the test set into a `--defects` folder; the default unsupervised model and
   `fit ... --defects` are fitted on the same train/good and evaluated on the same
   remaining test set (190 good + 367 defective), with symlinks, not copies.
4. defect masks on magnetic-tile: the same 25 labelled images with their masks
   (`--defect-masks`), against the unsupervised model on the same remaining test set:
   pixel AUROC, AUPRO, image AUROC.

Every figure comes from the CLI's own JSON output; nothing is tuned on a test set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _record import SHARED_DATA, git_commit, machine, publish, run_cli

from defectkit.data.datasets import read_mvtec
from defectkit.data.labelled import MVTEC_TYPE_SPLIT, first_per_class, read_mvtec_types, select

N_LABELLED = 5
COMMAND = " ".join(["python benchmarks/labelled.py", *sys.argv[1:]])


def header(title: str, command: str, note: str) -> list[str]:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        f"## {title}",
        "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}",
        f"- machine: {machine()}; OMP_NUM_THREADS={threads}; load average at the start "
        f"{load} (shared machine)",
        *([f"- note: {note}"] if note else []),
    ]


def table(
    rows: list[tuple[str, str, str]], figure: str = "figure", target: str = "target"
) -> list[str]:
    return [f"| {figure} | value | {target} |", "|---|---|---|"] + [
        f"| {a} | {b} | {c} |" for a, b, c in rows
    ]


def confusion(report: dict) -> list[str]:
    cm = report["confusion_matrix"]
    lines = [
        "| true \\ predicted | " + " | ".join(cm["labels"]) + " |",
        "|---" * (len(cm["labels"]) + 1) + "|",
    ]
    for label, row in zip(cm["labels"], cm["matrix"], strict=True):
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def per_class(report: dict) -> str:
    return ", ".join(
        f"{c} {m['precision']:.3f} / {m['recall']:.3f}" for c, m in report["per_class"].items()
    )


def classifier_run(data: Path, model: Path, manifest: list[str]) -> tuple:
    fit = run_cli(
        ["fit", str(data), "--method", "classifier", *manifest, "--out", str(model), "-q"]
    )
    info = json.loads(run_cli(["info", str(model)]).stdout)
    ev = run_cli(["evaluate", str(model), str(data), *manifest, "--format", "json", "-q"])
    return fit, info, json.loads(ev.stdout), ev


def bench_neu(args: argparse.Namespace, tmp: Path) -> None:
    data = args.neu
    fit, info, r, ev = classifier_run(data, tmp / "neu.dkm", ["--manifest", "split.csv"])
    t = info["training"]
    rows = [
        ("test accuracy (360 images, 60 per class)", f"{r['accuracy']:.4f}", ">= 0.97"),
        ("test macro-F1", f"{r['macro_f1']:.4f}", ""),
        ("mean stated probability of the predicted class", f"{r['mean_confidence']:.4f}", ""),
        ("validation accuracy (216 held out of train)", f"{t['val_accuracy']:.4f}", ""),
        ("fit wall time (CLI end to end, 1440 images)", f"{fit.seconds:.1f} s", "<= 600 s"),
        ("fit peak RSS", f"{fit.peak_rss_gb:.2f} GB", ""),
        ("evaluate wall time (360 images)", f"{ev.seconds:.1f} s", ""),
        ("model file size", f"{(tmp / 'neu.dkm').stat().st_size / 1024:.0f} KiB", ""),
    ]
    body = [
        *header(
            "Labelled: defect types on NEU-DET (`classifier`)",
            COMMAND,
            args.note,
        ),
        f"- fit: `defectkit fit {data.name} --method classifier --manifest split.csv` "
        f"(defaults: {json.dumps(info['params'])})",
        f"- training: {t['n_train']} images + {t['n_augmented']} augmented copies, "
        f"{t['n_val']} validation; head stopped at epoch {t['head']['best_epoch']} of "
        f"{t['head']['epochs']}, then refit on train + validation; temperature "
        f"{t['temperature']:.3g}",
        "",
        *table(rows),
        "",
        f"Precision / recall per class: {per_class(r)}",
        "",
        *confusion(r),
    ]
    publish("labelled-neu", body, record_it=not args.no_record)


def bench_types(args: argparse.Namespace, tmp: Path) -> None:
    data = args.tile
    fit, info, r, _ev = classifier_run(data, tmp / "types.dkm", [])
    t = info["training"]
    rows = [
        ("test macro-F1 (194 images, fixed split)", f"{r['macro_f1']:.4f}", ">= 0.80"),
        ("test accuracy", f"{r['accuracy']:.4f}", ""),
        ("mean stated probability of the predicted class", f"{r['mean_confidence']:.4f}", ""),
        ("fit wall time (CLI end to end, 198 images)", f"{fit.seconds:.1f} s", ""),
    ]
    body = [
        *header(
            "Labelled: defect types on magnetic-tile (`classifier`)",
            COMMAND,
            args.note,
        ),
        f"- fit: `defectkit fit {data.name} --method classifier` (defaults), on the 5 "
        "defect types of test/<type>",
        f"- fixed split: {MVTEC_TYPE_SPLIT}; train {t['class_counts']}",
        f"- training: {t['n_train']} images + {t['n_augmented']} augmented copies, "
        f"{t['n_val']} validation; temperature {t['temperature']:.3g}",
        "",
        *table(rows),
        "",
        f"Precision / recall per class: {per_class(r)}",
        "",
        *confusion(r),
    ]
    publish("labelled-types", body, record_it=not args.no_record)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)


def _labelled_split(data: Path, tmp: Path) -> tuple[list, Path, Path, Path, dict[str, int]]:
    """(labelled items, REST: the MVTec set without them, DEFECTS: the labelled images,
    MASKS: their masks, images per type in REST), all as symlinks under ``tmp``."""
    ds = read_mvtec(data)
    labelled = first_per_class(select(read_mvtec_types(data), "train"), N_LABELLED)
    taken = {it.path for it in labelled}
    rest = tmp / "rest"
    _link(data / "train", rest / "train")
    _link(data / "ground_truth", rest / "ground_truth")
    n_per_type: dict[str, int] = {}
    for sample in ds.test:
        if sample.path not in taken:
            _link(sample.path, rest / "test" / sample.defect_type / sample.path.name)
            n_per_type[sample.defect_type] = n_per_type.get(sample.defect_type, 0) + 1
    defects, masks = tmp / "defects", tmp / "defect_masks"
    for it in labelled:
        _link(it.path, defects / it.class_name / it.path.name)
        mask = data / "ground_truth" / it.class_name / f"{it.path.stem}_mask.png"
        _link(mask, masks / it.class_name / mask.name)
    return labelled, rest, defects, masks, n_per_type


def _fit_and_evaluate(rest: Path, runs: dict[str, list[str]], tmp: Path) -> dict[str, tuple]:
    """Per run name: (fit's CLI result, evaluate's JSON, the model's info, evaluate's CLI
    result), for `defectkit fit REST` with each run's extra options."""
    results = {}
    for name, extra in runs.items():
        model = tmp / f"{name.replace(' ', '-')}.dkm"
        fit = run_cli(["fit", str(rest), "--out", str(model), "-q", *extra])
        ev = run_cli(["evaluate", str(model), str(rest), "--format", "json", "-q"])
        info = json.loads(run_cli(["info", str(model)]).stdout)
        results[name] = (fit, json.loads(ev.stdout), info, ev)
    return results


def bench_semi(args: argparse.Namespace, tmp: Path) -> None:
    labelled, rest, defects, _, n_per_type = _labelled_split(args.tile, tmp / "semi")

    results = _fit_and_evaluate(
        rest, {"unsupervised": [], "semi-supervised": ["--defects", str(defects)]}, tmp
    )
    u, s = results["unsupervised"][1], results["semi-supervised"][1]
    semi_info = results["semi-supervised"][2]
    settings = [results[k][2]["params"] for k in ("unsupervised", "semi-supervised")]
    if settings[0] != settings[1]:
        raise SystemExit(f"the two fits used different settings: {settings}")
    semi = semi_info.get("semi_supervised", {})
    weights = (semi_info.get("rescorer") or {}).get("evidence_weights")

    def row(name: str, key: str, target: str = "", fmt: str = ".4f") -> tuple[str, str, str]:
        return (name, f"{u[key]:{fmt}} -> {s[key]:{fmt}}", target)

    good_u = u["recall_per_type"].get("good")
    good_s = s["recall_per_type"].get("good")
    rows = [
        row("image AUROC", "image_auroc", "higher than unsupervised"),
        row("image AP", "image_ap"),
        row("image F1-max", "image_f1_max"),
        row("pixel AUROC (maps are not re-scored)", "pixel_auroc"),
        (
            "recall, all defective, at the calibrated 1% false-alarm threshold",
            " -> ".join(f"{_recall_all(m, n_per_type):.3f}" for m in (u, s)),
            "",
        ),
        *(
            (
                f"recall {t}",
                f"{u['recall_per_type'][t]:.3f} -> {s['recall_per_type'][t]:.3f}",
                "",
            )
            for t in sorted(u["recall_per_type"])
            if t != "good"
        ),
        (
            "false-alarm rate on test/good at that threshold",
            f"{1 - good_u:.3f} -> {1 - good_s:.3f}",
            "",
        ),
        (
            "fit wall time (CLI)",
            f"{results['unsupervised'][0].seconds:.1f} s -> "
            f"{results['semi-supervised'][0].seconds:.1f} s",
            "",
        ),
        (
            "evaluate wall time (557 images)",
            f"{results['unsupervised'][3].seconds:.1f} s -> "
            f"{results['semi-supervised'][3].seconds:.1f} s",
            "",
        ),
    ]
    body = [
        *header(
            "Labelled: semi-supervised detection on magnetic-tile (`patchcore --defects`)",
            COMMAND,
            args.note,
        ),
        f"- labelled defects: {N_LABELLED} per type, the first {N_LABELLED} by file name of "
        f"each type's 'train' half ({MVTEC_TYPE_SPLIT}); {len(labelled)} images, moved "
        "out of the test set",
        f"- same remaining test set for both: {u['n_good']} good + {u['n_defect']} defective",
        "- fits: `defectkit fit REST --out ...` and `defectkit fit REST --defects DEFECTS "
        "--out ...` (default settings: patchcore, 10% of train/good held out, 1% "
        "false-alarm rate)",
        f"- anomaly model settings (both): `{results['unsupervised'][2]['method']}` "
        f"{json.dumps(settings[0])}",
        f"- re-scorer {'used' if semi.get('used') else 'NOT used'}: cross-validated AUROC on "
        f"the {semi.get('n_good')} held-out good + {semi.get('n_defect')} labelled images "
        f"{semi.get('labelled_cv_auroc', float('nan')):.4f} vs "
        f"{semi.get('labelled_anomaly_auroc', float('nan')):.4f} for the anomaly score; "
        f"evidence weights {json.dumps(weights)}",
        "",
        *table(rows, "figure (unsupervised -> semi-supervised)"),
    ]
    publish("labelled-semi", body, record_it=not args.no_record)


def bench_masks(args: argparse.Namespace, tmp: Path) -> None:
    """The same split as bench_semi, with the labelled images' masks (--defect-masks)."""
    labelled, rest, defects, masks, n_per_type = _labelled_split(args.tile, tmp / "masks")
    runs = {
        "unsupervised": [],
        "with masks": ["--defects", str(defects), "--defect-masks", str(masks)],
    }
    results = _fit_and_evaluate(rest, runs, tmp)
    u, s = results["unsupervised"][1], results["with masks"][1]
    head = results["with masks"][2].get("mask_head", {})
    good_u, good_s = u["recall_per_type"].get("good"), s["recall_per_type"].get("good")
    rows = [
        ("pixel AUROC", f"{u['pixel_auroc']:.4f} -> {s['pixel_auroc']:.4f}", ">= 0.90 (#2)"),
        ("AUPRO (30% FPR)", f"{u['aupro']:.4f} -> {s['aupro']:.4f}", ">= 0.80 (#2)"),
        ("image AUROC", f"{u['image_auroc']:.4f} -> {s['image_auroc']:.4f}", ">= 0.96 (#2)"),
        (
            "recall, all defective, at the calibrated 1% false-alarm threshold",
            " -> ".join(f"{_recall_all(m, n_per_type):.3f}" for m in (u, s)),
            "",
        ),
        ("false-alarm rate on test/good", f"{1 - good_u:.3f} -> {1 - good_s:.3f}", ""),
        (
            "fit wall time (CLI)",
            f"{results['unsupervised'][0].seconds:.1f} s -> "
            f"{results['with masks'][0].seconds:.1f} s",
            "",
        ),
        (
            "evaluate wall time",
            f"{results['unsupervised'][3].seconds:.1f} s -> "
            f"{results['with masks'][3].seconds:.1f} s",
            "",
        ),
    ]
    body = [
        *header(
            "Labelled: defect masks teach the maps on magnetic-tile "
            "(`patchcore --defects --defect-masks`)",
            COMMAND,
            args.note,
        ),
        f"- labelled defects and their masks: {N_LABELLED} per type, the same "
        f"{len(labelled)} images as the semi-supervised section, moved out of the test set",
        f"- same remaining test set for both: {u['n_good']} good + {u['n_defect']} defective",
        "- fits: `defectkit fit REST --out ...` and `defectkit fit REST --defects DEFECTS "
        "--defect-masks MASKS --out ...` (default settings otherwise)",
        f"- mask head: {json.dumps(head)}",
        "- the targets are #2's floors for good-only learning, shown for reference: this "
        f"model also learned from {len(labelled)} masks",
        "",
        *table(rows, "figure (unsupervised -> with masks)", "floor"),
    ]
    publish("labelled-masks", body, record_it=not args.no_record)


def _recall_all(m: dict, n_per_type: dict[str, int]) -> float:
    """Recall over all defective images, from the recall of each type and its count."""
    types = [t for t in n_per_type if t != "good"]
    found = sum(m["recall_per_type"][t] * n_per_type[t] for t in types)
    return found / sum(n_per_type[t] for t in types)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default="neu,types,semi,masks", help="comma-separated parts to run")
    ap.add_argument("--neu", type=Path, default=SHARED_DATA / "neu-det")
    ap.add_argument("--tile", type=Path, default=SHARED_DATA / "magnetic-tile")
    ap.add_argument("--no-record", action="store_true", help="print only")
    ap.add_argument("--note", default="", help="a line to record with the figures")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    for path in ([args.neu] if "neu" in parts else []) + (
        [args.tile] if parts & {"types", "semi", "masks"} else []
    ):
        if not path.is_dir():
            raise SystemExit(f"dataset not found: {path} (needs ../shared/data)")
    with tempfile.TemporaryDirectory() as tmp:
        if "neu" in parts:
            bench_neu(args, Path(tmp))
        if "types" in parts:
            bench_types(args, Path(tmp))
        if "semi" in parts:
            bench_semi(args, Path(tmp))
        if "masks" in parts:
            bench_masks(args, Path(tmp))


if __name__ == "__main__":
    main()

"""Few-shot: fits on k = 1, 2, 4, 8, 16 good images of every suite set, three
seeded draws each, scored on the whole test set.

    python benchmarks/fewshot.py                          # defaults (few-shot mode)
    python benchmarks/fewshot.py --k 8 --few-shot-below 0 --label held-out
    python benchmarks/fewshot.py -p min_bank=4096 --label bank4096 --k 1,8

Each (set, k, draw): k images drawn from train/good (seed = draw), fitted with
``pipeline.fit`` exactly as ``defectkit fit`` fits a folder of them, then every
test image scored in this process: image AUROC, pixel AUROC (sets with masks),
false-alarm rate on test/good and recall on the defective images at the
calibrated 1% threshold, and the 95% bound the fit states. Rows are kept per
variant in ``benchmarks/fewshot_results.json``; the table shows each k's mean
over draws with the spread (smallest to largest draw), and the full-set figures
of the suite's default row (``benchmarks/suite_results.json``: fitted on 90% of
train/good, the CLI's split).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _record import REPO, SHARED_DATA, git_commit, machine, publish

RESULTS = REPO / "benchmarks" / "fewshot_results.json"
SUITE = REPO / "benchmarks" / "suite_results.json"
SETS = ("magnetic-tile", "mvtec-bottle", "visa-fryum", "aitex", "casting")
KS = (1, 2, 4, 8, 16)
TARGET_FAR = 0.01


def _draw(data: Path, k: int, seed: int, into: Path) -> Path:
    """A folder of links to k good training images drawn with ``seed``."""
    from defectkit.data.datasets import fit_images

    paths = sorted(fit_images(data))
    pick = np.random.default_rng(seed).choice(len(paths), size=k, replace=False)
    folder = into / f"{data.name}-k{k}-s{seed}"
    folder.mkdir()
    for j in sorted(pick):
        p = paths[int(j)]
        os.symlink(p.resolve(), folder / f"{int(j):05d}{p.suffix}")
    return folder


def _test_set(data: Path) -> tuple[list[np.ndarray], list[int], list[np.ndarray | None]]:
    """Decoded test images, labels (1 defective) and masks (None for good images or
    a set without masks)."""
    from defectkit.data.datasets import read_mvtec
    from defectkit.data.images import load_image, load_mask

    images, labels, masks = [], [], []
    for s in read_mvtec(data).test:
        im = load_image(s.path)
        images.append(im)
        labels.append(int(s.label))
        masks.append(None if s.mask_path is None else load_mask(s.mask_path, im.shape).astype(bool))
    return images, labels, masks


def measure(det, images, labels, masks) -> dict:  # type: ignore[no-untyped-def]
    """Figures of one fitted detector on a decoded test set."""
    from defectkit.metrics.image import image_auroc
    from defectkit.metrics.pixel import pixel_auroc

    scores, maps = [], []
    for s in range(0, len(images), 16):
        res = det.score(images[s : s + 16])
        scores += [float(v) for v in res.scores]
        maps += list(res.maps)
    y = np.array(labels)
    sc = np.array(scores)
    thr = det.threshold
    row: dict = {"image_auroc": round(image_auroc(y, sc), 4)}
    if any(m is not None for m in masks):
        full = [
            np.zeros(m.shape, bool) if k is None else k for k, m in zip(masks, maps, strict=True)
        ]
        row["pixel_auroc"] = round(pixel_auroc(full, maps), 4)
    if thr is not None:
        row["far_test_good"] = round(float(np.mean(sc[y == 0] >= thr.value)), 4)
        row["recall"] = round(float(np.mean(sc[y == 1] >= thr.value)), 4)
        row["stated_upper"] = round(float(thr.false_alarm_upper), 4)
        row["estimator"] = thr.estimator
    few = det.info.get("few_shot")
    if few is not None:
        row["copies_kept"] = few["copies_kept"]
    row["_scores"] = {
        "calibration": det.info.get("calibration_scores", []),
        "copies": (few or {}).get("copy_scores", {}),
        "good": [round(v, 5) for v in sc[y == 0].tolist()],
        "defect": [round(v, 5) for v in sc[y == 1].tolist()],
    }
    return row


def _mean_spread(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})"


def table(variant: str, entry: dict, sets: tuple[str, ...]) -> list[str]:
    ks = sorted({int(k) for s in entry["sets"].values() for k in s})
    suite = json.loads(SUITE.read_text()).get("default", {}).get("sets", {})
    lines = []
    for key, title in (
        ("image_auroc", "image AUROC"),
        ("pixel_auroc", "pixel AUROC"),
        ("far_test_good", "false-alarm rate on test/good at the 1% target"),
        ("recall", "recall at that threshold"),
        ("stated_upper", "95% bound fit states"),
    ):
        lines += [
            f"**{title}** (mean over draws, smallest-largest)",
            "",
            "| set | " + " | ".join(f"k={k}" for k in ks) + " | full (suite default) |",
            "|---|" + "---|" * (len(ks) + 1),
        ]
        means: dict[int, list[float]] = {k: [] for k in ks}
        for s in sets:
            by_k = entry["sets"].get(s, {})
            cells = []
            for k in ks:
                rows = by_k.get(str(k), [])
                cells.append(_mean_spread(rows, key))
                vals = [r[key] for r in rows if r.get(key) is not None]
                if vals:
                    means[k].append(statistics.mean(vals))
            full = suite.get(s, {})
            full_key = {"far_test_good": "far_test_good", "recall": "recall"}.get(key, key)
            fv = full.get(full_key)
            cells.append("-" if fv is None else f"{fv:.3f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append(
            "| mean | "
            + " | ".join(f"{statistics.mean(means[k]):.3f}" if means[k] else "-" for k in ks)
            + " | |"
        )
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--param", "-p", action="append", default=[], help="method setting")
    ap.add_argument("--method", default=None)
    ap.add_argument("--k", default=",".join(map(str, KS)))
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--sets", default=None)
    ap.add_argument("--few-shot-below", type=int, default=None, help="fit setting (0: never)")
    ap.add_argument("--label", default=None)
    ap.add_argument("--data", type=Path, default=SHARED_DATA)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument(
        "--keep-scores", type=Path, default=None, help="JSON file for every run's raw scores"
    )
    args = ap.parse_args()
    kept_scores: dict = {}

    from defectkit import pipeline
    from defectkit.cli.common import parse_params

    sets = SETS if args.sets is None else tuple(args.sets.split(","))
    ks = [int(k) for k in args.k.split(",")]
    variant = args.label or "default"
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    entry = results.get(variant, {"sets": {}})
    if not args.render_only:
        missing = [s for s in sets if not (args.data / s / "train").is_dir()]
        if missing:
            raise SystemExit(f"suite sets not found under {args.data}: {', '.join(missing)}")
        cal = {} if args.few_shot_below is None else {"few_shot_below": args.few_shot_below}
        settings = pipeline.FitSettings(
            method=args.method,
            params=parse_params(args.param),
            calibration=pipeline.CalibrationSettings(**cal),
        )
        entry["settings"] = {"method": args.method, "params": args.param, **cal}
        entry.setdefault("runs", []).append(
            {
                "k": ks,
                "sets": list(sets),
                "command": f"python benchmarks/fewshot.py{_command(args)}",
                "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                "commit": git_commit(),
            }
        )
        for s in sets:
            test = _test_set(args.data / s)
            for k in ks:
                rows = []
                for seed in range(args.draws):
                    with tempfile.TemporaryDirectory() as tmp:
                        folder = _draw(args.data / s, k, seed, Path(tmp))
                        t0 = time.perf_counter()
                        det = pipeline.fit(settings, pipeline.FitData(folder)).detector
                        fit_s = time.perf_counter() - t0
                    row = measure(det, *test)
                    row["fit_seconds"] = round(fit_s, 1)
                    raw = row.pop("_scores")
                    if args.keep_scores is not None:
                        kept_scores.setdefault(s, {}).setdefault(str(k), []).append(raw)
                    rows.append(row)
                    print(f"{variant} {s} k={k} seed={seed}: {json.dumps(row)}", flush=True)
                entry["sets"].setdefault(s, {})[str(k)] = rows
                if not args.no_record:
                    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
                    saved[variant] = entry
                    RESULTS.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
                if args.keep_scores is not None:
                    args.keep_scores.write_text(json.dumps(kept_scores))
            del test
    runs = entry.get("runs", [])
    covered = {int(k) for r in runs for k in r["k"]}
    measured = {int(k) for by_k in entry["sets"].values() for k in by_k}
    lines = [f"## Few-shot: `{variant}`", ""]
    lines += [
        f"- k = {', '.join(map(str, r['k']))}: `{r['command']}`, {r['date']}, commit {r['commit']}"
        for r in runs
    ]
    if measured - covered:
        lines.append(
            f"- k = {', '.join(map(str, sorted(measured - covered)))}: earlier runs of this "
            "label, made before runs were recorded (their commands named those k)"
        )
    lines += [
        f"- rendered: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}",
        f"- settings: {json.dumps(entry.get('settings', {}))}",
        f"- {args.draws} seeded draws of k good training images per cell; test-set figures",
        "",
        *table(variant, entry, sets),
    ]
    slug = "".join(c if c.isalnum() else "-" for c in variant).strip("-")
    publish(f"fewshot-{slug}", lines, record_it=not args.no_record)


def _command(args: argparse.Namespace) -> str:
    out = "" if args.method is None else f" --method {args.method}"
    out += "".join(f" -p {p}" for p in args.param)
    out += "" if args.k == ",".join(map(str, KS)) else f" --k {args.k}"
    out += "" if args.sets is None else f" --sets {args.sets}"
    out += "" if args.few_shot_below is None else f" --few-shot-below {args.few_shot_below}"
    out += "" if args.label is None else f" --label {args.label}"
    return out


if __name__ == "__main__":
    main()

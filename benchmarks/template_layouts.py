"""Golden-template comparison on synthetic fixed-layout (PCB-like) boards.

    python benchmarks/template_layouts.py [--designs 5] [--per-kind 25] [--no-record]

For each board design (``defectkit.data.layouts``; photos shifted by up to
10 px and rotated by up to 2 degrees): fit ``template`` on 40 good photos, set
the threshold at the highest score of 20 other good photos (no false alarm on
them), then count a defect as found when its image scores above the threshold
and the map exceeds the threshold within 3 px of the defect's mask. The same
for the pair mode (``compare_pair`` against one good photo as the template).
Also fits and evaluates ``template`` through the CLI on one generated dataset.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from _record import git_commit, machine, record, run_cli

from defectkit.data.layouts import (
    LAYOUT_DEFECT_KINDS,
    generate_layout_dataset,
    make_layout,
    render_board,
)
from defectkit.methods.template import Template, compare_pair


def found(amap: np.ndarray, mask: np.ndarray, threshold: float) -> bool:
    region = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    return bool(amap.max() > threshold and amap[region].max() > threshold)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--designs", type=int, default=5)
    ap.add_argument("--per-kind", type=int, default=25)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    hits: dict[str, dict[str, list[bool]]] = {"template": {}, "pair": {}}
    fit_s, score_s, n_scored = 0.0, 0.0, 0
    for design in range(args.designs):
        layout = make_layout(seed=100 + design)

        def photo(key, kind=None, layout=layout, design=design):
            return render_board(layout, np.random.default_rng([design, *key]), kind)

        train = [photo([1, i])[0] for i in range(40)]
        good = [photo([2, i])[0] for i in range(20)]
        t0 = time.perf_counter()
        model = Template().fit(train)
        fit_s += time.perf_counter() - t0
        thr = float(model.score(good).scores.max())
        pair_thr = max(float(compare_pair(g, train[0]).max()) for g in good)
        for k, kind in enumerate(LAYOUT_DEFECT_KINDS):
            for i in range(args.per_kind):
                img, mask = photo([10 + k, i], kind)
                t0 = time.perf_counter()
                amap = model.score([img]).maps[0]
                score_s += time.perf_counter() - t0
                n_scored += 1
                hits["template"].setdefault(kind, []).append(found(amap, mask, thr))
                pair = compare_pair(img, train[0])
                hits["pair"].setdefault(kind, []).append(found(pair, mask, pair_thr))
        print(
            f"design {design}: "
            + json.dumps(
                {m: {k: float(np.mean(v)) for k, v in h.items()} for m, h in hits.items()}
            ),
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        data = generate_layout_dataset(tmp, seed=7)
        model_path = Path(tmp) / "t.dkm"
        fit = run_cli(["fit", str(data), "--method", "template", "--out", str(model_path), "-q"])
        ev = json.loads(
            run_cli(["evaluate", str(model_path), str(data), "--format", "json", "-q"]).stdout
        )

    n = args.designs * args.per_kind
    rows = [
        f"| {mode} | "
        + " | ".join(f"{100 * np.mean(hits[mode][k]):.1f}%" for k in LAYOUT_DEFECT_KINDS)
        + f" | **{100 * np.mean([x for v in hits[mode].values() for x in v]):.1f}%** |"
        for mode in ("template", "pair")
    ]
    body = "\n".join(
        [
            "## Template on fixed-layout (PCB-like) boards",
            "",
            f"- command: `python benchmarks/template_layouts.py --designs {args.designs} "
            f"--per-kind {args.per_kind}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}",
            f"- machine: {machine()}",
            f"- {args.designs} board designs x {len(LAYOUT_DEFECT_KINDS)} defect kinds x "
            f"{args.per_kind} photos ({n} per kind); photos shifted <= 10 px, rotated <= 2 deg; "
            "found = image score above the highest of 20 good photos and map above it within "
            "3 px of the mask; target >= 90%",
            "",
            "| mode | " + " | ".join(LAYOUT_DEFECT_KINDS) + " | all |",
            "|---|" + "---|" * (len(LAYOUT_DEFECT_KINDS) + 1),
            *rows,
            "",
            f"Template fit (40 photos, 256 px): {fit_s / args.designs:.2f} s; scoring "
            f"{1000 * score_s / max(n_scored, 1):.0f} ms a photo (registration included). "
            f"CLI on `generate_layout_dataset(seed=7)` (40 train, 12 good + 32 defective test): "
            f"image AUROC {ev['image_auroc']:.3f}, pixel AUROC {ev['pixel_auroc']:.3f}, "
            f"AUPRO {ev['aupro']:.3f}; fit {fit.seconds:.1f} s.",
        ]
    )
    print(body)
    if not args.no_record:
        record("template-layouts", body)


if __name__ == "__main__":
    main()

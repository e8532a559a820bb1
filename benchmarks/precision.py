"""Backbone precision: float32 against bfloat16 scoring on magnetic-tile.

    python benchmarks/precision.py [--model tile.dkm] [--method patchcore] [--no-record]

Without --model it fits ``--method`` with its default settings (float32, as
every fit is). Then, for each precision:

- accuracy: ``defectkit evaluate MODEL DATA --precision P --format json``;
- backbone alone: the model's feature extractor on 64 test images at the
  model's input size, in its batches, both precisions alternating, ms / image;
- end to end: ``defectkit inspect MODEL test/ -q --precision P`` wall time
  (process start, model load, image reading, scoring, JSON lines), best of
  ``--repeats`` runs, the precisions alternating so a shared machine's load hits
  both alike; and how many OK/NG decisions differ from float32.

bfloat16 needs a CPU with AVX512-BF16 or AMX; elsewhere the script says so and
stops.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _record import git_commit, machine, model_arguments, model_for, publish, run_cli

from defectkit.backbones import bfloat16_native
from defectkit.data.batches import load_all
from defectkit.data.datasets import read_mvtec
from defectkit.detector import Detector
from defectkit.methods.parts.resize import to_tensor

PRECISIONS = ("float32", "bfloat16")


def backbone_ms(model: Path, data: Path, n: int = 64, rounds: int = 3) -> dict[str, float]:
    """Best ms / image of the model's backbone alone, per precision."""
    det = Detector.load(model)
    m = det.model
    fx = m.extractor
    side = int(m.image_size)
    images, _, _ = load_all([s.path for s in read_mvtec(data).test[:: max(1, 582 // n)][:n]])
    bs = int(getattr(m, "batch_size", 4))
    batches = [
        torch.cat([to_tensor(im, (side, side)) for im in images[i : i + bs]])
        for i in range(0, len(images), bs)
    ]
    best = dict.fromkeys(PRECISIONS, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds):
            for p in PRECISIONS:
                fx.set_precision(p)
                t = time.perf_counter()
                for b in batches:
                    fx(b)
                best[p] = min(best[p], 1000 * (time.perf_counter() - t) / len(images))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model_arguments(ap)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"dataset not found: {args.data} (needs ../shared/data/magnetic-tile)")
    if not bfloat16_native():
        raise SystemExit("this CPU has neither AVX512-BF16 nor AMX: bfloat16 is not offered here")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model, fit_note = model_for(args, tmp)
        bb = backbone_ms(model, args.data)
        metrics = {}
        for p in PRECISIONS:
            ev = run_cli(
                ["evaluate", str(model), str(args.data), "--format", "json", "--precision", p]
            )
            metrics[p] = json.loads(ev.stdout)
        seconds: dict[str, float] = {}
        lines_out: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for p in PRECISIONS:
                run = run_cli(
                    ["inspect", str(model), str(args.data / "test"), "-q", "--precision", p]
                )
                seconds[p] = min(seconds.get(p, float("inf")), run.seconds)
                lines_out[p] = [json.loads(x) for x in run.stdout.splitlines() if x.strip()]
    load_after = os.getloadavg()

    n = len(lines_out["float32"])
    ref = {r["path"]: r["is_defect"] for r in lines_out["float32"]}
    flipped = sum(ref[r["path"]] != r["is_defect"] for r in lines_out["bfloat16"])
    lines = [
        f"## Backbone precision: `{args.method}` on magnetic-tile, float32 vs bfloat16",
        "",
        f"- command: `python benchmarks/precision.py --method {args.method}` (commit "
        f"{git_commit()}); model {fit_note}",
        f"- machine: {machine()}; load average before/after {load_before[0]:.1f} / "
        f"{load_after[0]:.1f} (shared machine)",
        f"- {n} test images; end to end is `defectkit inspect MODEL test/ -q --precision P`, "
        f"best of {args.repeats}",
        "",
        "| precision | image AUROC | pixel AUROC | AUPRO | backbone ms / image "
        "| inspect wall s (end to end) | images / s | OK/NG decisions unlike float32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in PRECISIONS:
        m = metrics[p]
        diff = 0 if p == "float32" else flipped
        lines.append(
            f"| {p} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {m['aupro']:.4f} | "
            f"{bb[p]:.1f} | {seconds[p]:.1f} | {n / seconds[p]:.1f} | {diff} of {n} |"
        )
    lines.append("")
    lines.append(
        f"- speed-up bfloat16 / float32: backbone {bb['float32'] / bb['bfloat16']:.2f}x, "
        f"end to end {seconds['float32'] / seconds['bfloat16']:.2f}x"
    )
    publish(f"precision-{args.method}", lines, record_it=not args.no_record)


if __name__ == "__main__":
    main()

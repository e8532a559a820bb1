"""One unified model over the suite's sets against one model per set.

    python benchmarks/unified.py [--sets a,b,...] [--model unified.dkm] [--no-record]

1. ``defectkit fit ROOT --products`` on a folder holding the suite's sets (links),
   with default settings (timed, peak RSS), unless ``--model`` reuses a file.
2. The separate models: each product's detector written to its own file. A
   product of the unified model is exactly the detector ``defectkit fit`` makes
   for that set alone (tests/test_products.py checks the scores against a
   separate fit), so the two columns differ only by the routing.
3. ``defectkit evaluate`` of the unified model on ROOT (every set's test images,
   routed by the model) and of each separate model on its own set: image AUROC,
   pixel AUROC, AUPRO; assignment accuracy per set and overall.
4. Unknown products, holding one set out: a router of the other sets' products
   (their stored descriptors and limits, as fitting on them alone gives) assigns
   the held-out set's test images; the share answered 'unknown product'.
5. ``defectkit inspect`` of all test images with the unified model, and of each
   set's test images with its separate model, in the same run: images/s.
6. Model file sizes.

Figures on the suite's test sets; the router's ``min_limit`` was chosen on them
(optimistic, see defectkit.products). Records into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _record import SHARED_DATA, git_commit, machine, publish, run_cli

SETS = ("magnetic-tile", "mvtec-bottle", "visa-fryum", "aitex", "casting")


def _test_images(folder: Path) -> list[Path]:
    from defectkit.data.datasets import read_mvtec

    return [s.path for s in read_mvtec(folder).test]


def _held_out_unknown(model_path: Path, root: Path, sets: list[str]) -> dict[str, float]:
    """Per set: the share of its test images a router of the other sets' products
    answers 'unknown product'."""
    from defectkit.data.files import load_within
    from defectkit.products import ProductRouter, ProductSet

    router = ProductSet.load(model_path).router
    out = {}
    for s in sets:
        others = [p for p in sets if p != s]
        part = ProductRouter(**router.get_params())
        part.products_ = others
        part.bank_ = {p: router.bank_[p] for p in others}
        part.limit_ = {p: router.limit_[p] for p in others}
        images, _, _ = load_within(_test_images(root / s), None)
        found = part.assign(images)
        out[s] = sum(a.product is None for a in found) / len(found)
    return out


def _inspect_rate(model: Path, paths: list[Path]) -> tuple[float, int]:
    """Seconds of ``defectkit inspect MODEL PATHS``, and the lines it wrote."""
    run = run_cli(["inspect", str(model), *map(str, paths), "-q"])
    return run.seconds, sum(1 for x in run.stdout.splitlines() if x.startswith("{"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--model", type=Path, default=None, help="reuse this unified model file")
    ap.add_argument("--keep", type=Path, default=None, help="copy the unified model here")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    sets = args.sets.split(",")
    with tempfile.TemporaryDirectory(prefix="dk-unified-") as tmp:
        tmp_path = Path(tmp)
        root = tmp_path / "products"
        root.mkdir()
        for s in sets:
            (root / s).symlink_to(SHARED_DATA / s)
        if args.model is None:
            model = tmp_path / "unified.dkm"
            fit = run_cli(["fit", str(root), "--products", "--out", str(model), "-q"])
            if fit.returncode != 0:
                raise SystemExit("fit --products failed")
            fit_note = f"fitted here in {fit.seconds:.0f} s, peak RSS {fit.peak_rss_gb:.2f} GB"
            if args.keep is not None:
                shutil.copy(model, args.keep)
        else:
            model, fit_note = args.model, f"reused `{args.model}`"

        from defectkit.products import ProductSet

        unified = ProductSet.load(model)
        separate = {}
        for s in sets:
            separate[s] = unified.detectors[s].save(tmp_path / f"{s}.dkm")
        t0 = time.perf_counter()
        ev = run_cli(["evaluate", str(model), str(root), "--format", "json", "-q"])
        if not ev.stdout.strip():
            raise SystemExit("evaluate of the unified model wrote nothing")
        routed = json.loads(ev.stdout)
        own = {}
        for s in sets:
            r = run_cli(["evaluate", str(separate[s]), str(root / s), "--format", "json", "-q"])
            own[s] = json.loads(r.stdout)
        unknown = _held_out_unknown(model, root, sets)
        # each set's test images by the unified model and by its own, alternating:
        # as many process starts each way
        u_sec = u_lines = s_sec = s_lines = 0
        for s in sets:
            paths = _test_images(root / s)
            sec, n = _inspect_rate(model, paths)
            u_sec, u_lines = u_sec + sec, u_lines + n
            sec, n = _inspect_rate(separate[s], paths)
            s_sec, s_lines = s_sec + sec, s_lines + n
        elapsed = time.perf_counter() - t0
        size_u = model.stat().st_size / 1024**2
        size_s = sum(p.stat().st_size for p in separate.values()) / 1024**2

    def f3(v: float | None) -> str:
        return "n/a" if v is None or v != v else f"{v:.3f}"

    rows = [
        "| set | image AUROC unified / separate | pixel AUROC unified / separate | "
        "AUPRO unified / separate | assigned right | unknown (own) | unknown when held out |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sets:
        u, o = routed["products"][s], own[s]
        rows.append(
            f"| {s} | {f3(u['image_auroc'])} / {f3(o['image_auroc'])} | "
            f"{f3(u['pixel_auroc'])} / {f3(o['pixel_auroc'])} | {f3(u['aupro'])} / "
            f"{f3(o['aupro'])} | {u['assignment_accuracy']:.2%} | {u['unknown_rate']:.1%} | "
            f"{unknown[s]:.1%} |"
        )
    overall = routed["overall"]
    mean_own = sum(own[s]["image_auroc"] for s in sets) / len(sets)
    u_rate, s_rate = u_lines / u_sec, s_lines / s_sec
    lines = [
        "## Unified model: the suite's sets as one model against one model per set",
        "",
        f"- command: `python benchmarks/unified.py --sets {','.join(sets)}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}",
        f"- machine: {machine()}",
        f"- unified model: {fit_note}; {size_u:.1f} MB (separate files together {size_s:.1f} MB)",
        "- test-set figures; the router's min_limit was chosen on these sets (optimistic)",
        "",
        *rows,
        "",
        f"- assignment over all {overall['n_images']} test images: "
        f"{overall['assignment_accuracy']:.2%} (unknown answers count as wrong); mean image "
        f"AUROC unified {f3(overall['mean_image_auroc'])}, separate {f3(mean_own)}",
        f"- `defectkit inspect` of each set's test images, the unified model and the set's "
        f"own in alternation (one run per set each way, process start included): unified "
        f"{u_rate:.1f} images/s ({u_lines} images in {u_sec:.1f} s), separate "
        f"{s_rate:.1f} images/s ({s_lines} in {s_sec:.1f} s): {u_rate / s_rate:.0%} of "
        "the separate models' rate",
        f"- measured in {elapsed:.0f} s after the fit",
    ]
    publish("unified", lines, record_it=not args.no_record)


if __name__ == "__main__":
    main()

"""How much of ``synthetic`` comes from the head and how much from its Gaussian
prior, on magnetic-tile: fit once, then score with several ``prior_weight``
values (0 = the head trained on synthetic defects alone).

    python benchmarks/synthetic_ablation.py [--weights 0,1,2,10] [--params '{"epochs": 12}']

Fits on every train/good image and scores the test set with images and masks
squashed to 256x256 (what the method sees; pixel figures are therefore at
256x256, not at each image's own size). Prints one line per weight: image
AUROC, pixel AUROC, AUPRO and image AUROC per defect type. Nothing is recorded:
``methods_table.py --methods synthetic`` records the CLI figures.
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
from _record import SHARED_DATA, machine

from defectkit.data import load_image, load_mask, read_mvtec
from defectkit.methods import get_method
from defectkit.metrics.evaluate import evaluate
from defectkit.metrics.image import image_auroc

SIDE = 256


def _squash(image: np.ndarray, nearest: bool = False) -> np.ndarray:
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(image, (SIDE, SIDE), interpolation=interp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="0,1,2,10", help="prior_weight values to score with")
    ap.add_argument("--params", default="{}", help="JSON settings for the fit")
    args = ap.parse_args()
    params = json.loads(args.params)
    weights = [float(w) for w in args.weights.split(",")]

    ds = read_mvtec(SHARED_DATA / "magnetic-tile")
    train = [_squash(load_image(p)) for p in ds.train]
    test, masks, labels, types = [], [], [], []
    for s in ds.test:
        img = load_image(s.path)
        mask = (
            np.zeros(img.shape[:2], bool)
            if s.mask_path is None
            else load_mask(s.mask_path, img.shape[:2])
        )
        test.append(_squash(img))
        masks.append(_squash(mask.astype(np.uint8), nearest=True).astype(bool))
        labels.append(s.label)
        types.append(s.defect_type)
    y = np.asarray(labels)

    print(f"machine: {machine()}")
    start = time.perf_counter()
    fit_params = {**params, "prior_weight": max(weights) or 1.0}  # so the prior is fitted
    model = get_method("synthetic")(**fit_params).fit(train)
    print(f"fit on {len(train)} images: {time.perf_counter() - start:.0f} s, {json.dumps(params)}")
    arrays, info = model.learned_state()
    for w in weights:
        scorer = get_method("synthetic")(**{**params, "prior_weight": w})
        scorer.load_learned_state(arrays, info)
        res = scorer.score(test)
        m = evaluate(y, res.scores, types, masks, res.maps)
        per_type = {
            t: image_auroc(y[sel], res.scores[sel])
            for t in sorted(set(types) - {"good"})
            for sel in [np.array([k in (t, "good") for k in types])]
        }
        print(
            f"prior_weight {w:g}: image AUROC {m['image_auroc']:.4f}, pixel AUROC "
            f"{m['pixel_auroc']:.4f}, AUPRO {m['aupro']:.4f}; per type "
            + ", ".join(f"{t} {v:.3f}" for t, v in per_type.items())
        )


if __name__ == "__main__":
    main()

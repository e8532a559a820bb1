"""``fit ROOT --products`` as a library call: one detector per product folder
(each exactly what ``fit`` makes for that folder alone), plus the router that
assigns images to products, as one :class:`~defectkit.products.ProductSet`."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectkit.errors import ConfigError, DatasetError
from defectkit.methods.base import Progress
from defectkit.pipeline.fitting import FitResult, fit
from defectkit.pipeline.settings import FitData, FitSettings
from defectkit.products import ProductRouter, ProductSet, check_product_name


@dataclass
class ProductsResult:
    """The unified model, and the fit of each product fitted in this call."""

    model: ProductSet
    fitted: dict[str, FitResult] = field(default_factory=dict)
    seconds: float = 0.0


def product_folders(root: Path) -> dict[str, Path]:
    """The product folders under ``root`` by name: each subfolder that holds an
    MVTec-layout set or good images of its own (sorted by name)."""
    from defectkit.data.datasets import list_images

    if not root.is_dir():
        raise DatasetError(f"products folder not found: {root}")
    out = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / "train" / "good").is_dir() or list_images([sub])[0]:
            out[sub.name] = sub
    if not out:
        raise DatasetError(
            f"{root}: no product folders (each subfolder an MVTec-layout set or a folder "
            "of good images)"
        )
    return out


def fit_products(
    settings: FitSettings,
    root: Path,
    *,
    add: Sequence[str] | None = None,
    base: ProductSet | None = None,
    progress: Progress | None = None,
) -> ProductsResult:
    """Fit every product folder under ``root``, or only those named in ``add``,
    added to ``base`` (whose products are kept as they are)."""
    from defectkit.data.datasets import fit_images
    from defectkit.data.files import load_within

    t0 = time.perf_counter()
    folders = product_folders(root)
    for name in folders:
        check_product_name(name)
    if add:
        if base is None:
            raise ConfigError("--add needs the existing unified model at --out")
        missing = [n for n in add if n not in folders]
        if missing:
            raise ConfigError(f"--add {missing[0]}: no such product folder under {root}")
        again = [n for n in add if n in base.detectors]
        if again:
            raise ConfigError(f"--add {again[0]}: already in the model (fit it anew without --add)")
        names = list(dict.fromkeys(add))
    else:
        names = list(folders)
    if base is None:
        model = ProductSet({}, ProductRouter())
    else:
        model = ProductSet(base.detectors, base.router, base.info)
    fitted: dict[str, FitResult] = {}
    for name in names:
        result = fit(settings, FitData(folders[name]), progress)
        result.detector.info["product"] = name
        fitted[name] = result
        images, _, _ = load_within(fit_images(folders[name]), settings.image_memory)
        model.add(name, result.detector, images)  # the router keeps descriptors only
    model.info["data"] = str(root)
    return ProductsResult(model, fitted, time.perf_counter() - t0)


def evaluate_products(
    model: ProductSet,
    root: Path,
    *,
    progress: Progress | None = None,
    pool: Any = None,
    batch_size: int = 16,
) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """Figures of a unified model on ``root``'s product folders (MVTec layouts
    with test/): per folder the image and pixel metrics of the images as the
    model routes them (scores in threshold units, so 1 is every product's
    threshold; see :meth:`ProductSet.score`), the share assigned to the folder's
    product, and, for a folder of a product the model does not hold, the share
    answered 'unknown product'. ``overall``: assignment over all images and the
    mean of the products' figures."""
    from defectkit.data.datasets import is_mvtec, read_mvtec
    from defectkit.metrics import evaluate as evaluate_metrics
    from defectkit.pipeline.scoring import score_dataset

    folders = {n: p for n, p in product_folders(root).items() if is_mvtec(p)}
    if not folders:
        raise DatasetError(f"{root}: no product folder with an MVTec layout (test/) to evaluate")
    out: dict[str, Any] = {"products": {}}
    errors: list[tuple[Path, str]] = []
    n_right = n_all = 0
    for name, folder in folders.items():
        ds = read_mvtec(folder)
        scored = score_dataset(
            model, ds.test, progress=progress, pool=pool, batch_size=batch_size, stage=name
        )
        errors += scored.errors
        assigned = [ex.get("product") for ex in scored.extras]
        with_masks = any(s.mask_path for s in ds.test)  # else image labels only
        figures = evaluate_metrics(
            scored.label_array,
            scored.score_array,
            types=scored.types,
            masks=scored.masks if with_masks else None,
            maps=scored.maps if with_masks else None,
            threshold=1.0,
        )
        figures["n_images"] = len(assigned)
        # for a product the model never saw, every image should be answered unknown
        figures["unknown_rate"] = sum(a is None for a in assigned) / max(1, len(assigned))
        if name in model.detectors:
            right = sum(a == name for a in assigned)
            figures["assignment_accuracy"] = right / max(1, len(assigned))
            n_right += right
            n_all += len(assigned)
        figures["assigned_to"] = dict(Counter("unknown" if a is None else a for a in assigned))
        out["products"][name] = figures
    known = [f for n, f in out["products"].items() if n in model.detectors]

    def mean(key: str) -> float | None:
        vals = [f[key] for f in known if f.get(key) is not None and f[key] == f[key]]
        return sum(vals) / len(vals) if vals else None

    out["overall"] = {
        "assignment_accuracy": n_right / n_all if n_all else None,
        "n_images": n_all,
        **{f"mean_{k}": mean(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
    }
    return out, errors

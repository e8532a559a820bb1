"""One model for several products: each image is assigned to its product from
whole-image features, then scored by that product's own detector with that
product's thresholds.

A line that makes several part numbers (both sides of a part, several fabrics)
keeps one model file, one service and one set of thresholds per product inside
it. :class:`ProductRouter` assigns: every product keeps the whole-image
descriptors of its good training images (the default backbone's stride-8 and
stride-16 maps at 160 px, averaged over the image, each part normalised to unit
length), and an image goes to the product whose nearest training image is
nearest. An image farther from that nearest training image than the product's
limit is an **unknown product**: it gets no score and no verdict, so that nobody
accepts a part the model never learned. The limit is ``margin`` (1.5) times the
largest leave-one-out nearest distance among the product's training images (how
far its own good parts lie from each other), but never below ``min_limit``
(0.65): defective parts of a product lie farther from its good ones than they
lie from each other, and must not become strangers.

``min_limit`` was chosen on the development suite's test images (optimistic;
``benchmarks/unified.py``): the five sets' own test images, defective ones
included, lie at most 0.25-0.53 from their nearest training image (aitex 0.88:
two fabrics, a few test images far from every training one), every image of a
set left out of the model at least 0.72-0.90 from the others'. Chosen on four
sets, the admissible middle was 0.58-0.70 each time; on the fifth, every
left-out image was unknown, and at most 3.3% of a set's own test images
(aitex) were.

:class:`ProductSet` is the unified model: the per-product detectors (each
exactly the detector ``defectkit fit`` makes for that product alone) and the
router, in one model file (each product's arrays under ``product.<i>.``).
Adding a product fits only the new one and its router entry.

>>> ps = ProductSet.fit_detectors({"pump-a": det_a, "pump-b": det_b}, images)  # doctest: +SKIP
>>> ps.assign(new_images)[0].product                                           # doctest: +SKIP
'pump-a'
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods.base import Image, Progress
from defectkit.model_file import ModelFile, read_model, write_model
from defectkit.params import Params

#: the model file's ``kind`` for a unified model
KIND = "products"
#: the score (in threshold units) of an image of no known product: rejected
UNKNOWN_SCORE = 1e6
_ROUTER = "router."
#: product names: also folder names and labels in the results database
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_product_name(name: str) -> str:
    if not NAME.match(name):
        raise ConfigError(
            f"product name {name!r}: use letters, digits, '.', '_' or '-' (at most 100, "
            "starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Assignment:
    """Which product an image is. ``product`` None: none of them (unknown).
    ``confidence`` in [0, 1]: 1 - the nearest product's distance over the
    runner-up's (with one product, over its limit). ``distance``: to the nearest
    product's nearest training image, in units of its limit (above 1: unknown)."""

    product: str | None
    confidence: float
    nearest: str
    distance: float


class ProductRouter(Params):
    """Assigns images to products, or to none (see the module docstring)."""

    name = "router"
    _built_from_settings = ("_extractor",)

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        image_size: int = 160,
        margin: float = 1.5,
        min_limit: float = 0.65,
    ) -> None:
        self.backbone = backbone
        self.image_size = image_size
        self.margin = margin
        self.min_limit = min_limit
        self._extractor: Any = None
        self._nn: dict[str, Any] = {}

    @classmethod
    def _settings_owner(cls) -> str:
        return "product router"

    def _check(self) -> None:
        if not (isinstance(self.image_size, int) and 32 <= self.image_size <= 1024):
            raise ConfigError(f"router image_size must be 32..1024, got {self.image_size!r}")
        if not (isinstance(self.margin, int | float) and self.margin >= 1):
            raise ConfigError(f"router margin must be >= 1, got {self.margin!r}")
        if not (isinstance(self.min_limit, int | float) and 0 <= self.min_limit <= 2):
            raise ConfigError(f"router min_limit must be 0..2, got {self.min_limit!r}")

    @property
    def extractor(self) -> Any:
        if self._extractor is None:
            from defectkit.backbones import default_layers, load_backbone

            self._extractor = load_backbone(self.backbone, default_layers(self.backbone))
        return self._extractor

    def descriptors(self, images: Sequence[Image], batch_size: int = 16) -> np.ndarray:
        """(n, d) whole-image descriptors, unit length."""
        import torch

        from defectkit.methods.parts.resize import to_tensor

        side = self.image_size
        n, out = len(images), []
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                # by index: ``images`` may be files decoded on use (ImageFiles)
                batch = [np.asarray(images[k]) for k in range(i, min(n, i + batch_size))]
                x = torch.cat([to_tensor(im, (side, side)) for im in batch])
                parts = []
                for m in self.extractor(x):
                    v = m.float().mean(dim=(2, 3))
                    parts.append(torch.nn.functional.normalize(v, dim=1))
                out.append(torch.cat(parts, dim=1).numpy() / math.sqrt(len(parts)))
        return np.concatenate(out).astype(np.float32)

    # -- fitting ------------------------------------------------------------------
    def fit(
        self, images: Mapping[str, Sequence[Image]], progress: Progress | None = None
    ) -> ProductRouter:
        """Keep every product's descriptors and its unknown limit."""
        self._check()
        self.products_: list[str] = []
        self.bank_: dict[str, np.ndarray] = {}
        self.limit_: dict[str, float] = {}
        self._nn = {}
        for name, ims in images.items():
            self.add(name, ims)
        return self

    def add(self, name: str, images: Sequence[Image]) -> ProductRouter:
        """Add one product (the others stay as they are)."""
        self._check()
        check_product_name(name)
        if not hasattr(self, "products_"):
            self.products_, self.bank_, self.limit_, self._nn = [], {}, {}, {}
        if name in self.bank_:
            raise ConfigError(f"product {name!r} is already in the model")
        if not images:
            raise ConfigError(f"product {name!r}: no images")
        self.products_.append(name)
        self.bank_[name] = self.descriptors(images)
        self.limit_[name] = max(self.margin * self._loo_radius(name), self.min_limit)
        return self

    def _loo_radius(self, name: str) -> float:
        """The largest distance from one of ``name``'s training images to its
        nearest other one (with one image: a small fixed radius on the unit-length
        descriptors)."""
        bank = self.bank_[name]
        if len(bank) < 2:
            return 0.25
        d, _ = self._search(name).search(bank, 2)  # itself first, then the nearest other
        return float(max(d[:, 1].max(), 1e-6))

    # -- assigning ----------------------------------------------------------------
    def _search(self, name: str) -> Any:
        """Exact nearest-neighbour search over ``name``'s descriptors, built once."""
        from defectkit.methods.parts.knn import NearestNeighbours

        nn = self._nn.get(name)
        if nn is None:
            nn = self._nn[name] = NearestNeighbours(self.bank_[name])
        return nn

    def distances(self, desc: np.ndarray) -> np.ndarray:
        """(n, products) distance of each descriptor to each product's nearest
        training image."""
        out = np.empty((len(desc), len(self.products_)), np.float64)
        for j, name in enumerate(self.products_):
            out[:, j] = self._search(name).search(desc, 1)[0][:, 0]
        return out

    def assign(self, images: Sequence[Image]) -> list[Assignment]:
        if not getattr(self, "products_", None):
            raise ConfigError("the product router is not fitted")
        return self.assign_descriptors(self.descriptors(images))

    def assign_descriptors(self, desc: np.ndarray) -> list[Assignment]:
        dist = self.distances(desc)
        out = []
        for row in dist:
            order = np.argsort(row)
            name = self.products_[int(order[0])]
            d1, limit = float(row[order[0]]), self.limit_[name]
            # against the runner-up; with one product, against its limit
            d2 = float(row[order[1]]) if len(order) > 1 else limit
            conf = 0.0 if d2 <= 0 else min(1.0, max(0.0, 1.0 - d1 / d2))
            rel = d1 / limit
            out.append(
                Assignment(name if rel <= 1.0 else None, round(conf, 4), name, round(rel, 4))
            )
        return out

    # -- persistence --------------------------------------------------------------
    def learned_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"bank.{i}": self.bank_[n] for i, n in enumerate(self.products_)}
        return arrays, {"products": list(self.products_), "limits": dict(self.limit_)}

    def load_learned_state(
        self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]
    ) -> None:
        names = list(state["products"])
        self.products_ = names
        self.bank_ = {}
        self._nn = {}
        for i, n in enumerate(names):
            bank = arrays.get(f"bank.{i}")
            if bank is None or bank.ndim != 2:
                raise ModelFileError(f"product router: descriptors of {n!r} missing or malformed")
            self.bank_[n] = bank.astype(np.float32)
        self.limit_ = {n: float(state["limits"][n]) for n in names}


class ProductSet:
    """The unified model: ``detectors`` by product name and the ``router``."""

    def __init__(
        self,
        detectors: Mapping[str, Any],
        router: ProductRouter,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.detectors = dict(detectors)
        self.router = router
        self.info = dict(info or {})
        routed = list(getattr(router, "products_", []))  # none before the first add
        if list(self.detectors) != routed:
            raise ConfigError(
                f"products of the detectors {list(self.detectors)} and of the router "
                f"{routed} differ"
            )

    @property
    def products(self) -> list[str]:
        return list(self.detectors)

    @classmethod
    def fit_detectors(
        cls,
        detectors: Mapping[str, Any],
        images: Mapping[str, Sequence[Image]],
        router: ProductRouter | None = None,
        progress: Progress | None = None,
    ) -> ProductSet:
        """The unified model of fitted ``detectors``, its router fitted on each
        product's good ``images``."""
        router = (router or ProductRouter()).fit(images, progress)
        return cls(detectors, router)

    def product(self, name: str | None) -> Any:
        """The detector of product ``name`` (a clear error naming the products)."""
        if name not in self.detectors:
            raise ConfigError(
                f"no product {name!r} in this unified model; its products: "
                f"{', '.join(self.products)}"
            )
        return self.detectors[name]

    def add(self, name: str, detector: Any, images: Sequence[Image]) -> ProductSet:
        """Add a product without touching the others."""
        self.router.add(name, images)
        self.detectors[name] = detector
        return self

    def assign(self, images: Sequence[Image]) -> list[Assignment]:
        return self.router.assign(images)

    @staticmethod
    def by_product(found: Sequence[Assignment]) -> dict[str, list[int]]:
        """Positions of the assigned images by product (unknown ones left out), in
        order: each product's detector then scores its images as one batch."""
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(found):
            if a.product is not None:
                groups.setdefault(a.product, []).append(i)
        return groups

    def set_precision(self, precision: str) -> ProductSet:
        for det in self.detectors.values():
            det.set_precision(precision)
        return self

    # -- scoring ------------------------------------------------------------------
    def score(self, images: Sequence[Image]) -> Any:
        """Each image scored by its product's detector, in units of that product's
        threshold (score / threshold, maps likewise: 1 is the threshold of every
        product), so that one set's scores can be ranked together whichever
        product each image went to. An unknown product's image scores
        ``UNKNOWN_SCORE`` everywhere (it is rejected). ``extras`` carry the
        assignment (``product``, ``product_confidence``) beside the evidence."""
        from defectkit.methods.base import ScoreResult

        found = self.assign(images)
        scores = np.full(len(images), UNKNOWN_SCORE, np.float64)
        maps: list[np.ndarray | None] = [None] * len(images)
        extras: list[dict[str, Any]] = [
            {"product": None, "product_confidence": a.confidence, "product_distance": a.distance}
            for a in found
        ]
        for product, idx in self.by_product(found).items():
            det = self.detectors[product]
            if det.threshold is None:
                raise ConfigError(f"product {product!r} has no threshold: calibrate it first")
            unit = float(det.threshold.value)
            res = det.score([images[i] for i in idx])
            for k, i in enumerate(idx):
                scores[i] = float(res.scores[k]) / unit
                maps[i] = (res.maps[k] / unit).astype(np.float32)
                extras[i].update(res.extras[k] if res.extras else {}, product=product)
        for i, m in enumerate(maps):
            if m is None:  # an unknown product: rejected everywhere
                maps[i] = np.full(np.asarray(images[i]).shape[:2], UNKNOWN_SCORE, np.float32)
        return ScoreResult(scores=scores, maps=maps, extras=extras)

    # -- inspect ------------------------------------------------------------------
    def inspect_loaded(
        self, items: Sequence[Any], names: Sequence[str], **kw: Any
    ) -> list[dict[str, Any]]:
        """``inspect`` records of loaded files: each image assigned, then inspected
        by its product's detector (exactly as that detector alone would), with
        ``product`` and ``product_confidence`` added. An unknown product's image
        gets no score and no verdict, and says why in ``product_note``."""
        from defectkit.decide.records import inspect_loaded

        numbers = kw.pop("numbers", None)
        good = [j for j, it in enumerate(items) if it.image is not None]
        out: list[dict[str, Any]] = [
            unknown_record(names[j], it.error) for j, it in enumerate(items)
        ]
        if not good:
            return out
        found = self.assign([items[j].image for j in good])
        for j, a in zip(good, found, strict=True):
            if a.product is None:
                out[j] = unknown_record(names[j], None, a)
        by_index = dict(zip(good, found, strict=True))
        for product, at in self.by_product(found).items():
            idx = [good[k] for k in at]
            recs = inspect_loaded(
                self.detectors[product],
                [items[j] for j in idx],
                [names[j] for j in idx],
                numbers=None if numbers is None else [numbers[j] for j in idx],
                **kw,
            )
            for j, rec in zip(idx, recs, strict=True):
                rec["product"] = product
                rec["product_confidence"] = by_index[j].confidence
                out[j] = rec
        return out

    # -- files --------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        arrays: dict[str, np.ndarray] = {}
        products = []
        for i, (name, det) in enumerate(self.detectors.items()):
            mf = det.to_model_file()
            products.append({"name": name, "model": mf.info})
            arrays.update({f"product.{i}.{k}": v for k, v in mf.arrays.items()})
        rarrays, rstate = self.router.learned_state()
        arrays.update({f"{_ROUTER}{k}": v for k, v in rarrays.items()})
        info = {
            "kind": KIND,
            "products": products,
            "router": {"params": self.router.get_params(), "state": rstate},
            "provenance": self.info,
        }
        return write_model(path, ModelFile(info=info, arrays=arrays))

    def save_decision(
        self, path: str | Path, product: str, out: str | Path | None = None, **note: Any
    ) -> Path:
        """Write ``product``'s thresholds into the unified model file at ``path``
        (or a copy at ``out``); every array and the other products stay as they
        are (:meth:`Detector.save_decision` for one product)."""
        mf = read_model(path)
        info = dict(mf.info)
        parts = [dict(p) for p in info.get("products") or []]
        where = [i for i, p in enumerate(parts) if p.get("name") == product]
        if not where:
            raise ModelFileError(f"{path}: no product {product!r} in the unified model")
        try:
            parts[where[0]]["model"] = self.detectors[product].decision_info(
                parts[where[0]]["model"], **note
            )
        except ModelFileError as e:
            raise ModelFileError(f"{path} [product {product}]: {e}") from None
        info["products"] = parts
        return write_model(path if out is None else out, ModelFile(info=info, arrays=mf.arrays))

    @classmethod
    def load(cls, path: str | Path) -> ProductSet:
        return cls.from_model_file(read_model(path), path)

    @classmethod
    def from_model_file(cls, mf: ModelFile, path: str | Path) -> ProductSet:
        from defectkit.detector import Detector

        info = mf.info
        try:
            detectors = {}
            for i, part in enumerate(info["products"]):
                prefix = f"product.{i}."
                sub = {k[len(prefix) :]: v for k, v in mf.arrays.items() if k.startswith(prefix)}
                detectors[str(part["name"])] = Detector.from_model_file(
                    ModelFile(info=part["model"], arrays=sub), f"{path} [product {part['name']}]"
                )
            params = dict(info["router"]["params"])
            ProductRouter.check_params(params)
            router = ProductRouter(**params)
            rarrays = {k[len(_ROUTER) :]: v for k, v in mf.arrays.items() if k.startswith(_ROUTER)}
            router.load_learned_state(rarrays, info["router"]["state"])
            return cls(detectors, router, dict(info.get("provenance") or {}))
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ModelFileError(f"{path}: unified model description is invalid ({e})") from None

    def describe(self, full: bool = False) -> dict[str, Any]:
        return {
            "kind": KIND,
            "products": {n: d.describe(full) for n, d in self.detectors.items()},
            "router": {
                **self.router.get_params(),
                "unknown_limits": {n: round(v, 4) for n, v in self.router.limit_.items()},
                "training_images": {n: len(b) for n, b in self.router.bank_.items()},
            },
            **({"provenance": self.info} if self.info else {}),
        }


def unknown_record(path: str, error: str | None, a: Assignment | None = None) -> dict[str, Any]:
    """The line of a file that was not read (``error``) or whose product is
    unknown (``a``): no score, no verdict."""
    rec: dict[str, Any] = {
        "path": path,
        "score": None,
        "is_defect": None,
        "threshold": None,
        "error": error,
        "regions": None,
        "severity": None,
        "product": None,
        "product_confidence": None,
    }
    if a is not None:
        rec["product_confidence"] = a.confidence
        rec["product_note"] = (
            f"unknown product: nearest is {a.nearest!r} at {a.distance:.2f} times its limit"
        )
    return rec


def is_product_file(info: Mapping[str, Any]) -> bool:
    return info.get("kind") == KIND

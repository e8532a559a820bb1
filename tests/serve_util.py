"""Helpers shared by the service tests: a small fitted detector, PNG bytes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from defectkit.data.images import load_image
from defectkit.detector import Detector

SMALL = {"image_size": 96, "coreset_ratio": 0.1}


def small_detector(demo_root: Path) -> Detector:
    """PatchCore fitted on the demo's train/good at 96 px (a few seconds on CPU)."""
    paths = sorted((demo_root / "train" / "good").glob("*.png"))
    return Detector.fit([load_image(p) for p in paths], "patchcore", dict(SMALL))


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def demo_test_images(demo_root: Path) -> tuple[list[Path], list[Path]]:
    """(good, defective) test image paths of the demo dataset."""
    good = sorted((demo_root / "test" / "good").glob("*.png"))
    bad = sorted(p for p in (demo_root / "test").glob("*/*.png") if p.parent.name != "good")
    return good, bad

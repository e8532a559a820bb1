"""Data layer: image loading and validation, dataset layouts, synthetic demo data."""

from defectkit.data.datasets import (
    IMAGE_EXTENSIONS,
    MVTecDataset,
    Sample,
    fit_images,
    is_image_file,
    is_mvtec,
    list_images,
    read_mvtec,
)
from defectkit.data.images import decode_image_bytes, load_image, load_mask, save_png
from defectkit.data.synthetic import (
    DEFECT_KINDS,
    SURFACE_KINDS,
    add_defect,
    generate_demo,
    make_surface,
)

__all__ = [
    "DEFECT_KINDS",
    "IMAGE_EXTENSIONS",
    "SURFACE_KINDS",
    "MVTecDataset",
    "Sample",
    "add_defect",
    "decode_image_bytes",
    "fit_images",
    "generate_demo",
    "is_image_file",
    "is_mvtec",
    "list_images",
    "load_image",
    "load_mask",
    "make_surface",
    "read_mvtec",
    "save_png",
]

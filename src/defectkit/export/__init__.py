"""Export to ONNX and run exported bundles with onnxruntime.

>>> from defectkit.export import export_onnx, load_onnx_detector   # doctest: +SKIP
>>> export_onnx(Detector.load("part.dkm"), "part-onnx")            # doctest: +SKIP
>>> det = load_onnx_detector("part-onnx")                           # doctest: +SKIP
>>> det.decide(det.score(images).scores)                            # doctest: +SKIP

See :mod:`defectkit.export.onnx_bundle` for what a bundle holds and
:mod:`defectkit.export.runtime` for how it runs.
"""

from defectkit.export.onnx_bundle import (
    Bundle,
    ExportError,
    export_onnx,
    exportable_methods,
    is_bundle,
    read_bundle,
)
from defectkit.export.runtime import OrtFeatureExtractor, load_onnx_detector

__all__ = [
    "Bundle",
    "ExportError",
    "OrtFeatureExtractor",
    "export_onnx",
    "exportable_methods",
    "is_bundle",
    "load_onnx_detector",
    "read_bundle",
]

"""Model loading, in one place for every entry point: the CLI, the service, the
local worker processes and the Ray actors."""

from __future__ import annotations

import os
from pathlib import Path

from defectkit.classify.classifier import DefectClassifier
from defectkit.detector import Detector
from defectkit.errors import ConfigError
from defectkit.model_file import read_model
from defectkit.products import ProductSet, is_product_file

RUNTIMES = ("auto", "torch", "onnx")


def load(
    path: str | os.PathLike[str],
    runtime: str = "auto",
    precision: str = "float32",
    *,
    threads: int = 0,
) -> Detector | DefectClassifier | ProductSet:
    """A :class:`Detector` (maybe bundled with a classifier), a
    :class:`DefectClassifier` stored alone or a unified :class:`ProductSet` of
    several products, from a model file or an ONNX bundle folder from
    ``defectkit export``.

    ``runtime``: ``auto`` (onnxruntime for a bundle folder, PyTorch for a model
    file), ``torch`` (a bundle's detector file, verified, run in PyTorch) or
    ``onnx`` (a bundle folder; ``threads`` onnxruntime threads, 0 its default).
    The detector's backbone scores in ``precision`` (see
    :meth:`Detector.set_precision`). Raises :class:`ConfigError` for a setting it
    cannot use and :class:`~defectkit.errors.ModelFileError` for a file it cannot
    read; never prints.
    """
    from defectkit.backbones import check_precision
    from defectkit.export.onnx_bundle import read_bundle

    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime must be auto, torch or onnx, got {runtime!r}")
    try:
        check_precision(precision)  # before the model loads
    except ConfigError as e:
        raise ConfigError(f"--{e}") from None
    path = Path(path)
    if runtime == "onnx" or (runtime == "auto" and path.is_dir()):
        from defectkit.export.runtime import load_onnx_detector

        if not path.is_dir():
            raise ConfigError(
                f"{path}: --runtime onnx needs a bundle folder; make one with "
                f"`defectkit export {path} --format onnx --out DIR`"
            )
        model: Detector | DefectClassifier | ProductSet = load_onnx_detector(path, threads=threads)
    elif path.is_dir():  # a bundle run with PyTorch: its detector file, verified
        model = _read(read_bundle(path).detector_path)
    else:
        model = _read(path)
    if isinstance(model, DefectClassifier):
        if precision != "float32":
            raise ConfigError(
                f"{path} holds a classifier alone: --precision is for anomaly detectors"
            )
        return model
    try:
        return model.set_precision(precision)
    except ConfigError as e:
        raise ConfigError(f"--precision {precision}: {e}") from None


def _read(path: Path) -> Detector | DefectClassifier | ProductSet:
    from defectkit.classify.classifier import is_classifier_file

    mf = read_model(path)
    if is_classifier_file(mf.info):
        return DefectClassifier.from_model_file(mf, path)
    if is_product_file(mf.info):
        return ProductSet.from_model_file(mf, path)
    return Detector.from_model_file(mf, path)


def load_detector(
    path: str | os.PathLike[str],
    runtime: str = "auto",
    precision: str = "float32",
    *,
    threads: int = 0,
    products: bool = False,
) -> Detector | ProductSet:
    """:func:`load` for what needs an anomaly detector (calibrate, report, export,
    the service, Ray): a classifier alone is refused with the reason, and so is a
    unified model of several products unless ``products`` (the service, calibrate
    with ``--product``)."""
    model = load(path, runtime, precision, threads=threads)
    if isinstance(model, DefectClassifier):
        raise ConfigError(
            f"{path}: holds a defect-type classifier alone, not an anomaly detector "
            "(it gives types, not OK/NG: inspect and evaluate take it; calibrate and "
            "report need an anomaly model)"
        )
    if isinstance(model, ProductSet) and not products:
        raise ConfigError(
            f"{path}: a unified model of {len(model.products)} products "
            f"({', '.join(model.products)}); this command takes one product's model "
            "(inspect, evaluate and serve take the unified model)"
        )
    return model

"""Running an ONNX bundle: the backbone in onnxruntime, the rest shared.

:func:`load_onnx_detector` gives an ordinary :class:`~defectkit.detector.Detector`
whose method takes its feature maps from an :class:`OrtFeatureExtractor`
instead of the PyTorch backbone. Everything after the backbone (patch embedding,
nearest neighbour or Mahalanobis distance, map upsampling, thresholds, regions,
OK/NG) is the method's and the detector's own code, so the two runtimes cannot
drift apart in their decision logic; only the backbone's arithmetic differs (to
about 1e-5 relative).

Speed: on magnetic-tile (``benchmarks/export_onnx.py``, default PatchCore,
2-core Xeon) the bundle scores at about the PyTorch path's speed (77 vs 72 ms
CPU per image, 19.8 vs 21.7 images/s end to end, same image AUROC 0.9795,
every decision equal): the PyTorch backbone already runs BatchNorm-folded, fused
oneDNN convolutions, and faiss and map post-processing are shared. Static int8
quantisation (onnxruntime, QOperator, per-channel, percentile calibration on
good images) ran the backbone 1.6x faster but moved its features by 24-35%
(mean relative error), so it is not offered. The bundle's worth is a fixed,
checksummed graph that other runtimes (onnxruntime on other hardware, OpenVINO,
TensorRT) can take, not a faster CPU path.

>>> det = load_onnx_detector("part-onnx")                 # doctest: +SKIP
>>> det.decide(det.score(images).scores)                  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from defectkit.errors import ConfigError, ImageError, ModelFileError
from defectkit.export.onnx_bundle import Bundle, read_bundle

if TYPE_CHECKING:
    from defectkit.detector import Detector


class OrtFeatureExtractor:
    """Stands in for :class:`~defectkit.backbones.FeatureExtractor`: ``(B, 3, H, W)``
    float tensors in [0, 1] in, one feature map per layer out (as tensors), with the
    same ``layers``, ``channels`` and ``strides`` attributes.

    ``threads``: onnxruntime's intra-op threads (default: torch's thread count).
    Its threads wait passively rather than spin, as torch's do under the CLI
    (``OMP_WAIT_POLICY=PASSIVE``): spinning collapses throughput when other
    processes share the cores.
    """

    def __init__(self, onnx_path: str | Path, description: dict[str, Any], threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                "onnxruntime is not installed: pip install onnxruntime (or use --runtime torch)"
            ) from None

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if os.environ.get("OMP_WAIT_POLICY", "").upper() != "ACTIVE":
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own (pybind) exception types
            raise ModelFileError(f"{onnx_path}: onnxruntime cannot load it ({e})") from None
        self.layers = [str(x) for x in description["layers"]]
        self.channels = [int(x) for x in description["channels"]]
        self.strides = [int(x) for x in description["strides"]]
        self.backbone_name = str(description.get("backbone", "onnx"))
        self.spec = None
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs != self.layers:
            raise ModelFileError(
                f"{onnx_path}: outputs {outputs} do not match the manifest's layers {self.layers}"
            )
        self._input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ImageError(
                None,
                f"expected a float tensor (B, 3, H, W) in [0, 1], got {x.dtype} {tuple(x.shape)}",
            )
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return [torch.from_numpy(o) for o in self.session.run(None, {self._input: feed})]


def load_onnx_detector(path: str | Path, *, threads: int = 0) -> Detector:
    """A :class:`~defectkit.detector.Detector` from a bundle folder (verified first),
    its method's backbone running in onnxruntime."""
    from defectkit.detector import Detector

    bundle: Bundle = read_bundle(path)
    det = Detector.load(bundle.detector_path)
    if det.model.name != bundle.method:
        raise ModelFileError(
            f"{path}: manifest says method {bundle.method!r}, the detector holds {det.model.name!r}"
        )
    fx = OrtFeatureExtractor(bundle.extractor_path, bundle.manifest["extractor"], threads)
    attach_extractor(det.model, fx)
    return det


def attach_extractor(model: Any, fx: OrtFeatureExtractor) -> None:
    """Give an exportable method ``fx`` as its backbone.

    PatchCore, PaDiM and k-means build their backbone lazily into ``_extractor``
    and read it only through their ``extractor`` property, so setting it is all
    it takes.
    The layers must be the ones the method asks for.
    """
    wanted = list(getattr(model, "layers", None) or [])
    if getattr(model, "context_layers", None) and getattr(model, "context_size", 0):
        wanted += [x for x in model.context_layers if x not in wanted]
    if wanted and fx.layers != wanted:
        raise ModelFileError(
            f"the bundle's ONNX extractor gives layers {fx.layers}, the {model.name} model "
            f"needs {wanted}"
        )
    if not hasattr(model, "_extractor"):
        raise ConfigError(f"method {model.name!r} has no backbone to replace")
    model._extractor = fx

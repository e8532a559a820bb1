"""ONNX model bundles: a folder that runs a detector with onnxruntime.

``defectkit export MODEL --format onnx --out DIR`` writes::

    DIR/manifest.json          what the bundle is, its files and their SHA-256
    DIR/extractor.onnx         the backbone feature extractor (dynamic batch, H, W)
    DIR/detector.safetensors   the detector: learned arrays (memory bank or
                               Gaussians) as safetensors, settings and thresholds
                               as JSON in its header (the .dkm model-file format)

What goes to ONNX and what does not: the backbone is nearly all of the compute
of PatchCore, PaDiM and k-means, so it is the ONNX graph. PatchCore's
nearest-neighbour search stays in faiss (exact or HNSW, as the model was
fitted): an HNSW index over a memory bank of up to 20,000 patches is faster
than a dense distance matrix, and ONNX has no nearest-neighbour operator
(k-means' nearest centre likewise). PaDiM's Mahalanobis distances stay in the
method's own NumPy/torch code. All run the method's own post-processing, so
scores, maps and OK/NG decisions come from the same code as the PyTorch path
(see :mod:`defectkit.export.runtime`).

Nothing is unpickled: the manifest is JSON, arrays are safetensors, and every
file's SHA-256 is checked before use, so a partial or tampered bundle is refused
with a message naming the file. Writes are atomic: the bundle is built in a
temporary folder next to ``DIR`` and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defectkit import __version__
from defectkit.atomic import fsync_folder, temp_sibling
from defectkit.errors import ConfigError, ModelFileError

if TYPE_CHECKING:
    from defectkit.detector import Detector

BUNDLE_FORMAT = "defectkit-onnx-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
EXTRACTOR_FILE = "extractor.onnx"
DETECTOR_FILE = "detector.safetensors"
ONNX_OPSET = 17


def exportable_methods() -> list[str]:
    """Methods whose compute-heavy part is a backbone held in ``model.extractor``
    (their ``exportable`` tag)."""
    from defectkit.methods import available_methods

    return [name for name, cls in available_methods().items() if cls.exportable]


class ExportError(ConfigError):
    """A model that cannot be exported (yet), or an export that failed."""


@dataclass
class Bundle:
    """A verified bundle: its folder, manifest and file paths."""

    path: Path
    manifest: dict[str, Any]

    @property
    def extractor_path(self) -> Path:
        return self.path / EXTRACTOR_FILE

    @property
    def detector_path(self) -> Path:
        return self.path / DETECTOR_FILE

    @property
    def method(self) -> str:
        return str(self.manifest["method"])


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a folder that claims to be a bundle (has a manifest)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_exportable(det: Detector) -> None:
    """Raise :class:`ExportError` naming the method when it cannot be exported yet."""
    name = det.model.name
    if not det.model.exportable:
        raise ExportError(
            f"method {name!r} cannot be exported to ONNX yet (exportable: "
            f"{', '.join(exportable_methods())}); inspect it with the PyTorch runtime"
        )
    parts = [
        label
        for label, held in (
            ("semi-supervised re-scorer", det.rescorer is not None),
            ("defect-type classifier", det.classifier is not None),
            (
                "mask head learned from defect masks",
                getattr(det.model, "mask_head_", None) is not None,
            ),
        )
        if held
    ]
    if parts:
        part = parts[0]
        raise ExportError(
            f"this {name} model holds a {part}, which cannot be exported to ONNX yet; "
            "export a plain anomaly model"
        )


def _export_extractor(det: Detector, path: Path) -> dict[str, Any]:
    """Trace the method's backbone to ONNX (the plain path: fused oneDNN ops are
    eager-only and switch off under export) and describe its inputs and outputs."""
    import torch

    model = det.model
    fx = model.extractor
    side = int(getattr(model, "image_size", 256))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                fx,
                (torch.rand(1, 3, side, side),),
                str(path),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["image"],
                output_names=list(fx.layers),
                dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}},
            )
    except Exception as e:  # the exporter raises many types; name the step that failed
        raise ExportError(f"ONNX export of the {model.name} backbone failed: {e}") from e
    return {
        "backbone": fx.backbone_name,
        "input": "image",
        "input_layout": "float32 (batch, 3, height, width) RGB in [0, 1]",
        "layers": list(fx.layers),
        "channels": [int(c) for c in fx.channels],
        "strides": [int(s) for s in fx.strides],
        "opset": ONNX_OPSET,
    }


def export_onnx(det: Detector, out: str | Path, *, overwrite: bool = True) -> Path:
    """Write ``det`` as an ONNX bundle folder at ``out``; returns ``out``.

    An existing bundle at ``out`` is replaced (unless ``overwrite`` is False); an
    existing folder that is not a bundle is never touched.

    >>> export_onnx(Detector.load("part.dkm"), "part-onnx")   # doctest: +SKIP
    """
    check_exportable(det)
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not is_bundle(out):
            raise ExportError(f"{out}: a non-empty folder that is not a bundle; choose another")
        if is_bundle(out) and not overwrite:
            raise ExportError(f"{out}: a bundle already exists there")
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        runtime = _export_extractor(det, tmp / EXTRACTOR_FILE)
        det.save(tmp / DETECTOR_FILE)
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "defectkit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "method": det.model.name,
            "extractor": runtime,
            "scoring": det.model.onnx_scoring,
            "files": {name: _sha256(tmp / name) for name in (EXTRACTOR_FILE, DETECTOR_FILE)},
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an old bundle there goes only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.{secrets.token_hex(8)}.old"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_folder(out.parent)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor stored in a graph: initializers and tensor attributes, subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _refuse_external_data(fpath: Path) -> None:
    """A bundle is self-contained. An ONNX file may point its weights at other files
    ("external data", any relative path): a crafted extractor could make the runtime
    read ``../../anything``, and the manifest's checksums, written by whoever made the
    bundle, would not stop it."""
    import onnx

    try:
        model = onnx.load(str(fpath), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for garbage
        raise ModelFileError(f"{fpath}: not a readable ONNX model ({e})") from None
    for tensor in _graph_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in tensor.external_data}.get("location", "?")
            raise ModelFileError(
                f"{fpath}: tensor {tensor.name!r} points at external data ({where!r}); "
                "a bundle must hold its weights inside extractor.onnx"
            )


def read_bundle(path: str | Path) -> Bundle:
    """Open and verify a bundle folder; raise ModelFileError saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFileError(
            f"{path}: not an ONNX bundle folder (make one with "
            "`defectkit export MODEL --format onnx --out DIR`)"
        )
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ModelFileError(f"{path}: not an ONNX bundle ({MANIFEST} is missing)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ModelFileError(f"{mpath}: unreadable bundle manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ModelFileError(f"{mpath}: not a defectkit ONNX bundle manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_VERSION:
        raise ModelFileError(
            f"{mpath}: bundle format version {version!r} is newer than this defectkit "
            f"({__version__}) understands (<= {BUNDLE_VERSION}); upgrade defectkit"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {EXTRACTOR_FILE, DETECTOR_FILE}:
        raise ModelFileError(
            f"{mpath}: the manifest must list {EXTRACTOR_FILE} and {DETECTOR_FILE} with "
            "their SHA-256"
        )
    for name, digest in sorted(files.items()):
        fpath = path / name
        if not fpath.is_file():
            raise ModelFileError(f"{path}: partial bundle, {name} is missing")
        if _sha256(fpath) != digest:
            raise ModelFileError(
                f"{fpath}: checksum mismatch with {MANIFEST}: the file was modified or damaged"
            )
    _refuse_external_data(path / EXTRACTOR_FILE)
    ext = manifest.get("extractor")
    if (
        not isinstance(ext, dict)
        or not isinstance(ext.get("layers"), list)
        or not isinstance(ext.get("strides"), list)
        or not isinstance(ext.get("channels"), list)
        or not len(ext["layers"]) == len(ext["strides"]) == len(ext["channels"]) > 0
    ):
        raise ModelFileError(f"{mpath}: extractor description missing or malformed")
    if manifest.get("method") not in exportable_methods():
        raise ModelFileError(
            f"{mpath}: method {manifest.get('method')!r} has no ONNX runtime in this defectkit"
        )
    return Bundle(path=path, manifest=manifest)

"""Model files: one safetensors file whose header metadata holds the JSON.

The file holds the learned arrays of a method as safetensors tensors and, in the
safetensors metadata, one JSON document (method, settings, backbone,
preprocessing, package version, thresholds, ...) plus a SHA-256 over both, so a
truncated, tampered or foreign file is refused with a clear message. Loading
never unpickles anything. Writes are atomic: a temporary file in the same
folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from defectkit import __version__
from defectkit.atomic import write_bytes
from defectkit.errors import ModelFileError

FORMAT = "defectkit-model"
FORMAT_VERSION = 1
_META_KEY = "defectkit"
_HASH_KEY = "defectkit_sha256"
MAX_MODEL_BYTES = 4 * 1024**3


@dataclass
class ModelFile:
    """The contents of a model file: JSON-able ``info`` and named arrays."""

    info: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _digest(info_json: str, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(info_json.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _storable(name: str, value: Any) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype == object:
        raise ModelFileError(f"array {name!r} has dtype object, which cannot be saved")
    # safetensors is little-endian: convert big-endian input here, so that the
    # digest written is the one computed again from the loaded arrays. Not
    # np.ascontiguousarray alone: it turns a 0-d array into shape (1,).
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def write_model(path: str | Path, model: ModelFile) -> Path:
    """Write atomically; an existing file at ``path`` stays intact on any failure."""
    path = Path(path)
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "defectkit_version": __version__}
    info.update(model.info)
    try:
        info_json = json.dumps(info, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"model info cannot be saved as JSON ({e})") from None
    arrays = {k: _storable(k, v) for k, v in model.arrays.items()}
    meta = {_META_KEY: info_json, _HASH_KEY: _digest(info_json, arrays)}
    try:
        data = st_save(arrays, metadata=meta)
    except SafetensorError as e:
        raise ModelFileError(f"arrays cannot be saved ({e})") from None
    write_bytes(path, data)
    return path


def _read_metadata(data: bytes, path: Path) -> dict[str, str]:
    if len(data) < 8:
        raise ModelFileError(f"{path}: not a defectkit model file (too short: {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ModelFileError(
            f"{path}: not a defectkit model file, or truncated (header length {n} "
            f"does not fit a {len(data)}-byte file)"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ModelFileError(f"{path}: corrupt model header ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or _META_KEY not in meta:
        raise ModelFileError(f"{path}: a safetensors file, but not a defectkit model")
    if not all(isinstance(v, str) for v in meta.values()):
        raise ModelFileError(f"{path}: corrupt model header (metadata values must be text)")
    return meta


def read_model(path: str | Path) -> ModelFile:
    """Read and verify a model file; raise ModelFileError saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, expected a model file (.dkm)")
    try:
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise ModelFileError(f"{path}: {size} bytes is larger than any defectkit model")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found") from None
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise ModelFileError(f"{path}: the file is empty (0 bytes), not a defectkit model")
    try:
        meta = _read_metadata(data, path)
    except ModelFileError:
        # Checked only once the safetensors reading failed: a valid header length
        # can itself start with these bytes (384 is b"\x80\x01...").
        if data[:1] == b"\x80" or data[:2] == b"PK":
            raise ModelFileError(
                f"{path}: looks like a pickle/zip (e.g. torch.save) file; defectkit loads "
                "only its own safetensors model files and never unpickles"
            ) from None
        raise
    try:
        arrays = st_load(data)
    except KeyError as e:  # a dtype numpy cannot hold, e.g. BF16 from torch
        raise ModelFileError(f"{path}: unsupported tensor dtype {e}") from None
    except (SafetensorError, ValueError, OverflowError) as e:
        raise ModelFileError(f"{path}: corrupt or truncated tensor data ({e})") from None
    info_json = meta[_META_KEY]
    if meta.get(_HASH_KEY) != _digest(info_json, arrays):
        raise ModelFileError(f"{path}: checksum mismatch: the file was modified or damaged")
    try:
        info = json.loads(info_json)
    except (TypeError, ValueError, RecursionError) as e:
        raise ModelFileError(f"{path}: corrupt model description ({e})") from None
    if not isinstance(info, dict):
        raise ModelFileError(f"{path}: corrupt model description (not a JSON object)")
    if info.get("format") != FORMAT:
        raise ModelFileError(f"{path}: unknown format {info.get('format')!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version!r} is newer than this defectkit "
            f"({__version__}) understands (<= {FORMAT_VERSION}); upgrade defectkit"
        )
    return ModelFile(info=info, arrays=arrays)

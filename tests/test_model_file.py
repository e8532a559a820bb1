"""Model files: round trips, atomic writes, and every damaged or foreign file
refused with a ModelFileError that says what is wrong (never another error)."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save
from safetensors.torch import save as st_torch_save

from defectkit import atomic, model_file
from defectkit.errors import ModelFileError
from defectkit.model_file import FORMAT, FORMAT_VERSION, ModelFile, read_model, write_model

# ---------------------------------------------------------------- helpers


def sample_model() -> ModelFile:
    rng = np.random.default_rng(0)
    return ModelFile(
        info={"method": "patchcore", "params": {"k": 3, "ratio": 0.1}, "note": "ok"},
        arrays={
            "bank": rng.standard_normal((5, 4)).astype(np.float32),
            "origin": np.arange(12, dtype=np.int32).reshape(4, 3),
        },
    )


def forge(path: Path, info: object, arrays: dict[str, np.ndarray] | None = None) -> Path:
    """A file with a correct checksum around any info (bypasses write_model's stamps)."""
    arrays = arrays or {}
    info_json = info if isinstance(info, str) else json.dumps(info)
    meta = {"defectkit": info_json, "defectkit_sha256": model_file._digest(info_json, arrays)}
    path.write_bytes(st_save(arrays, metadata=meta))
    return path


def raw_safetensors(header: object) -> bytes:
    """Bytes of a safetensors container with an arbitrary header and no data."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def refused(path: Path, *words: str) -> str:
    with pytest.raises(ModelFileError) as info:
        read_model(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "array",
    [
        np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
        np.array([1.5, -np.inf, np.nan, 1e300]),
        np.array([0.5, 65504, -2], dtype=np.float16),
        np.array([-(2**63), 2**63 - 1], dtype=np.int64),
        np.array([[0, 255], [7, 128]], dtype=np.uint8),
        np.array([-128, 127], dtype=np.int8),
        np.array([2**32 - 1], dtype=np.uint32),
        np.array([2**64 - 1], dtype=np.uint64),
        np.array([[True, False, True]]),
        np.array([1 + 2j, -3j], dtype=np.complex64),
        np.zeros((0, 7), dtype=np.float32),
        np.float32(2.5) + np.zeros((), dtype=np.float32),  # 0-d keeps shape ()
        np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian input
        np.arange(5, dtype=">i8"),
        np.arange(12, dtype=np.float64).reshape(3, 4).T,  # not C-contiguous
        np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    ],
    ids=lambda a: f"{a.dtype.str}{a.shape}",
)
def test_round_trip_arrays(tmp_path, array):
    path = write_model(tmp_path / "m.dkm", ModelFile(info={}, arrays={"a": array}))
    back = read_model(path).arrays["a"]
    assert back.shape == array.shape
    assert back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_round_trip_many_arrays_and_info(tmp_path):
    model = sample_model()
    model.info["nested"] = {"list": [1, 2.5, None, True], "unicode": "Prüfung 検査", "nan": 1.0}
    path = write_model(tmp_path / "sub" / "dir" / "m.dkm", model)  # makes the folders
    assert path == tmp_path / "sub" / "dir" / "m.dkm"
    back = read_model(str(path))  # str paths work too
    assert set(back.arrays) == set(model.arrays)
    for name, a in model.arrays.items():
        np.testing.assert_array_equal(back.arrays[name], a)
        assert back.arrays[name].dtype == a.dtype
    for key, value in model.info.items():
        assert back.info[key] == value
    assert back.info["format"] == FORMAT
    assert back.info["format_version"] == FORMAT_VERSION
    assert back.info["defectkit_version"]


def test_no_arrays_and_nan_in_info(tmp_path):
    path = write_model(tmp_path / "m.dkm", ModelFile(info={"score": float("nan")}))
    back = read_model(path)
    assert back.arrays == {}
    assert np.isnan(back.info["score"])


def test_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_model(tmp_path / "m.dkm", sample_model())
    finally:
        os.umask(old)
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_unsavable_input_is_a_model_file_error(tmp_path):
    with pytest.raises(ModelFileError, match="dtype object"):
        write_model(tmp_path / "m.dkm", ModelFile(info={}, arrays={"a": np.array([{}, 1])}))
    with pytest.raises(ModelFileError, match="cannot be saved"):
        write_model(tmp_path / "m.dkm", ModelFile(info={}, arrays={"a": np.array(["text"])}))
    with pytest.raises(ModelFileError, match="JSON"):
        write_model(tmp_path / "m.dkm", ModelFile(info={"x": object()}))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- atomic writes


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != "m.dkm"]


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, where):
    path = write_model(tmp_path / "m.dkm", sample_model())
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if where == "replace":
        monkeypatch.setattr(atomic.os, "replace", boom)
    elif where == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", boom)
    else:  # the write itself fails midway: half the bytes reach the temp file
        real_fdopen = os.fdopen

        def half_fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            real_write = f.write

            def write(data):
                real_write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")

            f.write = write
            return f

        monkeypatch.setattr(atomic.os, "fdopen", half_fdopen)

    other = ModelFile(info={"method": "other"}, arrays={"x": np.ones(3)})
    with pytest.raises(OSError, match="No space"):
        write_model(path, other)
    assert path.read_bytes() == before
    assert read_model(path).info["method"] == "patchcore"
    assert leftovers(tmp_path) == []


def test_interrupted_write_leaves_no_temp(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_model(tmp_path / "m.dkm", sample_model())
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_content(tmp_path):
    path = write_model(tmp_path / "m.dkm", sample_model())
    write_model(path, ModelFile(info={"method": "other"}, arrays={"x": np.ones(2)}))
    back = read_model(path)
    assert back.info["method"] == "other"
    assert list(back.arrays) == ["x"]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- damaged files


@pytest.fixture
def good_bytes(tmp_path) -> bytes:
    return write_model(tmp_path / "good.dkm", sample_model()).read_bytes()


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def test_truncated_everywhere(tmp_path, good_bytes):
    path = tmp_path / "cut.dkm"
    end = header_end(good_bytes)
    messages = {}
    for cut in range(len(good_bytes)):
        path.write_bytes(good_bytes[:cut])
        with pytest.raises(ModelFileError) as info:
            read_model(path)
        messages[cut] = str(info.value)
    assert "empty" in messages[0]
    assert all("too short" in messages[c] for c in range(1, 8))
    assert all("truncated" in messages[c] for c in range(8, end))
    assert all("truncated" in messages[c] for c in range(end, len(good_bytes)))


def flipped(data: bytes, at: int, mask: int = 0x01) -> bytes:
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


def test_flipped_byte_in_header_structure(tmp_path, good_bytes):
    path = tmp_path / "bad.dkm"
    path.write_bytes(flipped(good_bytes, 8, 0xFF))  # the header's opening brace
    refused(path, "corrupt model header")
    shape_at = good_bytes.index(b'"shape":[5,4]') + len('"shape":[')
    path.write_bytes(good_bytes[:shape_at] + b"6" + good_bytes[shape_at + 1 :])
    refused(path, "corrupt or truncated tensor data")


def test_flipped_byte_in_metadata_json(tmp_path, good_bytes):
    path = tmp_path / "bad.dkm"
    at = good_bytes.index(b"patchcore")
    path.write_bytes(flipped(good_bytes, at))  # still valid JSON, other content
    refused(path, "checksum mismatch")


def test_flipped_byte_in_tensor_data(tmp_path, good_bytes):
    path = tmp_path / "bad.dkm"
    end = header_end(good_bytes)
    for at in (end, (end + len(good_bytes)) // 2, len(good_bytes) - 1):
        path.write_bytes(flipped(good_bytes, at))
        refused(path, "checksum mismatch")


def test_flipped_checksum(tmp_path, good_bytes):
    path = tmp_path / "bad.dkm"
    digest = json.loads(good_bytes[8 : header_end(good_bytes)])["__metadata__"]
    at = good_bytes.index(digest["defectkit_sha256"].encode())
    path.write_bytes(good_bytes[:at] + b"0" * 64 + good_bytes[at + 64 :])
    refused(path, "checksum mismatch")


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_single_byte_flip_is_refused(tmp_path, good_bytes, mask):
    path = tmp_path / "bad.dkm"
    for at in range(len(good_bytes)):
        path.write_bytes(flipped(good_bytes, at, mask))
        with pytest.raises(ModelFileError):
            read_model(path)


# ---------------------------------------------------------------- foreign files


class _CreatesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_is_never_unpickled(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.dkm"
    path.write_bytes(pickle.dumps(_CreatesMarker(marker), protocol=protocol))
    message = refused(path)
    assert not marker.exists()
    if protocol >= 2:  # binary pickles are named as such
        assert "pickle" in message and "never unpickles" in message


def test_torch_save_files_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, path)
    assert zipfile.is_zipfile(path)
    refused(path, "pickle/zip", "torch.save")
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    refused(path, "pickle")


@pytest.mark.parametrize("target", [0x180, 0x4B50], ids=["x80", "PK"])
def test_header_length_looking_like_pickle_is_still_read(tmp_path, monkeypatch, target):
    # Regression: header lengths 384 (b"\x80\x01...") and 19280 (b"PK...") were
    # taken for pickle/zip signatures, refusing valid model files.
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: None)  # speed only
    path = tmp_path / "m.dkm"
    base = header_end(write_model(path, ModelFile(info={"pad": ""})).read_bytes()) - 8
    for pad in range(max(0, target - base - 16), target - base + 16):
        data = write_model(path, ModelFile(info={"pad": "a" * pad})).read_bytes()
        if header_end(data) - 8 == target:
            break
    else:
        pytest.fail(f"no header of length {target} was produced")
    assert data[:1] == b"\x80" or data[:2] == b"PK"
    assert read_model(path).info["pad"] == "a" * pad


def test_plain_safetensors_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    path.write_bytes(st_save({"a": np.zeros(3, np.float32)}))
    refused(path, "not a defectkit model")
    path.write_bytes(st_save({"a": np.zeros(3, np.float32)}, metadata={"author": "x"}))
    refused(path, "not a defectkit model")


def test_unsupported_dtype_refused(tmp_path):
    path = tmp_path / "bf16.dkm"
    meta = {"defectkit": "{}", "defectkit_sha256": "0" * 64}
    path.write_bytes(st_torch_save({"a": torch.zeros(3, dtype=torch.bfloat16)}, metadata=meta))
    refused(path, "unsupported tensor dtype", "BF16")


def test_newer_format_version_says_upgrade(tmp_path):
    info = {"format": FORMAT, "format_version": FORMAT_VERSION + 1}
    path = forge(tmp_path / "new.dkm", info, {"a": np.zeros(2, np.float32)})
    refused(path, "newer", "upgrade defectkit")
    path = forge(tmp_path / "odd.dkm", {"format": FORMAT, "format_version": "1"})
    refused(path, "upgrade defectkit")


def test_current_and_older_versions_read(tmp_path):
    for version in range(1, FORMAT_VERSION + 1):
        path = forge(tmp_path / f"v{version}.dkm", {"format": FORMAT, "format_version": version})
        assert read_model(path).info["format_version"] == version


def test_other_format_refused(tmp_path):
    path = forge(tmp_path / "x.dkm", {"format": "something-else", "format_version": 1})
    refused(path, "unknown format", "something-else")


@pytest.mark.parametrize("info", ["not json {", "[1, 2]", '"text"', "null"])
def test_bad_description_with_valid_checksum(tmp_path, info):
    refused(forge(tmp_path / "x.dkm", info), "corrupt model description")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ((2**63).to_bytes(8, "little") + b"{}", ("does not fit",)),
        ((2**64 - 1).to_bytes(8, "little") + b"{}" * 8, ("does not fit",)),
        ((0).to_bytes(8, "little") + b"{}", ("does not fit",)),
        (raw_safetensors([1, 2, 3]), ("not a defectkit model",)),
        (raw_safetensors("text"), ("not a defectkit model",)),
        (raw_safetensors({"__metadata__": [1]}), ("not a defectkit model",)),
        (raw_safetensors({"__metadata__": {"defectkit": 5}}), ("metadata values",)),
        (raw_safetensors({"__metadata__": {"defectkit": "{}"}}), ("checksum",)),
        (b"\x08" + b"\x00" * 7 + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8", ("corrupt model header",)),
        (len(b"[" * 100_000).to_bytes(8, "little") + b"[" * 100_000, ("corrupt model header",)),
        (b"\x00" * 64, ("does not fit",)),
        (b"hello world, not a model", ("not a defectkit model file",)),
    ],
    ids=range(12),
)
def test_hostile_headers(tmp_path, data, words):
    path = tmp_path / "x.dkm"
    path.write_bytes(data)
    refused(path, *words)


def test_tensor_offsets_outside_data(tmp_path):
    header = {
        "__metadata__": {"defectkit": "{}", "defectkit_sha256": "0" * 64},
        "a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]},
    }
    path = tmp_path / "x.dkm"
    path.write_bytes(raw_safetensors(header) + b"\x00" * 16)
    refused(path, "corrupt or truncated tensor data")


# ---------------------------------------------------------------- missing paths


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.dkm", "not found")
    refused(tmp_path / "no" / "such" / "folder" / "m.dkm", "not found")


def test_folder(tmp_path):
    refused(tmp_path, "is a folder")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dkm"
    path.write_bytes(b"")
    refused(path, "empty")


def test_too_large_file(tmp_path, monkeypatch, good_bytes):
    path = tmp_path / "m.dkm"
    path.write_bytes(good_bytes)
    monkeypatch.setattr(model_file, "MAX_MODEL_BYTES", len(good_bytes) - 1)
    refused(path, "larger than any defectkit model")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path, good_bytes):
    path = tmp_path / "m.dkm"
    path.write_bytes(good_bytes)
    path.chmod(0)
    try:
        refused(path, "permission denied")
    finally:
        path.chmod(0o644)

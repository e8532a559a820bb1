"""ONNX bundles: export, parity with the PyTorch path, refusal of bad bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fit, shared_dataset
from typer.testing import CliRunner

from defectkit.cli import app
from defectkit.detector import Detector
from defectkit.errors import ModelFileError
from defectkit.export.onnx_bundle import (
    DETECTOR_FILE,
    EXTRACTOR_FILE,
    MANIFEST,
    ExportError,
    export_onnx,
    read_bundle,
)
from defectkit.export.runtime import OrtFeatureExtractor, load_onnx_detector

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

runner = CliRunner()

SMALL = {  # name: (method, settings)
    "patchcore": (
        "patchcore",
        {"backbone": "efficientnet-lite0", "image_size": 64, "coreset_ratio": 0.1},
    ),
    # the context scale's whole-image descriptor has entries constant over the
    # training images at this size: they once amplified float rounding to 0.8%
    "patchcore-context": (
        "patchcore",
        {
            "backbone": "efficientnet-lite0",
            "image_size": 96,
            "context_size": 64,
            "coreset_ratio": 0.1,
        },
    ),
    "padim": ("padim", {"image_size": 64, "context_size": 32}),
    "kmeans": ("kmeans", {"image_size": 64, "n_clusters": 16, "n_iter": 5}),
}


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))


@pytest.fixture(scope="module", params=sorted(SMALL))
def exported(
    request: pytest.FixtureRequest,
    surface_set: dict[str, list[np.ndarray]],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Detector, Path]:
    det = Detector.fit(surface_set["train"], *SMALL[request.param], calibration_fraction=0.25)
    out = tmp_path_factory.mktemp("bundle") / request.param
    export_onnx(det, out)
    return det, out


def test_bundle_holds_onnx_safetensors_and_a_manifest(exported: tuple[Detector, Path]) -> None:
    det, out = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, EXTRACTOR_FILE, DETECTOR_FILE]
    )
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["method"] == det.model.name
    assert manifest["extractor"]["layers"] == list(det.model.extractor.layers)
    assert set(manifest["files"]) == {EXTRACTOR_FILE, DETECTOR_FILE}
    # the arrays file is safetensors (8-byte header length, then JSON), never a pickle
    head = (out / DETECTOR_FILE).read_bytes()[:9]
    assert head[8:9] == b"{"
    assert not any(p.name.endswith((".tmp", ".old")) for p in out.parent.iterdir())


def test_onnx_scores_match_pytorch_with_same_decisions(
    exported: tuple[Detector, Path], surface_set: dict[str, list[np.ndarray]]
) -> None:
    det, out = exported
    onnx_det = load_onnx_detector(out)
    assert isinstance(onnx_det.model.extractor, OrtFeatureExtractor)
    images = surface_set["good"] + surface_set["bad"]
    want, got = det.score(images), onnx_det.score(images)
    assert _max_rel(want.scores, got.scores) < 1e-3
    np.testing.assert_array_equal(det.decide(want.scores), onnx_det.decide(got.scores))
    assert det.decide(want.scores)[len(surface_set["good"]) :].any()  # some defects are NG
    for a, b in zip(want.maps, got.maps, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * float(a.max()))
    assert onnx_det.threshold == det.threshold
    assert onnx_det.pixel_threshold == det.pixel_threshold


def test_tampered_bundle_is_refused(exported: tuple[Detector, Path], tmp_path: Path) -> None:
    _, out = exported
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    read_bundle(copy)  # intact
    data = bytearray((copy / EXTRACTOR_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / EXTRACTOR_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"extractor\.onnx: checksum mismatch"):
        load_onnx_detector(copy)
    (copy / EXTRACTOR_FILE).unlink()
    with pytest.raises(ModelFileError, match=r"partial bundle, extractor\.onnx is missing"):
        load_onnx_detector(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(ModelFileError, match=r"manifest\.json is missing"):
        load_onnx_detector(copy)


def test_manifest_edits_are_refused(exported: tuple[Detector, Path], tmp_path: Path) -> None:
    _, out = exported
    for change, message in [
        ({"format": "other"}, "not a defectkit ONNX bundle"),
        ({"format_version": 99}, "newer than this defectkit"),
        ({"method": "texture"}, "has no ONNX runtime"),
    ]:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        copy.mkdir()
        for p in out.iterdir():
            (copy / p.name).write_bytes(p.read_bytes())
        manifest = json.loads((copy / MANIFEST).read_text())
        manifest.update(change)
        (copy / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(ModelFileError, match=message):
            read_bundle(copy)


def _copy_bundle(out: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in out.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_crafted_bundles_cannot_reach_outside_their_folder(
    exported: tuple[Detector, Path], tmp_path: Path
) -> None:
    """Checksums are written by whoever made the bundle, so they stop accidents, not
    a crafted bundle: the file names and the ONNX file's own references must be
    checked too."""
    import hashlib

    import onnx

    _, out = exported
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)

    # 1) a manifest naming a file outside the bundle
    copy = _copy_bundle(out, tmp_path / "names")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["../secret.bin"] = hashlib.sha256(secret.read_bytes()).hexdigest()
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=r"must list extractor\.onnx and detector"):
        read_bundle(copy)

    # 2) an extractor whose weights point at ../secret.bin, checksums made consistent
    copy = _copy_bundle(out, tmp_path / "external")
    model = onnx.load(str(copy / EXTRACTOR_FILE))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "64")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (copy / EXTRACTOR_FILE).write_bytes(model.SerializeToString())
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"][EXTRACTOR_FILE] = hashlib.sha256(
        (copy / EXTRACTOR_FILE).read_bytes()
    ).hexdigest()
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=r"external data \('\.\./secret\.bin'\)"):
        load_onnx_detector(copy)

    # 3) garbage with a matching checksum is refused as unreadable, not crashed on
    copy = _copy_bundle(out, tmp_path / "garbage")
    (copy / EXTRACTOR_FILE).write_bytes(b"<html>not onnx</html>")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"][EXTRACTOR_FILE] = hashlib.sha256(b"<html>not onnx</html>").hexdigest()
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        read_bundle(copy)


def test_method_without_export_is_named(
    surface_set: dict[str, list[np.ndarray]], tmp_path: Path
) -> None:
    det = Detector.fit(surface_set["train"], "threshold", {"size": 64})
    with pytest.raises(ExportError, match="method 'threshold' cannot be exported to ONNX"):
        export_onnx(det, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_export_never_replaces_a_folder_that_is_not_a_bundle(
    exported: tuple[Detector, Path], tmp_path: Path
) -> None:
    det, _ = exported
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="not a bundle"):
        export_onnx(det, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    export_onnx(det, tmp_path / "b")
    export_onnx(det, tmp_path / "b")  # a bundle is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "mine"]


# -- command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_model(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("cli") / "stone.dkm"
    return cli_fit(
        demo_root, model, *("-p", "image_size=64", "-p", "coreset_ratio=0.1"),
        *("-p", "backbone=efficientnet-lite0", "--calibration-fraction", "0.25"),
    )  # fmt: skip


def test_cli_export_then_inspect_gives_the_same_lines(
    cli_model: Path, demo_root: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    res = runner.invoke(app, ["export", str(cli_model), "--format", "onnx", "--out", str(bundle)])
    assert res.exit_code == 0, res.output
    test_dir = str(demo_root / "test")
    torch_res = runner.invoke(app, ["inspect", str(cli_model), test_dir, "-q"])
    onnx_res = runner.invoke(app, ["inspect", str(bundle), test_dir, "-q", "--runtime", "onnx"])
    assert torch_res.exit_code == onnx_res.exit_code == 0, onnx_res.output
    want = [json.loads(x) for x in torch_res.stdout.splitlines()]
    got = [json.loads(x) for x in onnx_res.stdout.splitlines()]
    assert len(got) == len(want) > 0
    for a, b in zip(want, got, strict=True):
        assert set(a) == set(b)
        assert (a["path"], a["is_defect"], a["threshold"]) == (
            b["path"],
            b["is_defect"],
            b["threshold"],
        )
        assert abs(a["score"] - b["score"]) <= 1e-3 * abs(a["score"])
        assert len(a["regions"]) == len(b["regions"])
        assert a["closest_good"] == b["closest_good"]
    assert any(a["is_defect"] for a in want)
    # a bundle folder runs with onnx by default, and with torch when asked
    auto = runner.invoke(app, ["inspect", str(bundle), test_dir, "-q"])
    assert auto.stdout == onnx_res.stdout
    via_torch = runner.invoke(app, ["inspect", str(bundle), test_dir, "-q", "--runtime", "torch"])
    assert via_torch.stdout == torch_res.stdout


def test_cli_refuses_bad_bundles_and_runtimes(
    cli_model: Path, demo_root: Path, tmp_path: Path
) -> None:
    test_dir = str(demo_root / "test")
    res = runner.invoke(app, ["inspect", str(cli_model), test_dir, "--runtime", "onnx"])
    assert res.exit_code == 2
    assert "needs a bundle folder" in res.output
    res = runner.invoke(app, ["inspect", str(cli_model), test_dir, "--runtime", "tpu"])
    assert res.exit_code == 2 and "--runtime must be" in res.output
    bundle = tmp_path / "b"
    assert runner.invoke(app, ["export", str(cli_model), "--out", str(bundle)]).exit_code == 0
    (bundle / DETECTOR_FILE).write_bytes((bundle / DETECTOR_FILE).read_bytes()[:-10])
    res = runner.invoke(app, ["inspect", str(bundle), test_dir])
    assert res.exit_code == 2
    assert "detector.safetensors: checksum mismatch" in res.output
    res = runner.invoke(app, ["export", str(cli_model), "--format", "tflite", "--out", str(bundle)])
    assert res.exit_code == 2 and "--format must be onnx" in res.output


# -- real data --------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_parity_on_magnetic_tile(method: str, tmp_path: Path) -> None:
    from defectkit.data.batches import load_all
    from defectkit.data.datasets import read_mvtec

    ds = read_mvtec(shared_dataset("magnetic-tile"))
    train, _, errors = load_all(ds.train[::38][:20])
    assert not errors and len(train) == 20
    samples = ds.test[::40]
    test, _, errors = load_all([s.path for s in samples])
    assert not errors
    params = {
        "patchcore": {"image_size": 128, "coreset_ratio": 0.05},
        "padim": {"image_size": 128, "context_size": 64},
    }[method]
    det = Detector.fit(train, method, params, calibration_fraction=0.2)
    export_onnx(det, tmp_path / "b")
    onnx_det = load_onnx_detector(tmp_path / "b")
    want, got = det.score(test), onnx_det.score(test)
    assert _max_rel(want.scores, got.scores) < 1e-3
    np.testing.assert_array_equal(det.decide(want.scores), onnx_det.decide(got.scores))
    labels = np.array([s.label for s in samples])
    assert labels.any() and not labels.all()  # both good and defective parts compared


def test_cli_evaluate_a_bundle_gives_the_same_figures(
    cli_model: Path, demo_root: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "b"
    assert runner.invoke(app, ["export", str(cli_model), "--out", str(bundle)]).exit_code == 0
    want = runner.invoke(
        app, ["evaluate", str(cli_model), str(demo_root), "--format", "json", "-q"]
    )
    got = runner.invoke(app, ["evaluate", str(bundle), str(demo_root), "--format", "json", "-q"])
    assert want.exit_code == got.exit_code == 0, got.output
    a, b = json.loads(want.stdout), json.loads(got.stdout)
    assert b["image_auroc"] == pytest.approx(a["image_auroc"], abs=1e-6)
    assert b["pixel_auroc"] == pytest.approx(a["pixel_auroc"], abs=1e-4)

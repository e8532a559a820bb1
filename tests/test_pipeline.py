"""One pipeline under every entry point: a model fitted on tiles is scored tile by
tile by inspect (one process and worker processes), evaluate, report, calibrate,
the service and an ONNX bundle, with the same scores; the pipeline's settings are
checked when made."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fit
from fastapi.testclient import TestClient
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from defectkit import pipeline
from defectkit.cli import app
from defectkit.data.images import load_image
from defectkit.decide.calibration import threshold_for_false_alarm_rate
from defectkit.detector import Detector
from defectkit.errors import ConfigError
from defectkit.tiling import Tiling, score_tiled

runner = CliRunner()
SMALL = ["-p", "backbone=efficientnet-lite0", "-p", "image_size=64", "-p", "coreset_ratio=0.1"]
TILED = ["--tile", "64", "--calibration-fraction", "0.25", *SMALL]


@pytest.fixture(scope="module")
def tiled(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cli_fit(demo_root, tmp_path_factory.mktemp("tiled") / "t.dkm", *TILED)


@pytest.fixture(scope="module")
def expected(tiled: Path, demo_root: Path) -> dict[str, tuple[float, int]]:
    """(score, label) of every test image, scored tile by tile by the method itself
    (not through the detector, so a detector that forgets its tiles is caught)."""
    det = Detector.load(tiled)
    assert det.tiling == Tiling(64, 8, "max")
    paths = sorted((demo_root / "test").rglob("*.png"))
    res = score_tiled(det.model, [load_image(p) for p in paths], 64, 8)
    whole = det.model.score([load_image(p) for p in paths]).scores
    assert not np.allclose(res.scores, whole, rtol=1e-3)  # tiles make a difference here
    return {
        str(p): (float(s), int(p.parent.name != "good"))
        for p, s in zip(paths, res.scores, strict=True)
    }


def _auroc(expected: dict[str, tuple[float, int]]) -> float:
    scores, labels = zip(*expected.values(), strict=True)
    return float(roc_auc_score(labels, scores))


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_inspect_scores_a_tiled_model_tile_by_tile(
    tiled: Path, demo_root: Path, expected: dict[str, tuple[float, int]], jobs: str
) -> None:
    res = runner.invoke(app, ["inspect", str(tiled), str(demo_root / "test"), "-q",
                              "--jobs", jobs, "--batch-size", "4"])  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert len(lines) == len(expected)
    for line in lines:
        assert line["score"] == pytest.approx(expected[line["path"]][0], rel=1e-5)
        assert line["evidence"]["tiles"] == 4


def test_evaluate_and_report_score_a_tiled_model_tile_by_tile(
    tiled: Path, demo_root: Path, expected: dict[str, tuple[float, int]], tmp_path: Path
) -> None:
    res = runner.invoke(app, ["evaluate", str(tiled), str(demo_root), "--format", "json", "-q"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["image_auroc"] == pytest.approx(_auroc(expected), abs=1e-9)
    res = runner.invoke(app, ["report", str(tiled), str(demo_root), "--out",
                              str(tmp_path / "r.html"), "--format", "json", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["image_auroc"] == pytest.approx(_auroc(expected), abs=1e-9)
    thr = Detector.load(tiled).threshold
    assert thr is not None
    good = [s for s, y in expected.values() if y == 0]
    want_far = np.mean(np.asarray(good) >= thr.value)
    assert summary["false_alarm_rate"] == pytest.approx(want_far)


def test_calibrate_scores_a_tiled_model_tile_by_tile(
    tiled: Path, demo_root: Path, expected: dict[str, tuple[float, int]], tmp_path: Path
) -> None:
    out = tmp_path / "recalibrated.dkm"
    good_dir = str(demo_root / "test" / "good")
    res = runner.invoke(app, ["calibrate", str(tiled), good_dir, "--target",
                              "false-alarm-rate=0.2", "--out", str(out), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    good = np.array([s for s, y in expected.values() if y == 0], np.float32)
    want = threshold_for_false_alarm_rate(good, 0.2)
    det = Detector.load(out)
    assert det.threshold is not None
    assert det.threshold.value == pytest.approx(want.value, rel=1e-5)
    assert det.tiling == Tiling(64, 8, "max")  # calibrate keeps the geometry


def test_the_service_scores_a_tiled_model_tile_by_tile(
    tiled: Path, demo_root: Path, expected: dict[str, tuple[float, int]], tmp_path: Path
) -> None:
    from defectkit.serve.app import create_app
    from defectkit.serve.store import ResultStore

    store = ResultStore.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    det = pipeline.load_detector(tiled)  # as `defectkit serve` loads it
    path = sorted((demo_root / "test").rglob("*.png"))[-1]
    try:
        with TestClient(create_app(det, store, token="t")) as client:
            files = {"file": (path.name, path.read_bytes(), "image/png")}
            res = client.post("/inspect", files=files, headers={"Authorization": "Bearer t"})
            assert res.status_code == 201, res.text
            assert res.json()["score"] == pytest.approx(expected[str(path)][0], rel=1e-5)
            assert client.get("/model").json()["tiling"] == {"tile": 64, "overlap": 8,
                                                             "blend": "max"}  # fmt: skip
    finally:
        store.close()


def test_an_onnx_bundle_of_a_tiled_model_scores_tile_by_tile(
    tiled: Path, demo_root: Path, expected: dict[str, tuple[float, int]], tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    res = runner.invoke(app, ["export", str(tiled), "--out", str(bundle)])
    assert res.exit_code == 0, res.output
    paths = sorted((demo_root / "test").rglob("*.png"))[:4]
    res = runner.invoke(app, ["inspect", str(bundle), *map(str, paths), "-q"])
    assert res.exit_code == 0, res.output
    for line in map(json.loads, res.stdout.splitlines()):
        assert line["score"] == pytest.approx(expected[line["path"]][0], rel=1e-3)
        assert line["evidence"]["tiles"] == 4


def test_old_model_files_keep_their_tiling_from_provenance(tiled: Path, tmp_path: Path) -> None:
    """Before the tiling was part of the model, fit --tile wrote it into provenance."""
    from defectkit.model_file import read_model, write_model

    mf = read_model(tiled)
    info = dict(mf.info)
    info["provenance"] = {**info["provenance"], "tiling": info.pop("tiling")}
    old = tmp_path / "old.dkm"
    write_model(old, type(mf)(info=info, arrays=mf.arrays))
    det = Detector.load(old)
    assert det.tiling == Tiling(64, 8, "max") and "tiling" not in det.info


def test_fit_settings_are_checked_when_made(demo_root: Path) -> None:
    with pytest.raises(ConfigError, match="--false-alarm-rate must be in"):
        pipeline.CalibrationSettings(false_alarm_rate=1.5)
    with pytest.raises(ConfigError, match="no setting"):
        pipeline.FitSettings(params={"bogus": 1})
    with pytest.raises(ConfigError, match="give it or --tile, not both"):
        pipeline.FitSettings(tiling=Tiling(64), min_defect_px=4)
    with pytest.raises(ConfigError, match="tile size must be"):
        Tiling(8)
    settings = pipeline.FitSettings(params={"image_size": 64})
    assert settings.method == "patchcore" and settings.params["seed"] == 0
    with pytest.raises(TypeError):
        settings.params["image_size"] = 32  # type: ignore[index]  # frozen


def test_pipeline_fit_gives_what_the_cli_writes(demo_root: Path, tmp_path: Path) -> None:
    """The CLI is a shell: the library call alone makes the same model."""
    model = cli_fit(demo_root, tmp_path / "cli.dkm", *SMALL)
    settings = pipeline.FitSettings(
        params={"backbone": "efficientnet-lite0", "image_size": 64, "coreset_ratio": 0.1}
    )
    result = pipeline.fit(settings, pipeline.FitData(demo_root))
    assert result.errors == []
    assert [n.split(":")[0] for n in result.notes] == ["few-shot mode"]  # 16 good images
    a, b = Detector.load(model), result.detector
    assert a.threshold is not None and b.threshold is not None
    assert a.threshold.value == pytest.approx(b.threshold.value, rel=1e-6)
    images = [load_image(p) for p in sorted((demo_root / "test").rglob("*.png"))[:3]]
    np.testing.assert_allclose(a.score(images).scores, b.score(images).scores, rtol=1e-6)

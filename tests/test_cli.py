"""The command line, end to end on data the tests generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_fit
from typer.testing import CliRunner

from defectkit.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def fitted(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("model") / "stone.dkm"
    return cli_fit(
        demo_root, model, "--param", "image_size=96", "--param", "coreset_ratio=0.1",
        "--calibration-fraction", "0.25", "--few-shot-below", "0",
    )  # fmt: skip


def test_fit_writes_a_model_with_a_calibrated_threshold(fitted: Path) -> None:
    res = runner.invoke(app, ["info", str(fitted)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["method"] == "patchcore"
    assert info["params"]["image_size"] == 96
    assert info["threshold"]["rule"] == "false-alarm-rate"
    assert info["threshold"]["n_good"] == 4  # 25% of 16 good images held out
    assert info["n_fit_images"] == 12


def test_info_says_what_the_calibration_can_certify(fitted: Path) -> None:
    info = json.loads(runner.invoke(app, ["info", str(fitted)]).stdout)
    cal = info["calibration"]
    assert cal["n_good"] == 4 and cal["estimator"] == "max" and cal["n_to_certify"] == 299
    assert cal["false_alarm_upper_95"] == pytest.approx(1 - 0.05 ** (1 / 4))
    assert "4 held-out good image(s) cannot certify a 1.0% false-alarm rate" in cal["warning"]
    assert info["calibration_scores"] == "4 scores (`defectkit info --full` lists them)"


def test_fit_warns_and_fits_a_tail_when_too_few_images_hold_out(
    demo_root: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m.dkm"
    args = ["fit", str(demo_root), "--out", str(model), "-q", "-p", "image_size=96"]
    res = runner.invoke(
        app,
        [
            *args,
            "-p",
            "coreset_ratio=0.1",
            "--calibration-fraction",
            "0.5",
            "--few-shot-below",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "warning: 8 held-out good image(s) cannot certify a 1.0% false-alarm rate" in text
    assert "log-normal tail" in text and "defectkit calibrate MODEL GOOD_DIR" in text
    info = json.loads(runner.invoke(app, ["info", str(model), "--full"]).stdout)
    assert info["threshold"]["estimator"] == "tail"
    scores = info["calibration_scores"]
    assert len(scores) == 8 and info["threshold"]["value"] > max(scores)


def test_inspect_jsonl_one_line_per_image_in_sorted_order(
    fitted: Path, demo_root: Path, tmp_path: Path
) -> None:
    maps = tmp_path / "maps"
    res = runner.invoke(
        app, ["inspect", str(fitted), str(demo_root / "test"), "--maps-out", str(maps), "-q"]
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    files = sorted(p for p in (demo_root / "test").rglob("*.png"))
    assert [Path(r["path"]) for r in lines] == files
    for r in lines:
        assert set(r) >= {"path", "score", "is_defect", "threshold", "error"}
        assert r["error"] is None
        assert isinstance(r["is_defect"], bool)
        assert r["is_defect"] == (r["score"] >= r["threshold"])
        assert Path(r["overlay"]).is_file()
    good = [r["score"] for r in lines if Path(r["path"]).parent.name == "good"]
    bad = [r["score"] for r in lines if Path(r["path"]).parent.name != "good"]
    assert sum(bad) / len(bad) > sum(good) / len(good)


def test_inspect_reports_a_bad_file_and_goes_on(
    fitted: Path, demo_root: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    missing = tmp_path / "missing.png"
    good = sorted((demo_root / "test" / "good").glob("*.png"))[:2]
    res = runner.invoke(
        app, ["inspect", str(fitted), str(good[0]), str(broken), str(missing), str(good[1]), "-q"]
    )
    assert res.exit_code == 1
    lines = {Path(x["path"]).name: x for x in map(json.loads, res.stdout.splitlines())}
    assert len(lines) == 4
    assert "not an image" in lines["broken.png"]["error"] or "text" in lines["broken.png"]["error"]
    assert lines["broken.png"]["score"] is None
    assert "not found" in lines["missing.png"]["error"] or "exist" in lines["missing.png"]["error"]
    assert lines[good[0].name]["error"] is None
    assert lines[good[1].name]["score"] is not None


def test_evaluate_json_has_the_contract_keys(fitted: Path, demo_root: Path) -> None:
    res = runner.invoke(app, ["evaluate", str(fitted), str(demo_root), "--format", "json", "-q"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    for key in (
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "pixel_auroc",
        "aupro",
        "n_good",
        "n_defect",
    ):
        assert key in metrics
    assert metrics["n_good"] == 6
    assert metrics["n_defect"] == 12
    assert metrics["image_auroc"] > 0.7
    assert metrics["pixel_auroc"] > 0.8


def test_methods_lists_the_default() -> None:
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    assert "patchcore (default)" in res.stdout


def test_bad_model_and_bad_options_exit_2(tmp_path: Path, demo_root: Path) -> None:
    fake = tmp_path / "fake.dkm"
    fake.write_bytes(b"\x80\x04garbage")
    res = runner.invoke(app, ["inspect", str(fake), str(demo_root)])
    assert res.exit_code == 2
    assert "pickle" in res.output
    res = runner.invoke(
        app, ["fit", str(demo_root), "--out", str(tmp_path / "m.dkm"), "--method", "nope"]
    )
    assert res.exit_code == 2
    assert "unknown method" in res.output
    res = runner.invoke(app, ["fit", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.dkm")])
    assert res.exit_code == 2
    assert "not found" in res.output
    res = runner.invoke(
        app, ["fit", str(demo_root), "--out", str(tmp_path / "m.dkm"), "-p", "bogus=1"]
    )
    assert res.exit_code == 2
    assert "no setting" in res.output


def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import defectkit.cli.tools as tools

    real = tools.__dict__.get("DEMO_SETTINGS")
    monkeypatch.setattr(
        tools,
        "DEMO_SETTINGS",
        {"categories": ("fabric",), "n_train": 16, "n_test_good": 4, "n_test_per_defect": 2},
    )
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "-q"])
    assert real is not None
    assert res.exit_code == 0, res.output
    assert "fabric" in res.stdout
    assert (tmp_path / "d" / "models" / "fabric.dkm").is_file()
    assert any((tmp_path / "d" / "heatmaps" / "fabric").glob("*.png"))

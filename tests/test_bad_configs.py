"""Bad datasets and settings: a clear error (exit 2, one line, no traceback) before
any long work, or, for a bad file inside a usable dataset, a warning and exit 1.

"Before long work" is checked by making fitting and scoring fail the test if they
are reached at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from defectkit import cli
from defectkit.detector import Detector

runner = CliRunner()
FAST = ["--method", "threshold", "--param", "size=32", "-q"]


@pytest.fixture(autouse=True)
def wide_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.common.err, "_width", 100_000)


@pytest.fixture
def no_long_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if fitting or scoring starts: the error must come before."""

    def boom(*args, **kwargs):
        raise AssertionError("long work started before the settings were checked")

    monkeypatch.setattr(Detector, "fit", boom)
    monkeypatch.setattr(Detector, "score", boom)


@pytest.fixture(scope="module")
def model(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cfg_model") / "m.dkm"
    res = runner.invoke(cli.app, ["fit", str(demo_root), "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    return out


def _usage_error(args: list[str], *fragments: str) -> str:
    res = runner.invoke(cli.app, [str(a) for a in args])
    assert res.exit_code == cli.EXIT_USAGE, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in res.output, (f, res.output)
    return res.output


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- datasets --------------------------------------------------------------------------------
def test_fit_on_an_empty_folder(tmp_path: Path, no_long_work) -> None:
    (tmp_path / "empty").mkdir()
    _usage_error(["fit", tmp_path / "empty", "--out", tmp_path / "m.dkm"], "no images found")


def test_fit_on_a_folder_of_non_images(tmp_path: Path, no_long_work) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("x")
    _usage_error(["fit", data, "--out", tmp_path / "m.dkm"], "no images found")


def test_fit_on_a_dataset_with_only_defects(demo_root: Path, tmp_path: Path, no_long_work):
    """test/<type> and ground_truth/ but no train/good: refused, not fitted on defects."""
    data = tmp_path / "only_defects"
    _copy(demo_root / "test", data / "test")
    _copy(demo_root / "ground_truth", data / "ground_truth")
    shutil.rmtree(data / "test" / "good")
    _usage_error(["fit", data, "--out", tmp_path / "m.dkm", *FAST], "no train/good folder")
    assert not (tmp_path / "m.dkm").exists()


def test_fit_when_no_training_image_can_be_read(demo_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "ds"
    (data / "train" / "good").mkdir(parents=True)
    for i in range(3):
        (data / "train" / "good" / f"{i}.png").write_bytes(b"<html>error page</html>")
    out = _usage_error(["fit", data, "--out", tmp_path / "m.dkm", *FAST], "none of the 3 images")
    assert "looks like an HTML page" in out  # each file's problem is named too


def test_evaluate_needs_a_test_set(model: Path, demo_root: Path, tmp_path: Path, no_long_work):
    data = tmp_path / "ds"
    _copy(demo_root / "train", data / "train")
    _usage_error(["evaluate", model, data, "-q"], "no test folder")
    (data / "test" / "good").mkdir(parents=True)
    _usage_error(["evaluate", model, data, "-q"], "no test images")
    _usage_error(["evaluate", model, tmp_path / "missing", "-q"], "not found")


def test_evaluate_with_masks_of_the_wrong_size(model: Path, demo_root: Path, tmp_path: Path):
    """A mask that does not fit its image: that image is skipped with both sizes
    named, the rest is evaluated, exit 1 (as for any file that failed)."""
    data = _copy(demo_root, tmp_path / "ds")
    masks = sorted((data / "ground_truth").rglob("*.png"))[:2]
    for m in masks:
        Image.new("L", (50, 40)).save(m)
    res = runner.invoke(cli.app, ["evaluate", str(model), str(data), "--format", "json", "-q"])
    assert res.exit_code == cli.EXIT_FILES_FAILED, res.output
    assert isinstance(res.exception, SystemExit)
    for m in masks:
        assert f"skipped {m}: " in res.stderr
    assert res.stderr.count("mask size 50x40 does not match image size 96x96") == 2
    metrics = json.loads(res.stdout)
    assert metrics["n_failed_files"] == 2
    n_test = sum(1 for _ in (data / "test").glob("*/*.png"))
    assert metrics["n_good"] + metrics["n_defect"] == n_test - 2


def test_evaluate_without_defects_warns_that_metrics_are_undefined(
    model: Path, demo_root: Path, tmp_path: Path
) -> None:
    data = _copy(demo_root, tmp_path / "ds")
    for d in (data / "test").iterdir():
        if d.name != "good":
            shutil.rmtree(d)
    res = runner.invoke(cli.app, ["evaluate", str(model), str(data), "-q"])
    assert res.exit_code == 0, res.output
    assert "no defective images were scored" in res.stderr
    # JSON has no NaN: undefined figures are null, and a strict parser reads the line
    res = runner.invoke(cli.app, ["evaluate", str(model), str(data), "--format", "json", "-q"])
    assert res.exit_code == 0, res.output

    def refuse(token: str) -> None:
        raise ValueError(f"non-JSON constant {token}")

    metrics = json.loads(res.stdout, parse_constant=refuse)
    assert metrics["image_auroc"] is None and metrics["pixel_auroc"] is None
    assert metrics["n_defect"] == 0 and metrics["n_good"] > 0


# -- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "patchcore", "--backbone", "resnet-9000"], "unknown backbone 'resnet-9000'"),
        (
            ["--method", "threshold", "--backbone", "efficientnet-lite0"],
            "no setting(s) ['backbone']",
        ),
        ([*FAST, "--param", "size=-3"], "size must be >= 16"),
        ([*FAST, "--param", "bogus"], "--param expects NAME=VALUE"),
        ([*FAST, "--param", "no_such_setting=1"], "no setting(s) ['no_such_setting']"),
        ([*FAST, "--calibration-fraction", "1.5"], "fraction must be in [0, 1)"),
        ([*FAST, "--calibration-fraction", "-0.2"], "fraction must be in [0, 1)"),
        ([*FAST, "--false-alarm-rate", "0"], "--false-alarm-rate must be in (0, 1)"),
        ([*FAST, "--false-alarm-rate", "1"], "--false-alarm-rate must be in (0, 1)"),
        ([*FAST, "--max-false-regions", "-1"], "--max-false-regions must be >= 0"),
        ([*FAST, "--min-region-area", "0"], "--min-region-area must be >= 1"),
        ([*FAST, "--seed", "-1"], "Invalid value for '--seed'"),
        ([*FAST, "--classifier-param", "epochs=1"], "--classifier-param needs --classify-types"),
        ([*FAST, "--manifest", "labels.csv"], "--manifest is for --method classifier"),
        (["--method", "classifier", "--classify-types"], "--classify-types: for anomaly methods"),
        ([*FAST, "--calibration-dir", "{train}"], "calibration images must be held out"),
        ([*FAST, "--calibration-dir", "{missing}"], "is not a folder"),
        ([*FAST, "--defects", "{missing}"], "is not a folder"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_fit_settings_refused_before_fitting(
    demo_root: Path, tmp_path: Path, no_long_work, extra: list[str], message: str
) -> None:
    where = {"train": str(demo_root / "train" / "good"), "missing": str(tmp_path / "none")}
    extra = [e.format(**where) for e in extra]
    _usage_error(["fit", demo_root, "--out", tmp_path / "m.dkm", *extra], message)
    assert not (tmp_path / "m.dkm").exists()


def test_fit_out_is_a_folder(demo_root: Path, tmp_path: Path, no_long_work) -> None:
    _usage_error(["fit", demo_root, "--out", tmp_path, *FAST], "is a folder")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "{model}", "{img}", "--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["inspect", "{model}", "{img}", "--format", "xml"], "--format must be jsonl or table"),
        (["inspect", "{model}", "{img}", "--mm-per-pixel", "-1"], "--mm-per-pixel must be"),
        (["inspect", "{img}", "{img}"], "not a defectkit model file"),
        (["inspect", "{missing}", "{img}"], "model file not found"),
        (["evaluate", "{model}", "{root}", "--format", "xml"], "--format must be json or table"),
        (["report", "{model}", "{root}", "--out", "r.html", "--gallery", "-1"], "--gallery"),
        (["calibrate", "{model}", "{root}", "--target", "miss-rate=2"], "must be in [0, 1)"),
        (["calibrate", "{model}", "{root}", "--target", "speed"], "--target must be"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_other_commands_refuse_bad_settings_before_scoring(
    model: Path, demo_root: Path, tmp_path: Path, no_long_work, args: list[str], message: str
) -> None:
    img = sorted((demo_root / "test" / "good").glob("*.png"))[0]
    where = {"model": model, "img": img, "root": demo_root, "missing": tmp_path / "no.dkm"}
    _usage_error([a.format(**where) for a in args], message)

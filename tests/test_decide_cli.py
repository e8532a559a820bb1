"""Decisions through the command line: pixel threshold and fit provenance,
regions / severity / closest good patch in `inspect`, `calibrate` rewriting
only the thresholds, and the separate calibration folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from defectkit.cli import app
from defectkit.data.images import load_image
from defectkit.detector import Detector
from defectkit.methods import get_method
from defectkit.model_file import ModelFile, read_model, write_model

runner = CliRunner()
FAST = ["-q", "-p", "image_size=96", "-p", "coreset_ratio=0.1"]


@pytest.fixture(scope="module")
def model(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("decide") / "stone.dkm"
    # held-out images (no few-shot mode): the tests below count them
    held_out = ["--calibration-fraction", "0.25", "--few-shot-below", "0"]
    res = runner.invoke(app, ["fit", str(demo_root), "--out", str(path), *FAST, *held_out])
    assert res.exit_code == 0, res.output
    return path


def inspect_lines(*args: str) -> list[dict]:
    res = runner.invoke(app, ["inspect", *args, "-q"])
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in res.stdout.splitlines()]


# ---------------------------------------------------------------- fit


def test_fit_stores_a_pixel_threshold_and_the_fit_image_paths(model: Path, demo_root: Path):
    det = Detector.load(model)
    pt, thr = det.pixel_threshold, det.threshold
    assert pt is not None and thr is not None
    assert pt.rule == "false-regions" and pt.target == 0.1 and pt.min_area_px == 25
    assert pt.n_good == thr.n_good == 4
    assert pt.value <= thr.value
    assert pt.false_regions_per_image <= 0.1
    fit_images = det.info["fit_images"]
    train = {str(p.resolve()) for p in (demo_root / "train" / "good").glob("*.png")}
    assert len(fit_images) == 12
    assert {f["path"] for f in fit_images} <= train
    assert set(det.info["calibration_images"]) == train - {f["path"] for f in fit_images}
    assert all(f["width"] == 96 and f["height"] == 96 for f in fit_images)
    # `info` summarises the path lists unless --full
    short = json.loads(runner.invoke(app, ["info", str(model)]).stdout)
    assert short["fit_images"].startswith("12 paths")
    assert short["pixel_threshold"]["value"] == pt.value
    full = json.loads(runner.invoke(app, ["info", str(model), "--full"]).stdout)
    assert full["fit_images"] == fit_images


def test_fit_on_a_separate_calibration_folder(demo_root: Path, tmp_path: Path) -> None:
    cal = tmp_path / "cal"
    shutil.copytree(demo_root / "test" / "good", cal)
    out = tmp_path / "m.dkm"
    res = runner.invoke(
        app, ["fit", str(demo_root), "--out", str(out), *FAST, "--calibration-dir", str(cal)]
    )
    assert res.exit_code == 0, res.output
    det = Detector.load(out)
    assert det.info["n_fit_images"] == 16  # all of train/good
    assert det.info["n_calibration_images"] == 6
    assert det.threshold.n_good == det.pixel_threshold.n_good == 6
    assert det.info["calibration_data"] == str(cal)
    # calibrating on images that are also fitted on would void the guarantee
    res = runner.invoke(
        app,
        ["fit", str(demo_root), "--out", str(out), *FAST, "--calibration-dir",
         str(demo_root / "train")],
    )  # fmt: skip
    assert res.exit_code == 2
    assert "held out" in res.output
    res = runner.invoke(
        app, ["fit", str(demo_root), "--out", str(out), "--calibration-dir", str(tmp_path / "x")]
    )
    assert res.exit_code == 2 and "not a folder" in res.output


# ---------------------------------------------------------------- inspect


def test_inspect_lines_carry_regions_severity_and_closest_good(
    model: Path, demo_root: Path, tmp_path: Path
) -> None:
    maps = tmp_path / "maps"
    lines = inspect_lines(str(model), str(demo_root / "test"), "--maps-out", str(maps))
    det = Detector.load(model)
    fit_paths = {f["path"] for f in det.info["fit_images"]}
    n_ng = 0
    for r in lines:
        assert {"regions", "severity", "pixel_threshold", "closest_good"} <= set(r)
        assert r["pixel_threshold"] == pytest.approx(det.region_threshold)
        if r["is_defect"]:
            n_ng += 1
            assert r["severity"] in ("minor", "major", "critical")
            for reg in r["regions"]:
                x, y, w, h = reg["bbox"]
                assert x >= 0 and y >= 0 and x + w <= r["width"] and y + h <= r["height"]
                assert 25 <= reg["area_px"] <= w * h
                assert reg["area_mm2"] is None
                assert r["pixel_threshold"] <= reg["mean_score"] <= reg["score"] <= r["score"]
            if r["regions"]:  # worst region first
                # the image score is the map maximum plus PatchCore's whole-image
                # evidence, so never below the worst region's peak
                peaks = [g["score"] for g in r["regions"]]
                assert peaks[0] == max(peaks)
                assert peaks[0] <= r["score"] + 1e-4
                order = ["minor", "major", "critical"]
                assert r["severity"] == max((g["severity"] for g in r["regions"]), key=order.index)
        else:
            assert r["regions"] == [] and r["severity"] is None
        cg = r["closest_good"]
        assert cg["path"] in fit_paths
        bx, by, bw, bh = cg["bbox"]
        assert (bw, bh) == (8, 8) and bx % 8 == 0 and by % 8 == 0  # a 12x12 grid on 96 px
        assert Path(r["overlay"]).is_file()
    assert n_ng >= 2


def test_closest_good_names_the_training_image_itself(demo_root: Path, tmp_path: Path) -> None:
    # with every patch in the bank, a training image's nearest good patch is itself
    out = tmp_path / "all.dkm"
    res = runner.invoke(
        app,
        ["fit", str(demo_root), "--out", str(out), "-q", "-p", "image_size=96",
         "-p", "coreset_ratio=1.0", "--calibration-fraction", "0"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    train = sorted((demo_root / "train" / "good").glob("*.png"))[:3]
    for r in inspect_lines(str(out), *map(str, train)):
        row, col = r["evidence"]["worst_patch"]
        assert r["closest_good"]["path"] == str(Path(r["path"]).resolve())
        assert r["closest_good"]["bbox"] == [col * 8, row * 8, 8, 8]
        assert r["is_defect"] is None and r["threshold"] is None  # no calibration set


def test_closest_good_box_scales_the_cell_to_the_training_image() -> None:
    det = Detector(
        get_method("patchcore")(),
        info={"fit_images": [{"path": "/a.png", "width": 200, "height": 100}]},
    )
    extra = {"grid": [10, 20], "nearest_good": {"train_index": 0, "grid_row": 3, "grid_col": 5}}
    assert det.closest_good(extra) == {"path": "/a.png", "bbox": [50, 30, 10, 10]}
    extra["nearest_good"]["grid"] = [4, 4]  # the method's own grid of the training image wins
    assert det.closest_good(extra)["bbox"] == [250, 75, 50, 25]
    extra["nearest_good"]["train_index"] = 3
    assert det.closest_good(extra) is None  # not a recorded fit image
    assert det.closest_good({"grid": [1, 1]}) is None


def test_mm_per_pixel_and_severity_rules(model: Path, demo_root: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("[critical]\nmin_area_mm2 = 0.0001\n")  # every region is critical
    lines = inspect_lines(
        str(model), str(demo_root / "test"), "--mm-per-pixel", "0.05", "--severity-rules",
        str(rules),
    )  # fmt: skip
    regions = [reg for r in lines for reg in r["regions"]]
    assert regions
    for reg in regions:
        assert reg["area_mm2"] == pytest.approx(reg["area_px"] * 0.0025, rel=1e-5)
        assert reg["severity"] == "critical"
    # mm^2 rules without a pixel size, a bad file, a bad pixel size: exit 2 before any work
    res = runner.invoke(
        app, ["inspect", str(model), str(demo_root), "--severity-rules", str(rules)]
    )
    assert res.exit_code == 2 and "--mm-per-pixel" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"major": {"min_area": 5}}')
    res = runner.invoke(app, ["inspect", str(model), str(demo_root), "--severity-rules", str(bad)])
    assert res.exit_code == 2 and "unknown key" in res.output
    res = runner.invoke(app, ["inspect", str(model), str(demo_root), "--mm-per-pixel", "-1"])
    assert res.exit_code == 2 and "mm-per-pixel" in res.output


def test_a_model_without_pixel_threshold_cuts_regions_at_the_image_threshold(
    model: Path, demo_root: Path, tmp_path: Path
) -> None:
    mf = read_model(model)
    info = dict(mf.info)
    del info["pixel_threshold"]
    # a file from before pixel thresholds also predates PatchCore's whole-image
    # score and reference pool: its image score is the map maximum, its threshold
    # on that scale
    old_parts = ("method.global_", "method.ref_")
    arrays = {k: v for k, v in mf.arrays.items() if not k.startswith(old_parts)}
    info["state"] = {k: v for k, v in info["state"].items() if k not in ("global_ref", "local_ref")}
    info["params"] = {**info["params"], "global_weight": 0.0}
    old = write_model(tmp_path / "old.dkm", ModelFile(info=info, arrays=arrays))
    test_images = [load_image(p) for p in sorted((demo_root / "test").rglob("*.png"))]
    map_max = Detector.load(old).score(test_images).scores
    info["threshold"] = {**info["threshold"], "value": float(np.quantile(map_max, 0.6))}
    old = write_model(tmp_path / "old.dkm", ModelFile(info=info, arrays=arrays))
    det = Detector.load(old)
    assert det.pixel_threshold is None
    assert det.region_threshold == det.threshold.value
    lines = inspect_lines(str(old), str(demo_root / "test"))
    assert all(r["pixel_threshold"] == det.threshold.value for r in lines)
    assert any(r["regions"] for r in lines if r["is_defect"])


# ---------------------------------------------------------------- calibrate


def calibrate(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, ["calibrate", *args, "-q"])
    return res.exit_code, res.stdout, res.output


def assert_only_thresholds_changed(before: ModelFile, after: ModelFile) -> None:
    assert before.arrays.keys() == after.arrays.keys()
    for k in before.arrays:
        assert before.arrays[k].dtype == after.arrays[k].dtype
        np.testing.assert_array_equal(before.arrays[k], after.arrays[k])
    changed = {
        k for k in before.info.keys() | after.info.keys() if before.info.get(k) != after.info.get(k)
    }
    assert changed <= {"threshold", "pixel_threshold", "provenance"}
    pb, pa = dict(before.info["provenance"]), dict(after.info["provenance"])
    pa.pop("calibrations")
    pb.pop("calibrations", None)
    assert pa == pb


@pytest.mark.parametrize(("target", "rule"), [("f1", "f1"), ("miss-rate=0.25", "miss-rate")])
def test_calibrate_on_labelled_defects_rewrites_only_the_threshold(
    model: Path, demo_root: Path, tmp_path: Path, target: str, rule: str
) -> None:
    m = tmp_path / "m.dkm"
    shutil.copy(model, m)
    before = read_model(m)
    code, stdout, output = calibrate(str(m), str(demo_root), "--target", target)
    assert code == 0, output
    after = read_model(m)
    assert_only_thresholds_changed(before, after)
    record = json.loads(stdout)
    thr = after.info["threshold"]
    assert thr == record["threshold"] and thr["rule"] == rule
    assert thr["n_good"] == 6 and thr["n_defect"] == 12
    assert record["previous_threshold"] == before.info["threshold"]
    assert after.info["pixel_threshold"] == before.info["pixel_threshold"]  # kept
    if rule == "miss-rate":
        assert thr["miss_rate"] <= 0.25
    # the rewritten model decides at the new threshold
    lines = inspect_lines(str(m), str(demo_root / "test"))
    assert all(r["threshold"] == thr["value"] for r in lines)
    for r in lines:  # scores are printed rounded to 6 decimals; thresholds are not
        assert (
            r["is_defect"] == (r["score"] >= thr["value"]) or abs(r["score"] - thr["value"]) < 1e-5
        )
    hist = after.info["provenance"]["calibrations"]
    assert hist[-1]["rule"] == rule and hist[-1]["data"] == str(demo_root)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_calibrate_on_good_images_only_never_collapses(
    model: Path, demo_root: Path, tmp_path: Path
) -> None:
    m = tmp_path / "m.dkm"
    shutil.copy(model, m)
    good = demo_root / "test" / "good"
    before = read_model(m)
    for target in ("f1", "miss-rate=0.1"):
        code, _, output = calibrate(str(m), str(good), "--target", target)
        assert code == 2
        assert "defective" in output and "false-alarm-rate" in output
    assert read_model(m).info == before.info  # untouched
    out = tmp_path / "new.dkm"
    code, _, output = calibrate(
        str(m), str(good), "--target", "false-alarm-rate=0.2", "--out", str(out),
        "--max-false-regions", "0.5",
    )  # fmt: skip
    assert code == 0, output
    assert read_model(m).info == before.info  # --out leaves MODEL alone
    after = read_model(out)
    assert_only_thresholds_changed(before, after)
    thr, pt = after.info["threshold"], after.info["pixel_threshold"]
    assert thr["rule"] == "false-alarm-rate" and thr["n_good"] == 6 and thr["n_defect"] == 0
    scores = [r["score"] for r in inspect_lines(str(m), str(good))]
    # conformal rank ceil(7 * 0.8) = 6: just above the highest of the 6 good scores
    # (inspect lines round scores to 6 decimals: up to 5e-7 either way)
    assert thr["value"] > max(scores) - 5e-7
    assert thr["value"] == pytest.approx(max(scores), rel=1e-5)
    assert pt["n_good"] == 6 and pt["target"] == 0.5 and pt["value"] <= thr["value"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("recall=0.9", "must be false-alarm-rate"),
        ("miss-rate=abc", "needs a number"),
        ("false-alarm-rate=0", r"\(0, 1\)"),
        ("miss-rate=1", r"\[0, 1\)"),
        ("f1=0.5", "no value"),
    ],
)
def test_calibrate_refuses_bad_targets(model: Path, demo_root: Path, target: str, message: str):
    code, _, output = calibrate(str(model), str(demo_root), "--target", target)
    assert code == 2
    assert re.search(message, output), output

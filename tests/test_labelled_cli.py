"""Labelled images through the command line: `fit --method classifier`, inspect and
evaluate with a classifier, the detector + classifier bundle (`--classify-types`)
and semi-supervised fitting (`--defects`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from defectkit.cli import app
from defectkit.data.images import save_png
from defectkit.data.synthetic import add_defect, make_surface
from defectkit.detector import Detector, load_model
from defectkit.model_file import read_model

runner = CliRunner()
KINDS = ("hole", "scratch", "spot")
CLF = ["-q", "-p", "image_size=128"]
FAST = ["-q", "-p", "image_size=96", "-p", "coreset_ratio=0.1"]


@pytest.fixture(scope="module")
def types_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA/<kind>/*.png, 12 images per kind, and split.csv (every 3rd image test)."""
    root = tmp_path_factory.mktemp("types")
    rng = np.random.default_rng(11)
    rows = ["image,class,split"]
    for i in range(12):
        for kind in KINDS:
            img, _ = add_defect(make_surface("brushed_metal", (128, 128), rng), kind, rng)
            save_png(root / kind / f"{i:02d}.png", img)
            rows.append(f"{kind}/{i:02d}.png,{kind},{'test' if i % 3 == 2 else 'train'}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def classifier(types_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clf") / "types.dkm"
    res = runner.invoke(
        app,
        [
            "fit",
            str(types_root),
            "--method",
            "classifier",
            "--manifest",
            "split.csv",
            "--out",
            str(path),
            *CLF,
        ],
    )
    assert res.exit_code == 0, res.output
    assert "defect-type classifier: 3 types" in said(res)
    return path


def lines(res) -> list[dict]:
    return [json.loads(x) for x in res.stdout.splitlines()]


def said(res) -> str:
    """The command's output with line wrapping undone."""
    return " ".join(res.output.split())


# -- classifier alone --------------------------------------------------------------------
def test_fit_classifier_from_a_manifest(classifier: Path) -> None:
    info = json.loads(runner.invoke(app, ["info", str(classifier)]).stdout)
    assert info["method"] == "classifier"
    assert info["classes"] == list(KINDS)
    assert info["params"]["image_size"] == 128
    assert info["n_train_images"] + info["n_val_images"] == 24  # the 'train' rows only
    assert info["manifest"].endswith("split.csv")
    assert info["train_images"].startswith("24 paths")


def test_fit_classifier_from_class_folders(types_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "folders"
    for kind in KINDS[:2]:
        shutil.copytree(types_root / kind, data / kind)
    out = tmp_path / "two.dkm"
    res = runner.invoke(
        app, ["fit", str(data), "--method", "classifier", "--out", str(out), *CLF, "-p", "seed=3"]
    )
    assert res.exit_code == 0, res.output
    clf = load_model(out)
    assert clf.classes_ == ["hole", "scratch"]
    assert clf.seed == 3
    assert clf.training_["n_train"] + clf.training_["n_val"] == 24


def test_inspect_with_a_classifier(classifier: Path, types_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image")
    res = runner.invoke(
        app, ["inspect", str(classifier), str(types_root / "spot"), str(broken), "-q"]
    )
    assert res.exit_code == 1, res.output  # one file failed, the rest inspected
    recs = lines(res)
    assert len(recs) == 13
    bad = [r for r in recs if r["error"]]
    assert len(bad) == 1 and bad[0]["defect_type"] is None and bad[0]["score"] is None
    good = [r for r in recs if not r["error"]]
    for r in good:
        assert set(r) >= {"path", "score", "is_defect", "threshold", "error", "regions"}
        assert r["is_defect"] is None and r["threshold"] is None and r["regions"] is None
        probs = r["type_probabilities"]
        assert set(probs) == set(KINDS)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert r["defect_type"] == max(probs, key=probs.get)
        assert r["score"] == pytest.approx(max(probs.values()))
        assert r["width"] == r["height"] == 128
    assert sum(r["defect_type"] == "spot" for r in good) >= 10
    table = runner.invoke(
        app, ["inspect", str(classifier), str(types_root / "hole"), "--format", "table"]
    )
    assert table.exit_code == 0 and "hole" in table.stdout
    maps = runner.invoke(app, ["inspect", str(classifier), str(types_root), "--maps-out", "x"])
    assert maps.exit_code == 2 and "classifier alone" in said(maps)


def test_evaluate_a_classifier_on_the_test_rows(classifier: Path, types_root: Path) -> None:
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(classifier),
            str(types_root),
            "--manifest",
            "split.csv",
            "-q",
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["n"] == 12  # 4 test rows per kind
    assert m["evaluated_on"] == "the 'test' rows"
    assert m["accuracy"] >= 0.9 and m["macro_f1"] >= 0.9
    cm = m["confusion_matrix"]
    assert cm["labels"] == list(KINDS)
    assert sum(map(sum, cm["matrix"])) == 12
    for i, kind in enumerate(cm["labels"]):
        assert sum(cm["matrix"][i]) == m["per_class"][kind]["support"] == 4
        assert cm["matrix"][i][i] == round(m["per_class"][kind]["recall"] * 4)
    assert set(m) >= {"per_class", "mean_confidence", "seconds", "n_failed_files"}
    table = runner.invoke(app, ["evaluate", str(classifier), str(types_root), "-q"])
    assert table.exit_code == 0
    assert "macro-F1" in table.stdout and "confusion matrix" in table.stdout


def test_classifier_files_are_refused_where_an_anomaly_model_is_needed(
    classifier: Path, types_root: Path, tmp_path: Path
) -> None:
    for args in (
        ["calibrate", str(classifier), str(types_root), "--target", "f1"],
        ["report", str(classifier), str(types_root), "--out", str(tmp_path / "r.html")],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2
        assert "defect-type classifier alone" in said(res)


def test_bad_manifests_and_options_exit_2(types_root: Path, tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(f"image,class,split\n{types_root}/hole/00.png,hole,train\nnope.png,hole,train\n")
    res = runner.invoke(
        app,
        [
            "fit",
            str(types_root),
            "--method",
            "classifier",
            "--manifest",
            str(csv),
            "--out",
            str(tmp_path / "m.dkm"),
        ],
    )
    assert res.exit_code == 2
    assert "line 3: image nope.png not found" in said(res)
    one_class = tmp_path / "one.csv"
    one_class.write_text(f"image,class\n{types_root}/hole/00.png,hole\n")
    res = runner.invoke(
        app,
        [
            "fit",
            str(types_root),
            "--method",
            "classifier",
            "--manifest",
            str(one_class),
            "--out",
            str(tmp_path / "m.dkm"),
        ],
    )
    assert res.exit_code == 2 and "at least 2 classes" in said(res)
    res = runner.invoke(
        app,
        [
            "fit",
            str(types_root),
            "--method",
            "classifier",
            "--defects",
            str(types_root),
            "--out",
            str(tmp_path / "m.dkm"),
        ],
    )
    assert res.exit_code == 2 and "--defects: for anomaly methods" in said(res)
    res = runner.invoke(
        app,
        [
            "fit",
            str(types_root),
            "--method",
            "classifier",
            "-p",
            "bogus=1",
            "--out",
            str(tmp_path / "m.dkm"),
        ],
    )
    assert res.exit_code == 2 and "no setting" in said(res)
    assert not (tmp_path / "m.dkm").exists()


# -- bundle: anomaly model + classifier ------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "stone.dkm"
    res = runner.invoke(
        app,
        [
            "fit",
            str(demo_root),
            "--out",
            str(path),
            *FAST,
            "--calibration-fraction",
            "0.25",
            "--classify-types",
            "--classifier-param",
            "image_size=96",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "defect-type classifier: 4 types" in said(res)
    return path


def test_bundle_stores_both_in_one_file(bundle: Path) -> None:
    mf = read_model(bundle)
    assert mf.info["method"] == "patchcore"
    assert any(k.startswith("method.") for k in mf.arrays)
    assert any(k.startswith("classifier.") for k in mf.arrays)
    det = Detector.load(bundle)
    assert det.classifier is not None
    assert det.classifier.classes_ == ["crack", "hole", "scratch", "spot"]
    assert det.classifier.training_["n_train"] == 8  # 2 of the 3 images of each type
    assert "sorted by file name" in det.info["classifier_data"]["split"]
    info = json.loads(runner.invoke(app, ["info", str(bundle)]).stdout)
    assert info["classifier"]["classes"] == det.classifier.classes_


def test_bundle_inspect_types_ng_parts_only(bundle: Path, demo_root: Path) -> None:
    res = runner.invoke(app, ["inspect", str(bundle), str(demo_root / "test"), "-q"])
    assert res.exit_code == 0, res.output
    recs = lines(res)
    assert any(r["is_defect"] for r in recs) and not all(r["is_defect"] for r in recs)
    for r in recs:
        assert isinstance(r["is_defect"], bool)
        assert r["is_defect"] == (r["score"] >= r["threshold"])
        if r["is_defect"]:
            assert r["defect_type"] in ("crack", "hole", "scratch", "spot")
            assert sum(r["type_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        else:
            assert r["defect_type"] is None and r["type_probabilities"] is None
    table = runner.invoke(
        app, ["inspect", str(bundle), str(demo_root / "test"), "--format", "table"]
    )
    assert table.exit_code == 0 and "type" in table.stdout


def test_bundle_evaluate_keeps_the_keys_and_adds_defect_types(
    bundle: Path, demo_root: Path
) -> None:
    res = runner.invoke(app, ["evaluate", str(bundle), str(demo_root), "--format", "json", "-q"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert set(m) >= {"image_auroc", "pixel_auroc", "aupro", "recall_per_type", "seconds"}
    types = m["defect_types"]
    assert types["n"] == 4  # the 'test' half: 1 of 3 per type
    assert types["evaluated_on"] == "the 'test' half of the types"


def test_anomaly_model_lines_are_unchanged(demo_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "plain.dkm"
    res = runner.invoke(app, ["fit", str(demo_root), "--out", str(model), *FAST])
    assert res.exit_code == 0, res.output
    det = Detector.load(model)
    assert det.classifier is None and det.rescorer is None
    recs = lines(
        runner.invoke(app, ["inspect", str(model), str(demo_root / "test" / "hole"), "-q"])
    )
    assert all("defect_type" not in r and "type_probabilities" not in r for r in recs)
    assert "classifier" not in json.loads(runner.invoke(app, ["info", str(model)]).stdout)


def test_classify_types_needs_labelled_defect_folders(tmp_path: Path, demo_root: Path) -> None:
    flat = tmp_path / "flat"
    shutil.copytree(demo_root / "train" / "good", flat)
    res = runner.invoke(
        app, ["fit", str(flat), "--out", str(tmp_path / "m.dkm"), *FAST, "--classify-types"]
    )
    assert res.exit_code == 2 and "no class" in said(res)
    res = runner.invoke(
        app, ["fit", str(demo_root), "--out", str(tmp_path / "m.dkm"), "--classifier-param", "x=1"]
    )
    assert res.exit_code == 2 and "--classifier-param needs --classify-types" in said(res)
    res = runner.invoke(
        app,
        [
            "fit",
            str(demo_root),
            "--out",
            str(tmp_path / "m.dkm"),
            "--classify-types",
            "--classifier-param",
            "bogus=1",
        ],
    )
    assert res.exit_code == 2 and "no setting" in said(res)


# -- semi-supervised ----------------------------------------------------------------------------
def test_fit_with_defects(demo_root: Path, tmp_path: Path) -> None:
    defects = tmp_path / "defects"
    for kind in ("hole", "spot"):
        shutil.copytree(demo_root / "test" / kind, defects / kind)
    model = tmp_path / "semi.dkm"
    res = runner.invoke(
        app,
        [
            "fit",
            str(demo_root),
            "--out",
            str(model),
            *FAST,
            "--calibration-fraction",
            "0.4",
            "--defects",
            str(defects),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "semi-supervised re-scoring" in said(res)
    det = Detector.load(model)
    semi = det.info["semi_supervised"]
    assert semi["n_defect"] == 6 and semi["n_good"] == 6
    assert len(semi["defect_images"]) == 6
    assert det.info["defects_data"] == str(defects)
    assert (det.rescorer is not None) == semi["used"]
    recs = lines(runner.invoke(app, ["inspect", str(model), str(demo_root / "test"), "-q"]))
    assert all(r["is_defect"] == (r["score"] >= r["threshold"]) for r in recs)


def test_fit_with_defect_masks(demo_root: Path, tmp_path: Path) -> None:
    defects = tmp_path / "defects"
    for kind in ("hole", "spot"):
        shutil.copytree(demo_root / "test" / kind, defects / kind)
    model = tmp_path / "masks.dkm"
    args = ["fit", str(demo_root), "--out", str(model), *FAST, "--calibration-fraction", "0.4"]
    masks = demo_root / "ground_truth"
    head = ["--defect-masks", str(masks), "--mask-head-param", "steps=200"]
    res = runner.invoke(app, [*args, "--defects", str(defects), *head])
    assert res.exit_code == 0, res.output
    assert "mask head learned from 6 defect masks" in said(res)
    det = Detector.load(model)
    assert det.model.mask_head_ is not None
    assert det.info["mask_head"]["n_defect_images"] == 6
    assert det.info["mask_head"]["params"] == {"steps": 200}
    assert det.info["defect_masks_data"] == str(masks)
    recs = lines(runner.invoke(app, ["inspect", str(model), str(demo_root / "test"), "-q"]))
    assert recs and all(r["error"] is None for r in recs)
    res = runner.invoke(app, ["export", str(model), "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 2 and "mask head" in said(res)


def test_bad_defect_masks_exit_2(demo_root: Path, tmp_path: Path) -> None:
    defects = tmp_path / "defects"
    shutil.copytree(demo_root / "test" / "hole", defects / "hole")
    partial = tmp_path / "partial" / "hole"
    partial.mkdir(parents=True)
    gt = sorted((demo_root / "ground_truth" / "hole").glob("*_mask.png"))
    for p in gt[1:]:
        shutil.copy(p, partial / p.name)
    small = tmp_path / "small" / "hole"
    small.mkdir(parents=True)
    for p in gt:
        save_png(small / p.name, np.zeros((8, 8), bool))
    out = ["--out", str(tmp_path / "m.dkm"), *FAST, "--calibration-fraction", "0.4"]
    with_defects = ["--defects", str(defects)]
    all_masks = [*with_defects, "--defect-masks", str(demo_root / "ground_truth")]
    cases = [
        (["--defect-masks", str(demo_root / "ground_truth")], "needs --defects"),
        ([*with_defects, "--defect-masks", str(tmp_path / "none")], "is not a folder"),
        ([*with_defects, "--defect-masks", str(partial.parent)], f"no mask file {gt[0].stem}"),
        ([*with_defects, "--defect-masks", str(small.parent)], "does not match image size"),
        ([*with_defects, "--mask-head-param", "steps=5"], "needs --defect-masks"),
        ([*all_masks, "--mask-head-param", "steps=0"], "steps must be a whole number >= 1"),
        ([*all_masks, "--mask-head-param", "depth=3"], "mask head has no setting(s) ['depth']"),
    ]
    for extra, message in cases:
        res = runner.invoke(app, ["fit", str(demo_root), *out, *extra])
        assert res.exit_code == 2, (extra, res.output)
        assert message in said(res), (extra, res.output)
    padim = ["--out", str(tmp_path / "p.dkm"), "-q", "--method", "padim", *with_defects]
    res = runner.invoke(
        app, ["fit", str(demo_root), *padim, "--defect-masks", str(demo_root / "ground_truth")]
    )
    assert res.exit_code == 2 and "not padim" in said(res), res.output


def test_bad_defects_options_exit_2(demo_root: Path, tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "m.dkm"), *FAST]
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted((demo_root / "test" / "hole").glob("*.png"))[:2]:
        shutil.copy(p, few / p.name)
    cases = [
        (["--defects", str(few)], "need at least 3"),
        (["--defects", str(tmp_path / "none")], "is not a folder"),
        (["--defects", str(demo_root / "test"), "--calibration-fraction", "0"], "held-out good"),
        (["--defects", str(demo_root / "train")], "also among the good images"),
    ]
    for extra, message in cases:
        res = runner.invoke(app, ["fit", str(demo_root), *out, *extra])
        assert res.exit_code == 2, (extra, res.output)
        assert message in said(res), (extra, res.output)

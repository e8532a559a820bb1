"""A unified model of several products: each image assigned to its product (or
to none), scored by exactly the detector a separate fit of that product makes,
one model file, products added without refitting the others, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fit
from typer.testing import CliRunner

from defectkit import pipeline
from defectkit.cli import app
from defectkit.data.images import load_image, save_png
from defectkit.data.synthetic import add_defect, make_surface
from defectkit.errors import ConfigError
from defectkit.pipeline.products import fit_products
from defectkit.products import ProductSet

SIZE = (80, 96)
PARAMS = {"image_size": 64, "coreset_ratio": 0.2}
KINDS = {"metal": "brushed_metal", "cloth": "fabric"}  # "stone" is never fitted: unknown


def _write(folder: Path, kind: str, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return [save_png(folder / f"{i:03d}.png", make_surface(kind, SIZE, rng)) for i in range(n)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("products")
    for k, (name, kind) in enumerate(KINDS.items()):
        _write(root / name, kind, 16, seed=k)
    return root


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> dict[str, list[Path]]:
    """New images of each fitted product (good and defective) and of one never fitted."""
    q = tmp_path_factory.mktemp("queries")
    rng = np.random.default_rng(99)
    out: dict[str, list[Path]] = {}
    for name, kind in KINDS.items():
        out[name] = _write(q / name, kind, 4, seed=50 + len(out))
        bad, _ = add_defect(make_surface(kind, SIZE, rng), "hole", rng)
        out[name].append(save_png(q / name / "bad.png", bad))
    out["stone"] = _write(q / "stone", "stone", 5, seed=77)
    return out


def _settings() -> pipeline.FitSettings:
    return pipeline.FitSettings(method="patchcore", params=dict(PARAMS))


@pytest.fixture(scope="module")
def unified(root) -> ProductSet:
    return fit_products(_settings(), root).model


def test_each_image_goes_to_its_product_and_a_stranger_to_none(unified, queries):
    assert unified.products == ["cloth", "metal"]
    for name in KINDS:
        found = unified.assign([load_image(p) for p in queries[name]])
        assert [a.product for a in found] == [name] * 5  # the defective one too
        assert all(0 < a.confidence <= 1 and a.distance <= 1 for a in found)
    strangers = unified.assign([load_image(p) for p in queries["stone"]])
    assert [a.product for a in strangers] == [None] * 5
    assert all(a.distance > 1 for a in strangers)


def test_scores_are_those_of_a_separate_fit_and_survive_the_file(unified, root, queries, tmp_path):
    path = unified.save(tmp_path / "u.dkm")
    loaded = pipeline.load(path)
    assert isinstance(loaded, ProductSet)
    for name in KINDS:
        alone = pipeline.fit(_settings(), pipeline.FitData(root / name)).detector
        images = [load_image(p) for p in queries[name]]
        expected = alone.score(images).scores
        np.testing.assert_allclose(loaded.detectors[name].score(images).scores, expected, rtol=1e-5)
        assert loaded.detectors[name].threshold.value == pytest.approx(alone.threshold.value)
    assert loaded.router.limit_ == pytest.approx(unified.router.limit_)


def test_inspect_records_carry_product_and_unknown_products_get_no_verdict(unified, queries):
    from defectkit.data.batches import load_item

    paths = [queries["metal"][0], queries["stone"][0], queries["cloth"][-1], Path("/nope.png")]
    items = [load_item(p) for p in paths]
    recs = unified.inspect_loaded(items, [str(p) for p in paths], numbers=range(1, 5))
    assert [r["product"] for r in recs] == ["metal", None, "cloth", None]
    assert recs[0]["is_defect"] is False and recs[2]["is_defect"] is True  # the hole
    assert recs[0]["threshold"] == unified.detectors["metal"].threshold.value
    assert recs[1]["is_defect"] is None and recs[1]["score"] is None
    assert recs[1]["product_note"].startswith("unknown product: nearest is")
    assert recs[1]["error"] is None and recs[3]["error"]  # the missing file says why


def test_adding_a_product_keeps_the_others_as_they_were(unified, root, tmp_path, queries):
    first = unified
    three = tmp_path / "three"  # the same product folders, and one more
    three.mkdir()
    for name in KINDS:
        (three / name).symlink_to(root / name)
    _write(three / "stone", "stone", 16, seed=5)
    before = ProductSet.load(first.save(tmp_path / "u.dkm"))
    grown = fit_products(_settings(), three, add=["stone"], base=before).model
    assert grown.products == ["cloth", "metal", "stone"]
    img = [load_image(queries["metal"][0])]
    np.testing.assert_array_equal(
        grown.detectors["metal"].score(img).scores, first.detectors["metal"].score(img).scores
    )
    assert grown.router.limit_["metal"] == first.router.limit_["metal"]
    # the stranger of before is now a product of its own
    assert [a.product for a in grown.assign([load_image(p) for p in queries["stone"]])] == [
        "stone"
    ] * 5
    with pytest.raises(ConfigError, match="already in the model"):
        fit_products(_settings(), three, add=["stone"], base=grown)


def test_cli_fit_products_then_inspect(root, queries, tmp_path):
    model = cli_fit(root, tmp_path / "u.dkm", "--products", "-p", "image_size=64")
    runner = CliRunner()
    res = runner.invoke(
        app, ["inspect", str(model), str(queries["cloth"][0]), str(queries["stone"][0])]
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert [r["product"] for r in lines] == ["cloth", None]
    assert lines[0]["product_confidence"] > 0.5
    # calibrate: one product, the other as it was; without --product it says why
    target = ["--target", "false-alarm-rate=0.05"]
    res = runner.invoke(app, ["calibrate", str(model), str(root / "metal"), *target])
    assert res.exit_code != 0 and "unified model of 2 products" in res.output
    before = ProductSet.load(model)
    res = runner.invoke(
        app, ["calibrate", str(model), str(root / "metal"), *target, "--product", "metal", "-q"]
    )
    assert res.exit_code == 0, res.output
    after = ProductSet.load(model)
    assert json.loads(res.stdout)["product"] == "metal"
    assert after.detectors["metal"].threshold.target == 0.05
    assert after.detectors["metal"].threshold.value != before.detectors["metal"].threshold.value
    assert after.detectors["cloth"].threshold == before.detectors["cloth"].threshold
    res = runner.invoke(
        app, ["calibrate", str(model), str(root / "metal"), *target, "--product", "x"]
    )
    assert res.exit_code != 0 and "no product 'x'" in res.output
    res = runner.invoke(app, ["fit", str(root), "--out", str(tmp_path / "x.dkm"), "--add", "metal"])
    assert res.exit_code != 0 and "--add is for --products" in res.output


def test_cli_evaluate_gives_figures_per_product_and_spots_a_stranger(tmp_path):
    from defectkit.data.synthetic import generate_demo

    sets = generate_demo(
        tmp_path / "lines", seed=3, size=(64, 64), n_train=16, n_test_good=4,
        n_test_per_defect=2,
    )  # fmt: skip
    shutil.rmtree(sets["fabric"] / "ground_truth")  # image labels only, as casting has
    fitted = tmp_path / "fitted"  # two of the three products
    fitted.mkdir()
    for name in ("brushed_metal", "fabric"):
        (fitted / name).symlink_to(sets[name])
    model = cli_fit(fitted, tmp_path / "u.dkm", "--products", "-p", "image_size=64")
    res = CliRunner().invoke(
        app, ["evaluate", str(model), str(tmp_path / "lines"), "--format", "json", "-q"]
    )
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout)
    per = figures["products"]
    for name in ("brushed_metal", "fabric"):
        assert per[name]["assignment_accuracy"] == 1.0 and per[name]["unknown_rate"] == 0.0
        assert per[name]["n_images"] == 4 + 2 * 4  # good + 2 of each of 4 defect kinds
        assert per[name]["image_auroc"] > 0.7
        assert per[name]["threshold_used"] == 1.0  # scores in threshold units
    assert per["brushed_metal"]["pixel_auroc"] > 0.5 and per["fabric"]["pixel_auroc"] is None
    assert per["stone"]["unknown_rate"] == 1.0 and "assignment_accuracy" not in per["stone"]
    assert figures["overall"]["assignment_accuracy"] == 1.0
    assert figures["overall"]["n_images"] == 24


def test_cli_report_names_one_product(unified, root, tmp_path):
    from defectkit.data.synthetic import generate_demo

    model = unified.save(tmp_path / "u.dkm")
    data = generate_demo(
        tmp_path / "d", seed=4, categories=("brushed_metal",), size=SIZE, n_train=4,
        n_test_good=3, n_test_per_defect=1,
    )["brushed_metal"]  # fmt: skip
    runner = CliRunner()
    html = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(model), str(data), "--out", str(html), "-q"])
    assert res.exit_code != 0 and "name one with --product" in res.output
    res = runner.invoke(
        app, ["report", str(model), str(data), "--out", str(html), "--product", "metal", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert html.stat().st_size > 1000


def test_service_routes_stores_and_charts_each_product_apart(unified, queries, tmp_path):
    from fastapi.testclient import TestClient

    from defectkit.serve.app import create_app
    from defectkit.serve.spc import SpcMonitor
    from defectkit.serve.store import ResultStore

    store = ResultStore.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    app = create_app(unified, store, spc=SpcMonitor(baseline=5), model_name="u.dkm")
    sent = [queries["metal"][0], queries["metal"][1], queries["cloth"][0], queries["stone"][0]]
    with TestClient(app) as client:
        got = []
        for p in sent:
            r = client.post("/inspect", files={"file": (p.name, p.read_bytes(), "image/png")})
            assert r.status_code == 201, r.text
            got.append(r.json())
        assert [g["product"] for g in got] == ["metal", "metal", "cloth", None]
        assert got[0]["is_defect"] is False and got[3]["is_defect"] is None
        assert got[3]["product_note"].startswith("unknown product")
        assert [r["id"] for r in client.get("/results?product=metal").json()["items"]] == [2, 1]
        metal = client.get("/spc", params={"product": "metal"}).json()
        assert metal["product"] == "metal" and len(metal["scores"]["points"]) == 2
        assert len(client.get("/spc", params={"product": "cloth"}).json()["scores"]["points"]) == 1
        assert client.get("/spc").json()["products"] == ["cloth", "metal"]
        assert client.get("/spc", params={"product": "stone"}).status_code == 404
        svg = client.get("/spc/scores.svg", params={"product": "metal"}).text
        assert svg.count('class="point"') == 2
        assert client.get("/model").json()["kind"] == "products"
        assert client.get("/facets").json()["products"] == ["cloth", "metal"]
    store.close()
    # a restart replays each product's results onto its own charts
    store = ResultStore.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    mon = SpcMonitor(baseline=5)
    create_app(unified, store, spc=mon)
    assert len(mon.charts_of("metal").state()["scores"]["points"]) == 2
    store.close()

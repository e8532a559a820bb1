"""inspect --engine ray: a local Ray instance (one per module: Ray starts slowly)
scores the same lines as the local engine, turns bad files into error rows and
writes Parquet and the results database."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from conftest import cli_fit
from typer.testing import CliRunner

from defectkit.cli import app
from defectkit.errors import ConfigError
from defectkit.scale.ray_engine import COLUMNS, InspectActor, import_ray

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> object:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def fitted(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("model") / "stone.dkm"
    return cli_fit(demo_root, model, "--param", "image_size=96", "--param", "coreset_ratio=0.1")


@pytest.fixture(scope="module")
def inputs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The demo test images, one file that is not an image and one missing path."""
    extra = tmp_path_factory.mktemp("bad")
    (extra / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return [str(demo_root / "test"), str(extra), str(extra / "absent.png")]


@pytest.fixture(scope="module")
def local_lines(
    fitted: Path, inputs: list[str], tmp_path_factory: pytest.TempPathFactory
) -> list[str]:
    """Lines of the local engine, with overlays written to a folder named ``maps``."""
    maps = tmp_path_factory.mktemp("local_out") / "maps"
    args = ["inspect", str(fitted), *inputs, "-q", "--batch-size", "4", "--maps-out", str(maps)]
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output  # some files failed
    return [line.replace(str(maps), "MAPS") for line in res.stdout.splitlines()]


@pytest.fixture(scope="module")
def ray_run(fitted: Path, inputs: list[str], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ray_out")
    res = runner.invoke(
        app,
        [
            "inspect",
            str(fitted),
            *inputs,
            "-q",
            "--engine",
            "ray",
            "--workers",
            "2",
            "--batch-size",
            "3",
            "--parquet",
            str(out / "results.parquet"),
            "--db",
            f"sqlite:///{out / 'results.db'}",
            "--data-dir",
            str(out),
            "--maps-out",
            str(out / "maps"),
        ],
    )
    return res, out


def _close(a: object, b: object) -> bool:
    """Equal JSON values, floats to a relative 1e-5."""
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, int | float)
            and isinstance(b, int | float)
            and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_ray_lines_equal_the_local_engine(local_lines: list[str], ray_run) -> None:
    res, out = ray_run
    assert res.exit_code == 1, res.output  # the bad files, as with the local engine
    lines = [line.replace(str(out / "maps"), "MAPS") for line in res.stdout.splitlines()]
    # the same records; numbers to float rounding, since batches of 3 and of 4 may
    # take other BLAS/oneDNN kernels (7th digit apart on an AMD EPYC)
    assert len(lines) == len(local_lines) > 10
    for got, want in zip(lines, local_lines, strict=True):
        assert _close(json.loads(got), json.loads(want)), (got, want)
    # overlays written by the actors, under the names the local engine gives them
    overlays = [json.loads(x)["overlay"] for x in res.stdout.splitlines() if '"overlay"' in x]
    assert len(overlays) == len(local_lines) - 2
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted(
        Path(p).name for p in overlays
    )


def test_bad_files_are_error_rows_and_the_others_are_scored(ray_run) -> None:
    res, _ = ray_run
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"] is not None}
    assert set(errors) == {"absent.png", "broken.png"}
    assert all(errors.values())
    scored = [r for r in rows if r["error"] is None]
    assert len(scored) == len(rows) - 2
    assert all(isinstance(r["score"], float) and r["is_defect"] is not None for r in scored)
    # the demo's defects are found
    assert any(r["is_defect"] for r in scored) and not all(r["is_defect"] for r in scored)


def test_parquet_holds_every_row_with_the_expected_columns(ray_run) -> None:
    res, out = ray_run
    table = pq.read_table(out / "results.parquet")
    assert table.column_names == list(COLUMNS)
    assert table.column("record").to_pylist() == res.stdout.splitlines()
    rows = table.to_pylist()
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["broken.png"]["score"] is None and by_name["broken.png"]["error"]
    good = [r for r in rows if r["error"] is None]
    assert all(r["width"] == 96 and r["height"] == 96 for r in good)
    for r in good:
        rec = json.loads(r["record"])
        assert r["score"] == rec["score"] and r["is_defect"] == rec["is_defect"]
        assert r["n_regions"] == len(rec["regions"])
    assert [r["index"] for r in rows if r["index"] >= 0] == list(range(len(rows) - 1))


def test_results_database_holds_the_scored_images(ray_run) -> None:
    from defectkit.serve.store import ResultStore

    res, out = ray_run
    scored = [json.loads(x) for x in res.stdout.splitlines()]
    scored = [r for r in scored if r["error"] is None]
    store = ResultStore.open(f"sqlite:///{out / 'results.db'}", out / "blobs")
    try:
        assert store.count() == len(scored)
        page = store.query(limit=1000, newest_first=False)
        assert [row.record for row in page.items] == scored
        first = page.items[0]
        assert (
            store.blobs.get(first.image_sha256, first.image_ext)
            == Path(scored[0]["path"]).read_bytes()
        )
    finally:
        store.close()


def test_an_image_that_fails_scoring_becomes_an_error_row(
    fitted: Path, demo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = sorted((demo_root / "test").rglob("*.png"))[:3]
    actor = InspectActor(str(fitted))
    real = actor.det.score

    def score(images, progress=None):
        if any(im[0, 0, 0] == files_first_pixel for im in images):
            raise RuntimeError("simulated failure")
        return real(images, progress)

    from defectkit.data import load_image

    files_first_pixel = load_image(files[1])[0, 0, 0]
    monkeypatch.setattr(actor.det, "score", score)
    batch = {
        "index": np.arange(3),
        "path": np.array([str(f) for f in files]),
        "file": np.array([str(f) for f in files]),
    }
    rows = actor(batch).to_pylist()
    assert [r["index"] for r in rows] == [0, 1, 2]
    failed = [r for r in rows if r["error"] is not None]
    assert len(failed) >= 1
    assert all("scoring failed: RuntimeError: simulated failure" in r["error"] for r in failed)
    assert any(r["score"] is not None for r in rows)


def test_missing_ray_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'defectkit\[ray\]'"):
        import_ray()


def test_ray_options_are_checked_before_any_work(fitted: Path, inputs: list[str]) -> None:
    res = runner.invoke(app, ["inspect", str(fitted), *inputs, "--parquet", "x.parquet"])
    assert res.exit_code == 2 and "--engine ray" in res.output
    res = runner.invoke(app, ["inspect", str(fitted), *inputs, "--engine", "spark"])
    assert res.exit_code == 2 and "local or ray" in res.output
    res = runner.invoke(app, ["inspect", str(fitted), *inputs, "--engine", "ray", "--workers", "0"])
    assert res.exit_code == 2 and "--workers" in res.output


def test_ray_scores_a_model_fitted_on_tiles_tile_by_tile(demo_root: Path, tmp_path: Path) -> None:
    """The model knows its tiles: a Ray actor loading it scores as the local engine."""
    model = cli_fit(demo_root, tmp_path / "tiled.dkm", "--tile", "64",
                    "--calibration-fraction", "0.25", "-p", "backbone=efficientnet-lite0",
                    "-p", "image_size=64", "-p", "coreset_ratio=0.1")  # fmt: skip
    test = str(demo_root / "test")
    local = runner.invoke(app, ["inspect", str(model), test, "-q", "--jobs", "1"])
    on_ray = runner.invoke(app, ["inspect", str(model), test, "-q", "--engine", "ray"])
    assert local.exit_code == 0 and on_ray.exit_code == 0, (local.output, on_ray.output)
    want = {r["path"]: r for r in map(json.loads, local.stdout.splitlines())}
    got = [json.loads(x) for x in on_ray.stdout.splitlines()]
    assert len(got) == len(want)
    for r in got:
        assert r["evidence"]["tiles"] == 4
        assert r["score"] == pytest.approx(want[r["path"]]["score"], rel=1e-5)
        assert r["is_defect"] == want[r["path"]]["is_defect"]

"""Tiling large images: tile layout, stitching, and a small defect in 4096x4096."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from defectkit.cli import app
from defectkit.data.images import save_png
from defectkit.data.synthetic import add_defect, make_surface
from defectkit.detector import Detector
from defectkit.errors import ConfigError
from defectkit.methods.base import ScoreResult
from defectkit.tiling import (
    Tiling,
    score_tiled,
    split_tiles,
    tile_boxes,
    tile_params,
    tile_starts,
)

runner = CliRunner()


@pytest.mark.parametrize("length", [32, 100, 511, 512, 513, 1000, 4096, 4100])
@pytest.mark.parametrize(("tile", "overlap"), [(64, 0), (64, 8), (512, 64), (100, 50)])
def test_tiles_cover_the_side_and_overlap_enough(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(b > a for a, b in itertools.pairwise(starts))
    for a, b in itertools.pairwise(starts):
        assert a + size - b >= overlap  # neighbours share at least `overlap` px
        assert b - a <= size  # no gap


def test_bad_tiling_settings_are_refused() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ConfigError, match="tile size must be an integer >= 32"):
        split_tiles([img], 16)
    with pytest.raises(ConfigError, match="tile overlap must be in"):
        split_tiles([img], 64, 40)
    with pytest.raises(ConfigError, match="tile blend must be one of"):
        score_tiled(_EchoScorer(), [img], 32, blend="median")


class _EchoScorer:
    """Scores a crop by its red channel: its map is the crop itself, its score the max."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def score(self, images: Sequence[np.ndarray], progress: object = None) -> ScoreResult:
        maps = [img[:, :, 0].astype(np.float32) for img in images]
        self.sizes += [m.shape for m in maps]
        return ScoreResult(
            scores=np.array([m.max() for m in maps], np.float32),
            maps=maps,
            extras=[{"mean": float(m.mean())} for m in maps],
        )


@pytest.mark.parametrize("blend", ["max", "mean"])
def test_stitched_map_puts_every_tile_back_in_place(blend: str) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 200, (300, 470, 3), dtype=np.uint8)
    img[250, 20] = 255  # the brightest pixel sits in the last row of tiles
    scorer = _EchoScorer()
    res = score_tiled(scorer, [img], 128, 24, blend=blend, batch_size=5)
    assert set(scorer.sizes) == {(128, 128)}
    assert len(scorer.sizes) == len(tile_boxes(300, 470, 128, 24)) == res.extras[0]["tiles"]
    np.testing.assert_allclose(res.maps[0], img[:, :, 0].astype(np.float32), rtol=1e-5)
    assert res.scores[0] == 255
    x, y, w, h = res.extras[0]["worst_tile"]["bbox"]
    assert x <= 20 < x + w and y <= 250 < y + h
    assert "mean" in res.extras[0]["worst_tile"]


def _mirrored(rng: np.random.Generator, side: int) -> np.ndarray:
    """A seamless 2*side square of brushed metal (mirrored copies), fast to make."""
    a = make_surface("brushed_metal", (side, side), rng)
    top = np.concatenate([a, a[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def test_small_defect_in_a_4096_image_is_found() -> None:
    rng = np.random.default_rng(5)
    tile = 512
    good = split_tiles([_mirrored(rng, 512)], tile)
    # the 5% coreset (no 2,048-patch floor) and held-out split this test was measured with
    params = {
        "backbone": "efficientnet-lite0",
        "image_size": 256,
        "coreset_ratio": 0.05,
        "min_bank": 0,
    }
    det = Detector.fit(
        good,
        "patchcore",
        tile_params("patchcore", {**params, "sigma": 4}),
        calibration_fraction=0.2,
        few_shot_below=0,  # 16 tiles: the held-out split this test was measured with
    )
    big = np.tile(_mirrored(rng, 512), (4, 4, 1))
    assert big.shape == (4096, 4096, 3)
    y0, x0 = 2900, 1230  # on the overlap of two tile columns
    crop, mask = add_defect(big[y0 : y0 + 64, x0 : x0 + 64], "hole", rng)
    big[y0 : y0 + 64, x0 : x0 + 64] = crop
    ys, xs = np.nonzero(mask)
    assert 50 <= mask.sum() <= 150  # about 10 px across
    res = score_tiled(det, [big], tile)
    amap = res.maps[0]
    assert amap.shape == (4096, 4096)
    peak = np.unravel_index(int(np.argmax(amap)), amap.shape)
    assert abs(peak[0] - (y0 + ys.mean())) < 32 and abs(peak[1] - (x0 + xs.mean())) < 32
    # the defect's neighbourhood holds the map's maximum region, far above the rest
    outside = amap.copy()
    outside[y0 - 64 : y0 + 128, x0 - 64 : x0 + 128] = 0
    assert amap.max() > 1.15 * outside.max(), (amap.max(), outside.max())
    assert det.decide(res.scores)[0]


def test_cli_inspect_with_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    good = split_tiles([_mirrored(rng, 96)], 64)
    det = Detector.fit(
        good, "patchcore", {"backbone": "efficientnet-lite0", "image_size": 64}, seed=0
    )
    model = det.save(tmp_path / "m.dkm")
    big = _mirrored(rng, 96)
    save_png(tmp_path / "big.png", big)
    res = runner.invoke(
        app, ["inspect", str(model), str(tmp_path / "big.png"), "--tile", "64", "-q"]
    )
    assert res.exit_code == 0, res.output
    line = json.loads(res.stdout)
    assert (line["width"], line["height"]) == (192, 192)
    want = score_tiled(det, [big], 64)
    assert line["score"] == pytest.approx(float(want.scores[0]), rel=1e-5)
    assert line["evidence"]["tiles"] == 16
    res = runner.invoke(app, ["inspect", str(model), str(tmp_path), "--tile", "8"])
    assert res.exit_code == 2 and "tile size must be" in res.output
    res = runner.invoke(app, ["inspect", str(model), str(tmp_path), "--tile-overlap", "8"])
    assert res.exit_code == 2 and "--tile-overlap needs --tile" in res.output


def test_a_tiled_detector_scores_and_calibrates_tile_by_tile() -> None:
    from defectkit.decide.calibration import threshold_for_false_alarm_rate

    rng = np.random.default_rng(2)
    det = Detector.fit(
        split_tiles([_mirrored(rng, 64)], 64),
        "patchcore",
        {"backbone": "efficientnet-lite0", "image_size": 64},
    )
    held_out = [_mirrored(rng, 96) for _ in range(4)]
    whole = det.score(held_out)
    assert whole.extras and "tiles" not in whole.extras[0]
    det.tiling = Tiling(64)
    tiled = score_tiled(det.model, held_out, 64)
    got = det.score(held_out)
    np.testing.assert_array_equal(got.scores, tiled.scores)
    assert got.extras[0]["tiles"] == 16 and not np.allclose(got.scores, whole.scores)
    assert det.calibrate(held_out, false_alarm_rate=0.05) is det
    want = threshold_for_false_alarm_rate(tiled.scores, 0.05)
    assert det.threshold == want and det.threshold.n_good == 4
    assert det.pixel_threshold is not None
    assert det.pixel_threshold.value <= det.threshold.value


def test_cli_fit_with_tiles_then_inspect_tiles_by_itself(tmp_path: Path) -> None:
    """fit --tile learns on tiles and calibrates on whole held-out images scored tile
    by tile; the model remembers its tiling, so a plain inspect tiles the same way."""
    rng = np.random.default_rng(3)
    good_dir = tmp_path / "good"
    for i in range(10):
        save_png(good_dir / f"{i:02d}.png", _mirrored(rng, 96))
    model = tmp_path / "m.dkm"
    res = runner.invoke(
        app,
        [
            "fit", str(good_dir), "--out", str(model), "--tile", "64", "-q",
            "--calibration-fraction", "0.3",
            "-p", "backbone=efficientnet-lite0", "-p", "image_size=64",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    det = Detector.load(model)
    assert det.tiling == Tiling(64, 8, "max")
    assert "tiling" not in det.info  # the model's geometry, not its provenance
    assert det.info["n_fit_images"] == 7 and det.info["n_calibration_images"] == 3
    assert det.info["n_fit_tiles"] == 7 * 16  # 192 px sides: 4 x 4 tiles of 64 px
    assert det.threshold is not None and det.threshold.n_good == 3

    bad, _ = add_defect(_mirrored(rng, 96), "hole", rng)
    save_png(tmp_path / "bad.png", bad)
    res = runner.invoke(app, ["inspect", str(model), str(tmp_path / "bad.png"), "-q"])
    assert res.exit_code == 0, res.output
    line = json.loads(res.stdout)
    want = score_tiled(det, [bad], 64, 8)
    assert line["score"] == pytest.approx(float(want.scores[0]), rel=1e-5)
    assert line["evidence"]["tiles"] == 16

    res = runner.invoke(
        app,
        ["fit", str(good_dir), "--out", str(model), "--tile", "64",
         "--calibration-fraction", "0"],
    )  # fmt: skip
    assert res.exit_code == 2 and "--tile needs held-out good images" in res.output


def test_tiled_fits_do_not_standardise_each_tile() -> None:
    assert tile_params("patchcore", {"sigma": 4}) == {
        "sigma": 4,
        "photometric": "none",
        "context_size": 0,
    }
    assert tile_params("padim", {})["photometric"] == "none"
    # the user's own choice stands; methods without the setting get nothing new
    assert tile_params("patchcore", {"photometric": "standardise"})["photometric"] == "standardise"
    assert tile_params("texture", {}) == {}


def test_cli_fit_with_tiles_keeps_tile_brightness(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data = tmp_path / "good"
    data.mkdir()
    for i in range(6):
        save_png(data / f"g{i}.png", _mirrored(rng, 96))
    out = tmp_path / "m.dkm"
    res = runner.invoke(
        app,
        ["fit", str(data), "--out", str(out), "--tile", "64", "-q", "-p", "image_size=64"],
    )
    assert res.exit_code == 0, res.output
    det = Detector.load(out)
    assert det.model.photometric == "none" and det.model.context_size == 0
    assert det.tiling is not None and det.tiling.tile == 64


def test_cli_min_defect_px_tiles_only_where_a_defect_would_fall_below_a_cell(
    tmp_path: Path,
) -> None:
    """--min-defect-px N: at a 64 px input a feature cell is 8 px, so a defect of N
    px needs tiles of 8N px (floored to 32s); 192 px images are tiled for N = 8 and
    left whole for N = 32."""
    rng = np.random.default_rng(4)
    good_dir = tmp_path / "good"
    for i in range(8):
        save_png(good_dir / f"{i:02d}.png", _mirrored(rng, 96))
    fast = ["-p", "backbone=efficientnet-lite0", "-p", "image_size=64", "-q"]
    small, whole = tmp_path / "small.dkm", tmp_path / "whole.dkm"
    args = ["--calibration-fraction", "0.25", *fast]
    res = runner.invoke(
        app, ["fit", str(good_dir), "--out", str(small), "--min-defect-px", "8", *args]
    )
    assert res.exit_code == 0, res.output
    assert "tiles of 64 px: a 8 px defect then spans a feature cell" in res.output
    assert Detector.load(small).tiling == Tiling(64)
    res = runner.invoke(
        app, ["fit", str(good_dir), "--out", str(whole), "--min-defect-px", "32", *args]
    )
    assert res.exit_code == 0, res.output
    assert "tiling" not in Detector.load(whole).info
    for extra, message in (
        (["--min-defect-px", "8", "--tile", "64"], "give it or --tile, not both"),
        (["--min-defect-px", "8", "--method", "threshold"], "methods with an image_size"),
    ):
        res = runner.invoke(app, ["fit", str(good_dir), "--out", str(whole), *extra])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output

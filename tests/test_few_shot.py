"""Few-shot mode: with fewer good images than ``FEW_SHOT_BELOW``, fit uses every
image and sets its thresholds from leave-one-out scores of them and of their
kept copies; the bound it states counts images, not copies."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from defectkit.cli import app
from defectkit.decide import few_shot
from defectkit.decide.calibration import calibration_warning
from defectkit.decide.few_shot import AUGMENTATIONS, left_out_scores
from defectkit.detector import Detector
from defectkit.errors import ConfigError
from defectkit.methods.padim import PaDiM
from defectkit.methods.patchcore import PatchCore

FAST = {"image_size": 64, "coreset_ratio": 0.1}


def test_left_out_scores_equal_a_refit_without_the_image(
    surface_set: dict[str, list[np.ndarray]],
) -> None:
    """With every patch in the bank, no whole-image term and exact search, scoring
    with an image left out is exactly a fit on the others."""
    settings = {**FAST, "coreset_ratio": 1.0, "global_weight": 0.0, "nn_search": "exact"}
    train = surface_set["train"][:5]
    model = PatchCore(**settings).fit(train)
    queries = [(1, train[1]), (3, train[3]), (3, surface_set["bad"][0])]
    got = model.score_left_out(train, queries)
    for (src, image), score, amap in zip(queries, got.scores, got.maps, strict=True):
        others = [im for i, im in enumerate(train) if i != src]
        want = PatchCore(**settings).fit(others).score([image])
        np.testing.assert_allclose(score, want.scores[0], rtol=1e-4)
        np.testing.assert_allclose(amap, want.maps[0], rtol=1e-3, atol=1e-4)
    # a training image scored in the full model finds itself: far lower than left out
    assert model.score([train[1]]).scores[0] < 0.5 * got.scores[0]
    # the model itself is untouched afterwards
    np.testing.assert_array_equal(model.score([train[1]]).scores, model.score([train[1]]).scores)
    assert len(model.memory_bank_) == len(model.bank_origin_)
    assert set(np.unique(model.bank_origin_[:, 0])) == set(range(5))


def test_left_out_scoring_checks_its_inputs(surface_set: dict[str, list[np.ndarray]]) -> None:
    train = surface_set["train"][:4]
    model = PatchCore(**FAST).fit(train)
    with pytest.raises(ConfigError, match="training images"):
        model.score_left_out(train[:3], [(0, train[0])])
    with pytest.raises(ConfigError, match=r"out of 0\.\.3"):
        model.score_left_out(train, [(4, train[0])])
    single = PatchCore(**FAST).fit(train[:1])
    with pytest.raises(ConfigError, match="at least 2"):
        single.score_left_out(train[:1], [(0, train[0])])
    with pytest.raises(ConfigError, match="cannot score with a training image left out"):
        PaDiM().score_left_out(train, [(0, train[0])])


def test_min_bank_keeps_a_handful_of_images_patches() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    small = PatchCore(image_size=64, coreset_ratio=0.01, min_bank=0).fit(images)
    assert len(small.memory_bank_) == 1  # 1% of 2 x 8 x 8 patches
    floor = PatchCore(image_size=64, coreset_ratio=0.01, min_bank=100).fit(images)
    assert len(floor.memory_bank_) == 100
    every = PatchCore(image_size=64, coreset_ratio=0.01).fit(images)
    assert len(every.memory_bank_) == 128  # the default floor, 2,048: the whole pool
    with pytest.raises(ConfigError, match="min_bank"):
        PatchCore(min_bank=-1).fit(images)


def test_fit_below_the_switch_uses_every_image(surface_set: dict[str, list[np.ndarray]]) -> None:
    train = surface_set["train"][:8]
    det = Detector.fit(train, "patchcore", FAST)
    assert det.info["n_fit_images"] == 8 and det.info["n_calibration_images"] == 0
    few = det.info["few_shot"]
    assert few["n_images"] == 8 and few["scores"] == "leave-one-out"
    assert len(det.info["calibration_scores"]) == 8
    thr = det.threshold
    assert thr is not None and thr.left_out and thr.n_good == 8
    assert thr.n_copies == 8 * len(few["copies_kept"])
    # the threshold is above every image's own leave-one-out score at a 1% target
    assert thr.value > max(det.info["calibration_scores"])
    assert thr.false_alarm_rate == 0.0
    # counted on the 8 images, not on the pooled copies: 31.2% at 95%
    assert thr.false_alarm_upper == pytest.approx(1 - 0.05 ** (1 / 8), abs=1e-6)
    warning = calibration_warning(thr)
    assert warning is not None and "few-shot mode: 8 good image(s)" in warning
    assert "defectkit calibrate MODEL GOOD_DIR" in warning
    assert det.pixel_threshold is not None and det.pixel_threshold.value <= thr.value
    # defects stand out against a threshold set that way
    bad = det.score(surface_set["bad"]).scores
    good = det.score(surface_set["good"]).scores
    assert np.mean(bad) > np.mean(good)


def test_the_switch_and_its_opt_out(surface_set: dict[str, list[np.ndarray]]) -> None:
    train = surface_set["train"][:10]
    held = Detector.fit(train, "patchcore", FAST, few_shot_below=0)
    assert "few_shot" not in held.info and held.info["n_calibration_images"] == 1
    assert held.threshold is not None and not held.threshold.left_out
    at = Detector.fit(train, "patchcore", FAST, few_shot_below=10)
    assert "few_shot" not in at.info  # 10 is not below 10
    none = Detector.fit(train, "patchcore", FAST, calibration_fraction=0.0)
    assert none.threshold is None and "few_shot" not in none.info
    # a method that cannot leave an image out keeps the held-out split
    padim = Detector.fit(train, "padim", {"image_size": 64})
    assert "few_shot" not in padim.info and padim.info["n_calibration_images"] == 1


def test_one_image_fits_and_says_nothing_is_certified(
    surface_set: dict[str, list[np.ndarray]],
) -> None:
    det = Detector.fit(surface_set["train"][:1], "patchcore", FAST)
    thr = det.threshold
    assert thr is not None and thr.left_out and thr.n_good == 1
    assert thr.false_alarm_upper == 1.0 and thr.false_alarm_rate is None
    few = det.info["few_shot"]
    # no mirrored copies without another image to compare them with
    assert set(few["copies_kept"]) == {n for n, (_, single) in AUGMENTATIONS.items() if single}
    assert det.info["calibration_scores"] == []
    assert "bound the false-alarm rate at 100.0%" in calibration_warning(thr)


def _lit_from_the_left(rng: np.random.Generator) -> np.ndarray:
    """A part lit from the left: bright on the left, dark on the right, with texture."""
    ramp = np.linspace(230, 30, 96, dtype=np.float32)[None, :, None]
    noise = cv2.GaussianBlur(rng.normal(0, 12, (96, 96, 3)).astype(np.float32), (0, 0), 1.5)
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def test_copies_the_part_does_not_allow_are_left_out() -> None:
    """Mirrored left to right, a part lit from the left looks defective: those copies
    are not pooled; mirrored top to bottom it looks like itself."""
    rng = np.random.default_rng(5)
    images = [_lit_from_the_left(rng) for _ in range(6)]
    model = PatchCore(**FAST, photometric="none").fit(images)
    found = left_out_scores(model, images)
    assert "mirror-lr" not in found.kept
    assert "mirror-ud" in found.kept
    assert found.medians["mirror-lr"] > found.plain.max()
    assert len(found.scores) == 6 * (1 + len(found.kept)) == len(found.maps)


def test_copies_scoring_far_above_their_own_images_are_left_out_despite_an_odd_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One odd good image (another kind of surface) scores far above the rest left
    out, so the largest plain score no longer bounds anything: mirrored copies of a
    part lit from the left pass under it, but score several times their own images
    and are still not pooled."""
    rng = np.random.default_rng(5)
    images = [_lit_from_the_left(rng) for _ in range(6)]
    odd = np.clip(128 + rng.normal(0, 90, (96, 96, 3)), 0, 255).astype(np.uint8)
    images.append(odd)
    model = PatchCore(**FAST, photometric="none").fit(images)
    monkeypatch.setattr(few_shot, "COPY_RATIO", float("inf"))
    unguarded = left_out_scores(model, images)
    assert "mirror-lr" in unguarded.kept  # under the odd image's score
    assert unguarded.medians["mirror-lr"] < unguarded.plain.max()
    monkeypatch.undo()
    found = left_out_scores(model, images)
    assert "mirror-lr" not in found.kept
    assert "mirror-ud" in found.kept and "brighter" in found.kept
    copies = np.array(found.copies["mirror-lr"])
    assert np.median(copies / found.plain) > few_shot.COPY_RATIO


def test_few_shot_maps_go_to_disk_above_the_memory_budget(
    surface_set: dict[str, list[np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every image's and copy's map is held for the pixel threshold: above
    ``map_memory`` they are written to a temporary folder, with the same thresholds,
    and the folder is gone afterwards."""
    images = surface_set["train"][:6]
    in_memory = Detector.fit(images, "patchcore", FAST)
    saved: list[int] = []
    append = few_shot.SavedMaps.append

    def counting(self: few_shot.SavedMaps, amap: np.ndarray) -> None:
        saved.append(amap.size)
        append(self, amap)

    monkeypatch.setattr(few_shot.SavedMaps, "append", counting)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    on_disk = Detector.fit(images, "patchcore", FAST, map_memory=0)
    assert len(saved) == 6 * (1 + len(AUGMENTATIONS))  # every image and copy
    assert on_disk.threshold == in_memory.threshold
    assert on_disk.pixel_threshold == in_memory.pixel_threshold
    assert on_disk.info["few_shot"] == in_memory.info["few_shot"]
    assert list(scratch.iterdir()) == []
    # under the budget nothing is written
    saved.clear()
    Detector.fit(images, "patchcore", FAST)
    assert saved == []


def test_model_file_keeps_the_few_shot_calibration(
    surface_set: dict[str, list[np.ndarray]], tmp_path: Path
) -> None:
    det = Detector.fit(surface_set["train"][:6], "patchcore", FAST)
    back = Detector.load(det.save(tmp_path / "m.dkm"))
    assert back.threshold == det.threshold and back.info["few_shot"] == det.info["few_shot"]
    summary = back.describe()["calibration"]
    assert summary["n_good"] == 6 and "few-shot mode" in summary["warning"]
    # calibrating on held-out good images later replaces the few-shot threshold
    back.calibrate(surface_set["good"])
    assert not back.threshold.left_out and back.threshold.n_good == 6
    assert "few_shot" not in back.info  # it no longer says how the threshold was set
    assert "few_shot" not in Detector.load(back.save(tmp_path / "m2.dkm")).info


def test_cli_fit_on_a_handful_says_so(
    surface_set: dict[str, list[np.ndarray]], tmp_path: Path
) -> None:
    folder = tmp_path / "good"
    folder.mkdir()
    for i, im in enumerate(surface_set["train"][:5]):
        cv2.imwrite(str(folder / f"{i}.png"), im[:, :, ::-1])
    out = tmp_path / "m.dkm"
    args = ["fit", str(folder), "--out", str(out), "-q", "-p", "image_size=64"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # Rich wraps long lines
    assert "few-shot mode: 5 good images (fewer than 64): all fitted" in said
    assert "fitted patchcore on 5 good images" in said
    assert "calibrated on 5 fitted good images, each left out" in said
    res = CliRunner().invoke(app, [*args, "--few-shot-below", "0"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    # 10% of 5 rounds to none held out: without few-shot mode, no threshold at all
    assert "few-shot" not in said and "on 5 good images" in said and "threshold" not in said
    res = CliRunner().invoke(app, [*args, "--few-shot-below", "-1"])
    assert res.exit_code == 2


def test_cli_calibrate_replaces_the_few_shot_calibration(
    surface_set: dict[str, list[np.ndarray]], tmp_path: Path
) -> None:
    """The documented next step: once good parts accumulate, `defectkit calibrate`
    sets the threshold on them, and the model no longer describes the few-shot one."""
    folders = {"fit": surface_set["train"][:5], "more": surface_set["good"]}
    for name, images in folders.items():
        (tmp_path / name).mkdir()
        for i, im in enumerate(images):
            cv2.imwrite(str(tmp_path / name / f"{i}.png"), im[:, :, ::-1])
    out = tmp_path / "m.dkm"
    fit = ["fit", str(tmp_path / "fit"), "--out", str(out), "-q", "-p", "image_size=64"]
    assert CliRunner().invoke(app, fit).exit_code == 0
    assert "few_shot" in Detector.load(out).info
    target = ["--target", "false-alarm-rate=0.01", "-q"]
    res = CliRunner().invoke(app, ["calibrate", str(out), str(tmp_path / "more"), *target])
    assert res.exit_code == 0, res.output
    det = Detector.load(out)
    assert "few_shot" not in det.info
    assert not det.threshold.left_out and det.threshold.n_good == len(surface_set["good"])


def test_mirrored_bank_patches_point_at_their_place_in_the_training_image() -> None:
    """Each bank patch from a mirrored copy is recorded at the spot of its own
    training image that it shows, so evidence names the right place."""
    rng = np.random.default_rng(3)
    images = [_lit_from_the_left(rng) for _ in range(3)]
    settings = {**FAST, "coreset_ratio": 1.0, "photometric": "none", "mirror_bank": "both"}
    model = PatchCore(**settings)
    model.fit(images)
    plain = model._embed_batches(images, None, "test")
    lr = model._embed_batches([im[:, ::-1].copy() for im in images], None, "test")
    ud = model._embed_batches([im[::-1].copy() for im in images], None, "test")
    h, w = plain[0].shape[:2]
    assert len(model.memory_bank_) == 3 * 3 * h * w  # every patch of images and copies
    found = {"plain": 0, "lr": 0, "ud": 0}
    for feat, (i, r, c) in zip(model.memory_bank_, model.bank_origin_, strict=True):
        for name, emb, (rr, cc) in (
            ("plain", plain, (r, c)),
            ("lr", lr, (r, w - 1 - c)),
            ("ud", ud, (h - 1 - r, c)),
        ):
            if np.array_equal(feat, emb[int(i)][rr, cc]):
                found[name] += 1
                break
    assert found == {"plain": 3 * h * w, "lr": 3 * h * w, "ud": 3 * h * w}
    with pytest.raises(ConfigError, match="mirror_bank must be one of"):
        PatchCore(**{**settings, "mirror_bank": "diagonal"}).fit(images)


def test_few_shot_puts_the_mirrors_the_part_allows_in_the_memory() -> None:
    """From ``MIRROR_BANK_FROM`` images, the mirrors the calibration keeps join the
    bank (a part lit from the left: top-to-bottom only); below it, none do."""
    rng = np.random.default_rng(5)
    images = [_lit_from_the_left(rng) for _ in range(few_shot.MIRROR_BANK_FROM)]
    settings = {**FAST, "photometric": "none"}
    det = Detector.fit(images, "patchcore", settings)
    few = det.info["few_shot"]
    assert few["memory_mirrors"] == "ud" == det.model.get_params()["mirror_bank"]
    assert "mirror-lr" not in few["copies_kept"]
    plain = PatchCore(**settings, mirror_bank="none").fit(images)
    assert len(det.model.memory_bank_) > len(plain.memory_bank_)
    fewer = Detector.fit(images[:-1], "patchcore", settings)
    assert "memory_mirrors" not in fewer.info["few_shot"]
    assert fewer.model.get_params()["mirror_bank"] == "auto"
    fixed = Detector.fit(images, "patchcore", {**settings, "mirror_bank": "none"})
    assert "memory_mirrors" not in fixed.info["few_shot"]
    assert len(fixed.model.memory_bank_) == len(plain.memory_bank_)


def test_scoring_only_some_kinds_of_copy_gives_their_same_scores_and_choices() -> None:
    """The mirror choice scores the mirrors alone: each kind is judged on its own,
    so its scores and whether it is kept do not depend on the other kinds."""
    rng = np.random.default_rng(5)
    images = [_lit_from_the_left(rng) for _ in range(6)]
    model = PatchCore(**FAST, photometric="none").fit(images)
    every = left_out_scores(model, images)
    mirrors = left_out_scores(model, images, keep_maps=False, only=few_shot.MIRROR_KINDS)
    assert set(mirrors.copies) == set(few_shot.MIRROR_KINDS)
    for kind in few_shot.MIRROR_KINDS:
        np.testing.assert_allclose(mirrors.copies[kind], every.copies[kind])
    assert mirrors.kept == [k for k in every.kept if k in few_shot.MIRROR_KINDS]
    assert len(mirrors.maps) == 0 and len(mirrors.scores) == 6 * (1 + len(mirrors.kept))

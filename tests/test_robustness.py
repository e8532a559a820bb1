"""Every bad-input case of ``badinputs`` through every entry point that reads images.

Entry points: the Python API (``load_image``, ``Detector.score``), ``defectkit
inspect`` (JSON lines and the table), ``defectkit fit`` and ``evaluate`` and
``report`` (bad files inside the dataset folders), and the service's ``POST
/inspect``. Each must give a clear per-file verdict (never a traceback), keep
scoring the good files of the same batch, and exit non-zero when a file failed.

What the CLI does with a bad file inside a dataset folder (checked here): fit,
evaluate and report skip it with a ``skipped <path>: <problem>`` line on stderr,
finish the work on the other files (the model or metrics or report is written),
and exit 1.

The outcomes are gathered into a cases x entry points table that
``tests/conftest.py`` prints in the terminal summary.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from badinputs import IGNORED, IS_ROOT, NOTES, Built, build_corpus, record
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from defectkit import cli
from defectkit.data.images import load_image
from defectkit.detector import Detector
from defectkit.errors import ImageError
from defectkit.serve.app import create_app
from defectkit.serve.store import ResultStore

runner = CliRunner()
METHOD, PARAMS = "threshold", {"size": 64}
N_TRAIN = 10  # good images the dataset-folder tests fit on


@pytest.fixture(autouse=True)
def wide_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps stderr at 80 columns when it is not a terminal: make the
    ``skipped <path>: <problem>`` lines one line each, so they can be checked."""
    monkeypatch.setattr(cli.common.err, "_width", 100_000)


@pytest.fixture(scope="module")
def base(demo_root: Path) -> np.ndarray:
    return load_image(sorted((demo_root / "test" / "good").glob("*.png"))[0])


@pytest.fixture(scope="module")
def model_path(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    train = sorted((demo_root / "train" / "good").glob("*.png"))
    det = Detector.fit([load_image(p) for p in train], METHOD, dict(PARAMS), seed=0)
    return det.save(tmp_path_factory.mktemp("robust_model") / "m.dkm")


@pytest.fixture(scope="module")
def detector(model_path: Path) -> Detector:
    return Detector.load(model_path)


@pytest.fixture(scope="module")
def corpus(base: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> list[Built]:
    if IS_ROOT:
        note = "unreadable: not run (tests run as root, and root can read any file)"
        if note not in NOTES:
            NOTES.append(note)
    return build_corpus(tmp_path_factory.mktemp("corpus") / "cases", base)


def _verdict(built: Built, message: str | None, expect: str | None = None) -> str | None:
    """None when ``message`` (None: it loaded) is what the case expects, else why not."""
    expect = built.case.expect if expect is None else expect
    if expect == "ok":
        return None if message is None else f"expected ok, got error {message!r}"
    if message is None:
        return f"expected an error matching {expect!r}, but it loaded"
    if not re.search(expect, message):
        return f"error {message!r} does not match {expect!r}"
    return None


def _check(mismatches: list[str], built: Built, entry: str, message: str | None, **kw) -> None:
    why = _verdict(built, message, **kw)
    if why is not None:
        mismatches.append(f"{built.case.name} [{entry}]: {why}")
    cell = "ok" if message is None else "error"
    record(built.case.name, entry, cell if why is None else "FAIL")


def _no_traceback(res) -> None:
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


# -- Python API ---------------------------------------------------------------------------
def test_python_api_load_image_and_score(corpus: list[Built], detector: Detector) -> None:
    assert len(corpus) + (1 if IS_ROOT else 0) >= 40
    mismatches: list[str] = []
    loaded = []
    for b in corpus:
        try:
            img = load_image(b.path)
            message = None
        except ImageError as e:
            assert e.path == str(b.path), "the error must name the file"
            message = e.problem
        _check(mismatches, b, "load_image", message)
        if message is None:
            loaded.append((b, img))
    # every image that loads scores: one batch of mixed sizes and encodings
    result = detector.score([img for _, img in loaded])
    for (b, img), score, amap in zip(loaded, result.scores, result.maps, strict=True):
        want = b.case.shape or (96, 96)
        fine = math.isfinite(float(score)) and amap.shape == img.shape[:2] == want
        if not fine:
            mismatches.append(f"{b.case.name} [Detector.score]: score {score}, map {amap.shape}")
        record(b.case.name, "Detector.score", "ok" if fine else "FAIL")
    assert not mismatches, "\n".join(mismatches)


BAD_ARRAYS = [
    ("nan", lambda g: np.where(g > 100, np.nan, g / 255.0), "NaN or infinite"),
    ("inf", lambda g: np.where(g > 100, np.inf, g / 255.0), "NaN or infinite"),
    ("float_over_1", lambda g: g.astype(np.float32), r"\[0, 1\]"),
    ("negative_float", lambda g: g / 255.0 - 0.5, r"\[0, 1\]"),
    ("int64", lambda g: g.astype(np.int64), "unsupported dtype int64"),
    ("int8", lambda g: g.astype(np.int8), "unsupported dtype int8"),
    ("complex", lambda g: g.astype(np.complex64), "unsupported dtype complex64"),
    ("object", lambda g: g.astype(object), "unsupported dtype object"),
    ("bool", lambda g: g > 100, "unsupported dtype bool"),
    ("str", lambda g: g.astype(str), "unsupported dtype"),
    ("five_channels", lambda g: np.concatenate([g, g[:, :, :2]], axis=2), r"shape \(H, W, 3\)"),
    ("one_dimensional", lambda g: g.reshape(-1), r"shape \(H, W, 3\)"),
    ("four_dimensional", lambda g: g[None], r"shape \(H, W, 3\)"),
    ("too_small", lambda g: g[:4, :4], "too small"),
    ("empty", lambda g: g[:0], "too small"),
    ("nested_list", lambda g: g.tolist(), "expected a numpy array, got list"),
    ("none", lambda g: None, "expected a numpy array, got NoneType"),
]


@pytest.mark.parametrize(("name", "make", "message"), BAD_ARRAYS, ids=[a[0] for a in BAD_ARRAYS])
def test_python_api_rejects_bad_arrays_clearly(
    detector: Detector, base: np.ndarray, name: str, make, message: str
) -> None:
    good = base.copy()
    with pytest.raises(ImageError, match=message) as info:
        detector.score([good, make(base)])
    assert "image #1" in str(info.value), "the error must say which image"
    # the good image alone still scores: nothing was left in a bad state
    assert np.isfinite(detector.score([good]).scores).all()


def test_python_api_rejects_an_empty_batch(detector: Detector) -> None:
    with pytest.raises(ImageError, match="at least 1 image"):
        detector.score([])


def test_python_api_accepts_valid_array_variants(detector: Detector, base: np.ndarray) -> None:
    variants = [
        base,
        base / 255.0,  # float64 in [0, 1]
        (base / 255.0).astype(np.float32),
        base.astype(np.uint16) * 257,
        base[:, :, 0],  # grey (H, W)
        base[:, :, :1],  # (H, W, 1)
        np.concatenate([base, base[:, :, :1]], axis=2),  # RGBA: alpha dropped
        np.asfortranarray(base),
        base[::-1, ::2],  # a strided view
    ]
    res = detector.score(variants)
    assert np.isfinite(res.scores).all()
    assert [m.shape for m in res.maps] == [v.shape[:2] for v in variants]


# -- defectkit inspect ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "table"])
def test_cli_inspect_batch_with_every_case(
    corpus: list[Built], model_path: Path, demo_root: Path, fmt: str, monkeypatch
) -> None:
    # one table row per line (Rich wraps at 80 columns when stdout is not a terminal)
    monkeypatch.setattr(cli.common.out, "_width", 100_000)
    goods = sorted((demo_root / "test" / "good").glob("*.png"))[:2]
    args = [str(goods[0]), *(str(b.path) for b in corpus), str(goods[1])]
    res = runner.invoke(cli.app, ["inspect", str(model_path), *args, "-q", "--format", fmt])
    _no_traceback(res)
    assert res.exit_code == cli.EXIT_FILES_FAILED, res.output
    n_bad = sum(not b.case.ok for b in corpus)
    assert f"{n_bad} file(s) could not be inspected" in res.stderr
    if fmt == "table":
        # a row per input (names that are not UTF-8 included), the problem in its column
        rows = [line for line in res.stdout.splitlines() if "│" in line]
        mismatches: list[str] = []
        for b in corpus:
            name = b.path.name.split("\n")[0]  # a newline in a name splits its cell
            shown = "/" + name.encode("utf-8", "surrogateescape").decode(
                "utf-8", "backslashreplace"
            )
            row = next((r for r in rows if r.split("│")[1].strip().endswith(shown)), "")
            error = row.split("│")[-2].strip() if row else "(no row)"
            _check(mismatches, b, "inspect (table)", error or None)
        assert not mismatches, "\n".join(mismatches)
        return
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    by_path = {r["path"]: r for r in lines}
    assert len(lines) == len(by_path) == len(args), "one line per input"
    for g in goods:  # the good files of the same batch are still scored
        assert by_path[str(g)]["error"] is None and by_path[str(g)]["score"] is not None
    mismatches: list[str] = []
    for b in corpus:
        rec = by_path[str(b.path)]
        if rec["error"] is None:
            assert isinstance(rec["score"], float) and rec["is_defect"] in (True, False)
        else:
            assert rec["score"] is None and rec["is_defect"] is None
        _check(mismatches, b, "inspect (jsonl)", rec["error"])
    assert not mismatches, "\n".join(mismatches)


# -- fit, evaluate and report: bad files inside dataset folders --------------------------
@pytest.fixture(scope="module")
def bad_dataset(demo_root: Path, base: np.ndarray, tmp_path_factory) -> tuple[Path, list, list]:
    """An MVTec layout whose train/good and test/odd folders also hold every case."""
    root = tmp_path_factory.mktemp("bad_dataset") / "ds"
    train = sorted((demo_root / "train" / "good").glob("*.png"))[:N_TRAIN]
    for p in train:
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / "train" / "good" / p.name)
    shutil.copytree(demo_root / "test", root / "test")
    shutil.copytree(demo_root / "ground_truth", root / "ground_truth")
    in_train = build_corpus(root / "train" / "good", base)
    in_test = build_corpus(root / "test" / "odd", base)
    return root, in_train, in_test


def _skipped(stderr: str, built: Built) -> str | None:
    """The problem printed for a skipped file, or None when it was not skipped."""
    m = re.search(rf"skipped {re.escape(str(built.path))}: (.*)", stderr)
    return None if m is None else m.group(1)


def _check_walked(mismatches: list[str], built: Built, entry: str, stderr: str, used: bool):
    """One case met while walking a dataset folder: used, skipped with a warning, or
    not taken as an image at all."""
    expect = built.case.walk_outcome()
    problem = _skipped(stderr, built)
    if expect == IGNORED:
        fine = problem is None and not used
        cell = "ignored" if fine else "FAIL"
        if not fine:
            mismatches.append(f"{built.case.name} [{entry}]: expected it to be ignored")
    elif expect == "ok":
        fine = used and problem is None
        cell = "ok" if fine else "FAIL"
        if not fine:
            mismatches.append(f"{built.case.name} [{entry}]: expected it to be used ({problem})")
    else:
        fine = problem is not None and not used and re.search(expect, problem) is not None
        cell = "skip+warn" if fine else "FAIL"
        if not fine:
            mismatches.append(f"{built.case.name} [{entry}]: {problem!r} vs {expect!r}")
    record(built.case.name, entry, cell)


def test_cli_fit_skips_bad_training_files_with_a_warning(bad_dataset, tmp_path: Path) -> None:
    root, in_train, _ = bad_dataset
    out = tmp_path / "fit.dkm"
    args = ["fit", str(root), "--out", str(out), "--method", METHOD, "-q"]
    res = runner.invoke(cli.app, [*args, "--param", "size=64", "--calibration-fraction", "0.3"])
    _no_traceback(res)
    assert res.exit_code == cli.EXIT_FILES_FAILED, res.output
    det = Detector.load(out)  # the model is written from the files that could be read
    used = {Path(x["path"]) for x in det.info["fit_images"]}
    used |= {Path(p) for p in det.info["calibration_images"]}
    n_ok = sum(b.case.walk_outcome() == "ok" for b in in_train)
    assert len(used) == N_TRAIN + n_ok
    n_skipped = sum(b.case.walk_outcome() not in ("ok", IGNORED) for b in in_train)
    assert det.info["n_skipped_files"] == n_skipped
    mismatches: list[str] = []
    for b in in_train:
        _check_walked(mismatches, b, "fit (train/good)", res.stderr, b.path.absolute() in used)
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("command", ["evaluate", "report"])
def test_cli_evaluate_and_report_skip_bad_test_files(
    bad_dataset, model_path: Path, tmp_path: Path, command: str
) -> None:
    root, _, in_test = bad_dataset
    args = [command, str(model_path), str(root), "--format", "json", "-q"]
    if command == "report":
        args += ["--out", str(tmp_path / "r.html"), "--gallery", "2"]
    res = runner.invoke(cli.app, args)
    _no_traceback(res)
    assert res.exit_code == cli.EXIT_FILES_FAILED, res.output
    summary = json.loads(res.stdout)
    n_ok = sum(b.case.walk_outcome() == "ok" for b in in_test)
    n_demo = sum(1 for _ in (root / "test").glob("*/*.png")) - sum(
        1 for _ in (root / "test" / "odd").glob("*.png")
    )
    assert summary["n_good"] + summary["n_defect"] == n_demo + n_ok
    if command == "report":
        assert (tmp_path / "r.html").stat().st_size > 1000
    mismatches: list[str] = []
    for b in in_test:
        used = b.case.walk_outcome() == "ok" and _skipped(res.stderr, b) is None
        _check_walked(mismatches, b, f"{command} (test/odd)", res.stderr, used)
    assert not mismatches, "\n".join(mismatches)


# -- the service: POST /inspect ---------------------------------------------------------
def test_service_upload_of_every_case(corpus: list[Built], detector: Detector, tmp_path) -> None:
    store = ResultStore.open(f"sqlite:///{tmp_path / 'results.db'}", tmp_path / "blobs")
    app = create_app(detector, store, token=None, max_upload_bytes=5_000_000)
    mismatches: list[str] = []
    n_ok = 0
    with TestClient(app) as client:
        for b in corpus:
            if b.case.kind != "content":
                record(b.case.name, "POST /inspect", "n/a")
                continue
            files = {"file": (b.path.name, b.data(), "application/octet-stream")}
            r = client.post("/inspect", files=files)
            if r.status_code == 201:
                n_ok += 1
                assert r.json()["error"] is None and r.json()["score"] is not None
                message = None
            else:
                assert r.status_code == 415, (b.case.name, r.status_code, r.text)
                message = r.json()["detail"]
                assert b.path.name in message, "the error must name the upload"
            _check(mismatches, b, "POST /inspect", message)
        assert client.get("/results").json()["total"] == n_ok
    # nothing recorded for a bad upload, one row per good one
    assert store.count() == n_ok == sum(b.case.ok for b in corpus if b.case.kind == "content")
    store.close()
    assert not mismatches, "\n".join(mismatches)

"""`defectkit report`: figures that agree with `evaluate`, one self-contained
HTML file, good-only data, and rendering in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from defectkit.cli import app

runner = CliRunner()
CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = (
    "summary",
    "curves",
    "histogram",
    "confusion",
    "recall",
    "regions",
    "false-alarms",
    "misses",
)


@pytest.fixture(scope="module")
def model(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "stone.dkm"
    res = runner.invoke(
        app,
        ["fit", str(demo_root), "--out", str(path), "-q", "-p", "image_size=96",
         "-p", "coreset_ratio=0.1", "--calibration-fraction", "0.25"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return path


@pytest.fixture(scope="module")
def report(model: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("html") / "report.html"
    res = runner.invoke(
        app, ["report", str(model), str(demo_root), "--out", str(out), "--format", "json", "-q"]
    )
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)


def test_report_figures_agree_with_evaluate(model: Path, demo_root: Path, report) -> None:
    _, s = report
    res = runner.invoke(app, ["evaluate", str(model), str(demo_root), "--format", "json", "-q"])
    ev = json.loads(res.stdout)
    assert s["n_good"] == ev["n_good"] == 6 and s["n_defect"] == ev["n_defect"] == 12
    assert s["image_auroc"] == pytest.approx(ev["image_auroc"])
    assert s["threshold"] == ev["threshold_used"]
    for kind, rate in ev["recall_per_type"].items():
        if kind == "good":
            assert 1 - rate == pytest.approx(s["false_alarm_rate"])
        else:
            assert s["recall_per_type"][kind] == pytest.approx(rate)
    c = s["confusion"]
    assert c["tn"] + c["fp"] == 6 and c["fn"] + c["tp"] == 12
    assert s["recall"] == pytest.approx(c["tp"] / 12)
    assert s["false_alarm_upper_calibrated"] is not None
    assert s["bound_covers"] == (s["false_alarm_rate"] <= s["false_alarm_upper_calibrated"])
    reported, alone = s["regions"]["reported"], s["regions"]["pixel_threshold_only"]
    assert reported["defective"]["n_truth"] == alone["defective"]["n_truth"] > 0
    # inspect lists regions on NG images only: never more than the pixel threshold alone
    assert reported["defective"]["n_found"] <= alone["defective"]["n_found"]
    assert reported["good"]["n_pred"] <= alone["good"]["n_pred"]
    assert reported["recall"] == reported["defective"]["n_found"] / reported["defective"]["n_truth"]
    assert s["seconds"]["total"] > 0


def test_report_html_is_self_contained(report) -> None:
    path, s = report
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    # nothing is fetched: no external URL in any src, href, url() or @import
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "url(" not in page and "@import" not in page
    plots = re.findall(r'<img class="plot"[^>]*src="data:image/png;base64,', page)
    assert len(plots) == 4
    thumbs = re.findall(r'<figure><img[^>]*src="data:image/jpeg;base64,', page)
    n_fa, n_miss = s["confusion"]["fp"], s["confusion"]["fn"]
    assert len(thumbs) == min(n_fa, 12) + min(n_miss, 12)
    import base64

    for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_good_images_only(model: Path, demo_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "good-only"
    shutil.copytree(demo_root / "test" / "good", data / "good")
    out = tmp_path / "r.html"
    res = runner.invoke(
        app, ["report", str(model), str(data), "--out", str(out), "--format", "json", "-q"]
    )
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["n_good"] == 6 and s["n_defect"] == 0
    assert s["recall"] is None and s["image_auroc"] is None
    assert s["regions"]["reported"]["recall"] is None
    assert s["false_alarm_rate"] is not None
    assert "No misses at this threshold." in out.read_text()


def test_report_refuses_bad_options(model: Path, demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    res = runner.invoke(
        app, ["report", str(model), str(demo_root), "--out", str(out), "--format", "x"]
    )
    assert res.exit_code == 2
    res = runner.invoke(app, ["report", str(model), str(tmp_path / "none"), "--out", str(out)])
    assert res.exit_code == 2 and "not found" in res.output
    assert not out.exists()


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'chromium-profile'}",
    ]
    return subprocess.run(
        [str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium not installed at /usr/bin/chromium"
)
def test_report_renders_in_headless_chromium(report, tmp_path: Path) -> None:
    import cv2

    path, _ = report
    dom = chromium("--dump-dom", path.resolve().as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for section in SECTIONS:
        assert f'id="{section}"' in html
    assert len(re.findall(r"<img ", html)) >= 4
    assert "Recall per defect type" in html
    shot = tmp_path / "shot.png"
    res = chromium(
        f"--screenshot={shot}", "--window-size=1200,3000", path.resolve().as_uri(), tmp=tmp_path
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (3000, 1200)
    # not blank: the decoded plots give many colours, the curves and bars strong red,
    # and the good-score histogram green
    assert img.std() > 20
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 300
    b, g, r = (img[:, :, i].astype(int) for i in range(3))
    assert np.count_nonzero((r > 150) & (g < 90) & (b < 90)) > 500
    assert np.count_nonzero((g > r + 30) & (g > b + 30)) > 500

"""Dashboard end to end in headless Debian Chromium (driven by Playwright, never
downloading a browser) on a 1366x768 screen: upload, see the result appear and the
header's figures change, open the detail view, review it, see the charts update.
Screenshots are kept as test artefacts in ``$DEFECTKIT_TEST_ARTIFACTS`` (default
``test-artifacts/`` in the working directory)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from serve_util import png_bytes

from defectkit.data.synthetic import add_defect, make_surface
from defectkit.detector import Detector
from defectkit.serve.app import create_app
from defectkit.serve.spc import SpcMonitor
from defectkit.serve.store import ResultStore

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dash-token"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) not installed")
if not CHROMIUM.exists():
    pytest.skip(
        "Debian chromium not at /usr/bin/chromium (.ci/run installs it)", allow_module_level=True
    )


ARTIFACTS = Path(os.environ.get("DEFECTKIT_TEST_ARTIFACTS", "test-artifacts"))
SCREEN = {"width": 1366, "height": 768}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from defectkit.data.images import save_png

    tmp = tmp_path_factory.mktemp("dash")
    rng = np.random.default_rng(11)
    train = [make_surface("stone", (96, 96), rng) for _ in range(48)]
    # fitted from files, so that a result can name its closest good training patch
    paths = [save_png(tmp / f"train_{i:02d}.png", im) for i, im in enumerate(train)]
    det = Detector.fit(
        train,
        "patchcore",
        {"image_size": 96, "coreset_ratio": 0.1},
        calibration_fraction=0.25,
        paths=paths,
    )
    store = ResultStore.open(f"sqlite:///{tmp / 'r.db'}", tmp / "blobs")
    app = create_app(det, store, token=TOKEN, spc=SpcMonitor(baseline=5), model_name="stone.dkm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    end = time.monotonic() + 30
    while not srv.started and time.monotonic() < end:
        time.sleep(0.05)
    good = tmp / "good.png"
    good.write_bytes(png_bytes(make_surface("stone", (96, 96), np.random.default_rng(5))))
    bad_img, _ = add_defect(make_surface("stone", (96, 96), np.random.default_rng(6)), "hole", rng)
    bad = tmp / "bad.png"
    bad.write_bytes(png_bytes(bad_img))
    yield {"url": f"http://127.0.0.1:{port}", "store": store, "good": good, "bad": bad}
    srv.should_exit = True
    t.join(10)
    store.close()


def _loaded(page, selector: str) -> None:
    """Wait until the image at ``selector`` has really loaded (a broken image never
    gets a natural width, so this times out and fails)."""
    page.wait_for_function(
        "(sel) => { const i = document.querySelector(sel);"
        " return i !== null && i.complete && i.naturalWidth > 0; }",
        arg=selector,
        timeout=15_000,
    )


def _fits_screen(page) -> None:
    """Nothing wider than the screen, and the page itself does not scroll: the
    feed and the side panel scroll on their own."""
    size = page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    assert size[0] <= SCREEN["width"] and size[1] <= SCREEN["height"], size


def test_inspect_detail_review_and_charts_in_chromium(server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport=SCREEN)
        page.goto(server["url"] + "/")
        expect = sync_api.expect
        expect(page.locator("#model-info")).to_contain_text("stone.dkm")
        expect(page.locator("#kpi-parts")).to_have_text("0")
        expect(page.locator("#chart-scores svg .empty")).to_have_count(1)
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")

        # a defective part: it appears in the feed, the header counts it as NG
        page.set_input_files("#upload-file", str(server["bad"]))
        page.fill("#upload-lot", "lot-1")
        page.click("#upload-btn")
        expect(page.locator("#upload-status")).to_contain_text("result 1: NG")
        card = page.locator('#feed .card[data-id="1"]')
        expect(card).to_contain_text("NG")
        _loaded(page, '#feed .card[data-id="1"] img')
        expect(page.locator("#kpi-parts")).to_have_text("1")
        expect(page.locator("#kpi-ng")).to_have_text("100.0%")
        expect(page.locator("#kpi-yield")).to_have_text("0.0%")
        expect(page.locator("#queue-count")).to_have_text("1")

        # its detail view: image beside heatmap, regions, worst and closest good patch
        card.click()
        expect(page.locator("#detail")).to_be_visible()
        expect(page.locator("#detail-title")).to_contain_text("Result 1")
        for sel in ("#detail-image", "#detail-overlay", "#detail-worst", "#detail-good"):
            _loaded(page, sel)
        assert page.locator("#detail-regions tbody tr td").first.inner_text() == "1"
        expect(page.locator("#detail-facts")).to_contain_text("not reviewed")
        _fits_screen(page)
        page.screenshot(path=str(ARTIFACTS / "dashboard-detail.png"))

        # review it there as a defect of a named type
        page.fill("#detail-type", "hole")
        page.click("#detail-defect")
        expect(page.locator("#detail-facts")).to_contain_text("defect (hole)")
        stored = server["store"].get(1)
        assert (stored.review_verdict, stored.review_defect_type) == ("defect", "hole")
        page.keyboard.press("Escape")
        expect(page.locator("#detail")).to_be_hidden()
        expect(page.locator("#queue-count")).to_have_text("0")
        # the reviewed type is offered from now on
        expect(page.locator('#defect-types option[value="hole"]')).to_have_count(1)

        # good parts add points to the score chart and a lot to the p-chart
        expect(page.locator("#chart-scores svg circle.point")).to_have_count(0)
        page.fill("#upload-lot", "lot-2")
        for _ in range(2):
            page.set_input_files("#upload-file", str(server["good"]))
            page.click("#upload-btn")
            expect(page.locator("#upload-status")).to_contain_text(": OK")
        expect(page.locator("#spc-count")).to_have_text("2")
        expect(page.locator("#chart-scores svg circle.point")).to_have_count(2)
        expect(page.locator("#chart-scores svg text.time").first).to_be_visible()
        expect(page.locator("#chart-p svg circle.point")).to_have_count(2)
        expect(page.locator("#kpi-yield")).to_have_text("66.7%")

        # filters: NG only leaves the one defective part in the feed
        page.select_option("#f-verdict", "ng")
        expect(page.locator("#feed .card")).to_have_count(1)
        page.select_option("#f-verdict", "")
        expect(page.locator("#feed .card")).to_have_count(3)
        page.select_option("#f-lot", "lot-1")
        expect(page.locator("#kpi-parts")).to_have_text("1")
        page.click("#f-clear")
        expect(page.locator("#kpi-parts")).to_have_text("3")

        # the review queue, ordered by doubt, with the known types offered
        page.click('.tabs button[data-tab="queue"]')
        expect(page.locator("#queue tbody tr")).to_have_count(2)
        _fits_screen(page)
        page.click('.tabs button[data-tab="charts"]')
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"))

        # a wrong token is refused with the server's message
        page.fill("#token", "wrong")
        page.set_input_files("#upload-file", str(server["good"]))
        page.click("#upload-btn")
        expect(page.locator("#upload-status")).to_contain_text("error 403")
        browser.close()
    assert server["store"].count() == 3
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000

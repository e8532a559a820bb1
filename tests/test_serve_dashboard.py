"""Dashboard end to end in headless Debian Chromium (driven by Playwright, never
downloading a browser): upload, see the result appear, review it, see the chart
update."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    rng = np.random.default_rng(11)
    train = [make_surface("stone", (96, 96), rng) for _ in range(48)]
    det = Detector.fit(
        train, "patchcore", {"image_size": 96, "coreset_ratio": 0.1}, calibration_fraction=0.25
    )
    tmp = tmp_path_factory.mktemp("dash")
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


def test_upload_review_and_chart_update_in_chromium(server):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page()
        page.goto(server["url"] + "/")
        sync_api.expect(page.locator("#model-info")).to_contain_text("stone.dkm")
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")

        # upload a defective part: the result appears in the feed and the review queue
        page.set_input_files("#upload-file", str(server["bad"]))
        page.fill("#upload-lot", "lot-1")
        page.click("#upload-btn")
        sync_api.expect(page.locator("#upload-status")).to_contain_text("result 1: NG")
        sync_api.expect(page.locator('#feed tr[data-id="1"]')).to_contain_text("NG")
        row = page.locator('#queue tr[data-id="1"]')
        sync_api.expect(row).to_be_visible()
        # the overlay loads after the row appears: wait for it (a broken image never
        # gets a natural width, so this times out and fails)
        page.wait_for_function(
            "() => { const i = document.querySelector('#feed tr[data-id=\"1\"] img');"
            " return i !== null && i.complete && i.naturalWidth > 0; }",
            timeout=15_000,
        )

        # review it as a defect of a named type: it leaves the queue and is stored
        row.locator(".review-type").fill("hole")
        row.locator(".review-defect").click()
        sync_api.expect(page.locator('#queue tr[data-id="1"]')).to_have_count(0)
        stored = server["store"].get(1)
        assert (stored.review_verdict, stored.review_defect_type) == ("defect", "hole")

        # a good part adds a point to the score chart
        sync_api.expect(page.locator("#spc-count")).to_have_text("0")
        page.set_input_files("#upload-file", str(server["good"]))
        page.click("#upload-btn")
        sync_api.expect(page.locator("#upload-status")).to_contain_text("result 2: OK")
        sync_api.expect(page.locator("#spc-count")).to_have_text("1")
        sync_api.expect(page.locator("#pchart tbody tr")).to_contain_text("lot lot-1")

        # a wrong token is refused with the server's message
        page.fill("#token", "wrong")
        page.set_input_files("#upload-file", str(server["good"]))
        page.click("#upload-btn")
        sync_api.expect(page.locator("#upload-status")).to_contain_text("error 403")
        browser.close()
    assert server["store"].count() == 2

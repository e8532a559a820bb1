"""SPC: control-chart rules on made-up numbers, the webhook on a local listener,
and a replayed drifting stream through the service."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_util import png_bytes

from defectkit.data.synthetic import make_surface
from defectkit.detector import Detector
from defectkit.serve.app import create_app
from defectkit.serve.spc import SpcMonitor, p_limits, western_electric
from defectkit.serve.store import ResultStore

TOKEN = "t"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _feed(mon: SpcMonitor, scores, lot=None):
    events = []
    for i, s in enumerate(scores):
        events += [(i, e) for e in mon.update(float(s), False, lot=lot, notify=False)]
    return events


def test_western_electric_rules():
    assert western_electric([0.0, 3.2])["rule 1: beyond 3 sigma"]
    assert not western_electric([0.0, 2.9])["rule 1: beyond 3 sigma"]
    assert western_electric([2.1, 0.0, 2.2])["rule 2: 2 of 3 beyond 2 sigma"]
    assert not western_electric([2.1, 0.0, -2.2])["rule 2: 2 of 3 beyond 2 sigma"]
    assert western_electric([1.1, 1.2, 0.0, 1.5, 1.3])["rule 3: 4 of 5 beyond 1 sigma"]
    assert western_electric([0.1] * 8)["rule 4: 8 on one side"]
    assert not western_electric([0.1] * 7 + [-0.1])["rule 4: 8 on one side"]
    assert not any(western_electric([]).values())


def test_p_limits_are_binomial_3_sigma_quantiles():
    from scipy.stats import binom

    lcl, ucl = p_limits(0.02, 200)
    k = round(ucl * 200)
    assert binom.sf(k, 200, 0.02) <= 0.00135 < binom.sf(k - 1, 200, 0.02)
    assert 0.0 <= lcl < 0.02 < ucl
    # close to p ± 3 sd where the normal approximation holds
    lcl, ucl = p_limits(0.3, 1000)
    sd = math.sqrt(0.3 * 0.7 / 1000)
    assert ucl == pytest.approx(0.3 + 3 * sd, abs=0.005)
    assert lcl == pytest.approx(0.3 - 3 * sd, abs=0.005)


def test_ewma_and_cusum_rarely_fire_in_control_and_catch_a_shift():
    # 40 log-normal streams: 100 baseline parts, then 100 in control or shifted up
    # by 1 sigma (of the log score)
    false_alarms, caught = 0, 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        base = np.exp(rng.normal(3.0, 0.1, 200))
        false_alarms += bool(_feed(SpcMonitor(baseline=100), base))
        shifted = np.concatenate([base[:100], np.exp(rng.normal(3.1, 0.1, 100))])
        events = _feed(SpcMonitor(baseline=100), shifted)
        caught += bool(events) and min(i for i, _ in events) < 150
    assert false_alarms <= 8  # measured 12.5% over 200 seeds (mostly xbar rules)
    assert caught >= 36


def test_each_rule_fires_once_while_it_holds():
    rng = np.random.default_rng(3)
    scores = np.concatenate([np.exp(rng.normal(3.0, 0.1, 100)), np.full(60, np.exp(3.5))])
    events = _feed(SpcMonitor(baseline=100), scores)
    assert {e.chart for _, e in events} >= {"ewma", "cusum", "xbar"}
    assert sum(e.chart == "ewma" for _, e in events) == 1
    # downward shifts are no warning by default, but are with two_sided
    low = np.concatenate([scores[:100], np.full(60, np.exp(2.5))])
    assert _feed(SpcMonitor(baseline=100), low) == []
    assert _feed(SpcMonitor(baseline=100, two_sided=True), low)


def test_scores_of_ng_parts_do_not_feed_the_score_charts():
    mon = SpcMonitor(baseline=5)
    for s in (1.0, 1.1, 0.9, 1.0, 1.05):
        mon.update(s, False, notify=False)
    mon.update(50.0, True, notify=False)
    assert mon.state()["scores"]["points"][-1]["score"] == 1.05
    assert mon.n_good_ == 5


def test_p_chart_fires_for_a_bad_lot():
    mon = SpcMonitor(baseline=5, min_group=20)
    rng = np.random.default_rng(1)
    for lot in range(5):
        for _ in range(40):
            mon.update(1.0, bool(rng.random() < 0.02), lot=f"L{lot}", notify=False)
    assert not [a for a in mon.alarms if a.chart == "p"]
    events = []
    for i in range(40):
        events += mon.update(1.0, i % 3 == 0, lot="bad", notify=False)
    p_alarms = [e for e in events if e.chart == "p"]
    assert len(p_alarms) == 1 and "lot bad" in p_alarms[0].message
    row = next(r for r in mon.state()["p_chart"] if r["group"] == "lot bad")
    assert row["p"] > row["ucl"]


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []  # noqa: RUF012 - shared by the test and the handler

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}/alarm", _Hook.received
    server.shutdown()
    server.server_close()


def _wait_for(cond, timeout=5.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_alarm_is_logged_and_posted_to_the_webhook(webhook, caplog):
    url, received = webhook
    mon = SpcMonitor(baseline=5, webhook_url=url)
    with caplog.at_level("WARNING", logger="defectkit.spc"):
        for s in (1.0, 1.1, 0.9, 1.0, 1.05, 9.0):
            mon.update(s, False)
    assert _wait_for(lambda: received)
    assert received[0]["alarm"]["chart"] in {"ewma", "cusum", "xbar"}
    assert "SPC alarm" in caplog.text


# -- drift replay through the service ---------------------------------------------
BASELINE, AFTER = 100, 100


@pytest.fixture(scope="module")
def stone_detector():
    rng = np.random.default_rng(11)
    train = [make_surface("stone", (96, 96), rng) for _ in range(48)]
    return Detector.fit(
        train, "patchcore", {"image_size": 96, "coreset_ratio": 0.1}, calibration_fraction=0.25
    )


def _stream(drift: bool) -> list[np.ndarray]:
    """Good parts; with ``drift`` the camera goes out of focus from part BASELINE on:
    Gaussian blur whose sigma grows by 0.02 px per part."""
    rng = np.random.default_rng(104)
    images = [make_surface("stone", (96, 96), rng) for _ in range(BASELINE + AFTER)]
    if drift:
        images = [
            cv2.GaussianBlur(im, (0, 0), 0.02 * (i - BASELINE + 1)) if i >= BASELINE else im
            for i, im in enumerate(images)
        ]
    return images


def _replay(detector, tmp_path, images, webhook_url):
    store = ResultStore.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    app = create_app(
        detector, store, token=TOKEN, spc=SpcMonitor(baseline=BASELINE, webhook_url=webhook_url)
    )
    ids = []
    with TestClient(app) as c:
        for i, im in enumerate(images):
            files = {"file": (f"{i}.png", png_bytes(im), "image/png")}
            r = c.post("/inspect", files=files, data={"lot": f"lot{i // 25}"}, headers=AUTH)
            assert r.status_code == 201
            ids.append(r.json()["id"])
        spc = c.get("/spc").json()
    store.close()
    return ids, spc


def test_drift_replay_alarms_within_50_parts_and_not_without_drift(
    stone_detector, tmp_path, webhook
):
    url, received = webhook
    ids, spc = _replay(stone_detector, tmp_path / "clean", _stream(False), url)
    assert spc["alarms"] == [] and spc["stored_alarms"] == []
    assert spc["scores"]["mean"] is not None

    ids, spc = _replay(stone_detector, tmp_path / "drift", _stream(True), url)
    assert spc["stored_alarms"], "no alarm on the drifting stream"
    first = min(a["result_id"] for a in spc["stored_alarms"])
    part = ids.index(first)
    assert BASELINE <= part < BASELINE + 50, f"first alarm at part {part}"
    assert _wait_for(lambda: received)  # and it went to the webhook


def test_each_product_has_its_own_baseline_limits_and_alarm_label():
    mon = SpcMonitor(baseline=5)
    for i in range(30):  # two products whose good scores differ tenfold
        mon.update(1.0 + 0.01 * (i % 3), False, product="a", result_id=i)
        mon.update(10.0 + 0.1 * (i % 3), False, product="b", result_id=100 + i)
    a, b = mon.charts_of("a").state(), mon.charts_of("b").state()
    assert a["scores"]["center"] < 1.1 < 9 < b["scores"]["center"]
    assert mon.state()["scores"]["points"] == [] and mon.products == ["a", "b"]
    assert mon.charts_of("c") is None  # asking never creates charts
    events = []
    for i in range(40):  # product a drifts up; b stays
        events += mon.update(3.0, False, product="a", result_id=200 + i)
    assert events and all(e.message.startswith("[a] ") for e in events)
    assert mon.charts_of("b").alarms == []

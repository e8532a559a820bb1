"""The inspection service through FastAPI's TestClient, against a small model."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_util import demo_test_images, png_bytes, small_detector

from defectkit.data.images import load_image
from defectkit.serve.app import create_app
from defectkit.serve.inspection import inspect_image
from defectkit.serve.spc import SpcMonitor
from defectkit.serve.store import ResultStore

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def detector(demo_root):
    return small_detector(demo_root)


@pytest.fixture
def store(tmp_path):
    s = ResultStore.open(f"sqlite:///{tmp_path / 'results.db'}", tmp_path / "blobs")
    yield s
    s.close()


@pytest.fixture
def client(detector, store):
    app = create_app(detector, store, token=TOKEN, max_upload_bytes=200_000, model_name="t.dkm")
    with TestClient(app) as c:
        yield c


def _post(client, path, line=None, lot=None, headers=AUTH, name=None):
    data = {k: v for k, v in (("line", line), ("lot", lot)) if v is not None}
    files = {"file": (name or path.name, path.read_bytes(), "image/png")}
    return client.post("/inspect", files=files, data=data, headers=headers)


def test_inspect_returns_the_cli_result_object_and_stores_it(client, detector, demo_root, store):
    from defectkit.data.images import load_image

    _, bad = demo_test_images(demo_root)
    r = _post(client, bad[0], line="L1", lot="lot-1")
    assert r.status_code == 201, r.text
    body = r.json()
    # same contract as `defectkit inspect`: same keys and values for this image
    expected = inspect_image(detector, load_image(bad[0]), bad[0].name).record
    for key in ("score", "is_defect", "threshold", "error", "width", "height", "severity"):
        assert (
            body[key] == pytest.approx(expected[key])
            if key == "score"
            else body[key] == expected[key]
        )
    assert body["regions"] == json.loads(json.dumps(expected["regions"]))
    assert body["path"] == bad[0].name and body["line"] == "L1" and body["lot"] == "lot-1"
    assert store.count() == 1 and store.get(body["id"]).score == pytest.approx(body["score"])
    assert client.get(f"/results/{body['id']}").json()["score"] == body["score"]
    ov = client.get(body["links"]["overlay"])
    assert ov.status_code == 200 and ov.headers["content-type"] == "image/png"
    assert ov.content.startswith(b"\x89PNG")
    img = client.get(body["links"]["image"])
    assert img.content == bad[0].read_bytes()


def test_write_endpoints_need_the_token(client, demo_root, store):
    good, _ = demo_test_images(demo_root)
    r = _post(client, good[0], headers={})
    assert r.status_code == 401 and "token" in r.json()["detail"]
    r = _post(client, good[0], headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403
    assert client.post("/results/1/review", json={"verdict": "good"}).status_code == 401
    assert store.count() == 0
    assert client.get("/results").status_code == 200  # reads are open


def test_bad_uploads_get_clear_4xx_and_store_nothing(client, store):
    r = client.post(
        "/inspect", files={"file": ("x.png", b"not an image", "image/png")}, headers=AUTH
    )
    assert r.status_code == 415 and "not a usable image" in r.json()["detail"]
    r = client.post("/inspect", files={"file": ("x.png", b"", "image/png")}, headers=AUTH)
    assert r.status_code == 415 and "empty" in r.json()["detail"]
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    assert len(big) > 200_000
    r = client.post("/inspect", files={"file": ("big.png", big, "image/png")}, headers=AUTH)
    assert r.status_code == 413 and "larger than" in r.json()["detail"]
    r = client.post("/inspect", data={"line": "L1"}, headers=AUTH)
    assert r.status_code == 422 and "file" in r.json()["detail"]
    r = client.post(
        "/inspect", files={"file": ("../../etc/passwd", b"x", "image/png")}, headers=AUTH
    )
    assert r.status_code == 415
    assert store.count() == 0
    metrics = client.get("/metrics").text
    assert 'defectkit_rejected_requests_total{code="415"} 3' in metrics


def test_results_filters_and_pagination(client, demo_root):
    good, bad = demo_test_images(demo_root)
    ids = []
    for i, p in enumerate(good[:3] + bad[:3]):
        ids.append(_post(client, p, line="A" if i % 2 else "B").json()["id"])
    page = client.get("/results", params={"limit": 4}).json()
    assert page["total"] == 6 and [r["id"] for r in page["items"]] == ids[::-1][:4]
    page2 = client.get("/results", params={"limit": 4, "offset": 4}).json()
    assert [r["id"] for r in page2["items"]] == ids[::-1][4:]
    a = client.get("/results", params={"line": "A"}).json()
    assert a["total"] == 3 and {r["line"] for r in a["items"]} == {"A"}
    ng = client.get("/results", params={"verdict": "ng"}).json()["items"]
    ok = client.get("/results", params={"verdict": "ok"}).json()["items"]
    assert all(r["is_defect"] for r in ng) and not any(r["is_defect"] for r in ok)
    assert len(ng) + len(ok) == 6 and len(ng) >= 2  # the demo defects are found
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    assert client.get("/results", params={"since": future}).json()["total"] == 0
    assert client.get("/results", params={"until": future}).json()["total"] == 6
    r = client.get("/results", params={"since": "yesterday"})
    assert r.status_code == 422 and "ISO 8601" in r.json()["detail"]
    assert client.get("/results", params={"verdict": "bad"}).status_code == 422
    assert client.get("/results", params={"limit": 10_000}).status_code == 422
    assert client.get("/results/999999").status_code == 404
    assert client.get("/results/999999/overlay.png").status_code == 404


def test_review(client, demo_root, store):
    _, bad = demo_test_images(demo_root)
    rid = _post(client, bad[0]).json()["id"]
    r = client.post(
        f"/results/{rid}/review",
        json={"verdict": "defect", "defect_type": "crack", "comment": "seen"},
        headers=AUTH,
    )
    assert r.status_code == 200 and r.json()["review"]["defect_type"] == "crack"
    assert store.get(rid).review_verdict == "defect"
    bad_verdict = client.post(f"/results/{rid}/review", json={"verdict": "meh"}, headers=AUTH)
    assert bad_verdict.status_code == 422 and "verdict" in bad_verdict.json()["detail"]
    missing = client.post("/results/424242/review", json={"verdict": "good"}, headers=AUTH)
    assert missing.status_code == 404
    assert client.get("/results", params={"reviewed": True}).json()["total"] == 1


def test_health_metrics_model_spc(client, demo_root):
    good, _ = demo_test_images(demo_root)
    _post(client, good[0])
    h = client.get("/health").json()
    assert h == {"status": "ok", "results": 1, "model": "t.dkm"}
    m = client.get("/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert "defectkit_results_stored 1" in text
    assert "defectkit_inspect_seconds_count 1" in text
    n = sum(
        int(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("defectkit_inspections_total{")
    )
    assert n == 1
    assert client.get("/model").json()["name"] == "t.dkm"
    spc = client.get("/spc").json()
    assert spc["scores"]["points"] and "p_chart" in spc and "alarms" in spc


def test_concurrent_requests_are_all_stored_and_scored_in_batches_one_at_a_time(
    detector, store, demo_root, monkeypatch
):
    good, bad = demo_test_images(demo_root)
    import defectkit.serve.inspection as inspection_mod

    active, peak, sizes = [0], [0], []
    lock = threading.Lock()
    real = inspection_mod.inspect_images

    def counting(det, images, names):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            sizes.append(len(images))
        try:
            time.sleep(0.3)  # the others arrive meanwhile
            return real(det, images, names)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(inspection_mod, "inspect_images", counting)
    app = create_app(detector, store, token=TOKEN)
    paths = (good + bad)[:8]
    codes: list[int] = []
    with TestClient(app) as c:

        def send(p):
            codes.append(_post(c, p).status_code)

        threads = [threading.Thread(target=send, args=(p,)) for p in paths]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = c.get("/metrics").text
    assert codes == [201] * len(paths)
    assert store.count() == len(paths)
    assert peak[0] == 1  # one scoring thread
    assert sum(sizes) == len(paths) and max(sizes) > 1  # requests that waited went together
    assert f"defectkit_batch_size_count {len(sizes)}" in metrics
    assert f"defectkit_batch_size_sum {len(paths)}" in metrics
    assert "defectkit_queue_depth 0" in metrics and "defectkit_queue_capacity 64" in metrics
    # the batched results are each image's own: the same as scoring it alone
    by_hash = {r.image_sha256: r for r in store.query(limit=100).items}
    for p in paths:
        row = by_hash[hashlib.sha256(p.read_bytes()).hexdigest()]
        alone = detector.score([load_image(p)]).scores[0]
        assert row.score == pytest.approx(float(alone), rel=1e-5)


def test_a_full_queue_answers_429_at_once(detector, store, demo_root, monkeypatch):
    """Beyond max_queue waiting requests: 429 with Retry-After, nothing stored for
    them; every accepted request is stored."""
    good, _ = demo_test_images(demo_root)
    import defectkit.serve.inspection as inspection_mod

    gate = threading.Event()
    real = inspection_mod.inspect_images

    def blocked(det, images, names):
        gate.wait(30)
        return real(det, images, names)

    monkeypatch.setattr(inspection_mod, "inspect_images", blocked)
    app = create_app(detector, store, token=TOKEN, max_batch=1, max_queue=2)
    codes: list[int] = []
    with TestClient(app) as c:

        def send(p):
            r = _post(c, p)
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["Retry-After"] == "1" and "busy" in r.json()["detail"]

        threads = [threading.Thread(target=send, args=(good[i % len(good)],)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while codes.count(429) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # one is being scored, two wait, three are turned away
        gate.set()
        for t in threads:
            t.join()
        metrics = c.get("/metrics").text
    assert sorted(codes) == [201, 201, 201, 429, 429, 429]
    assert store.count() == 3
    assert 'defectkit_rejected_requests_total{code="429"} 3' in metrics


def test_restart_continues_with_the_same_database(detector, tmp_path, demo_root):
    good, _ = demo_test_images(demo_root)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    s1 = ResultStore.open(url, tmp_path / "b")
    with TestClient(create_app(detector, s1, token=TOKEN, spc=SpcMonitor(baseline=5))) as c:
        first = [_post(c, p).json()["id"] for p in good[:3]]
    s1.close()
    s2 = ResultStore.open(url, tmp_path / "b")
    with TestClient(create_app(detector, s2, token=TOKEN, spc=SpcMonitor(baseline=5))) as c:
        nxt = _post(c, good[3]).json()["id"]
        assert c.get("/results").json()["total"] == 4
        assert len(c.get("/spc").json()["scores"]["points"]) == 4  # replayed
    s2.close()
    assert nxt > max(first)


def test_a_bad_upload_in_a_batch_fails_alone(detector, store, demo_root, monkeypatch, tmp_path):
    """A corrupt image batched with good ones gets its 415; the others are scored
    and stored as usual."""
    good, _ = demo_test_images(demo_root)
    import defectkit.serve.inspection as inspection_mod

    sizes: list[int] = []
    real = inspection_mod.inspect_images

    def slow(det, images, names):
        sizes.append(len(images))
        time.sleep(0.3)
        return real(det, images, names)

    monkeypatch.setattr(inspection_mod, "inspect_images", slow)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths = [good[0], broken, good[1], good[2]]
    codes: dict[str, int] = {}
    app = create_app(detector, store, token=TOKEN)
    with TestClient(app) as c:

        def send(p):
            r = _post(c, p)
            codes[p.name] = r.status_code
            if r.status_code == 415:
                assert "not a usable image" in r.json()["detail"]

        threads = [threading.Thread(target=send, args=(p,)) for p in paths]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join()
    assert codes.pop("broken.png") == 415
    assert set(codes.values()) == {201} and store.count() == 3
    assert sum(sizes) == 3


# -- scoring in worker processes ---------------------------------------------------
def _reporting_worker_model(path: str, flag: str):
    """A worker's model (as ``defectkit serve`` loads it) that writes its pid to
    ``flag`` when it starts scoring a batch, then takes a minute: long enough to
    be killed mid-batch. Module level, so a spawned worker can unpickle it."""
    import os

    from defectkit.pipeline.scoring import worker_model

    det = worker_model(path)
    real = det.score

    def score(images, *args, **kwargs):
        Path(flag).write_text(str(os.getpid()))
        time.sleep(60)
        return real(images, *args, **kwargs)

    det.score = score
    return det


def _wait_until(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def _metric(text: str, name: str) -> int:
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not in /metrics"
    return int(float(values[0]))


class _HeldHere:
    """Holds every batch scored in this process until ``release()``, so that the
    batches sent meanwhile can only be scored by a worker."""

    def __init__(self, monkeypatch) -> None:
        import defectkit.serve.inspection as inspection_mod

        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls = 0
        real = inspection_mod.inspect_images

        def held(det, images, names):
            self.calls += 1
            self.entered.set()
            assert self.gate.wait(60), "never released"
            return real(det, images, names)

        monkeypatch.setattr(inspection_mod, "inspect_images", held)

    def release(self) -> None:
        self.gate.set()


@pytest.fixture(scope="module")
def model_path(detector, tmp_path_factory):
    return detector.save(tmp_path_factory.mktemp("model") / "small.dkm")


@pytest.fixture(scope="module")
def pool(model_path):
    """One real worker process that loaded the model, as ``defectkit serve --jobs 2``."""
    from functools import partial

    from defectkit.pipeline.scoring import worker_model
    from defectkit.scale.local_pool import WorkerPool

    with WorkerPool(1, partial(worker_model, str(model_path))) as p:
        _wait_until(p.ready, "the worker has loaded its model")
        yield p


def _same_record(body: dict, detector, path, name: str) -> None:
    expected = inspect_image(detector, load_image(path), name).record
    assert body["score"] == pytest.approx(expected["score"], rel=1e-5, abs=1e-5)
    for key in ("is_defect", "threshold", "width", "height", "severity", "path"):
        assert body[key] == expected[key], key
    assert [r["bbox"] for r in body["regions"] or []] == [
        list(r["bbox"]) for r in expected["regions"] or []
    ]


def test_a_worker_process_scores_batches_with_the_same_records(
    detector, store, demo_root, pool, monkeypatch
):
    """While this process is busy, batches go to the worker and are answered; the
    records are those of scoring in this process, and stored the same way."""
    good, bad = demo_test_images(demo_root)
    here = _HeldHere(monkeypatch)
    app = create_app(detector, store, token=TOKEN, pool=pool)
    answers: dict[str, dict] = {}
    with TestClient(app) as c:
        first = threading.Thread(target=lambda: answers.update(first=_post(c, good[0]).json()))
        first.start()
        assert here.entered.wait(30)  # this process holds the first batch
        for p in good[1:3] + bad[:3]:  # answered while it still does: by the worker
            r = _post(c, p)
            assert r.status_code == 201, r.text
            answers[str(p)] = r.json()
        metrics = c.get("/metrics").text
        here.release()
        first.join(60)
        ov = c.get(answers[str(bad[0])]["links"]["overlay"])
    assert here.calls == 1
    assert _metric(metrics, "defectkit_scoring_processes") == 2
    assert _metric(metrics, 'defectkit_batches_total{process="worker"}') == 5
    assert store.count() == 6
    assert answers["first"]["path"] == good[0].name
    _same_record(answers["first"], detector, good[0], good[0].name)
    for p in good[1:3] + bad[:3]:
        _same_record(answers[str(p)], detector, p, p.name)
        assert store.get(answers[str(p)]["id"]).score == pytest.approx(answers[str(p)]["score"])
    assert ov.status_code == 200 and ov.content.startswith(b"\x89PNG")


def test_a_bad_upload_in_a_batch_sent_to_a_worker_fails_alone(
    detector, store, demo_root, pool, monkeypatch, tmp_path
):
    good, _ = demo_test_images(demo_root)
    here = _HeldHere(monkeypatch)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    app = create_app(detector, store, token=TOKEN, pool=pool, max_wait=0.5)
    codes: dict[str, int] = {}
    with TestClient(app) as c:

        def send(p):
            r = _post(c, p)
            codes[str(p)] = r.status_code
            if r.status_code == 415:
                assert "not a usable image" in r.json()["detail"]

        first = threading.Thread(target=send, args=(good[0],))
        first.start()
        assert here.entered.wait(30)
        threads = [threading.Thread(target=send, args=(p,)) for p in (good[1], broken, good[2])]
        for t in threads:  # within max_wait of each other: one batch, for the worker
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join(60)
        assert codes == {str(good[1]): 201, str(broken): 415, str(good[2]): 201}
        assert store.count() == 2  # while this process still holds its batch
        here.release()
        first.join(60)
        metrics = c.get("/metrics").text
    assert codes[str(good[0])] == 201 and store.count() == 3
    assert _metric(metrics, 'defectkit_batches_total{process="worker"}') == 1
    assert 'defectkit_batch_size_bucket{le="2"} 1' in metrics  # the first alone
    assert _metric(metrics, "defectkit_batch_size_sum") == 4  # and the three together


def test_a_batch_whose_worker_is_killed_is_scored_here(
    detector, store, demo_root, model_path, monkeypatch, tmp_path
):
    """SIGKILL the worker mid-batch: its requests are answered (scored in this
    process), nothing is lost, and the service goes on with this process alone."""
    import os
    import signal
    from functools import partial

    from defectkit.scale.local_pool import WorkerPool

    good, bad = demo_test_images(demo_root)
    flag = tmp_path / "scoring.pid"
    here = _HeldHere(monkeypatch)
    setup = partial(_reporting_worker_model, str(model_path), str(flag))
    answers: dict[str, int] = {}
    with WorkerPool(1, setup) as pool:
        _wait_until(pool.ready, "the worker has loaded its model")
        app = create_app(detector, store, token=TOKEN, pool=pool)
        with TestClient(app) as c:

            def send(p):
                r = _post(c, p)
                answers[str(p)] = r.status_code
                assert r.status_code == 201, r.text
                _same_record(r.json(), detector, p, p.name)

            threads = [threading.Thread(target=send, args=(good[0],))]
            threads[0].start()
            assert here.entered.wait(30)  # this process is busy: the next goes to the worker
            threads.append(threading.Thread(target=send, args=(bad[0],)))
            threads[1].start()
            _wait_until(flag.exists, "the worker scores its batch", 60)
            os.kill(int(flag.read_text()), signal.SIGKILL)
            _wait_until(lambda: pool.failure is not None, "the death is noticed", 30)
            here.release()
            for t in threads:
                t.join(60)
            r = _post(c, good[1])  # and the service goes on, in this process
            assert r.status_code == 201
            metrics = c.get("/metrics").text
    assert answers == {str(good[0]): 201, str(bad[0]): 201}
    assert store.count() == 3 and "stopped" in pool.failure
    assert _metric(metrics, "defectkit_scoring_processes") == 1
    assert _metric(metrics, 'defectkit_batches_total{process="main"}') == 3
    assert _metric(metrics, 'defectkit_batches_total{process="worker"}') == 0

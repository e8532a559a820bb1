"""The dashboard's own endpoints through FastAPI's TestClient: header summary,
filter choices, chart SVGs, the worst patch and the closest good patch."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_util import SMALL, demo_test_images

from defectkit.data.images import load_image
from defectkit.detector import Detector
from defectkit.serve.app import create_app
from defectkit.serve.dashboard import patch_png
from defectkit.serve.spc import SpcMonitor
from defectkit.serve.store import ResultStore

TOKEN = "dash-api"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def fitted(demo_root, tmp_path_factory):
    """A small PatchCore fitted from copies of the demo's good images, so that the
    test can take the training images away."""
    train = tmp_path_factory.mktemp("train")
    paths = []
    for p in sorted((demo_root / "train" / "good").glob("*.png")):
        paths.append(train / p.name)
        shutil.copy(p, paths[-1])
    det = Detector.fit([load_image(p) for p in paths], "patchcore", dict(SMALL), paths=paths)
    return det, train


@pytest.fixture
def client(fitted, tmp_path):
    store = ResultStore.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    app = create_app(fitted[0], store, token=TOKEN, spc=SpcMonitor(baseline=5))
    with TestClient(app) as c:
        yield c
    store.close()


def _post(client, path, **form):
    files = {"file": (path.name, path.read_bytes(), "image/png")}
    r = client.post("/inspect", files=files, data=form, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()


def _png(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def test_summary_gives_yield_ng_rate_rate_and_groups(client, demo_root):
    good, bad = demo_test_images(demo_root)
    for p, line in ((good[0], "L1"), (good[1], "L1"), (bad[0], "L2")):
        _post(client, p, line=line, lot="lot-7")
    s = client.get("/summary", params={"window": 3600}).json()
    assert s["n"] == 3 and s["ok"] + s["ng"] + s["unknown"] == 3
    decided = s["ok"] + s["ng"]
    assert s["yield"] == pytest.approx(s["ok"] / decided)
    assert s["ng_rate"] == pytest.approx(s["ng"] / decided)
    assert s["per_minute"] == pytest.approx(3 / 60)
    assert s["per_minute_now"] == pytest.approx(3 / 5)
    assert {g["name"]: g["n"] for g in s["by_line"]} == {"L1": 2, "L2": 1}
    assert client.get("/summary", params={"line": "L2"}).json()["n"] == 1
    assert client.get("/summary", params={"window": 10}).status_code == 422


def test_facets_and_product_filter(client, demo_root):
    good, _ = demo_test_images(demo_root)
    _post(client, good[0], line="L1", lot="A", product="pump-3")
    _post(client, good[1], line="L1", lot="B")
    f = client.get("/facets").json()
    assert (f["lines"], f["products"]) == (["L1"], ["pump-3"])
    assert f["lots"] == ["B", "A"]  # newest first
    assert f["model_defect_types"] == []  # this model has no classifier
    client.post(
        "/results/1/review", json={"verdict": "defect", "defect_type": "dent"}, headers=AUTH
    )
    assert client.get("/facets").json()["defect_types"] == ["dent"]
    page = client.get("/results", params={"product": "pump-3"}).json()
    assert [r["id"] for r in page["items"]] == [1] and page["items"][0]["product"] == "pump-3"


def test_review_queue_order_by_doubt(client, demo_root):
    good, bad = demo_test_images(demo_root)
    for p in (*good[:3], *bad[:3]):
        _post(client, p)
    items = client.get("/results", params={"reviewed": "false", "order": "doubt"}).json()["items"]
    doubt = [abs(r["score"] - r["threshold"]) / r["threshold"] for r in items]
    assert len(doubt) == 6 and doubt == sorted(doubt)
    assert client.get("/results", params={"order": "sideways"}).status_code == 422


def test_chart_svgs_follow_the_monitor(client, demo_root):
    good, _ = demo_test_images(demo_root)
    root = ET.fromstring(client.get("/spc/scores.svg").text)
    assert not [e for e in root.iter() if e.get("class") == "point"]
    _post(client, good[0], lot="A")
    r = client.get("/spc/scores.svg", params={"width": 500, "height": 200})
    assert r.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(r.text)
    assert root.get("width") == "500"
    assert len([e for e in root.iter() if e.get("class") == "point"]) == 1
    p = ET.fromstring(client.get("/spc/p.svg").text)
    assert any((e.text or "") == "A" for e in p.iter() if "group" in (e.get("class") or ""))


def test_worst_patch_and_closest_good_patch(client, fitted, demo_root, tmp_path):
    _, bad = demo_test_images(demo_root)
    rec = _post(client, bad[0])
    good = rec["closest_good"]
    assert good["path"].startswith(str(fitted[1]))
    worst = _png(client.get(f"/results/{rec['id']}/worst-patch.png"))
    near = _png(client.get(f"/results/{rec['id']}/closest-good.png"))
    assert max(worst.shape[:2]) == max(near.shape[:2]) == 160
    # the closest good patch is a crop of that training image, with the box drawn
    train = load_image(good["path"])
    x, y, w, h = good["bbox"]
    assert x + w <= train.shape[1] and y + h <= train.shape[0]
    # training images moved away: a clear 404, not a server error
    moved = tmp_path / "moved"
    shutil.move(str(fitted[1]), moved)
    try:
        r = client.get(f"/results/{rec['id']}/closest-good.png")
        assert r.status_code == 404 and "training image not readable" in r.json()["detail"]
    finally:
        shutil.move(str(moved), fitted[1])
    assert client.get("/results/999/worst-patch.png").status_code == 404


def test_patch_crop_keeps_its_size_at_the_edges():
    img = np.zeros((100, 200, 3), np.uint8)
    img[90:100, 0:10] = 255  # the box, in the bottom-left corner
    out = cv2.imdecode(np.frombuffer(patch_png(img, [0, 90, 10, 10], side=96), np.uint8), 1)
    assert out.shape[:2] == (96, 96)  # 48 px of context, slid inside the image
    # the white box sits in the crop's bottom-left corner (2x scale)
    assert out[-10:, :10].mean() > 200 and out[:40, 40:].mean() < 60

"""`defectkit serve` as a real process on 127.0.0.1: upload, review, SIGKILL,
restart on the same database, and `defectkit export-labels`."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_util import demo_test_images, small_detector
from typer.testing import CliRunner

from defectkit.cli import app

TOKEN = "cli-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, data_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "defectkit.cli", "serve", str(model), "--data-dir",
           str(data_dir), "--port", str(port), "--token", TOKEN, "--threads", "1",
           *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start in 60 s")


@pytest.fixture(scope="module")
def model_file(demo_root, tmp_path_factory):
    return small_detector(demo_root).save(tmp_path_factory.mktemp("m") / "small.dkm")


def test_serve_survives_sigkill_and_export_labels(model_file, demo_root, tmp_path):
    good, bad = demo_test_images(demo_root)
    data_dir = tmp_path / "results"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(model_file, data_dir, port)
    acknowledged = []
    try:
        for p in good[:3] + bad[:3]:
            r = httpx.post(f"{base}/inspect", files={"file": (p.name, p.read_bytes())},
                           data={"line": "L1"}, headers=AUTH, timeout=60)  # fmt: skip
            assert r.status_code == 201, r.text
            acknowledged.append(r.json())
        review = {"verdict": "defect", "defect_type": "crack/../x"}
        r = httpx.post(f"{base}/results/{acknowledged[3]['id']}/review", json=review, headers=AUTH)
        assert r.status_code == 200
        r = httpx.post(f"{base}/results/{acknowledged[0]['id']}/review",
                       json={"verdict": "good"}, headers=AUTH)  # fmt: skip
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    # every acknowledged result survived the kill; the server carries on with them
    proc = start_server(model_file, data_dir, port)
    try:
        listed = httpx.get(f"{base}/results", params={"limit": 100}).json()
        assert {r["id"] for r in listed["items"]} == {r["id"] for r in acknowledged}
        r = httpx.post(f"{base}/inspect", files={"file": (good[3].name, good[3].read_bytes())},
                       headers=AUTH, timeout=60)  # fmt: skip
        assert r.status_code == 201 and r.json()["id"] > max(a["id"] for a in acknowledged)
        assert httpx.get(f"{base}/results/{acknowledged[3]['id']}/overlay.png").status_code == 200
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stdout.close()

    out = tmp_path / "labels"
    res = CliRunner().invoke(app, ["export-labels", str(out), "--data-dir", str(data_dir)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "labels.csv").read_text().splitlines()))
    assert [r["class"] for r in rows] == ["good", "crack_x"]
    for r in rows:
        assert (out / r["image"]).is_file()
        assert (out / r["image"]).resolve().is_relative_to(out.resolve())
    assert (out / rows[0]["image"]).read_bytes() == good[0].read_bytes()


def _spawned_children(pid: int) -> list[int]:
    """Worker processes (spawned by multiprocessing) whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_serve_jobs_scores_in_worker_processes_and_stops_them(model_file, demo_root, tmp_path):
    import threading

    good, bad = demo_test_images(demo_root)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(model_file, tmp_path / "results", port, "--jobs", "2")
    codes: list[int] = []
    try:
        workers = _spawned_children(proc.pid)
        assert len(workers) == 1, workers

        def send(paths):
            for p in paths:
                r = httpx.post(f"{base}/inspect", files={"file": (p.name, p.read_bytes())},
                               headers=AUTH, timeout=60)  # fmt: skip
                codes.append(r.status_code)

        images = good + bad
        threads = [threading.Thread(target=send, args=(images[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = httpx.get(f"{base}/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()
    assert codes == [201] * len(images), codes
    assert "defectkit_scoring_processes 2" in metrics, metrics
    assert f"defectkit_results_stored {len(images)}" in metrics
    deadline = time.monotonic() + 15
    while any(_running(w) for w in workers):  # gone with the service
        assert time.monotonic() < deadline, "a worker process outlived the service"
        time.sleep(0.1)


def test_export_labels_without_a_database_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(
        app, ["export-labels", str(tmp_path / "o"), "--data-dir", str(tmp_path)]
    )
    assert res.exit_code == 2
    assert "no results database" in res.output


def test_serve_rejects_a_missing_model(tmp_path):
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "nope.dkm")])
    assert res.exit_code == 2 and "no such model file" in res.output


def test_serve_refuses_a_bad_precision_before_listening(model_file, tmp_path):
    res = CliRunner().invoke(
        app, ["serve", str(model_file), "--data-dir", str(tmp_path), "--precision", "int4"]
    )
    assert res.exit_code == 2 and "precision must be one of float32, bfloat16" in res.output
    assert not (tmp_path / "results.db").exists()  # refused before the store was opened


def test_sigkill_under_concurrent_load_loses_no_acknowledged_result(
    model_file, demo_root, tmp_path
):
    import threading

    good, bad = demo_test_images(demo_root)
    images = [p.read_bytes() for p in good + bad]
    data_dir = tmp_path / "results"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(model_file, data_dir, port)
    acked: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        i = k
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                try:
                    upload = {"file": ("p.png", images[i % len(images)])}
                    r = c.post(f"{base}/inspect", files=upload, headers=AUTH)
                except httpx.HTTPError:
                    return  # the server is gone
                i += 4
                if r.status_code == 201:
                    with lock:
                        acked.append(r.json()["id"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    end = time.monotonic() + 60
    while len(acked) < 12 and time.monotonic() < end:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-load: requests are in flight
    proc.wait(10)
    proc.stdout.close()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 12
    proc = start_server(model_file, data_dir, port)
    try:
        stored = {
            r["id"] for r in httpx.get(f"{base}/results", params={"limit": 500}).json()["items"]
        }
        assert set(acked) <= stored
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stdout.close()


def test_serve_runs_an_onnx_bundle_with_the_same_scores(model_file, demo_root, tmp_path):
    """The service takes an exported bundle folder as it takes a model file: same
    scores and decisions as the PyTorch model, through onnxruntime."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from defectkit.data.images import load_image
    from defectkit.detector import Detector
    from defectkit.export.onnx_bundle import export_onnx

    det = Detector.load(model_file)
    bundle = export_onnx(det, tmp_path / "bundle")
    good, bad = demo_test_images(demo_root)
    port = _free_port()
    proc = start_server(bundle, tmp_path / "results", port)
    try:
        model_info = httpx.get(f"http://127.0.0.1:{port}/model", timeout=10).json()
        assert model_info["name"] == "bundle"
        assert model_info["method"] == det.describe()["method"] == "patchcore"
        for p in (good[0], bad[0]):
            files = {"file": (p.name, p.read_bytes())}
            r = httpx.post(
                f"http://127.0.0.1:{port}/inspect", files=files, headers=AUTH, timeout=60
            )
            assert r.status_code == 201, r.text
            want = float(det.score([load_image(p)]).scores[0])
            assert r.json()["score"] == pytest.approx(want, rel=1e-3)
            assert r.json()["is_defect"] == bool(det.decide([want])[0])
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stdout.close()
    res = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert res.exit_code == 2 and "no such model file or ONNX bundle folder" in res.output

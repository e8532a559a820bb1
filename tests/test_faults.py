"""Faults from outside: a full disk while saving a model, SIGKILL in the middle of
``defectkit fit``, and the results database going away before and while the
service runs."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from serve_util import demo_test_images
from sqlalchemy import event
from typer.testing import CliRunner

from defectkit import atomic, cli
from defectkit.data.images import load_image
from defectkit.detector import Detector
from defectkit.errors import ModelFileError
from defectkit.model_file import read_model, write_model
from defectkit.serve.app import create_app
from defectkit.serve.spc import SpcMonitor
from defectkit.serve.store import ResultStore

runner = CliRunner()
FIT = ["--method", "threshold", "--param", "size=32", "-q"]


def _fit_args(demo_root: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", str(demo_root), "--out", str(out), *FIT, *extra]


@pytest.fixture(scope="module")
def old_model(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a valid model file, to put where a new one is being written."""
    out = tmp_path_factory.mktemp("old") / "m.dkm"
    res = runner.invoke(cli.app, _fit_args(demo_root, out))
    assert res.exit_code == 0, res.output
    return out.read_bytes()


def _half_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the model file's write put half of its bytes on disk, then fail with
    ENOSPC, as a full disk does."""
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        real_write = f.write

        def write(data):
            real_write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        f.write = write
        return f

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)


def test_disk_full_while_saving_keeps_the_old_model(
    demo_root: Path, old_model: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.common.err, "_width", 100_000)
    path = tmp_path / "m.dkm"
    path.write_bytes(old_model)
    _half_writes(monkeypatch)
    res = runner.invoke(cli.app, _fit_args(demo_root, path, "--param", "presmooth=2.5"))
    # a clear one-line error, exit 2, no traceback
    assert res.exit_code == cli.EXIT_USAGE, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    assert "No space left on device" in res.stderr and "left unchanged" in res.stderr
    # the old model is intact, and nothing half-written is left beside it
    assert path.read_bytes() == old_model
    assert Detector.load(path).model.get_params().get("presmooth") != 2.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.dkm"]


def test_disk_full_while_recalibrating_keeps_the_model(
    demo_root: Path, old_model: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.dkm"
    path.write_bytes(old_model)
    _half_writes(monkeypatch)
    res = runner.invoke(cli.app, ["calibrate", str(path), str(demo_root), "--target", "f1", "-q"])
    assert res.exit_code == cli.EXIT_USAGE, res.output
    assert isinstance(res.exception, SystemExit) and "No space left" in res.stderr
    assert path.read_bytes() == old_model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.dkm"]


# A `defectkit fit` that stops for ever once half of the model file's bytes are on
# disk: the moment a SIGKILL does the most harm.
_STALL_IN_WRITE = textwrap.dedent(
    """
    import os, sys, time
    from defectkit import atomic, cli
    real_fdopen = os.fdopen
    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        real_write = f.write
        def write(data):
            real_write(data[: len(data) // 2])
            f.flush()
            print("HALF-WRITTEN", flush=True)
            time.sleep(600)
        f.write = write
        return f
    atomic.os.fdopen = fdopen
    sys.argv = ["defectkit", *sys.argv[1:]]
    cli.app()
    """
)


def test_sigkill_during_fit_leaves_no_half_written_model(
    demo_root: Path, old_model: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "m.dkm"
    path.write_bytes(old_model)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _STALL_IN_WRITE, *_fit_args(demo_root, path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "HALF-WRITTEN" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"fit ended before writing: {proc.stderr.read()}")
        assert "HALF-WRITTEN" in line
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the model path still holds the old, valid model
    assert path.read_bytes() == old_model
    Detector.load(path)
    # what the killed process left is a hidden temporary file, which does not load
    leftovers = [p for p in tmp_path.iterdir() if p.name != "m.dkm"]
    assert leftovers and all(p.name.startswith(".m.dkm.") for p in leftovers)
    for p in leftovers:
        assert 0 < p.stat().st_size < len(old_model)
        with pytest.raises(ModelFileError):
            read_model(p)
    # an hour on, the next write of the model removes them
    then = time.time() - atomic.STALE_SECONDS - 60
    for p in leftovers:
        os.utime(p, (then, then))
    write_model(path, read_model(path))
    assert [p.name for p in tmp_path.iterdir()] == ["m.dkm"]


# -- the results database goes away ---------------------------------------------------------
class Outage:
    """Make every new database connection fail, as when the server is down or the
    file cannot be opened; pooled connections are dropped when it starts."""

    def __init__(self, store: ResultStore) -> None:
        self.engine = store.engine
        self.down = False
        event.listen(self.engine, "do_connect", self._connect)

    def _connect(self, *_args: object) -> None:
        if self.down:
            raise sqlite3.OperationalError("unable to open database file (simulated outage)")

    def start(self) -> None:
        self.down = True
        self.engine.dispose()

    def stop(self) -> None:
        self.down = False


@pytest.fixture(scope="module")
def detector(demo_root: Path) -> Detector:
    train = sorted((demo_root / "train" / "good").glob("*.png"))
    return Detector.fit([load_image(p) for p in train], "threshold", {"size": 32})


@pytest.fixture
def store(tmp_path: Path):
    s = ResultStore.open(f"sqlite:///{tmp_path / 'results.db'}", tmp_path / "blobs")
    yield s
    s.close()


def _post(client: TestClient, path: Path):
    return client.post("/inspect", files={"file": (path.name, path.read_bytes(), "image/png")})


def _charted(client: TestClient) -> int:
    return sum(g["n"] for g in client.get("/spc").json()["p_chart"])


def test_database_down_mid_run_gives_503_and_recovers(detector, store, demo_root) -> None:
    good, bad = demo_test_images(demo_root)
    outage = Outage(store)
    with TestClient(create_app(detector, store)) as client:
        assert _post(client, good[0]).status_code == 201
        outage.start()
        r = _post(client, bad[0])
        assert r.status_code == 503, r.text
        assert "database unavailable" in r.json()["detail"] and "not recorded" in r.json()["detail"]
        assert r.headers["Retry-After"]
        assert client.get("/health").status_code == 503
        r = client.get("/results")
        assert r.status_code == 503 and "database unavailable" in r.json()["detail"]
        metrics = client.get("/metrics")  # still answers, counting the refusals
        assert metrics.status_code == 200
        assert 'defectkit_rejected_requests_total{code="503"} 2' in metrics.text
        assert _charted(client) == 1, "a result that was not recorded is not charted"
        # the database comes back: no restart, the client sends the image again
        outage.stop()
        r = _post(client, bad[0])
        assert r.status_code == 201, r.text
        assert client.get("/health").json()["results"] == 2
        assert _charted(client) == 2
    assert store.count() == 2  # recorded once: not lost, not twice
    assert [row.filename for row in store.query(newest_first=False).items] == [
        good[0].name,
        bad[0].name,
    ]


def test_database_down_at_start_then_up(detector, store, demo_root) -> None:
    good, _ = demo_test_images(demo_root)
    with TestClient(create_app(detector, store)) as client:  # three results before
        for p in good[:3]:
            assert _post(client, p).status_code == 201
    outage = Outage(store)
    outage.start()
    with TestClient(create_app(detector, store)) as client:  # starts anyway
        assert client.get("/health").status_code == 503
        assert _post(client, good[3]).status_code == 503
        assert _charted(client) == 0
        outage.stop()
        assert client.get("/health").json()["results"] == 3
        assert _post(client, good[3]).status_code == 201
        # the three stored results are replayed into the charts once, then the new one
        assert _charted(client) == 4
        assert _post(client, good[4]).status_code == 201
        assert _charted(client) == 5
    assert store.count() == 5


def test_alarm_that_cannot_be_stored_does_not_fail_a_recorded_result(
    detector, store, demo_root, monkeypatch
) -> None:
    """Once the row is committed the answer must be 201: a 503 would make the client
    send the image again and record it twice."""
    good, _ = demo_test_images(demo_root)

    class AlarmingMonitor(SpcMonitor):
        def update(self, *args, **kwargs):
            super().update(*args, **kwargs)
            return [SimpleNamespace(chart="p", rule="test", message="alarm", result_id=None)]

    outage = Outage(store)
    real_add = store.add

    def add_then_fail(*args, **kwargs):
        row = real_add(*args, **kwargs)
        outage.start()  # the database goes away right after the commit
        return row

    monkeypatch.setattr(store, "add", add_then_fail)
    with TestClient(create_app(detector, store, spc=AlarmingMonitor())) as client:
        r = _post(client, good[0])
        assert r.status_code == 201, r.text
        outage.stop()
    assert store.count() == 1 and store.alarms() == []

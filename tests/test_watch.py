"""The hot folder: every complete image file inspected once, stored as the service
stores it, moved by verdict; restarts and crashes never inspect a file twice or
skip one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from defectkit.cli import app
from defectkit.detector import Detector
from defectkit.errors import ConfigError
from defectkit.serve import watch as watch_module
from defectkit.serve.store import ResultStore
from defectkit.serve.watch import HotFolder, WatchSettings


@pytest.fixture(scope="module")
def model(surface_set: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    det = Detector.fit(surface_set["train"], "patchcore", {"image_size": 64})
    return det.save(tmp_path_factory.mktemp("watch") / "m.dkm")


@pytest.fixture
def det(model: Path) -> Detector:
    return Detector.load(model)


def _write(folder: Path, name: str, image: np.ndarray) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image[:, :, ::-1])
    return path


def _store(tmp_path: Path) -> ResultStore:
    return ResultStore.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")


def test_each_file_is_inspected_once_stored_and_moved(
    det: Detector, surface_set: dict, tmp_path: Path
) -> None:
    inbox, done = tmp_path / "in", tmp_path / "done"
    for i, im in enumerate(surface_set["good"][:3]):
        _write(inbox, f"g{i}.png", im)
    for i, im in enumerate(surface_set["bad"][:2]):
        _write(inbox, f"cam2/b{i}.png", im)
    (inbox / "broken.png").write_bytes(b"not an image at all")
    (inbox / "notes.txt").write_text("not an image name: never read")
    store = _store(tmp_path)
    hot = HotFolder(det, store, WatchSettings(inbox, move_to=done, settle_seconds=0))
    outcomes = hot.step()
    by_name = {o.path.name: o for o in outcomes}
    assert sorted(by_name) == ["b0.png", "b1.png", "broken.png", "g0.png", "g1.png", "g2.png"]
    assert by_name["broken.png"].status == "error" and "broken.png" in by_name["broken.png"].message
    assert (done / "error" / "broken.png").exists()
    inspected = [o for o in outcomes if o.status == "inspected"]
    assert len(inspected) == 5 == store.count()
    for o in inspected:
        row = store.get(o.result_id)
        assert row is not None and row.is_defect == o.is_defect and row.score == o.score
        assert row.filename == o.path.relative_to(inbox).as_posix()
        want = done / ("ng" if o.is_defect else "ok") / row.filename
        assert o.moved_to == want and want.exists() and not o.path.exists()
        # stored exactly as the service stores it: the inspect record, image and overlay
        assert row.record["path"] == row.filename and row.overlay_sha256 is not None
    # the defective images score above the good ones
    good = [by_name[f"g{i}.png"].score for i in range(3)]
    assert min(by_name["b0.png"].score, by_name["b1.png"].score) > max(good)
    assert (inbox / "notes.txt").exists()
    assert hot.step() == [] and store.count() == 5
    store.close()


def test_a_crash_after_the_commit_moves_without_inspecting_again(
    det: Detector, surface_set: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox, done = tmp_path / "in", tmp_path / "done"
    for i, im in enumerate(surface_set["good"][:3]):
        _write(inbox, f"g{i}.png", im)
    store = _store(tmp_path)
    settings = WatchSettings(inbox, move_to=done, settle_seconds=0, batch_size=1)
    real_move = watch_module._move

    def crash(path: Path, target: Path) -> Path:
        raise SystemExit("killed between commit and move")

    monkeypatch.setattr(watch_module, "_move", crash)
    with pytest.raises(SystemExit):
        HotFolder(det, store, settings).step()
    assert store.count() == 1  # the first file's row was committed, then the "crash"
    monkeypatch.setattr(watch_module, "_move", real_move)
    outcomes = HotFolder(det, store, settings).step()  # the restart
    assert [o.status for o in outcomes] == ["already", "inspected", "inspected"]
    assert store.count() == 3
    assert len({store.get(i).image_sha256 for i in range(1, 4)}) == 3
    assert sorted(p.name for p in done.rglob("*.png")) == ["g0.png", "g1.png", "g2.png"]
    store.close()


def test_files_left_in_place_are_not_inspected_again_after_a_restart(
    det: Detector, surface_set: dict, tmp_path: Path
) -> None:
    inbox = tmp_path / "in"
    for i, im in enumerate(surface_set["good"][:2]):
        _write(inbox, f"g{i}.png", im)
    store = _store(tmp_path)
    settings = WatchSettings(inbox, settle_seconds=0)
    first = HotFolder(det, store, settings)
    assert [o.status for o in first.step()] == ["inspected", "inspected"]
    assert first.step() == []  # known by size and time: not even read again
    _write(inbox, "g0.png", surface_set["bad"][0])  # a new image under an old name
    assert [o.status for o in first.step()] == ["inspected"]
    again = HotFolder(det, store, settings)  # a restart: hashes tell what is done
    assert [o.status for o in again.step()] == ["already", "already"]
    assert store.count() == 3
    # two files with the same bytes are one image
    shutil.copy(inbox / "g1.png", inbox / "copy.png")
    assert [o.status for o in again.step()] == ["already"]
    assert store.count() == 3
    store.close()


def test_a_file_is_read_only_once_it_is_complete(
    det: Detector, surface_set: dict, tmp_path: Path
) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    now = [0.0]
    store = _store(tmp_path)
    hot = HotFolder(det, store, WatchSettings(inbox, settle_seconds=5), clock=lambda: now[0])
    data = cv2.imencode(".png", surface_set["good"][0])[1].tobytes()
    path = inbox / "slow.png"
    path.write_bytes(data[:100])  # the camera is still writing
    assert hot.step() == []
    now[0] = 4.0
    with path.open("ab") as f:
        f.write(data[100:])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert hot.step() == []  # seen changed at 4 s
    now[0] = 8.0  # unchanged for 4 s
    assert hot.step() == []
    now[0] = 9.5
    assert [o.status for o in hot.step()] == ["inspected"]
    # a marker makes a file complete at once
    _write(inbox, "fast.png", surface_set["good"][1])
    (inbox / "fast.png.done").write_text("")
    assert [o.path.name for o in hot.step()] == ["fast.png"]
    store.close()


def test_a_database_outage_leaves_files_for_the_next_poll(
    det: Detector, surface_set: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox, done = tmp_path / "in", tmp_path / "done"
    _write(inbox, "g0.png", surface_set["good"][0])
    store = _store(tmp_path)
    hot = HotFolder(det, store, WatchSettings(inbox, move_to=done, settle_seconds=0))
    hot.step()  # replays the (empty) charts
    _write(inbox, "g1.png", surface_set["good"][1])
    real = store.find_image

    def down(sha: str):
        raise OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr(store, "find_image", down)
    assert hot.step() == [] and (inbox / "g1.png").exists()
    monkeypatch.setattr(store, "find_image", real)
    assert [o.status for o in hot.step()] == ["inspected"]
    assert store.count() == 2
    store.close()


def test_a_database_down_at_start_is_waited_for(
    det: Detector, surface_set: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "in"
    _write(inbox, "g0.png", surface_set["good"][0])
    store = _store(tmp_path)
    hot = HotFolder(det, store, WatchSettings(inbox, settle_seconds=0))
    real = store.count

    def down() -> int:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(store, "count", down)  # the SPC replay reads it first
    assert hot.step() == [] and (inbox / "g0.png").exists()
    monkeypatch.setattr(store, "count", real)
    assert [o.status for o in hot.step()] == ["inspected"]
    store.close()


def test_worker_processes_score_batches_with_the_same_results(
    model: Path, det: Detector, surface_set: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a worker process, some batches are scored there: every file gets the
    outcome and score it gets in this process alone, in the order found; a copy of
    an image inspected in the same poll is inspected once."""
    from functools import partial

    import defectkit.serve.inspection as inspection_mod
    from defectkit.data.images import load_image
    from defectkit.pipeline.scoring import worker_model
    from defectkit.scale.local_pool import WorkerPool

    inbox = tmp_path / "in"
    for i, im in enumerate(surface_set["good"][:4] + surface_set["bad"][:4]):
        _write(inbox, f"{i:02d}.png", im)
    (inbox / "03b.png").write_bytes(b"not an image at all")
    shutil.copy(inbox / "00.png", inbox / "00copy.png")
    here: list[int] = []  # batches scored in this process
    real = inspection_mod.inspect_images

    def counting(d, images, names):
        here.append(len(images))
        return real(d, images, names)

    monkeypatch.setattr(inspection_mod, "inspect_images", counting)
    store = _store(tmp_path)
    with WorkerPool(1, partial(worker_model, str(model))) as pool:
        deadline = time.monotonic() + 120
        while not pool.ready():
            assert time.monotonic() < deadline, "the worker never loaded its model"
            time.sleep(0.02)
        settings = WatchSettings(inbox, settle_seconds=0, batch_size=2)
        outcomes = HotFolder(det, store, settings, pool=pool).step()
    assert pool.failure is None
    names = [o.path.name for o in outcomes]
    assert names == [f"{i:02d}.png" for i in range(3)] + ["03.png", "03b.png"] + [
        f"{i:02d}.png" for i in range(4, 8)
    ] + ["00copy.png"]
    status = {o.path.name: o.status for o in outcomes}
    assert status.pop("00copy.png") == "already" and status.pop("03b.png") == "error"
    assert set(status.values()) == {"inspected"} and store.count() == 8
    assert sum(here) < 8  # the rest were scored by the worker
    for o in outcomes:
        if o.status == "inspected":
            alone = det.score([load_image(o.path)]).scores[0]
            assert o.score == pytest.approx(float(alone), rel=1e-5, abs=1e-5)
            assert store.get(o.result_id).score == o.score
    assert [o.result_id for o in outcomes if o.status == "inspected"] == list(range(1, 9))
    store.close()


def test_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        WatchSettings(tmp_path / "missing")
    with pytest.raises(ConfigError, match="must not hold the watched folder"):
        WatchSettings(tmp_path, move_to=tmp_path)
    with pytest.raises(ConfigError, match="--settle"):
        WatchSettings(tmp_path, settle_seconds=-1)


def test_cli_watch_once(model: Path, surface_set: dict, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    for i, im in enumerate(surface_set["good"][:2]):
        _write(inbox, f"g{i}.png", im)
    args = ["watch", str(model), str(inbox), "--once", "--data-dir", str(tmp_path / "res")]
    res = CliRunner().invoke(app, [*args, "--move-to", str(tmp_path / "done"), "--line", "L1"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["status"] for x in lines] == ["inspected", "inspected"]
    assert "watch: 2 inspected" in res.output
    store = ResultStore.open(f"sqlite:///{tmp_path / 'res' / 'results.db'}", tmp_path / "b")
    assert store.count() == 2 and store.get(1).line == "L1"
    store.close()
    res = CliRunner().invoke(app, ["watch", str(model), str(tmp_path / "nope"), "--once"])
    assert res.exit_code == 2 and "is not a folder" in res.output


def test_killed_and_restarted_every_file_is_inspected_exactly_once(
    model: Path, surface_set: dict, tmp_path: Path
) -> None:
    """``kill -9`` mid-run, then a restart: each file has exactly one result and
    ends up in ok/ or ng/."""
    inbox, done, res = tmp_path / "in", tmp_path / "done", tmp_path / "res"
    images = surface_set["train"] + surface_set["good"] + surface_set["bad"]
    for i, im in enumerate(images):
        _write(inbox, f"{i:03d}.png", im)
    cmd = [sys.executable, "-m", "defectkit.cli", "watch", str(model), str(inbox)]
    cmd += ["--move-to", str(done), "--data-dir", str(res), "--settle", "0", "--poll", "0.1"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    assert proc.stdout is not None
    for seen, _ in enumerate(proc.stdout, 1):  # some files done: now kill it hard
        if seen == 5:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run([*cmd, "--once"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    store = ResultStore.open(f"sqlite:///{res / 'results.db'}", res / "blobs")
    rows = store.query(limit=1000).items
    assert len(rows) == len(images) == len({r.image_sha256 for r in rows})
    moved = sorted(p.name for p in done.rglob("*.png"))
    assert moved == sorted(f"{i:03d}.png" for i in range(len(images)))
    assert not list(inbox.glob("*.png"))
    store.close()

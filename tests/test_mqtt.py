"""Results and alarms to a real Mosquitto broker (Debian's ``mosquitto``, started
here on a free port): published at least once with a unique id, never lost while
the broker is down or restarted, never blocking the store."""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from defectkit.errors import ConfigError
from defectkit.serve.mqtt import Broker, MqttPublisher
from defectkit.serve.store import ResultStore

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
needs_broker = pytest.mark.skipif(
    MOSQUITTO is None, reason="Debian's mosquitto is not installed (.ci/run installs it)"
)
PNG = (  # a 1x1 PNG: the store keeps bytes, it does not decode them
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00"
    b"\x00\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x9a"
    b"\xa0\xb0\x00\x00\x00\x00IEND\xaeB`\x82"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A broker on 127.0.0.1 that keeps its sessions on disk across restarts."""

    def __init__(self, folder: Path) -> None:
        self.port = _free_port()
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {folder}/\nautosave_interval 1\n"
            # started as root, mosquitto would drop to user mosquitto, which cannot
            # write in pytest's private tmp_path: sessions would not survive a restart
            f"user {getpass.getuser()}\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class Subscriber:
    """A durable subscriber (fixed id, no clean session, QoS 1): it gets what was
    published while it was away once it reconnects."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-subscriber-{uuid.uuid4().hex[:8]}",
            clean_session=False,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_message = self._got
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _got(self, _c, _u, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def wait_for(self, n: int, timeout: float = 30) -> list[tuple[str, dict]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.05)
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def broker(tmp_path: Path):
    if MOSQUITTO is None:
        pytest.skip("Debian's mosquitto is not installed (.ci/run installs it)")
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


def _store(tmp_path: Path) -> ResultStore:
    return ResultStore.open(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")


def _add(store: ResultStore, i: int) -> int:
    record = {"path": f"p{i}.png", "score": float(i), "is_defect": i % 2 == 1}
    return store.add(record, PNG, None, filename=f"p{i}.png", line="L1").id


def test_broker_url_is_checked() -> None:
    b = Broker.parse("mqtt://broker.local:1884/plant/line1")
    assert (b.host, b.port, b.topics.results) == ("broker.local", 1884, "plant/line1/results")
    assert Broker.parse("mqtt://h/t").port == 1883
    for bad in ("http://h/t", "mqtt://h", "mqtt://h/a/#", "mqtt://h:x/t"):
        with pytest.raises(ConfigError, match="--mqtt"):
            Broker.parse(bad)


@needs_broker
def test_results_and_alarms_are_published_with_their_ids(broker: Mosquitto, tmp_path) -> None:
    sub = Subscriber(broker.port, "line/#")
    store = _store(tmp_path)
    pub = MqttPublisher(Broker.parse(f"mqtt://127.0.0.1:{broker.port}/line"), store).start()
    ids = [_add(store, i) for i in range(5)]
    alarm = store.add_alarm("ewma", "above limit", "scores drift up", ids[-1])
    got = sub.wait_for(6)
    results = [m for t, m in got if t == "line/results"]
    alarms = [m for t, m in got if t == "line/alarms"]
    assert sorted(m["id"] for m in results) == ids
    assert results[0]["path"] == "p0.png" and results[0]["line"] == "L1"
    assert [m["alarm"]["id"] for m in alarms] == [alarm.id]
    deadline = time.monotonic() + 10
    while store.outbox_pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.outbox_pending() == []  # every message acknowledged and marked
    pub.stop()
    sub.close()
    store.close()


@needs_broker
def test_nothing_is_lost_while_the_broker_is_down_or_restarted(
    broker: Mosquitto, tmp_path: Path
) -> None:
    sub = Subscriber(broker.port, "line/results")
    time.sleep(0.3)  # subscribed: the broker keeps the session from now on
    store = _store(tmp_path)
    # the publisher retries after 4 s at the earliest, the subscriber after 1 s: it
    # is back (its session restored) before the backlog is sent
    pub = MqttPublisher(
        Broker.parse(f"mqtt://127.0.0.1:{broker.port}/line"),
        store,
        ack_timeout=1.0,
        reconnect_delay=(4, 8),
    ).start()
    ids = [_add(store, i) for i in range(10)]
    sub.wait_for(10)
    broker.stop()  # the broker goes away mid-run
    t0 = time.perf_counter()
    ids += [_add(store, i) for i in range(10, 30)]
    assert time.perf_counter() - t0 < 5  # storing never waits for the broker
    assert len(store.outbox_pending(1000)) >= 20
    time.sleep(1.5)
    broker.start()
    got = sub.wait_for(30, timeout=60)
    received = [m["id"] for _, m in got]
    assert set(received) == set(ids)  # at least once: every id arrived
    deadline = time.monotonic() + 30
    while store.outbox_pending() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.outbox_pending() == []  # and each acknowledged, then marked sent
    assert len(received) - len(set(received)) <= 10  # repeats, if any, carry the same id
    pub.stop()
    sub.close()
    store.close()


@needs_broker
def test_messages_left_unsent_go_out_after_a_restart(broker: Mosquitto, tmp_path: Path) -> None:
    """Written while no publisher ran (a crash, or the broker unreachable): kept in
    the database and sent by the next process."""
    store = _store(tmp_path)
    store.topics = Broker.parse("mqtt://127.0.0.1/line").topics  # as a publisher would set it
    ids = [_add(store, i) for i in range(3)]
    store.close()
    sub = Subscriber(broker.port, "line/results")
    time.sleep(0.3)
    store = _store(tmp_path)
    pub = MqttPublisher(Broker.parse(f"mqtt://127.0.0.1:{broker.port}/line"), store).start()
    got = sub.wait_for(3)
    assert sorted(m["id"] for _, m in got) == ids
    pub.stop()
    sub.close()
    store.close()


@needs_broker
def test_watch_publishes_what_it_inspects(broker: Mosquitto, tmp_path: Path) -> None:
    import cv2
    import numpy as np
    from typer.testing import CliRunner

    from defectkit.cli import app
    from defectkit.detector import Detector

    rng = np.random.default_rng(0)
    images = [rng.integers(90, 110, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    model = Detector.fit(images, "patchcore", {"image_size": 64}).save(tmp_path / "m.dkm")
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i, im in enumerate(images[:2]):
        cv2.imwrite(str(inbox / f"{i}.png"), im)
    sub = Subscriber(broker.port, "cell7/results")
    time.sleep(0.3)
    args = ["watch", str(model), str(inbox), "--once", "--data-dir", str(tmp_path / "res")]
    res = CliRunner().invoke(app, [*args, "--mqtt", f"mqtt://127.0.0.1:{broker.port}/cell7"])
    assert res.exit_code == 0, res.output
    got = sub.wait_for(2)
    assert sorted(m["path"] for _, m in got) == ["0.png", "1.png"]
    sub.close()
    res = CliRunner().invoke(app, [*args, "--mqtt", "mqtt://127.0.0.1"])
    assert res.exit_code == 2 and "--mqtt" in res.output

"""Results and SPC alarms to an MQTT broker (``--mqtt mqtt://host:1883/base``).

Nothing here can block or lose an inspection. Each result and alarm is written
to the store's ``outbox`` table in the same transaction as the row itself
(:attr:`ResultStore.topics <defectkit.serve.store.ResultStore.topics>`); this
publisher, a background thread with a reconnecting paho-mqtt client, sends the
outbox oldest first with QoS 1 and marks a message sent only once the broker has
acknowledged it (PUBACK). While the broker is down, messages wait in the
database, across restarts too, and go out when it is back.

Delivery is **at least once, with a unique id**: a message acknowledged just
before a crash, but not yet marked sent, is sent again after the restart. Each
result message is the service's result object (``id`` is the result's row id);
each alarm message is ``{"alarm": {..., "id": ...}}``. Consumers drop repeats by
that id. Topics: ``BASE/results`` and ``BASE/alarms``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

from defectkit.errors import ConfigError
from defectkit.serve.store import ResultStore, Topics

log = logging.getLogger("defectkit.mqtt")

#: messages sent per look at the outbox
_CHUNK = 100


@dataclass(frozen=True)
class Broker:
    """An ``mqtt://host[:port]/base/topic`` URL, checked."""

    host: str
    port: int
    base: str

    @classmethod
    def parse(cls, url: str) -> Broker:
        u = urlparse(url)
        if u.scheme != "mqtt" or not u.hostname:
            raise ConfigError(f"--mqtt {url!r}: expected mqtt://host[:port]/topic")
        try:
            port = u.port or 1883
        except ValueError:
            raise ConfigError(f"--mqtt {url!r}: bad port") from None
        base = u.path.strip("/")
        if not base or "+" in base or "#" in url:
            raise ConfigError(f"--mqtt {url!r}: give a topic without wildcards, e.g. /line1")
        return cls(u.hostname, port, base)

    @property
    def topics(self) -> Topics:
        return Topics(results=f"{self.base}/results", alarms=f"{self.base}/alarms")


class MqttPublisher:
    """Sends ``store``'s outbox to the broker in a background thread."""

    def __init__(
        self,
        broker: Broker,
        store: ResultStore,
        *,
        poll: float = 0.2,
        ack_timeout: float = 5.0,
        reconnect_delay: tuple[int, int] = (1, 10),
    ) -> None:
        self.broker = broker
        self.reconnect_delay = reconnect_delay
        self.store = store
        self.poll = poll
        self.ack_timeout = ack_timeout
        self.sent = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None

    def start(self) -> MqttPublisher:
        """Route the store's results and alarms to the outbox and start sending."""
        import paho.mqtt.client as mqtt

        self.store.topics = self.broker.topics
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"defectkit-{uuid.uuid4().hex[:12]}"
        )
        client.reconnect_delay_set(*self.reconnect_delay)
        client.on_connect = lambda *a: self._wake.set()
        client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        client.loop_start()
        self._client = client
        self._thread = threading.Thread(target=self._run, name="defectkit-mqtt", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Send what can be sent within ``timeout``, then disconnect."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                sent = self._send_pending()
            except Exception as e:  # the database or the broker: try again later
                log.warning("MQTT: outbox not sent (%s); retrying", e)
                sent = 0
            if stopping:
                return
            if not sent:
                self._wake.wait(self.poll)
                self._wake.clear()

    def _send_pending(self) -> int:
        client = self._client
        if client is None or not client.is_connected():
            return 0
        rows = self.store.outbox_pending(_CHUNK)
        infos = [(row.id, client.publish(row.topic, row.payload, qos=1)) for row in rows]
        done = []
        for row_id, info in infos:
            try:
                info.wait_for_publish(self.ack_timeout)
            except (RuntimeError, ValueError):  # queue full or not connected any more
                break
            if not info.is_published():
                break
            done.append(row_id)
        self.store.outbox_sent(done)
        self.sent += len(done)
        return len(done)

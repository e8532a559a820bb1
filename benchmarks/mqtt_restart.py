"""MQTT under broker restarts: results posted to `defectkit serve --mqtt` while
the broker (Debian's mosquitto) is stopped and restarted mid-run; every stored
result must reach a subscriber, none lost.

    python benchmarks/mqtt_restart.py [--images 600] [--restarts 2] [--signal kill]
        [--rate 20] [--model M.dkm] [--keep-logs DIR] [--no-record]

Fits a small PatchCore model on generated surfaces (or reuses ``--model``),
starts mosquitto on a free 127.0.0.1 port with persistence (saved on every
change, so a subscriber's session and its queued messages survive a restart)
and a durable subscriber (fixed client id, no clean session, QoS 1) on
``TOPIC/results`` and ``TOPIC/alarms`` that records every message's id. Then
``defectkit serve --mqtt mqtt://127.0.0.1:PORT/TOPIC`` runs with a SQLite store
in a temporary folder, and ``--clients`` clients post ``--images`` distinct
96x96 PNG surfaces at ``--rate`` images a second (a line's cadence). Meanwhile
the broker is stopped (``--signal``, SIGKILL by default) ``--restarts`` times,
at seeded random moments spread over the run (one in each equal slice of the
middle 80% of the posts, and at least 3 s after the last restart), and started
again after ``--down`` seconds (seeded, uniform).

After the last post, waits (``--drain-timeout``) until the outbox table is
empty and every stored id has arrived, then checks against the database: every
result and alarm id received at least once (lost), ids received more than once
(duplicates, and how many came with the broker's DUP flag), ids received that
are not in the database (unknown). The delivery is "exactly once" when no
duplicate arrived, "at least once with a unique id" otherwise. A lost id is
shown with whether the broker had acknowledged it (outbox row marked sent) and
how long before which stop. Loopback only. Records into BENCHMARKS.md; exits 1
if anything was lost or unknown, or a post failed.

While others edit this tree, run it against a clean clone's code:
``PYTHONPATH=/path/to/clone/src python benchmarks/mqtt_restart.py``; the record
then names the clone's commit.
"""

from __future__ import annotations

import argparse
import getpass
import itertools
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import cv2
import httpx
import numpy as np
from _record import REPO, git_commit, machine, publish, wait_healthy

TOKEN = "bench-token"
TOPIC = "bench/line1"
SUBSCRIBER_ID = "defectkit-bench-subscriber"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
#: seconds the broker stays up between two stops, at least
MIN_UP = 3.0
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}


def _code() -> str:
    """The commit measured: this work tree's, or, where ``defectkit`` is imported
    from another checkout (PYTHONPATH, e.g. a clean clone while this tree is being
    edited), that checkout's."""
    import defectkit

    src = Path(defectkit.__file__).resolve().parents[1]
    if src == REPO / "src":
        return git_commit()
    try:
        git = ["git", "-C", str(src), "rev-parse", "--short", "HEAD"]
        head = subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return f"unknown (defectkit imported from {src})"
    return f"{head}{' (+ uncommitted changes)' if dirty else ''} (defectkit from a clone)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Mosquitto:
    """A broker on 127.0.0.1 that keeps its sessions on disk across restarts."""

    def __init__(self, folder: Path, sig: signal.Signals) -> None:
        self.port = _free_port()
        self.sig = sig
        self.conf = folder / "mosquitto.conf"
        self.log = folder / "mosquitto.log"
        # saved after every change (autosave_on_changes): a SIGKILL loses as little
        # as mosquitto allows; no cap on messages queued for an offline subscriber;
        # `user`: started as root, mosquitto would switch to user mosquitto, which
        # cannot write in this private temporary folder (no session would survive)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {folder}/\nautosave_on_changes true\nautosave_interval 1\n"
            f"max_queued_messages 0\nuser {getpass.getuser()}\n"
        )
        self.proc: subprocess.Popen | None = None
        self.down_s = 0.0
        self.stopped_at: list[float] = []  # time.time() of each stop

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf), "-v"], stdout=log,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"mosquitto exited:\n{self.log.read_text()[-2000:]}")
            if _listening(self.port):
                return
            time.sleep(0.02)
        raise SystemExit("mosquitto did not start in 10 s")

    def stop(self, sig: signal.Signals | None = None) -> None:
        if self.proc is not None:
            self.stopped_at.append(time.time())
            self.proc.send_signal(sig or self.sig)
            self.proc.wait(10)
            self.proc = None

    def restart(self, down: float) -> None:
        """Stop, stay down ``down`` seconds, start; the time it was unreachable adds
        to ``down_s``."""
        t0 = time.perf_counter()
        self.stop()
        time.sleep(down)
        self.start()
        self.down_s += time.perf_counter() - t0


class Subscriber:
    """A durable subscriber (fixed id, no clean session, QoS 1) that records each
    message's id: a result's ``id``, an alarm's ``alarm.id``."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.results: list[int] = []
        self.alarms: list[int] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.connects = 0
        self.resumed = 0  # reconnects where the broker still had the session
        self.redelivered = 0  # messages the broker sent again (DUP flag)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=SUBSCRIBER_ID, clean_session=False
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._connected
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._got
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise SystemExit("subscriber: no SUBACK in 10 s")

    def _connected(self, client, _userdata, flags, _rc, _props=None) -> None:
        self.connects += 1
        self.resumed += bool(flags.session_present)
        client.subscribe([(f"{TOPIC}/results", 1), (f"{TOPIC}/alarms", 1)])

    def _got(self, _client, _userdata, msg) -> None:
        body = json.loads(msg.payload)
        with self.lock:
            self.redelivered += bool(msg.dup)
            if msg.topic.endswith("/alarms"):
                self.alarms.append(int(body["alarm"]["id"]))
            else:
                self.results.append(int(body["id"]))

    def received(self) -> tuple[list[int], list[int]]:
        with self.lock:
            return list(self.results), list(self.alarms)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _model(tmp: Path) -> Path:
    from defectkit.data.synthetic import make_surface
    from defectkit.detector import Detector

    rng = np.random.default_rng(0)
    train = [make_surface("brushed_metal", (96, 96), rng) for _ in range(40)]
    return Detector.fit(train, "patchcore", {"image_size": 96}).save(tmp / "mqtt.dkm")


def _images(n: int) -> list[bytes]:
    from defectkit.data.synthetic import make_surface

    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        img = make_surface("brushed_metal", (96, 96), rng)
        img[0, 0] = (i % 256, i // 256 % 256, 7)  # distinct bytes per image
        ok, buf = cv2.imencode(".png", img[:, :, ::-1])
        assert ok
        out.append(buf.tobytes())
    return out


def _start_service(model: Path, data_dir: Path, port: int, broker: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "defectkit.cli", "serve", str(model), "--data-dir",
           str(data_dir), "--port", str(port), "--token", TOKEN, "--mqtt",
           f"mqtt://127.0.0.1:{broker}/{TOPIC}"]  # fmt: skip
    log = data_dir.parent / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    return wait_healthy(proc, port, lambda: log.read_text(errors="replace")[-2000:])


class Poster:
    """``clients`` threads posting ``images`` (each once) to ``/inspect``, image i
    not before ``i / rate`` seconds from the start (a line's cadence; 0: at once);
    a 429 is retried after Retry-After, other failures are counted, not retried."""

    def __init__(self, url: str, images: list[bytes], clients: int, rate: float) -> None:
        self.url, self.images, self.rate = url, images, rate
        self.t0 = 0.0
        self.next = 0
        self.answered = 0
        self.last = 0.0  # perf_counter of the last answer
        self.codes: Counter[int | str] = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def start(self) -> Poster:
        self.t0 = time.perf_counter()
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def _client(self) -> None:
        with httpx.Client(timeout=300) as c:
            while True:
                with self.lock:
                    i, self.next = self.next, self.next + 1
                if i >= len(self.images):
                    return
                if self.rate > 0:
                    time.sleep(max(0.0, self.t0 + i / self.rate - time.perf_counter()))
                while True:
                    try:
                        r = c.post(f"{self.url}/inspect",
                                   files={"file": (f"{i:05d}.png", self.images[i])},
                                   data={"line": "bench"},
                                   headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
                        code: int | str = r.status_code
                    except httpx.HTTPError as e:
                        code = type(e).__name__
                    if code != 429:
                        break
                    time.sleep(float(r.headers.get("Retry-After", "1")))
                with self.lock:
                    self.codes[code] += 1
                    self.answered += 1
                    self.last = time.perf_counter()


def _db(path: Path) -> tuple[list[int], list[int], int]:
    """Stored result ids, alarm ids, and outbox rows not yet marked sent."""
    with sqlite3.connect(path) as db:
        results = [r for (r,) in db.execute("SELECT id FROM results ORDER BY id")]
        alarms = [r for (r,) in db.execute("SELECT id FROM alarms ORDER BY id")]
        (pending,) = db.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone()
    return results, alarms, pending


def _lost_detail(path: Path, topic: str, ids: list[int], stops: list[float]) -> list[str]:
    """For each lost id: not acknowledged (its outbox row unsent), or acknowledged
    by the broker (marked sent) how long before which broker stop."""
    key = "$.alarm.id" if topic.endswith("/alarms") else "$.id"
    with sqlite3.connect(path) as db:
        rows = dict(
            db.execute(
                f"SELECT json_extract(payload, '{key}'), sent_at FROM outbox WHERE topic = ?",
                (topic,),
            ).fetchall()
        )
    out = []
    for i in ids:
        sent = rows.get(i)
        if sent is None:
            out.append(f"{i} (never acknowledged)")
            continue
        at = datetime.fromisoformat(sent).replace(tzinfo=timezone.utc).timestamp()
        after = [(t - at, k) for k, t in enumerate(stops, 1) if t >= at]
        when = f", {after[0][0] * 1e3:.0f} ms before stop {after[0][1]}" if after else ""
        out.append(f"{i} (acknowledged{when})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rate", type=float, default=20.0,
                    help="images posted per second at most (0: as fast as served)")  # fmt: skip
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--signal", choices=sorted(SIGNALS), default="kill",
                    help="how the broker is stopped: SIGKILL or SIGTERM")  # fmt: skip
    ap.add_argument("--down", type=float, nargs=2, default=(2.0, 5.0), metavar=("MIN", "MAX"),
                    help="seconds the broker stays down each time (uniform)")  # fmt: skip
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--model", type=Path, default=None, help="reuse this model file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                    help="copy the broker's (verbose) and the service's logs here")  # fmt: skip
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if not Path(MOSQUITTO).exists():
        raise SystemExit("mosquitto not found: apt-get install -y mosquitto")
    if not 1 <= args.images <= 20000 or not 1 <= args.clients <= 32 or args.restarts < 0:
        raise SystemExit("--images 1..20000, --clients 1..32, --restarts >= 0")
    if args.rate < 0 or not 0 < args.down[0] <= args.down[1]:
        raise SystemExit("--rate >= 0 and --down MIN MAX with 0 < MIN <= MAX")
    rng = np.random.default_rng(args.seed)
    # one stop in each equal slice of the middle 80% of the posts, down a random while
    edges = np.linspace(0.1, 0.9, args.restarts + 1)
    at = [int(args.images * rng.uniform(lo, hi)) for lo, hi in itertools.pairwise(edges)]
    downs = [float(rng.uniform(*args.down)) for _ in at]
    sig = SIGNALS[args.signal]

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        print("model and images ...", file=sys.stderr)
        model = args.model or _model(tmp)
        images = _images(args.images)
        (tmp / "broker").mkdir()
        broker = Mosquitto(tmp / "broker", sig)
        broker.start()
        sub = proc = None
        try:
            sub = Subscriber(broker.port)
            time.sleep(1.5)  # the subscription is saved before any stop
            port = _free_port()
            data_dir = tmp / "service"
            proc = _start_service(model, data_dir, port, broker.port)
            t0 = time.perf_counter()
            poster = Poster(f"http://127.0.0.1:{port}", images, args.clients, args.rate)
            poster.start()
            stops: list[tuple[int, float]] = []
            up = time.perf_counter()
            for n, down in zip(at, downs, strict=True):
                while (poster.answered < n or time.perf_counter() - up < MIN_UP) and any(
                    t.is_alive() for t in poster.threads
                ):
                    time.sleep(0.02)
                stops.append((poster.answered, down))
                print(f"broker stopped ({args.signal}) after {poster.answered} posts, "
                      f"down {down:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
                broker.restart(down)
                up = time.perf_counter()
            poster.join()
            posts_s = poster.last - t0
            print(f"{args.images} posts in {posts_s:.0f} s; draining ...", file=sys.stderr)
            db_path = data_dir / "results.db"
            deadline = time.monotonic() + args.drain_timeout
            while True:
                results, alarms, pending = _db(db_path)
                got_r, got_a = sub.received()
                arrived = set(results) <= set(got_r) and set(alarms) <= set(got_a)
                if (pending == 0 and arrived) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            drain_s = time.perf_counter() - poster.last
            time.sleep(2.0)  # late repeats, if any, are counted too
            seconds = time.perf_counter() - t0
            results, alarms, pending = _db(db_path)
            got_r, got_a = sub.received()
            lost_r = sorted(set(results) - set(got_r))
            lost_a = sorted(set(alarms) - set(got_a))
            stopped = list(broker.stopped_at)
            detail = _lost_detail(db_path, f"{TOPIC}/results", lost_r, stopped)
            detail += [
                f"alarm {d}" for d in _lost_detail(db_path, f"{TOPIC}/alarms", lost_a, stopped)
            ]
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if sub is not None:
                sub.close()
            broker.stop(signal.SIGTERM)
            if args.keep_logs is not None:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for log in (broker.log, tmp / "serve.log"):
                    if log.exists():
                        shutil.copy(log, args.keep_logs / log.name)
        serve_log = (tmp / "serve.log").read_text(errors="replace")
        save_errors = broker.log.read_text(errors="replace").count("Error saving")

    dup_r = sum(c - 1 for c in Counter(got_r).values() if c > 1)
    dup_a = sum(c - 1 for c in Counter(got_a).values() if c > 1)
    unknown = len(set(got_r) - set(results)) + len(set(got_a) - set(alarms))
    lost = len(lost_r) + len(lost_a)
    accepted = poster.codes.get(201, 0)
    errors = {str(c): n for c, n in poster.codes.items() if c != 201}
    retries = serve_log.count("MQTT: outbox not sent")
    ok = lost == unknown == pending == 0 and accepted == len(results) == args.images
    semantics = (
        "exactly once (this run)" if dup_r + dup_a == 0 else "at least once with a unique id"
    )
    verdict = semantics if ok else "FAILED"
    cmd = f"python benchmarks/mqtt_restart.py --images {args.images} --restarts {args.restarts}"
    for name, default in (("clients", 4), ("rate", 20.0), ("signal", "kill"), ("seed", 0)):
        if getattr(args, name) != default:
            cmd += f" --{name} {getattr(args, name)}"
    if tuple(args.down) != (2.0, 5.0):
        cmd += f" --down {args.down[0]} {args.down[1]}"
    mid_run = sum(n < args.images for n, _ in stops)
    lines = [
        "## MQTT: broker restarted mid-run (`defectkit serve --mqtt`, loopback)",
        "",
        f"- command: `{cmd}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {_code()}",
        f"- machine: {machine()}",
        f"- {args.images} distinct 96x96 PNG surfaces posted by {args.clients} clients "
        f"({'at most ' + format(args.rate, 'g') + ' a second' if args.rate else 'at once'}) "
        "to `defectkit serve --mqtt` (SQLite store; small PatchCore fitted on generated "
        f"surfaces); mosquitto (persistence saved on every change) stopped with "
        f"SIG{args.signal.upper()} {len(stops)} times at seeded random moments, after "
        f"{', '.join(str(n) for n, _ in stops) or '-'} answered posts, down "
        f"{', '.join(f'{d:.1f}' for _, d in stops) or '-'} s, and restarted with its saved "
        "sessions; a durable subscriber (fixed id, no clean session, QoS 1) on results "
        "and alarms; ids compared with the database once the outbox had drained "
        f"({drain_s:.0f} s after the last post)",
        "",
        "| images posted (201) | results stored | alarms stored | messages received | "
        "lost | duplicates | unknown ids | restarts | broker down s | elapsed s | delivery |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {accepted} | {len(results)} | {len(alarms)} | {len(got_r) + len(got_a)} | "
        f"{lost} | {dup_r + dup_a} | {unknown} | {len(stops)} ({mid_run} mid-run) | "
        f"{broker.down_s:.1f} | "
        f"{seconds:.0f} | {verdict} |",
        "",
        f"- received: {len(got_r)} result messages ({len(set(got_r))} distinct ids), "
        f"{len(got_a)} alarm messages ({len(set(got_a))} distinct ids); received with the "
        f"DUP flag (sent again by the broker): {sub.redelivered}; outbox rows left "
        f"unsent: {pending}; publisher retries logged: {retries}; subscriber reconnects: "
        f"{sub.connects - 1}, with its session kept by the broker: {sub.resumed}",
        "- by design (`serve/mqtt.py`) delivery is at least once with a unique id: a "
        "message is sent again when the broker stops between its PUBACK and the outbox "
        "row being marked sent, and the broker sends one again (DUP flag) when it stops "
        "before saving the subscriber's PUBACK; the subscriber drops repeats by id",
    ]
    if save_errors:
        lines.append(f"- the broker failed to save its database {save_errors} times")
    if errors:
        lines.append(f"- posts not answered 201: {errors}")
        print(f"service log (tail):\n{serve_log[-3000:]}", file=sys.stderr)
    if lost:
        lines.append(f"- LOST (id, and whether the broker had acknowledged it): "
                     f"{'; '.join(detail[:20])}")  # fmt: skip
    publish("mqtt-restart", lines, record_it=not args.no_record)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

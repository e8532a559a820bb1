"""Service load benchmark: `defectkit serve` on 127.0.0.1 under concurrent clients.

    python benchmarks/service_load.py [--model M.dkm] [--clients 16] [--seconds 60] [--no-record]

Fits the default model on magnetic-tile (or reuses ``--model``), measures the
CLI's ``inspect`` rate on the test images (process start and model load
included), then, each with a fresh SQLite database, in the same run:

1. the service scoring one image at a time in one process (``--max-batch 1
   --jobs 1``, as before micro-batching),
2. micro-batching in one process (``--jobs 1``, as before worker processes) and
3. workers: the service with its defaults (micro-batching, and ``--jobs`` auto:
   this process and a worker process per further usable core, one torch thread
   each, as ``defectkit inspect`` scores),

each under ``--clients`` clients posting test images one after another for
``--seconds``; then
4. overload: the defaults again, ``--overload-clients`` (32) clients against
   ``--max-queue`` ``--overload-queue`` (16) for half as long: requests beyond the
   queue must be answered 429 at once, the accepted ones with bounded latency.

Reports errors, p50 / p99 latency, throughput (and its ratio to the CLI rate),
and checks that every accepted request is a row in the database (rows ==
accepted). Loopback only; bounded in time. Records into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _record import SHARED_DATA, git_commit, machine, publish, run_cli, wait_healthy

TOKEN = "bench-token"
TARGET_RATIO = 0.80
TARGET_P99 = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _test_images(data: Path) -> list[Path]:
    exts = {".png", ".jpg", ".jpeg", ".bmp"}
    return sorted(p for p in (data / "test").rglob("*") if p.suffix.lower() in exts)


def _start(model: Path, data_dir: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "defectkit.cli", "serve", str(model), "--data-dir",
           str(data_dir), "--port", str(port), "--token", TOKEN, *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return wait_healthy(proc, port, lambda: proc.stderr.read())


def _load(url: str, images: list[bytes], clients: int, seconds: float):
    lat: list[float] = []
    codes: dict[int | str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        i = k
        with httpx.Client(timeout=300) as c:
            while time.monotonic() < deadline:
                data = images[i % len(images)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{url}/inspect", files={"file": ("part.png", data)},
                               data={"line": "bench"},
                               headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
                    code: int | str = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == 201:
                        lat.append(dt)
                if code == 429:
                    time.sleep(float(r.headers.get("Retry-After", "1")))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, codes, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "magnetic-tile")
    ap.add_argument("--model", type=Path, default=None, help="reuse this model file")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--overload-clients", type=int, default=32)
    ap.add_argument("--overload-queue", type=int, default=16)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"dataset not found: {args.data}")
    if not 1 <= args.clients <= 64 or not 1 <= args.seconds <= 600:
        raise SystemExit("--clients 1..64 and --seconds 1..600 (the run is bounded)")
    paths = _test_images(args.data)
    images = [p.read_bytes() for p in paths]

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = args.model
        if model is None:
            model = tmp_path / "model.dkm"
            print("fitting the default model ...", file=sys.stderr)
            run_cli(["fit", str(args.data), "--out", str(model), "-q"])
        print("CLI inspect rate ...", file=sys.stderr)
        cli = run_cli(["inspect", str(model), str(args.data / "test"), "-q"], True)
        cli_rate = len(paths) / cli.seconds

        one = ["--jobs", "1"]
        runs = [
            (
                "one at a time (--max-batch 1 --jobs 1)",
                ["--max-batch", "1", *one],
                args.clients,
                args.seconds,
            ),
            ("micro-batching (--jobs 1)", one, args.clients, args.seconds),
            ("workers (defaults: micro-batching, --jobs auto)", [], args.clients, args.seconds),
            (
                f"overload: defaults, --max-queue {args.overload_queue}",
                ["--max-queue", str(args.overload_queue)],
                args.overload_clients,
                args.seconds / 2,
            ),
        ]
        results = []
        for k, (label, extra, clients, seconds) in enumerate(runs):
            port = _free_port()
            data_dir = tmp_path / f"service{k}"
            proc = _start(model, data_dir, port, extra)
            try:
                print(f"{label}: {clients} clients for {seconds:.0f} s ...", file=sys.stderr)
                lat, codes, wall = _load(f"http://127.0.0.1:{port}", images, clients, seconds)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            rows = sqlite3.connect(data_dir / "results.db").execute("SELECT count(*) FROM results")
            results.append((label, clients, lat, codes, wall, rows.fetchone()[0]))

    lines = [
        "## Service under load (`defectkit serve`, loopback)",
        "",
        f"- command: `python benchmarks/service_load.py --clients {args.clients} "
        f"--seconds {args.seconds:.0f}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {git_commit()}",
        f"- machine: {machine()}",
        f"- data: {len(paths)} test images of {args.data.name}, posted round-robin; "
        "model: default `defectkit fit` settings; SQLite (WAL) store; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; the "
        f"{len(results)} services ran one after another in this run, each started "
        "fresh (its worker processes load the model meanwhile); a client answered 429 "
        "waits Retry-After and goes on",
        f"- CLI `inspect` rate (same images, process start included): {cli_rate:.2f} images/s",
        "",
        "| service | clients | accepted (201) | 429 | other errors | rows == accepted | "
        "p50 s | p99 s | images/s | / CLI |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    failed = False
    for label, clients, lat, codes, wall, n_rows in results:
        accepted = codes.get(201, 0)
        busy = codes.get(429, 0)
        errors = sum(n for c, n in codes.items() if c not in (201, 429))
        failed |= bool(errors) or n_rows != accepted
        rate = accepted / wall
        other = f"{errors} {dict(codes)}" if errors else "0"
        lines.append(
            f"| {label} | {clients} | {accepted} | {busy} | {other} | "
            f"{'yes' if n_rows == accepted else f'NO ({n_rows})'} | {_pct(lat, 0.5):.2f} | "
            f"{_pct(lat, 0.99):.2f} | {rate:.2f} | {rate / cli_rate:.0%} |"
        )
    lines += [
        "",
        f"- targets (#17): 16 clients: throughput >= {TARGET_RATIO:.0%} of the CLI, p99 <= "
        f"{TARGET_P99:.0f} s, zero errors, zero lost; overload answered with 429, nothing "
        "accepted lost, accepted latency bounded",
    ]
    publish("service_load", lines, record_it=not args.no_record)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Hot folder under crashes: files dropped in bursts while `defectkit watch` is
killed (SIGKILL) and restarted; every file must be inspected exactly once.

    python benchmarks/watch_restart.py [--files 2000] [--kills 3] [--no-record]

Fits a small PatchCore model on generated surfaces (or reuses ``--model``),
then a writer thread drops ``--files`` distinct PNG images (generated surfaces,
each with its own bytes) into the hot folder in bursts of 50, each written under
a temporary name and renamed when complete, as cameras do. Meanwhile
``defectkit watch --move-to`` runs and is killed ``--kills`` times at random
moments (seeded) and restarted; after the last burst it runs until the folder
is empty. Checks: one row per file (rows == files, distinct image hashes ==
files), every file moved to ok/ or ng/, none left. Records into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from _record import git_commit, machine, publish

BURST = 50


def _model(tmp: Path) -> Path:
    from defectkit.data.synthetic import make_surface
    from defectkit.detector import Detector

    rng = np.random.default_rng(0)
    train = [make_surface("brushed_metal", (96, 96), rng) for _ in range(40)]
    return Detector.fit(train, "patchcore", {"image_size": 96}).save(tmp / "watch.dkm")


def _writer(inbox: Path, n: int, done: threading.Event) -> None:
    from defectkit.data.synthetic import make_surface

    rng = np.random.default_rng(1)
    for start in range(0, n, BURST):
        for i in range(start, min(n, start + BURST)):
            img = make_surface("brushed_metal", (96, 96), rng)
            img[0, 0] = (i % 256, i // 256 % 256, 7)  # distinct bytes per file
            ok, buf = cv2.imencode(".png", img[:, :, ::-1])
            assert ok
            tmp = inbox / f".{i:05d}.png.part"
            tmp.write_bytes(buf.tobytes())
            os.replace(tmp, inbox / f"{i:05d}.png")
        time.sleep(float(rng.uniform(0.5, 2.0)))
    done.set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = args.model or _model(tmp)
        inbox, moved, res = tmp / "in", tmp / "done", tmp / "res"
        inbox.mkdir()
        cmd = [sys.executable, "-m", "defectkit.cli", "watch", str(model), str(inbox),
               "--move-to", str(moved), "--data-dir", str(res), "--settle", "0.5",
               "--poll", "0.2"]  # fmt: skip
        written = threading.Event()
        writer = threading.Thread(target=_writer, args=(inbox, args.files, written))
        t0 = time.perf_counter()
        writer.start()
        kills = 0
        while kills < args.kills:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            time.sleep(float(rng.uniform(8, 20)))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            print(f"killed watch ({kills}/{args.kills})", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        writer.join()
        while any(p.suffix == ".png" for p in inbox.iterdir()):
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        seconds = time.perf_counter() - t0
        with sqlite3.connect(res / "results.db") as db:
            rows, hashes = db.execute(
                "SELECT count(*), count(DISTINCT image_sha256) FROM results"
            ).fetchone()
        names = [p.name for p in moved.rglob("*.png")]
        left = [p.name for p in inbox.iterdir() if p.suffix == ".png"]
        ok = rows == hashes == args.files == len(names) == len(set(names)) and not left
        lines = [
            "## Hot folder: kill -9 and restart",
            "",
            f"- command: `python benchmarks/watch_restart.py --files {args.files} "
            f"--kills {args.kills}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; commit {git_commit()}",
            f"- machine: {machine()}",
            f"- {args.files} distinct 96x96 PNG files dropped in bursts of {BURST} (written "
            "under a temporary name, then renamed), `defectkit watch --move-to` killed "
            f"with SIGKILL {args.kills} times at random moments and restarted",
            "",
            "| files | kills | rows | distinct image hashes | files moved | left in folder | "
            "wall s | verdict |",
            "|---|---|---|---|---|---|---|---|",
            f"| {args.files} | {kills} | {rows} | {hashes} | {len(names)} | {len(left)} | "
            f"{seconds:.0f} | {'exactly once' if ok else 'FAILED'} |",
        ]
        publish("watch-restart", lines, record_it=not args.no_record)
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()

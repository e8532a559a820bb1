"""Shared helpers for benchmark scripts: machine description, running CLI
commands with wall time and peak memory, and writing results into BENCHMARKS.md
between markers (figures are only ever written by the scripts)."""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from defectkit.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{os.cpu_count()} cores, {cpu}, {mem:.0f} GiB RAM, Python {platform.python_version()}"


def git_commit() -> str:
    """HEAD's short hash, plus "(+ uncommitted changes)" when tracked files differ
    from it: a figure is then not exactly the commit's."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (+ uncommitted changes)" if dirty else head


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


@dataclass
class Run:
    seconds: float
    peak_rss_gb: float
    stdout: str
    returncode: int


def run_cli(args: list[str], stdout_to_devnull: bool = False) -> Run:
    """Run ``defectkit ARGS`` in a child process; wall time and its peak RSS."""
    cmd = [sys.executable, "-m", "defectkit.cli", *args]
    wrapper = [sys.executable, "-c", _RSS_WRAPPER, *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(
        wrapper,
        stdout=subprocess.DEVNULL if stdout_to_devnull else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - t0
    m = re.search(r"__PEAK_RSS_KB__=(\d+)", proc.stderr)
    rss = int(m.group(1)) / 1024**2 if m else float("nan")
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return Run(seconds, rss, proc.stdout or "", proc.returncode)


# Runs the command as a child and prints the child's peak RSS (ru_maxrss, KiB).
_RSS_WRAPPER = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:])
print(f"__PEAK_RSS_KB__={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(rc)
"""


def wait_healthy(proc: subprocess.Popen, port: int, why: Callable[[], str]) -> subprocess.Popen:
    """Wait (up to 120 s) until the service started as ``proc`` answers
    ``/health`` on ``port``; stop the benchmark with ``why()`` if it exits."""
    import httpx

    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {why()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


def record(section: str, body: str) -> None:
    """Replace (or add) the block of ``section`` in BENCHMARKS.md."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(BENCHMARKS_MD, text)


def publish(section: str, lines: list[str], *, record_it: bool = True) -> str:
    """Print a benchmark's block and, with ``record_it``, record it in BENCHMARKS.md."""
    text = "\n".join(lines)
    print(text)
    if record_it:
        record(section, text)
    return text


def model_arguments(ap: argparse.ArgumentParser) -> None:
    """--model (reuse a file), --method (what to fit otherwise), --data, --no-record."""
    ap.add_argument("--model", type=Path, default=None, help="reuse this model file")
    ap.add_argument("--method", default="patchcore")
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "magnetic-tile")
    ap.add_argument("--no-record", action="store_true")


def model_for(args: argparse.Namespace, tmp: str | Path) -> tuple[Path, str]:
    """``args.model``, or ``--method`` fitted on ``args.data`` with its default
    settings into ``tmp``; and a note saying which, for the record."""
    if args.model is not None:
        return Path(args.model), f"reused `{args.model}`"
    model = Path(tmp) / "model.dkm"
    fit = run_cli(["fit", str(args.data), "--method", args.method, "--out", str(model), "-q"])
    return model, f"fitted here in {fit.seconds:.0f} s with default settings"

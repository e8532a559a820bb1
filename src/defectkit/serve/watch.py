"""The hot folder (``defectkit watch``): how most line cameras hand over images.

Every image file that appears under the folder is inspected once it is complete
(its size and modification time unchanged for ``settle_seconds``, or a
``NAME.done`` marker beside it), stored exactly as the service stores an upload
(:func:`~defectkit.serve.inspection.store_result`: image and overlay files, the
committed row, the SPC charts and their alarms), and, with ``move_to``, moved to
``move_to/ok`` or ``move_to/ng`` (``move_to/error`` for a file that is not a
usable image, with the reason logged).

Exactly once, across restarts and crashes: an image is keyed by the SHA-256 of
its bytes. Before inspecting a file the store is asked whether that image has a
result, and the row is committed before the file is moved. A crash after the
commit leaves the file where it was: the next run finds its result and only
moves it. A crash before leaves no row: the next run inspects it. Two files
with the same bytes are one image, inspected once.

Batches are scored in this process and, given a
:class:`~defectkit.scale.local_pool.WorkerPool` (``defectkit watch --jobs``), in
its worker processes too, as ``defectkit inspect`` scores
(:func:`~defectkit.scale.local_pool.ordered_batches`); results are stored and
files moved in the order the files were found.

>>> settings = WatchSettings(Path("camera"), move_to=Path("done"))  # doctest: +SKIP
>>> HotFolder(det, store, settings).run()                            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from defectkit.data.datasets import IMAGE_EXTENSIONS
from defectkit.detector import Detector
from defectkit.errors import ConfigError
from defectkit.scale.local_pool import WorkerPool, ordered_batches
from defectkit.serve.inspection import (
    DB_UNAVAILABLE,
    Unusable,
    inspect_uploads,
    replay,
    store_result,
)
from defectkit.serve.spc import SpcMonitor
from defectkit.serve.store import ResultStore

log = logging.getLogger("defectkit.watch")

#: a file NAME is complete as soon as NAME + this exists (written after it)
MARKER = ".done"
#: files read ahead at most: this many batches for each process scoring
BATCHES_AHEAD = 4


@dataclass(frozen=True)
class WatchSettings:
    """Where images arrive, where they go, and when a file counts as complete."""

    folder: Path
    #: folder for ok/, ng/ and error/ (None: files stay where they are)
    move_to: Path | None = None
    #: a file is complete once its size and time are unchanged this long
    settle_seconds: float = 1.0
    poll_seconds: float = 0.5
    batch_size: int = 16
    line: str | None = None
    lot: str | None = None

    def __post_init__(self) -> None:
        if not self.folder.is_dir():
            raise ConfigError(f"watch: {self.folder} is not a folder")
        if self.settle_seconds < 0 or self.poll_seconds <= 0:
            raise ConfigError("watch: --settle must be >= 0 s and --poll > 0 s")
        if self.batch_size < 1:
            raise ConfigError(f"watch: batch size must be >= 1, got {self.batch_size}")
        if self.move_to is not None and self.folder.resolve().is_relative_to(
            self.move_to.resolve()
        ):
            raise ConfigError(f"watch: --move-to {self.move_to} must not hold the watched folder")


@dataclass
class Outcome:
    """What happened to one file: ``inspected`` (a new result), ``already`` (its
    image had a result: a restart after a crash, or a copy), or ``error``."""

    path: Path
    status: str
    result_id: int | None = None
    is_defect: bool | None = None
    score: float | None = None
    message: str | None = None
    moved_to: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "status": self.status,
            "id": self.result_id,
            "is_defect": self.is_defect,
            "score": self.score,
            "error": self.message,
            "moved_to": None if self.moved_to is None else str(self.moved_to),
        }


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float


@dataclass
class HotFolder:
    """Polls ``settings.folder`` and inspects each complete image file once."""

    detector: Detector
    store: ResultStore
    settings: WatchSettings
    monitor: SpcMonitor = field(default_factory=SpcMonitor)
    clock: Callable[[], float] = time.monotonic
    counts: Counter[str] = field(default_factory=Counter)
    #: worker processes that score batches too (None: this process alone)
    pool: WorkerPool | None = None

    def __post_init__(self) -> None:
        self._seen: dict[Path, _Seen] = {}
        # files handled and left in place (no move_to), by (size, mtime): not read again
        self._handled: dict[Path, tuple[int, int]] = {}
        self._replayed = False
        self._told = False

    # -- finding complete files ---------------------------------------------------
    def _candidates(self) -> Iterator[Path]:
        skip = None if self.settings.move_to is None else self.settings.move_to.resolve()
        for root, dirs, files in os.walk(self.settings.folder):
            here = Path(root)
            if skip is not None:
                dirs[:] = [d for d in dirs if (here / d).resolve() != skip]
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                yield here / name

    def ready(self) -> list[Path]:
        """Image files complete now: a marker beside them, or unchanged for
        ``settle_seconds`` since first seen this way."""
        now = self.clock()
        ready, present = [], set()
        for path in self._candidates():
            try:
                st = path.stat()
            except OSError:  # gone between listing and looking
                continue
            present.add(path)
            key = (st.st_size, st.st_mtime_ns)
            if self._handled.get(path) == key:
                continue
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != key:
                seen = self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now)
            marked = path.with_name(path.name + MARKER).exists()
            if marked or (st.st_size > 0 and now - seen.since >= self.settings.settle_seconds):
                ready.append(path)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        for gone in set(self._handled) - present:
            del self._handled[gone]
        return ready

    # -- inspecting -----------------------------------------------------------------
    def step(self) -> list[Outcome]:
        """One poll: every complete file, in batches. Stops early (the rest waits
        for the next poll) when the database is down."""
        try:
            if not self._replayed:  # the charts continue from the stored results
                replay(self.store, self.monitor)
                self._replayed = True
        except DB_UNAVAILABLE as e:
            log.warning("results database unavailable (%s); retrying at the next poll", e)
            return []
        out: list[Outcome] = []
        todo = self.ready()
        processes = 1 + (self.pool.workers if self.pool is not None else 0)
        ahead = self.settings.batch_size * BATCHES_AHEAD * processes
        try:
            while todo:
                todo = self._inspect(todo[:ahead], out) + todo[ahead:]
        except DB_UNAVAILABLE as e:
            log.warning("results database unavailable (%s); retrying at the next poll", e)
        if self.pool is not None and self.pool.failure and not self._told:
            self._told = True
            log.warning("%s; every batch is now scored in this process", self.pool.failure)
        return out

    def _inspect(self, paths: list[Path], out: list[Outcome]) -> list[Path]:
        """Inspect the new images among ``paths`` in batches, adding each file's
        outcome to ``out`` once it is done; returns the files left for after these:
        copies of an image inspected among them."""
        todo: list[tuple[Path, bytes]] = []
        later: list[Path] = []
        hashes: set[str] = set()
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as e:
                log.warning("%s: cannot read (%s); trying again at the next poll", path, e)
                continue
            sha = hashlib.sha256(data).hexdigest()
            if sha in hashes:  # found "already" once the first copy is stored
                later.append(path)
                continue
            row = self.store.find_image(sha)
            if row is not None:
                out.append(self._done(path, "already", row.id, row.is_defect, row.score))
                continue
            hashes.add(sha)
            todo.append((path, data))
        size = self.settings.batch_size
        batches = [todo[i : i + size] for i in range(0, len(todo), size)]
        uploads = [[(data, self._name(path)) for path, data in batch] for batch in batches]
        scored = ordered_batches(
            uploads, partial(inspect_uploads, self.detector), self.pool, inspect_uploads
        )
        meta = {"line": self.settings.line, "lot": self.settings.lot, "part_id": None}
        for batch, results in zip(batches, scored, strict=True):
            for (path, data), result in zip(batch, results, strict=True):
                if isinstance(result, Unusable):
                    log.error("%s: not inspected: %s", path, result.message)
                    out.append(self._done(path, "error", message=result.message))
                    continue
                row, _ = store_result(
                    self.store, self.monitor, result, data, self._name(path), meta
                )
                out.append(self._done(path, "inspected", row.id, row.is_defect, row.score))
        return later

    def _name(self, path: Path) -> str:
        return path.relative_to(self.settings.folder).as_posix()

    def _done(
        self,
        path: Path,
        status: str,
        result_id: int | None = None,
        is_defect: bool | None = None,
        score: float | None = None,
        message: str | None = None,
    ) -> Outcome:
        """Record the outcome and move the file (or remember it, left in place)."""
        self.counts[status] += 1
        outcome = Outcome(path, status, result_id, is_defect, score, message)
        if self.settings.move_to is None:
            st = path.stat()
            self._handled[path] = (st.st_size, st.st_mtime_ns)
            return outcome
        verdict = "error" if status == "error" else {True: "ng", False: "ok"}.get(is_defect, "ok")
        outcome.moved_to = _move(path, self.settings.move_to / verdict / self._name(path))
        path.with_name(path.name + MARKER).unlink(missing_ok=True)
        self._seen.pop(path, None)
        return outcome

    def run(self, stop: threading.Event | None = None, on_outcome: Any = None) -> None:
        """Poll until ``stop`` is set; ``on_outcome(outcome)`` is called for each file."""
        stop = stop or threading.Event()
        while not stop.is_set():
            for outcome in self.step():
                if on_outcome is not None:
                    on_outcome(outcome)
            stop.wait(self.settings.poll_seconds)


def _move(path: Path, target: Path) -> Path:
    """Move ``path`` to ``target`` (its name kept; a number added where a file of that
    name is already there); returns where it went."""
    target.parent.mkdir(parents=True, exist_ok=True)
    final, n = target, 1
    while final.exists():
        final = target.with_name(f"{target.stem}-{n}{target.suffix}")
        n += 1
    shutil.move(str(path), str(final))
    return final

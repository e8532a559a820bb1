"""Micro-batching for the service: requests that arrive together are scored as
one batch, behind a bounded queue, by ``consumers`` threads that each take the
next batch (one thread per batch that may be scored at once: the service runs
one for this process and two for each worker process, see
:class:`~defectkit.serve.inspection.UploadScorer`).

A request waits at most ``max_wait`` seconds for others to join its batch (only
while a consumer is free: under load the next batch is whatever queued while
the last ones were scored). One consumer at a time gathers a batch, so requests
that arrive together stay together. When ``max_queue`` requests already wait,
:meth:`Batcher.submit` raises :class:`QueueFull` at once, so the service can
answer 429 instead of letting latency grow without bound.

>>> batcher = Batcher(handle, max_batch=16, max_wait=0.005, max_queue=64)  # doctest: +SKIP
>>> future = batcher.submit(payload)                                       # doctest: +SKIP
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests: try again later."""


@dataclass
class Job:
    """One request: its payload and the future its answer goes to."""

    payload: Any
    future: Future[Any] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Feeds batches of queued :class:`Job` to ``handle(jobs)`` in ``consumers``
    threads (``handle`` is called from several threads at once when there are
    several). ``handle`` must settle every job's future; one it leaves unset, or
    an exception it raises, fails the jobs still pending with that exception."""

    def __init__(
        self,
        handle: Callable[[list[Job]], None],
        *,
        max_batch: int = 16,
        max_wait: float = 0.005,
        max_queue: int = 64,
        consumers: int = 1,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait < 0 or consumers < 1:
            raise ValueError("max_batch, max_queue and consumers must be >= 1, max_wait >= 0")
        self.handle = handle
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.consumers = consumers
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._sizes: Counter[int] = Counter()
        self._sizes_lock = threading.Lock()
        self._lock = threading.Lock()  # the threads
        self._gather = threading.Lock()  # one consumer gathers a batch at a time
        self._threads: list[threading.Thread] = []

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a batch)."""
        return self._queue.qsize()

    @property
    def batch_sizes(self) -> Counter[int]:
        """Batches handed to ``handle``, by size (a copy)."""
        with self._sizes_lock:
            return Counter(self._sizes)

    def submit(self, payload: Any) -> Future[Any]:
        """Queue ``payload``; its answer comes in the future returned. The consumer
        threads start with the first request (and again after :meth:`close`)."""
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            for k in range(len(self._threads), self.consumers):
                thread = threading.Thread(
                    target=self._run, name=f"defectkit-batcher-{k}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        job = Job(payload)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.max_queue} requests are already waiting") from None
        return job.future

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the threads."""
        with self._lock:
            threads = [t for t in self._threads if t.is_alive()]
            for _ in threads:  # one stop for each: every queued job comes before them
                self._queue.put(None)
        end = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))

    def _next_batch(self) -> tuple[list[Job], bool]:
        """(jobs, stop): blocks for the first job, then takes what else is queued
        (waiting up to ``max_wait`` for more while the batch is not full)."""
        with self._gather:
            first = self._queue.get()
            if first is None:
                return [], True
            jobs = [first]
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    job = self._queue.get_nowait() if left <= 0 else self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:
                    return jobs, True
                jobs.append(job)
            return jobs, False

    def _process(self, jobs: list[Job]) -> None:
        with self._sizes_lock:
            self._sizes[len(jobs)] += 1
        try:
            self.handle(jobs)
        except BaseException as e:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(RuntimeError("request was not answered"))

    def _run(self) -> None:
        while True:
            jobs, stop = self._next_batch()
            if jobs:
                self._process(jobs)
            if stop:
                return

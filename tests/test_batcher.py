"""The service's micro-batcher: requests that wait go together, one batch at a
time; a full queue refuses at once; every request gets an answer."""

from __future__ import annotations

import threading
import time

import pytest

from defectkit.serve.batcher import Batcher, Job, QueueFull


def test_waiting_requests_form_one_batch_and_each_gets_its_answer() -> None:
    gate = threading.Event()
    seen: list[list[int]] = []

    def handle(jobs: list[Job]) -> None:
        gate.wait(10)
        seen.append([j.payload for j in jobs])
        for j in jobs:
            j.future.set_result(j.payload * 10)

    b = Batcher(handle, max_batch=4, max_wait=0.0, max_queue=16)
    futures = [b.submit(0)]
    time.sleep(0.2)  # the first is taken alone; the next six wait
    futures += [b.submit(i) for i in range(1, 7)]
    gate.set()
    assert [f.result(10) for f in futures] == [i * 10 for i in range(7)]
    assert seen == [[0], [1, 2, 3, 4], [5, 6]]
    assert dict(b.batch_sizes) == {1: 1, 4: 1, 2: 1}
    b.close()


def test_a_lone_request_waits_briefly_for_company() -> None:
    seen: list[int] = []

    def handle(jobs: list[Job]) -> None:
        seen.append(len(jobs))
        for j in jobs:
            j.future.set_result(None)

    b = Batcher(handle, max_batch=8, max_wait=0.3, max_queue=8)
    first = b.submit(1)
    time.sleep(0.05)
    second = b.submit(2)
    first.result(5), second.result(5)
    assert seen == [2]
    b.close()


def test_full_queue_refuses_and_errors_reach_every_request() -> None:
    gate = threading.Event()

    def handle(jobs: list[Job]) -> None:
        gate.wait(10)
        if jobs[0].payload == "bad":
            raise ValueError("scoring failed")
        jobs[0].future.set_result("ok")  # the second job is left unanswered

    b = Batcher(handle, max_batch=2, max_wait=0.0, max_queue=2)
    running = b.submit("bad")
    time.sleep(0.2)
    waiting = [b.submit("x"), b.submit("y")]
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        b.submit("z")
    assert b.depth == 2
    gate.set()
    with pytest.raises(ValueError, match="scoring failed"):
        running.result(5)
    assert waiting[0].result(5) == "ok"
    with pytest.raises(RuntimeError, match="not answered"):
        waiting[1].result(5)
    b.close()
    # a closed batcher starts again on the next request
    gate.set()
    assert b.submit("again").result(5) == "ok"
    b.close()
    with pytest.raises(ValueError):
        Batcher(lambda jobs: None, max_queue=0)


def test_consumers_handle_batches_at_the_same_time() -> None:
    """Two consumers hold two batches at once (each waits for the other at a
    barrier); one consumer never does."""

    def run(consumers: int) -> list:
        barrier = threading.Barrier(2, timeout=1.0 if consumers == 1 else 10.0)
        names: set[str] = set()

        def handle(jobs: list[Job]) -> None:
            barrier.wait()
            names.add(threading.current_thread().name)
            for j in jobs:
                j.future.set_result(j.payload)

        b = Batcher(handle, max_batch=1, max_wait=0.0, max_queue=8, consumers=consumers)
        futures = [b.submit(i) for i in range(4)]
        try:
            return [f.result(15) for f in futures], names
        finally:
            b.close()

    answers, names = run(2)
    assert answers == [0, 1, 2, 3] and len(names) == 2
    with pytest.raises(threading.BrokenBarrierError):
        run(1)


def test_one_consumer_at_a_time_gathers_so_requests_that_arrive_together_stay_together() -> None:
    seen: list[list[int]] = []

    def handle(jobs: list[Job]) -> None:
        seen.append([j.payload for j in jobs])
        for j in jobs:
            j.future.set_result(None)

    b = Batcher(handle, max_batch=8, max_wait=0.5, max_queue=8, consumers=3)
    futures = []
    for i in range(3):
        futures.append(b.submit(i))
        time.sleep(0.05)
    for f in futures:
        f.result(5)
    assert seen == [[0, 1, 2]]
    b.close()


def test_close_finishes_what_is_queued_in_every_consumer() -> None:
    def handle(jobs: list[Job]) -> None:
        time.sleep(0.05)
        for j in jobs:
            j.future.set_result(threading.current_thread())

    b = Batcher(handle, max_batch=2, max_wait=0.0, max_queue=32, consumers=3)
    futures = [b.submit(i) for i in range(20)]
    b.close()
    assert all(f.done() for f in futures)
    consumers = {f.result() for f in futures}
    assert len(consumers) == 3 and not any(t.is_alive() for t in consumers)
    assert sum(k * n for k, n in b.batch_sizes.items()) == 20
    with pytest.raises(ValueError):
        Batcher(handle, consumers=0)

"""Inspecting a long list of images on several local processes.

On the 2-core CI machine, one process with two torch threads inspects the 582
magnetic-tile test images in 24-26 s; two processes with one thread each take
17.7-19.1 s (measured in alternation), with the same scores to 4e-7. About a
third of the per-image work (decoding, resizing, small tensor ops, map
post-processing, regions, JSON) runs on one core whatever torch's thread count,
and Python threads cannot share it: two threads with one torch thread each took
21.5 s against 21.6 s. Separate processes can.

``ordered_batches`` runs batches in this process and, once they are ready, in
spawned worker processes that each load the model once; results come back in
input order. Workers start before this process loads its own model, so their
start-up (mostly importing torch) overlaps its own. A worker that cannot start
or dies only costs speed: this process does its batches itself. The service
(``defectkit serve``, :class:`~defectkit.serve.inspection.UploadScorer`) and the
hot folder (``defectkit watch``) score on the same workers.

>>> with WorkerPool(1, partial(load_model, path)) as pool:  # doctest: +SKIP
...     for records in ordered_batches(batches, partial(work, model), pool, work):
...         print(records)
"""

from __future__ import annotations

import math
import multiprocessing as mp
import multiprocessing.connection
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from defectkit.errors import DefectkitError

T = TypeVar("T")
B = TypeVar("B")

#: Fewer images than this stay in one process, where a worker's start-up (about
#: 3 s) does not pay for itself: on the 2-core CI machine, 64 magnetic-tile images
#: took 6.2-7.1 s with a worker against 5.6-6.0 s without; 128 took 6.9-8.1 s
#: against 8.5-9.2 s.
MIN_IMAGES_FOR_WORKERS = 128

#: At most this many processes unless ``--jobs`` asks for more: each holds its
#: own model and torch (about 0.45 GB for the default PatchCore).
MAX_AUTO_JOBS = 8


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU
    quota (a container limited to 2 CPUs on a 64-core host has 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, or v1 CFS quota), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000"
    except (OSError, ValueError):
        try:  # v1
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, p = float(quota), float(period)
    except ValueError:  # "max": no quota
        return None
    return q / p if q > 0 and p > 0 else None


def auto_jobs(n_images: int | None, cores: int | None = None) -> int:
    """Processes for inspecting ``n_images``: one per usable core for long lists
    (at most ``MAX_AUTO_JOBS``). ``None`` is a stream that does not end (the
    service, the hot folder): one per usable core too."""
    cores = usable_cores() if cores is None else cores
    long = n_images is None or n_images >= MIN_IMAGES_FOR_WORKERS
    return min(cores, MAX_AUTO_JOBS) if long else 1


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch and faiss on one thread each inside the block (restored after)."""
    import torch

    torch_threads = torch.get_num_threads()
    faiss_threads = _faiss_threads(None)
    torch.set_num_threads(1)
    _faiss_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        _faiss_threads(faiss_threads)


def _faiss_threads(n: int | None) -> int | None:
    """faiss' OpenMP thread count, set to ``n`` when given; None without faiss."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency
        return None
    before = faiss.omp_get_max_threads()
    if n is not None:
        faiss.omp_set_num_threads(n)
    return before


#: In a worker process: its model, or the reason its setup failed.
_state: dict[str, Any] = {}


class WorkerSetupError(RuntimeError):
    """A worker process could not run its setup (load the model)."""


def _exit_with_parent() -> None:
    """End this worker when its parent process ends, even by SIGKILL (it would
    otherwise wait for work forever, holding its model in memory)."""
    parent = mp.parent_process()
    if parent is None:  # pragma: no cover - workers are always spawned children
        return

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="defectkit-parent-watch", daemon=True).start()


def _worker_setup(setup: Callable[[], Any]) -> None:
    _exit_with_parent()
    # a failure is kept and told to the parent, not printed as a traceback
    try:
        import torch

        torch.set_num_threads(1)
        _faiss_threads(1)
        _state["model"] = setup()
    except Exception as e:
        _state["error"] = _describe(e)


def _loaded_model() -> Any:
    if "error" in _state:
        raise WorkerSetupError(_state["error"])
    return _state["model"]


def _worker_ready() -> int:
    _loaded_model()
    return os.getpid()


def _worker_run(work: Callable[[Any, B], T], batch: B) -> T:
    return work(_loaded_model(), batch)


class WorkerPool:
    """``workers`` spawned processes, each running ``setup()`` once (e.g. loading
    the model) and then ``work(model, batch)`` on the batches it is given.

    ``setup`` and ``work`` must be picklable (module-level functions, or
    ``functools.partial`` of them). Processes are spawned, not forked: torch's
    OpenMP threads do not survive a fork. As with any spawned process, a script
    that starts a pool must keep its top-level work under
    ``if __name__ == "__main__":`` (the ``defectkit`` command does).
    """

    def __init__(self, workers: int, setup: Callable[[], Any]) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._ready: list[Future[int]] = []
        self.failure: str | None = None
        if workers < 1:
            return
        try:
            self._executor = ProcessPoolExecutor(
                workers,
                mp_context=mp.get_context("spawn"),
                initializer=_worker_setup,
                initargs=(setup,),
            )
            # spawn every worker now (the executor otherwise starts them on demand)
            self._ready = [self._executor.submit(_worker_ready) for _ in range(workers)]
        except (OSError, RuntimeError) as e:
            self.stop(f"could not start worker processes: {e}")

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers now. Called once every result is in (or on an error):
        a worker still loading its model would otherwise hold the exit for seconds."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(timeout=10)

    def stop(self, reason: str) -> None:
        """Give up on the workers (``reason`` is kept in ``failure``)."""
        if self.failure is None:
            self.failure = reason
        self.close()

    @property
    def alive(self) -> bool:
        return self._executor is not None

    def ready(self) -> bool:
        """Whether at least one worker has finished its setup."""
        if not self.alive:
            return False
        for f in self._ready:
            if f.done():
                if f.exception() is None:
                    return True
                e = f.exception()
                reason = str(e) if isinstance(e, WorkerSetupError) else _describe(e)
                self.stop(f"worker process failed to start: {reason}")
                return False
        return False

    def submit(self, work: Callable[[Any, B], T], batch: B) -> Future[T] | None:
        if self._executor is None:
            return None
        try:
            return self._executor.submit(_worker_run, work, batch)
        except (BrokenProcessPool, RuntimeError) as e:
            self.stop(f"worker processes stopped: {_describe(e)}")
            return None


def _describe(e: BaseException | None) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def ordered_batches(
    batches: Sequence[B],
    local: Callable[[B], T],
    pool: WorkerPool | None,
    work: Callable[[Any, B], T] | None = None,
) -> Iterator[T]:
    """``local(batch)`` (this process) or ``work(model, batch)`` (a worker) for
    each batch, yielded in input order.

    This process takes the lowest batch nobody has started; once a worker is
    ready, up to two batches per worker wait for it. A batch whose worker died
    is redone here; a ``DefectkitError`` raised in a worker is raised here, as
    it would have been locally.
    """
    n = len(batches)
    done: dict[int, T] = {}
    pending: dict[int, Future[T]] = {}
    emitted = 0

    def free(start: int) -> int:  # lowest batch from ``start`` that nobody has taken
        k = start
        while k < n and (k in pending or k in done):
            k += 1
        return k

    def collect(k: int, f: Future[T]) -> None:
        try:
            done[k] = f.result()
        except DefectkitError:
            raise
        except (BrokenProcessPool, CancelledError, OSError, RuntimeError, MemoryError) as e:
            assert pool is not None
            pool.stop(f"worker process stopped: {_describe(e)}")
            done[k] = local(batches[k])

    while emitted < n:
        for k in [k for k, f in pending.items() if f.done()]:
            collect(k, pending.pop(k))
        if emitted in done:
            yield done.pop(emitted)
            emitted += 1
            continue
        mine = free(emitted)  # this process's next batch; the workers get those after it
        if pool is not None and work is not None and pool.ready():
            j = free(mine + 1)
            while j < n and len(pending) < 2 * pool.workers:
                f = pool.submit(work, batches[j])
                if f is None:
                    break
                pending[j] = f
                j = free(j + 1)
        if mine < n:
            done[mine] = local(batches[mine])
        else:  # everything left is with the workers: wait for the next in order
            collect(emitted, pending.pop(emitted))

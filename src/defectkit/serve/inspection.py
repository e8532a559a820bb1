"""One image in, the ``inspect`` result object out, plus the overlay image; and
the one way a result is stored (row, files, SPC charts, alarms), shared by the
service and the hot folder (``defectkit watch``).

The record has the same keys as a line of ``defectkit inspect --format jsonl``
(``path`` is the upload's name), so the service and the CLI share one result
contract.

A batch of uploads (their bytes and names) is scored by :func:`inspect_uploads`,
in this process or in a worker process of a
:class:`~defectkit.scale.local_pool.WorkerPool` (the same workers as
``defectkit inspect --jobs``): it decodes, scores and encodes the overlays, and
gives back plain data that pickles. :class:`UploadScorer` spreads the batches of
several threads over this process and the workers.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import Counter
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from defectkit.data.images import decode_image_bytes
from defectkit.decide.overlay import region_overlay
from defectkit.decide.records import image_record
from defectkit.detector import Detector
from defectkit.errors import ImageError
from defectkit.products import ProductSet, unknown_record
from defectkit.scale.local_pool import WorkerPool, WorkerSetupError
from defectkit.serve.spc import AlarmEvent, SpcMonitor
from defectkit.serve.store import Result, ResultStore

log = logging.getLogger("defectkit.serve")

#: what a database that is down, locked or unreachable raises
DB_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeoutError)
#: results replayed into the SPC charts at start
REPLAY = 50_000


@dataclass
class Inspection:
    """The result object of one image and its overlay (uint8 RGB)."""

    record: dict[str, Any]
    overlay: np.ndarray


def inspect_image(det: Detector, image: np.ndarray, name: str) -> Inspection:
    """Score, decide and explain one image exactly as ``defectkit inspect`` does
    (the line comes from the same :func:`~defectkit.decide.records.image_record`)."""
    return inspect_images(det, [image], [name])[0]


def inspect_images(
    det: Detector | ProductSet, images: list[np.ndarray], names: list[str]
) -> list[Inspection]:
    """:func:`inspect_image` for a batch, scored in one call (the backbone's batch).
    A unified model assigns each image to its product first, whose detector then
    inspects it (``product`` and ``product_confidence`` in the record); an image
    of no known product gets no score and no verdict, its overlay is the image."""
    if isinstance(det, ProductSet):
        return _inspect_products(det, images, names)
    result = det.score(images)
    decisions = det.decide(result.scores)
    out = []
    for i, (image, name) in enumerate(zip(images, names, strict=True)):
        is_defect = None if decisions is None else bool(decisions[i])
        proba = None
        if det.classifier is not None and (decisions is None or is_defect):
            proba = det.classify([image])[0]
        rec, regions, labels = image_record(
            det,
            name,
            image,
            float(result.scores[i]),
            result.maps[i],
            is_defect,
            result.extras[i] if result.extras else None,
            proba,
        )
        overlay = region_overlay(image, result.maps[i], det.map_threshold, regions, labels)
        out.append(Inspection(rec, overlay))
    return out


def _inspect_products(
    det: ProductSet, images: list[np.ndarray], names: list[str]
) -> list[Inspection]:
    found = det.assign(images)
    out: list[Inspection | None] = [None] * len(images)
    for i, a in enumerate(found):
        if a.product is None:
            rec = unknown_record(names[i], None, a)
            rec.update(width=int(images[i].shape[1]), height=int(images[i].shape[0]))
            out[i] = Inspection(rec, images[i])
    for product, idx in det.by_product(found).items():
        done = inspect_images(
            det.detectors[product], [images[i] for i in idx], [names[i] for i in idx]
        )
        for i, ins in zip(idx, done, strict=True):
            ins.record.update(product=product, product_confidence=found[i].confidence)
            out[i] = ins
    return [x for x in out if x is not None]


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class Scored:
    """An upload's result object and its overlay as PNG bytes, ready to store."""

    record: dict[str, Any]
    overlay_png: bytes


@dataclass
class Unusable:
    """An upload that is not a usable image, and why (the decoder's message)."""

    message: str


def inspect_uploads(det: Detector, uploads: list[tuple[bytes, str]]) -> list[Scored | Unusable]:
    """Decode the uploads ``(bytes, name)`` and score the usable ones as one batch
    (:func:`inspect_images`); one that cannot be decoded gives :class:`Unusable` in
    its place. Also the work of a worker process (``pool.submit(inspect_uploads,
    uploads)``): the overlays are encoded here, so only plain data comes back."""
    out: list[Scored | Unusable | None] = [None] * len(uploads)
    images, names, at = [], [], []
    for i, (data, name) in enumerate(uploads):
        try:
            images.append(decode_image_bytes(data, name))
        except ImageError as e:
            out[i] = Unusable(str(e))
            continue
        names.append(name)
        at.append(i)
    if images:
        for i, ins in zip(at, inspect_images(det, images, names), strict=True):
            out[i] = Scored(ins.record, png_bytes(ins.overlay))
    return [x for x in out if x is not None]


#: a worker process that is gone: its batch is scored in this process instead
WORKER_GONE = (BrokenProcessPool, CancelledError, WorkerSetupError)


class UploadScorer:
    """:func:`inspect_uploads` for batches handed in by several threads at once:
    a batch is scored in this process while it is free (one batch at a time; its
    model is not shared between threads), else in a worker of ``pool`` once one
    has loaded its model. A batch finds no worker while none is ready or after
    the pool stopped (a worker could not start or died): it then waits for this
    process, and a batch whose worker died is scored here again, so no request is
    lost. The pool is not restarted."""

    def __init__(self, detector: Detector, pool: WorkerPool | None = None) -> None:
        self.detector = detector
        self.pool = pool
        #: batches scored, by where: "main" (this process) or "worker"
        self.batches: Counter[str] = Counter()
        self._here = threading.Lock()
        self._lock = threading.Lock()  # the pool and the counts
        self._told = False

    @property
    def processes(self) -> int:
        """Processes scoring: this one, and the workers while the pool runs."""
        pool = self.pool
        return 1 + (pool.workers if pool is not None and pool.alive else 0)

    def __call__(self, uploads: list[tuple[bytes, str]]) -> list[Scored | Unusable]:
        if self._here.acquire(blocking=False):
            try:
                return self._score_here(uploads)
            finally:
                self._here.release()
        future = self._submit(uploads)
        if future is not None:
            try:
                result = future.result()
            except WORKER_GONE as e:
                self._stop(f"worker process stopped ({type(e).__name__}: {e})")
            else:
                self._count("worker")
                return result
        with self._here:
            return self._score_here(uploads)

    def _score_here(self, uploads: list[tuple[bytes, str]]) -> list[Scored | Unusable]:
        result = inspect_uploads(self.detector, uploads)
        self._count("main")
        return result

    def _submit(self, uploads: list[tuple[bytes, str]]) -> Future[list[Scored | Unusable]] | None:
        pool = self.pool
        if pool is None:
            return None
        with self._lock:
            future = pool.submit(inspect_uploads, uploads) if pool.ready() else None
        self._tell()
        return future

    def _stop(self, reason: str) -> None:
        assert self.pool is not None
        with self._lock:
            self.pool.stop(reason)
        self._tell()

    def _tell(self) -> None:
        """Log once that the workers are gone (their batches are scored here)."""
        pool = self.pool
        if pool is None or pool.failure is None or self._told:
            return
        self._told = True
        log.warning("%s; every batch is now scored in this process", pool.failure)

    def _count(self, where: str) -> None:
        with self._lock:
            self.batches[where] += 1


def replay(store: ResultStore, monitor: SpcMonitor, limit: int = REPLAY) -> None:
    """Feed the newest ``limit`` stored results to the charts, oldest first, so that
    they continue after a restart. Rows are read before any is fed: a database
    failure midway leaves the charts untouched for the next try."""
    total = store.count()
    rows = store.query(limit=limit, offset=max(0, total - limit), newest_first=False).items
    for row in rows:
        monitor.update(
            row.score, row.is_defect, lot=row.lot, created_at=row.created_at,
            result_id=row.id, notify=False, product=row.product,
        )  # fmt: skip


def store_result(
    store: ResultStore,
    monitor: SpcMonitor,
    scored: Scored,
    image: bytes,
    name: str,
    meta: dict[str, str | None],
) -> tuple[Result, list[AlarmEvent]]:
    """Store one scored upload (files, then the committed row), then feed the SPC
    charts and store the alarms they raise. A database failure while adding the
    row propagates (nothing was recorded; the image may be sent again); once the
    row is committed, an alarm that cannot be stored is logged (it stays in the
    monitor) rather than raised, so a caller never records the image twice.

    Callers in several threads hold one lock around it, so that the charts see
    the results in the order of their ids (as :func:`replay` feeds them)."""
    row = store.add(scored.record, image, scored.overlay_png, filename=name, **meta)
    events = monitor.update(  # a product's results on its own charts
        row.score, row.is_defect, lot=row.lot, created_at=row.created_at, result_id=row.id,
        product=row.product,
    )  # fmt: skip
    for e in events:
        try:
            store.add_alarm(e.chart, e.rule, e.message, e.result_id)
        except DB_UNAVAILABLE as exc:
            log.warning("SPC alarm not stored (%s): %s", exc, e.message)
    return row, events

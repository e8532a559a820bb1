"""One image in, the ``inspect`` result object out, plus the overlay image; and
the one way a result is stored (row, files, SPC charts, alarms), shared by the
service and the hot folder (``defectkit watch``).

The record has the same keys as a line of ``defectkit inspect --format jsonl``
(``path`` is the upload's name), so the service and the CLI share one result
contract.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from defectkit.decide.overlay import region_overlay
from defectkit.decide.records import image_record
from defectkit.detector import Detector
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


def inspect_images(det: Detector, images: list[np.ndarray], names: list[str]) -> list[Inspection]:
    """:func:`inspect_image` for a batch, scored in one call (the backbone's batch)."""
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


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def replay(store: ResultStore, monitor: SpcMonitor, limit: int = REPLAY) -> None:
    """Feed the newest ``limit`` stored results to the charts, oldest first, so that
    they continue after a restart. Rows are read before any is fed: a database
    failure midway leaves the charts untouched for the next try."""
    total = store.count()
    rows = store.query(limit=limit, offset=max(0, total - limit), newest_first=False).items
    for row in rows:
        monitor.update(
            row.score, row.is_defect, lot=row.lot, created_at=row.created_at,
            result_id=row.id, notify=False,
        )  # fmt: skip


def store_result(
    store: ResultStore,
    monitor: SpcMonitor,
    ins: Inspection,
    image: bytes,
    name: str,
    meta: dict[str, str | None],
) -> tuple[Result, list[AlarmEvent]]:
    """Store one inspection (files, then the committed row), then feed the SPC
    charts and store the alarms they raise. A database failure while adding the
    row propagates (nothing was recorded; the image may be sent again); once the
    row is committed, an alarm that cannot be stored is logged (it stays in the
    monitor) rather than raised, so a caller never records the image twice."""
    row = store.add(ins.record, image, png_bytes(ins.overlay), filename=name, **meta)
    events = monitor.update(
        row.score, row.is_defect, lot=row.lot, created_at=row.created_at, result_id=row.id
    )
    for e in events:
        try:
            store.add_alarm(e.chart, e.rule, e.message, e.result_id)
        except DB_UNAVAILABLE as exc:
            log.warning("SPC alarm not stored (%s): %s", exc, e.message)
    return row, events

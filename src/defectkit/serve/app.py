"""The inspection service (FastAPI): upload an image, get the ``inspect`` result
object with an ``id``; every result is stored, reviewable and charted.

Endpoints (write endpoints need ``Authorization: Bearer TOKEN`` when a token is
set):

- ``POST /inspect``: multipart field ``file``, optional form fields ``line``,
  ``lot``, ``part_id``, ``product``; 201 with the result (committed before the reply)
- ``GET /results`` (``since``, ``until``, ``line``, ``lot``, ``product``, ``verdict``
  ok/ng/unknown, ``reviewed``, ``order`` newest/oldest/doubt, ``limit``, ``offset``),
  ``GET /results/{id}``, ``GET /results/{id}/overlay.png``, ``GET /results/{id}/image``
- ``POST /results/{id}/review``: JSON ``{"verdict": "defect"|"good",
  "defect_type": ..., "comment": ...}``
- ``GET /spc`` (``product``: a unified model's products have their own charts),
  ``GET /model``, ``GET /health``, ``GET /metrics`` (Prometheus text)
- ``/`` and ``/dashboard/...``: the dashboard pages, and the read endpoints only
  they use (``/summary``, ``/facets``, chart SVGs, patch images; see
  :mod:`defectkit.serve.dashboard`)

Requests that arrive together are scored as one batch
(:mod:`defectkit.serve.batcher`). Batches are scored one at a time in this
process and, given a :class:`~defectkit.scale.local_pool.WorkerPool`
(``defectkit serve --jobs``), at the same time in its worker processes, one torch
thread each, as ``defectkit inspect`` scores
(:class:`~defectkit.serve.inspection.UploadScorer`; a batch
whose worker died is scored here). Concurrent requests queue instead of
oversubscribing the CPU cores: at most ``max_queue`` wait; beyond that ``POST
/inspect`` answers 429 with ``Retry-After`` at once, so the latency of accepted
requests stays bounded. Results are stored one at a time, in the batcher's
threads, so the SPC charts see them in the order of their ids.

While the results database is down (at start or later), requests that need it
get 503 with ``Retry-After`` and nothing is recorded; ``POST /inspect`` can be
sent again and is then recorded once. The service recovers by itself when the
database answers again (no restart); the SPC charts and ``/metrics`` keep
answering meanwhile.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from defectkit.detector import Detector
from defectkit.products import ProductSet
from defectkit.scale.local_pool import WorkerPool
from defectkit.serve.batcher import Batcher, Job, QueueFull
from defectkit.serve.dashboard import mount as mount_dashboard
from defectkit.serve.dashboard import spc_state as charts_state
from defectkit.serve.inspection import DB_UNAVAILABLE, Unusable, UploadScorer, store_result
from defectkit.serve.inspection import replay as replay_results
from defectkit.serve.spc import SpcMonitor
from defectkit.serve.store import ResultStore

log = logging.getLogger("defectkit.serve")

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_TEXT = 200
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
#: seconds a client is asked to wait before retrying while the database is down
RETRY_AFTER = 5


class Review(BaseModel):
    verdict: str
    defect_type: str | None = None
    comment: str | None = None


class _Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inspections: Counter[str] = Counter()
        self.rejected: Counter[int] = Counter()
        self.reviews = 0
        self.alarms = 0
        self.latency_sum = 0.0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def observe(self, seconds: float) -> None:
        with self.lock:
            self.latency_sum += seconds
            for i, b in enumerate(LATENCY_BUCKETS):
                if seconds <= b:
                    self.latency_buckets[i] += 1
                    break
            else:
                self.latency_buckets[-1] += 1


def _text(value: str | None, name: str) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > MAX_TEXT:
        raise HTTPException(422, f"{name} is longer than {MAX_TEXT} characters")
    return value


def _brief(exc: BaseException) -> str:
    """The driver's message of a database error, first line only (no SQL)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(422, f"{name} must be an ISO 8601 time, got {value!r}") from None
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc).replace(tzinfo=None)
    return t


def create_app(
    detector: Detector | ProductSet,
    store: ResultStore,
    *,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    spc: SpcMonitor | None = None,
    model_name: str = "model",
    max_batch: int = 16,
    max_wait: float = 0.005,
    max_queue: int = 64,
    pool: WorkerPool | None = None,
) -> FastAPI:
    """The service around a fitted detector and an open store; ``token`` None
    leaves write endpoints open (for embedding; ``defectkit serve`` always sets one).
    ``pool``: worker processes that score batches too (each loaded the same model,
    e.g. with :func:`~defectkit.pipeline.scoring.worker_model`); the caller starts
    and closes it. None scores in this process alone."""
    monitor = spc if spc is not None else SpcMonitor()
    metrics = _Metrics()

    replay_pending = True

    def replay() -> None:
        """Feed stored results to the charts, once (:func:`replay_results`)."""
        nonlocal replay_pending
        replay_results(store, monitor)
        replay_pending = False

    try:
        replay()
    except DB_UNAVAILABLE as e:  # start anyway: /health says 503 until the database answers
        log.warning("results database unavailable at start (%s); retrying on use", _brief(e))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="defectkit inspection service", lifespan=lifespan)
    app.state.store = store
    app.state.spc = monitor
    app.state.detector = detector

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "missing token: send Authorization: Bearer TOKEN")
        if not hmac.compare_digest(authorization[7:].encode(), token.encode()):
            raise HTTPException(403, "wrong token")

    @app.exception_handler(HTTPException)
    async def _http_error(_req: Request, exc: HTTPException) -> JSONResponse:
        metrics.rejected[exc.status_code] += 1
        headers = dict(exc.headers or {})
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers or None)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeoutError)
    async def _db_down(_req: Request, exc: Exception) -> JSONResponse:
        metrics.rejected[503] += 1
        log.warning("results database unavailable: %s", _brief(exc))
        return JSONResponse(
            {"detail": f"results database unavailable ({_brief(exc)}); retry later"},
            503,
            headers={"Retry-After": str(RETRY_AFTER)},
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.rejected[422] += 1
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems)}, 422)

    def db_down(e: BaseException) -> HTTPException:
        # no row was committed: the client may send the image again, and it is then
        # recorded once
        return HTTPException(
            503,
            f"results database unavailable ({_brief(e)}): the result was not "
            "recorded; send the image again",
            headers={"Retry-After": str(RETRY_AFTER)},
        )

    scorer = UploadScorer(detector, pool)
    storing = threading.Lock()  # rows and charts in the same order; one replay

    def score_and_store(jobs: list[Job]) -> None:
        """One batch (in one of the batcher's threads): decode and score together,
        here or in a worker, then store each and answer it."""
        scored = scorer([(data, name) for data, name, _ in (job.payload for job in jobs)])
        for job, result in zip(jobs, scored, strict=True):
            data, name, meta = job.payload
            if isinstance(result, Unusable):
                problem = f"not a usable image: {result.message}"
                job.future.set_exception(HTTPException(415, problem))
                continue
            try:
                with storing:
                    if replay_pending:  # the database was down at start
                        replay()
                    row, events = store_result(store, monitor, result, data, name, meta)
            except DB_UNAVAILABLE as e:
                job.future.set_exception(db_down(e))
                continue
            with metrics.lock:
                metrics.alarms += len(events)
                verdict = {True: "ng", False: "ok", None: "unknown"}[row.is_defect]
                metrics.inspections[verdict] += 1
            job.future.set_result(row.to_dict())

    # a batch in this process, and one running and one waiting in each worker
    consumers = 1 + 2 * (pool.workers if pool is not None else 0)
    batcher = Batcher(
        score_and_store,
        max_batch=max_batch,
        max_wait=max_wait,
        max_queue=max_queue,
        consumers=consumers,
    )

    @app.post("/inspect", status_code=201, dependencies=[Depends(require_token)])
    async def inspect(
        file: UploadFile,
        line: Annotated[str | None, Form()] = None,
        lot: Annotated[str | None, Form()] = None,
        part_id: Annotated[str | None, Form()] = None,
        product: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
        # the client's file name is kept as a label only; it never reaches the file system
        name = _text((file.filename or "upload")[-MAX_TEXT:], "filename") or "upload"
        meta = {
            "line": _text(line, "line"),
            "lot": _text(lot, "lot"),
            "part_id": _text(part_id, "part_id"),
            "product": _text(product, "product"),
        }
        try:
            future = batcher.submit((data, name, meta))
        except QueueFull as e:
            raise HTTPException(
                429, f"busy: {e}; retry shortly", headers={"Retry-After": "1"}
            ) from None
        rec = await asyncio.wrap_future(future)
        metrics.observe(time.perf_counter() - t0)
        return rec

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if (
            request.method == "POST"
            and size is not None
            and size.isdigit()
            and int(size) > max_upload_bytes + 64 * 1024
        ):
            metrics.rejected[413] += 1
            return JSONResponse({"detail": f"upload larger than {max_upload_bytes} bytes"}, 413)
        return await call_next(request)

    @app.get("/results")
    def results(
        since: str | None = None,
        until: str | None = None,
        line: str | None = None,
        lot: str | None = None,
        product: str | None = None,
        verdict: Annotated[str | None, Query(pattern="^(ok|ng|unknown)$")] = None,
        reviewed: bool | None = None,
        order: Annotated[str, Query(pattern="^(newest|oldest|doubt)$")] = "newest",
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        page = store.query(
            since=_parse_time(since, "since"),
            until=_parse_time(until, "until"),
            line=line,
            lot=lot,
            product=product,
            verdict=verdict,
            reviewed=reviewed,
            order=order,
            limit=limit,
            offset=offset,
        )
        return {
            "total": page.total,
            "limit": limit,
            "offset": offset,
            "items": [r.to_dict() for r in page.items],
        }

    def _row(result_id: int):
        row = store.get(result_id)
        if row is None:
            raise HTTPException(404, f"no result {result_id}")
        return row

    @app.get("/results/{result_id}")
    def result(result_id: int) -> dict[str, Any]:
        return _row(result_id).to_dict()

    @app.get("/results/{result_id}/overlay.png")
    def overlay(result_id: int) -> FileResponse:
        row = _row(result_id)
        if row.overlay_sha256 is None:
            raise HTTPException(404, f"result {result_id} has no overlay")
        return FileResponse(store.blobs.path(row.overlay_sha256, "png"), media_type="image/png")

    @app.get("/results/{result_id}/image")
    def image(result_id: int) -> FileResponse:
        row = _row(result_id)
        media = {"jpg": "image/jpeg", "png": "image/png", "bmp": "image/bmp"}
        return FileResponse(
            store.blobs.path(row.image_sha256, row.image_ext),
            media_type=media.get(row.image_ext, "application/octet-stream"),
        )

    @app.post("/results/{result_id}/review", dependencies=[Depends(require_token)])
    def review(result_id: int, body: Review) -> dict[str, Any]:
        if body.verdict not in ("defect", "good"):
            raise HTTPException(422, f'verdict must be "defect" or "good", got {body.verdict!r}')
        row = store.review(
            result_id,
            body.verdict,
            _text(body.defect_type, "defect_type"),
            body.comment[:2000] if body.comment else None,
        )
        if row is None:
            raise HTTPException(404, f"no result {result_id}")
        with metrics.lock:
            metrics.reviews += 1
        return row.to_dict()

    @app.get("/spc")
    def spc_state(product: str | None = None) -> dict[str, Any]:
        state = charts_state(monitor, product)  # a unified model charts each product apart
        try:
            state["stored_alarms"] = [a.to_dict() for a in store.alarms()]
        except DB_UNAVAILABLE:  # the charts live in memory: still show them
            state["stored_alarms"] = []
            state["stored_alarms_unavailable"] = True
        return state

    @app.get("/model")
    def model_info() -> dict[str, Any]:
        info = detector.describe()
        return {"name": model_name, **info}

    @app.get("/health")
    def health() -> dict[str, Any]:
        try:
            rows = store.count()
        except Exception as e:  # the database is down: say so, with 503
            return JSONResponse({"status": "error", "detail": str(e)}, 503)
        return {"status": "ok", "results": rows, "model": model_name}

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        lines = [
            "# HELP defectkit_inspections_total Images inspected and stored, by verdict.",
            "# TYPE defectkit_inspections_total counter",
        ]
        with metrics.lock:
            for v in ("ok", "ng", "unknown"):
                lines.append(
                    f'defectkit_inspections_total{{verdict="{v}"}} {metrics.inspections[v]}'
                )
            lines += [
                "# HELP defectkit_rejected_requests_total Requests answered with an error.",
                "# TYPE defectkit_rejected_requests_total counter",
            ]
            for code, n in sorted(metrics.rejected.items()):
                lines.append(f'defectkit_rejected_requests_total{{code="{code}"}} {n}')
            lines += [
                "# HELP defectkit_inspect_seconds Time to answer POST /inspect.",
                "# TYPE defectkit_inspect_seconds histogram",
            ]
            cum = 0
            for b, n in zip(LATENCY_BUCKETS, metrics.latency_buckets, strict=False):
                cum += n
                lines.append(f'defectkit_inspect_seconds_bucket{{le="{b}"}} {cum}')
            total = sum(metrics.latency_buckets)
            lines += [
                f'defectkit_inspect_seconds_bucket{{le="+Inf"}} {total}',
                f"defectkit_inspect_seconds_sum {metrics.latency_sum:.6f}",
                f"defectkit_inspect_seconds_count {total}",
                "# HELP defectkit_reviews_total Reviews recorded.",
                "# TYPE defectkit_reviews_total counter",
                f"defectkit_reviews_total {metrics.reviews}",
                "# HELP defectkit_spc_alarms_total SPC alarms raised since start.",
                "# TYPE defectkit_spc_alarms_total counter",
                f"defectkit_spc_alarms_total {metrics.alarms}",
                "# HELP defectkit_queue_depth Inspection requests waiting to be scored.",
                "# TYPE defectkit_queue_depth gauge",
                f"defectkit_queue_depth {batcher.depth}",
                "# HELP defectkit_queue_capacity Requests that may wait before 429.",
                "# TYPE defectkit_queue_capacity gauge",
                f"defectkit_queue_capacity {batcher.max_queue}",
                "# HELP defectkit_scoring_processes Processes scoring (this one and workers).",
                "# TYPE defectkit_scoring_processes gauge",
                f"defectkit_scoring_processes {scorer.processes}",
                "# HELP defectkit_batches_total Batches scored, by process.",
                "# TYPE defectkit_batches_total counter",
                *(
                    f'defectkit_batches_total{{process="{where}"}} {scorer.batches[where]}'
                    for where in ("main", "worker")
                ),
                "# HELP defectkit_batch_size Images scored together, per batch.",
                "# TYPE defectkit_batch_size histogram",
            ]
            sizes = dict(batcher.batch_sizes)
            for b in BATCH_BUCKETS:
                cum = sum(n for k, n in sizes.items() if k <= b)
                lines.append(f'defectkit_batch_size_bucket{{le="{b}"}} {cum}')
            n_batches = sum(sizes.values())
            lines += [
                f'defectkit_batch_size_bucket{{le="+Inf"}} {n_batches}',
                f"defectkit_batch_size_sum {sum(k * n for k, n in sizes.items())}",
                f"defectkit_batch_size_count {n_batches}",
            ]
        try:
            stored = store.count()
        except DB_UNAVAILABLE:  # still answer: the counters above matter most then
            stored = None
        if stored is not None:
            lines += [
                "# HELP defectkit_results_stored Rows in the results table.",
                "# TYPE defectkit_results_stored gauge",
                f"defectkit_results_stored {stored}",
            ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    mount_dashboard(app)
    return app

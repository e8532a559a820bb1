"""The dashboard: pages (plain HTML, CSS and JavaScript in ``static/``; no build
step) served at ``/dashboard/``, and the read endpoints only they need.

- ``GET /summary?window=S&line=&lot=&product=``: the header's figures over the
  last ``S`` seconds (an hour, a shift): parts, yield, NG rate, parts per minute
  (over the window and over the last five minutes), alarms, and per line and lot
- ``GET /facets``: lines, lots, products and defect types seen, plus the defect
  types the model's classifier knows (the filters' and the review form's choices)
- ``GET /spc/scores.svg``, ``GET /spc/p.svg`` (``product``: a unified model
  charts each product apart): the control charts (:mod:`defectkit.serve.charts`)
- ``GET /results/{id}/closest-good.png``: the good training patch nearest to the
  image's worst patch (from the model's memory; read from the training image,
  which must still be where the model was fitted), and
  ``GET /results/{id}/worst-patch.png``: that worst patch of the image itself

Writes (upload, review) go through the service's own endpoints with the token
typed into the page (kept in the browser's localStorage).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path as FilePath
from typing import Annotated, Any

import cv2
import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from defectkit.data.images import decode_image_bytes, load_image
from defectkit.detector import grid_cell_box
from defectkit.errors import ImageError
from defectkit.serve.charts import p_chart_svg, scores_svg
from defectkit.serve.spc import SpcMonitor
from defectkit.serve.store import ResultStore, utcnow

STATIC = FilePath(__file__).resolve().parent / "static"
#: side of the patch images in the detail view, pixels
PATCH_PX = 160
#: the last minutes whose rate the header calls "now"
NOW_MINUTES = 5

router = APIRouter()


def _store(request: Request) -> ResultStore:
    return request.app.state.store


@router.get("/summary")
def summary(
    request: Request,
    window: Annotated[int, Query(ge=60, le=31 * 86400)] = 3600,
    line: str | None = None,
    lot: str | None = None,
    product: str | None = None,
) -> dict[str, Any]:
    store, now = _store(request), utcnow()
    out = store.summary(now - timedelta(seconds=window), line=line, lot=lot, product=product)
    recent = store.summary(
        now - timedelta(minutes=NOW_MINUTES), line=line, lot=lot, product=product, top=0
    )
    decided = out["ok"] + out["ng"]
    out.update(
        window_s=window,
        until=now.isoformat() + "Z",
        yield_=None if decided == 0 else out["ok"] / decided,
        ng_rate=None if decided == 0 else out["ng"] / decided,
        per_minute=out["n"] / (window / 60),
        per_minute_now=recent["n"] / NOW_MINUTES,
    )
    out["yield"] = out.pop("yield_")
    return out


@router.get("/facets")
def facets(request: Request) -> dict[str, Any]:
    out = _store(request).facets()
    clf = getattr(request.app.state.detector, "classifier", None)
    known = [str(c) for c in getattr(clf, "classes_", [])] if clf is not None else []
    out["model_defect_types"] = known
    out["defect_types"] = sorted(set(known) | set(out["defect_types"]))
    return out


def _svg(text: str) -> Response:
    return Response(text, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


def spc_state(monitor: SpcMonitor, product: str | None) -> dict[str, Any]:
    """The SPC state of ``product``'s charts (a unified model charts each product
    apart), or of the results without a product; 404 for a product without charts."""
    charts = monitor.charts_of(product)
    if charts is None:
        raise HTTPException(404, f"no control charts for product {product!r} yet")
    return charts.state()


@router.get("/spc/{chart}.svg")
def chart_svg(
    request: Request,
    chart: Annotated[str, Path(pattern="^(scores|p)$")],
    product: str | None = None,
    width: Annotated[int, Query(ge=200, le=4000)] = 640,
    height: Annotated[int, Query(ge=120, le=2000)] = 240,
) -> Response:
    """``scores``: the good parts' scores (EWMA); ``p``: the p-chart."""
    state = spc_state(request.app.state.spc, product)
    if chart == "scores":
        return _svg(scores_svg(state["scores"], state["alarms"], width=width, height=height))
    return _svg(p_chart_svg(state["p_chart"], width=width, height=height))


def patch_png(image: np.ndarray, bbox: list[int], side: int = PATCH_PX) -> bytes:
    """A crop around ``bbox`` (x, y, w, h) with three times its size of context
    (at least 48 px, at most the image), the box drawn in, its longer side
    scaled to ``side`` pixels."""
    x, y, w, h = bbox
    H, W = image.shape[:2]
    side_w = min(W, max(48, 3 * w, 3 * h))
    side_h = min(H, max(48, 3 * w, 3 * h))
    # the window keeps its size at the image's edges: it slides inwards
    x0 = int(min(max(0, x + w / 2 - side_w / 2), W - side_w))
    y0 = int(min(max(0, y + h / 2 - side_h / 2), H - side_h))
    x1, y1 = x0 + side_w, y0 + side_h
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    scale = side / max(crop.shape[:2])
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    p0 = (round((x - x0) * scale), round((y - y0) * scale))
    p1 = (round((x + w - x0) * scale) - 1, round((y + h - y0) * scale) - 1)
    cv2.rectangle(crop, p0, p1, (255, 200, 0), 2)
    ok, buf = cv2.imencode(".png", crop[:, :, ::-1])
    assert ok
    return buf.tobytes()


def _record(request: Request, result_id: int) -> tuple[Any, dict[str, Any]]:
    row = _store(request).get(result_id)
    if row is None:
        raise HTTPException(404, f"no result {result_id}")
    return row, row.record


@router.get("/results/{result_id}/closest-good.png")
def closest_good(request: Request, result_id: int) -> Response:
    _, rec = _record(request, result_id)
    good = rec.get("closest_good")
    if not good or not good.get("bbox"):
        raise HTTPException(
            404, f"result {result_id} names no closest good patch (the method keeps no memory)"
        )
    try:
        image = load_image(good["path"])
    except ImageError as e:
        raise HTTPException(404, f"training image not readable here: {e}") from None
    return Response(patch_png(image, good["bbox"]), media_type="image/png")


@router.get("/results/{result_id}/worst-patch.png")
def worst_patch(request: Request, result_id: int) -> Response:
    row, rec = _record(request, result_id)
    ev = rec.get("evidence") or {}
    cell, grid = ev.get("worst_patch"), ev.get("grid")
    if not cell or not grid or min(grid) <= 0:
        raise HTTPException(404, f"result {result_id} names no worst patch")
    store = _store(request)
    data = store.blobs.get(row.image_sha256, row.image_ext)
    image = decode_image_bytes(data, f"result {result_id}")
    bbox = grid_cell_box(cell[0], cell[1], grid, image.shape[0], image.shape[1])
    return Response(patch_png(image, bbox), media_type="image/png")


def mount(app: FastAPI) -> None:
    """The dashboard's endpoints and pages on ``app`` (whose state holds the
    store, the SPC monitor and the detector, as ``create_app`` sets them)."""
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    def _root() -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    app.mount("/dashboard", StaticFiles(directory=STATIC, html=True), name="dashboard")

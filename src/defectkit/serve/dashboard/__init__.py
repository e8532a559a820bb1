"""Dashboard pages (plain HTML, CSS and JavaScript; no build step), served by the
service at ``/dashboard/``: live feed with overlays, control charts and alarms,
review queue, model info. They read the JSON endpoints; writes send the token
typed into the page (kept in the browser's localStorage)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent


def mount(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def _root() -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    app.mount("/dashboard", StaticFiles(directory=STATIC, html=True), name="dashboard")

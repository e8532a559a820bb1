"""``defectkit serve``: start the worker processes, open the store, load the
model, run uvicorn."""

from __future__ import annotations

import logging
import os
import secrets
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("defectkit-results")


def default_db_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'results.db'}"


def serve(
    model: Path,
    *,
    db: str | None,
    data_dir: Path,
    host: str,
    port: int,
    token: str | None,
    max_upload_mb: float,
    webhook: str | None,
    baseline: int,
    threads: int,
    precision: str = "float32",
    batching: dict[str, Any] | None = None,
    mqtt: str | None = None,
    jobs: int = 0,
) -> None:
    """``jobs``: processes scoring, this one included (0: one per usable core);
    above 1, every process scores on one torch thread and ``threads`` is unused."""
    import uvicorn

    from defectkit.pipeline.scoring import stream_model
    from defectkit.serve.app import create_app
    from defectkit.serve.spc import SpcMonitor
    from defectkit.serve.store import ResultStore

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    token = token or os.environ.get("DEFECTKIT_TOKEN")
    if not token:
        token = secrets.token_urlsafe(24)
        print(
            f"no --token or DEFECTKIT_TOKEN given; write token for this run: {token}",
            file=sys.stderr,
        )
    # a model file, or an ONNX bundle folder from `defectkit export` (onnxruntime)
    from defectkit.serve.mqtt import Broker, MqttPublisher

    broker = None if mqtt is None else Broker.parse(mqtt)  # checked before any work
    with ExitStack() as stack:
        pool, det = stack.enter_context(stream_model(model, jobs, precision, threads))
        store = ResultStore.open(db or default_db_url(data_dir), data_dir / "blobs")
        stack.callback(store.close)
        publisher = None if broker is None else MqttPublisher(broker, store).start()
        if publisher is not None:
            stack.callback(publisher.stop)
        app = create_app(
            det,
            store,
            token=token,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            spc=SpcMonitor(baseline=baseline, webhook_url=webhook),
            model_name=model.name,
            pool=pool,
            **(batching or {}),
        )
        uvicorn.run(app, host=host, port=port, log_level="warning")

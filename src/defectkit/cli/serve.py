"""``defectkit serve`` (the inspection service and dashboard) and
``defectkit export-labels`` (its reviewed results as a labelled set)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from defectkit.cli.common import PRECISION_HELP, STREAM_JOBS_HELP, command, err, fail, out

#: the results database, shared by the service and what reads its results
DbOption = Annotated[
    str | None,
    typer.Option(help="database URL (postgresql://...); default SQLite in --data-dir"),
]

JobsOption = Annotated[int, typer.Option(help=STREAM_JOBS_HELP, min=0)]

MqttOption = Annotated[
    str | None,
    typer.Option(
        help="also publish results and SPC alarms to mqtt://host[:port]/topic (QoS 1, "
        "at least once with the result id; unsent messages wait in the database)"
    ),
]


@command()
def serve(
    model: Annotated[
        Path, typer.Argument(help="model file from `defectkit fit`, or an ONNX bundle folder")
    ],
    db: DbOption = None,
    data_dir: Annotated[
        Path, typer.Option(help="SQLite file and stored images and overlays (by hash)")
    ] = Path("defectkit-results"),
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    token: Annotated[
        str | None, typer.Option(help="API token for write endpoints (or env DEFECTKIT_TOKEN)")
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(help="largest accepted upload, MiB")] = 20.0,
    webhook: Annotated[str | None, typer.Option(help="URL to POST SPC alarms to")] = None,
    spc_baseline: Annotated[int, typer.Option(help="good parts that set the SPC baseline")] = 100,
    threads: Annotated[int, typer.Option(help="torch threads with --jobs 1")] = 2,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "float32",
    jobs: JobsOption = 0,
    max_queue: Annotated[
        int, typer.Option(help="requests that may wait to be scored; beyond it 429", min=1)
    ] = 64,
    max_batch: Annotated[
        int, typer.Option(help="images scored together at most (micro-batching)", min=1)
    ] = 16,
    batch_wait_ms: Annotated[
        float, typer.Option(help="ms a lone request waits for others to join its batch", min=0)
    ] = 5.0,
    mqtt: MqttOption = None,
) -> None:
    """Run the inspection service and dashboard (see defectkit/serve/app.py)."""
    from defectkit.export.onnx_bundle import is_bundle
    from defectkit.serve.runner import serve as run_service

    if not (model.is_file() or is_bundle(model)):
        raise fail(f"{model}: no such model file or ONNX bundle folder")
    if max_upload_mb <= 0 or spc_baseline < 5:
        raise fail("--max-upload-mb must be > 0 and --spc-baseline at least 5")
    run_service(
        model,
        db=db,
        data_dir=data_dir,
        host=host,
        port=port,
        token=token,
        max_upload_mb=max_upload_mb,
        webhook=webhook,
        baseline=spc_baseline,
        threads=threads,
        precision=precision,
        batching={"max_queue": max_queue, "max_batch": max_batch, "max_wait": batch_wait_ms / 1e3},
        mqtt=mqtt,
        jobs=jobs,
    )


@command("export-labels")
def export_labels(
    out_dir: Annotated[
        Path, typer.Argument(help="folder to write <class>/<id>.<ext> and labels.csv")
    ],
    db: DbOption = None,
    data_dir: Annotated[
        Path, typer.Option(help="the service's --data-dir (SQLite file, stored images)")
    ] = Path("defectkit-results"),
) -> None:
    """Write reviewed results of the service as a labelled dataset (class folders + CSV)."""
    from defectkit.serve.export import export_labels as run_export
    from defectkit.serve.runner import default_db_url
    from defectkit.serve.store import ResultStore

    if db is None and not (data_dir / "results.db").is_file():
        raise fail(f"{data_dir / 'results.db'}: no results database (give --data-dir or --db)")
    store = ResultStore.open(db or default_db_url(data_dir), data_dir / "blobs")
    try:
        counts = run_export(store, out_dir)
    finally:
        store.close()
    total = sum(counts.values())
    out.print(f"{total} reviewed image(s) written to {out_dir}: {counts}")


@command()
def watch(
    model: Annotated[
        Path, typer.Argument(help="model file from `defectkit fit`, or an ONNX bundle folder")
    ],
    folder: Annotated[Path, typer.Argument(help="hot folder the camera writes images to")],
    db: DbOption = None,
    data_dir: Annotated[
        Path, typer.Option(help="SQLite file and stored images and overlays (by hash)")
    ] = Path("defectkit-results"),
    move_to: Annotated[
        Path | None,
        typer.Option(help="move each inspected file to MOVE_TO/ok, /ng or /error"),
    ] = None,
    settle: Annotated[
        float,
        typer.Option(
            help="seconds a file's size must stay unchanged before it is read (or write "
            "NAME.done beside it)"
        ),
    ] = 1.0,
    poll: Annotated[float, typer.Option(help="seconds between looks at the folder")] = 0.5,
    line: Annotated[str | None, typer.Option(help="production line stored with results")] = None,
    lot: Annotated[str | None, typer.Option(help="lot stored with results")] = None,
    once: Annotated[
        bool, typer.Option("--once", help="inspect what is complete now, then exit")
    ] = False,
    threads: Annotated[int, typer.Option(help="torch threads with --jobs 1")] = 2,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "float32",
    jobs: JobsOption = 0,
    mqtt: MqttOption = None,
) -> None:
    """Inspect every image that appears in FOLDER once, store it as `serve` does
    (same database, dashboard and SPC), print one JSON line per file."""
    import json
    import logging
    import sys
    import threading
    from contextlib import ExitStack

    from defectkit.pipeline.scoring import stream_model
    from defectkit.serve.mqtt import Broker, MqttPublisher
    from defectkit.serve.runner import default_db_url
    from defectkit.serve.store import ResultStore
    from defectkit.serve.watch import HotFolder, Outcome, WatchSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not (model.is_file() or model.is_dir()):
        raise fail(f"{model}: no such model file or ONNX bundle folder")
    # --once reads what is there now: nothing is still being written
    settings = WatchSettings(
        folder,
        move_to=move_to,
        settle_seconds=0.0 if once else settle,
        poll_seconds=poll,
        line=line,
        lot=lot,
    )
    broker = None if mqtt is None else Broker.parse(mqtt)

    def say(outcome: Outcome) -> None:
        sys.stdout.write(json.dumps(outcome.to_dict()) + "\n")
        sys.stdout.flush()

    with ExitStack() as stack:
        pool, det = stack.enter_context(stream_model(model, jobs, precision, threads))
        store = ResultStore.open(db or default_db_url(data_dir), data_dir / "blobs")
        stack.callback(store.close)
        if broker is not None:
            stack.callback(MqttPublisher(broker, store).start().stop)
        hot = HotFolder(det, store, settings, pool=pool)
        try:
            if once:
                for outcome in hot.step():
                    say(outcome)
            else:
                hot.run(threading.Event(), on_outcome=say)
        except KeyboardInterrupt:
            pass
    counts = ", ".join(f"{n} {k}" for k, n in sorted(hot.counts.items())) or "nothing"
    err.print(f"watch: {counts}", highlight=False)

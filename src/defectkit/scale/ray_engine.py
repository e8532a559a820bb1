"""Batch inspection on a Ray cluster (``defectkit inspect --engine ray``).

Ray Data reads the list of input paths and scores them with a fixed pool of
actors (``map_batches`` with a callable class): each actor loads the model once
and turns a batch of paths into result rows. A file that cannot be read or
scored becomes a row with its ``error``; the job itself does not fail. Rows come
back to the driver in input order as Arrow tables, with the full result object
(the same JSON as a line of the local ``inspect``) in the ``record`` column.

Input files and the model file must be readable at the same path on every node
(a shared file system); paths are made absolute on the driver.

Ray is optional: ``pip install 'defectkit[ray]'``.

>>> for table in inspect_paths("part.dkm", paths, workers=4):  # doctest: +SKIP
...     for line in table.column("record").to_pylist():
...         print(line)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectkit.errors import ConfigError

INSTALL_HINT = "pip install 'defectkit[ray]'"

#: Columns of the result tables (and of the Parquet file), in order: ``index`` is
#: the position in the list of image files (-1 for an input that does not exist),
#: ``record`` the whole result object as JSON, the others copies of its fields
#: (``n_regions``: length of ``regions``).
COLUMNS = (
    "index",
    "path",
    "score",
    "is_defect",
    "threshold",
    "error",
    "severity",
    "n_regions",
    "width",
    "height",
    "defect_type",
    "record",
)


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a ConfigError saying how to install it."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data
    except ImportError as e:
        raise ConfigError(
            f"--engine ray needs Ray Data and pyarrow ({e.name} is missing): {INSTALL_HINT}"
        ) from None
    return ray


def result_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("index", pa.int64()),
            ("path", pa.string()),
            ("score", pa.float64()),
            ("is_defect", pa.bool_()),
            ("threshold", pa.float64()),
            ("error", pa.string()),
            ("severity", pa.string()),
            ("n_regions", pa.int32()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("defect_type", pa.string()),
            ("record", pa.string()),
        ]
    )


def records_table(indices: Sequence[int], records: Sequence[dict[str, Any]]) -> Any:
    """An Arrow table of result rows: flat columns plus the whole record as JSON."""
    import pyarrow as pa

    regions = [r.get("regions") for r in records]
    cols: dict[str, list[Any]] = {
        "index": [int(i) for i in indices],
        "path": [r["path"] for r in records],
        "score": [r.get("score") for r in records],
        "is_defect": [r.get("is_defect") for r in records],
        "threshold": [r.get("threshold") for r in records],
        "error": [r.get("error") for r in records],
        "severity": [r.get("severity") for r in records],
        "n_regions": [None if g is None else len(g) for g in regions],
        "width": [r.get("width") for r in records],
        "height": [r.get("height") for r in records],
        "defect_type": [r.get("defect_type") for r in records],
        "record": [json.dumps(r) for r in records],
    }
    return pa.Table.from_pydict(cols, schema=result_schema())


class InspectActor:
    """One Ray actor: loads the model once, then scores batches of paths.

    Batches are ``{"index", "path", "file"}`` columns (``path`` as given, written
    in the records; ``file`` absolute, read here).
    """

    def __init__(
        self,
        model: str,
        mm_per_pixel: float | None = None,
        rules: Any = None,
        maps_out: str | None = None,
        maps_shown: str | None = None,
        threads: int = 1,
        precision: str = "float32",
    ) -> None:
        import torch

        from defectkit.pipeline import load_detector

        torch.set_num_threads(max(1, threads))
        self.det = load_detector(model, "torch", precision)
        self.mm_per_pixel = mm_per_pixel
        self.rules = rules
        self.maps_out = None if maps_out is None else Path(maps_out)
        self.maps_shown = None if maps_shown is None else Path(maps_shown)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        from defectkit.data.batches import iter_batches
        from defectkit.decide.records import failed_record

        indices = [int(i) for i in batch["index"]]
        names = [str(p) for p in batch["path"]]
        files = [Path(str(f)) for f in batch["file"]]
        items = next(iter_batches(files, len(files)))
        try:
            records = self._inspect(items, names, indices)
        except Exception:  # one bad image must not fail its batch: score one by one
            records = []
            for item, name, index in zip(items, names, indices, strict=True):
                try:
                    records.extend(self._inspect([item], [name], [index]))
                except Exception as e:
                    problem = f"scoring failed: {type(e).__name__}: {e}"
                    records.append(failed_record(self.det, name, problem))
        return records_table(indices, records)

    def _inspect(self, items: list[Any], names: list[str], indices: list[int]) -> list[Any]:
        from defectkit.decide.records import inspect_loaded

        return inspect_loaded(
            self.det,
            items,
            names,
            mm_per_pixel=self.mm_per_pixel,
            rules=self.rules,
            maps_out=self.maps_out,
            maps_shown=self.maps_shown,
            numbers=[i + 1 for i in indices],
        )


def inspect_paths(
    model: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]],
    *,
    workers: int = 1,
    address: str | None = None,
    batch_size: int = 16,
    cpus_per_worker: int = 1,
    mm_per_pixel: float | None = None,
    rules: Any = None,
    maps_out: str | os.PathLike[str] | None = None,
    progress_bars: bool = False,
    precision: str = "float32",
) -> Iterator[Any]:
    """Score ``paths`` on Ray with ``workers`` actors; yields Arrow tables of
    result rows (columns :data:`COLUMNS`) in input order.

    Connects to ``address`` (``auto``, ``ray://host:10001``, ...) or starts a
    local Ray instance, unless Ray is already initialised in this process (then
    it is used as it is and left running). Each actor reserves
    ``cpus_per_worker`` CPUs and uses as many torch threads, and runs the
    backbone in ``precision`` (see :meth:`Detector.set_precision`).
    """
    if workers < 1 or cpus_per_worker < 1 or batch_size < 1:
        raise ConfigError("workers, cpus_per_worker and batch_size must be >= 1")
    ray = import_ray()
    if not paths:
        return
    started = False
    if not ray.is_initialized():
        # worker output must not reach stdout (it carries the results)
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        started = True
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    try:
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = progress_bars
        items = [
            {"index": i, "path": str(p), "file": os.path.abspath(p)} for i, p in enumerate(paths)
        ]
        n_blocks = max(1, min(len(items), -(-len(items) // batch_size)))
        ds = ray.data.from_items(items, override_num_blocks=n_blocks)
        maps_abs = None if maps_out is None else os.path.abspath(maps_out)
        ds = ds.map_batches(
            InspectActor,
            fn_constructor_kwargs={
                "model": os.path.abspath(model),
                "mm_per_pixel": mm_per_pixel,
                "rules": rules,
                "maps_out": maps_abs,
                "maps_shown": None if maps_out is None else str(maps_out),
                "threads": cpus_per_worker,
                "precision": precision,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
        )
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if table.num_rows:
                yield table
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()


class ResultSinks:
    """Where result rows go besides stdout: a Parquet file and/or the results
    database of ``defectkit serve`` (:class:`~defectkit.serve.store.ResultStore`).

    Rows with an error go to Parquet but not to the database (a stored result
    needs its image). Use as a context manager; the Parquet file is complete
    only after it closes.
    """

    def __init__(
        self,
        parquet: str | os.PathLike[str] | None = None,
        db: str | None = None,
        data_dir: str | os.PathLike[str] = "defectkit-results",
    ) -> None:
        self.parquet = None if parquet is None else Path(parquet)
        self.db = db
        self.data_dir = Path(data_dir)
        self._writer: Any = None
        self._store: Any = None
        self.n_stored = 0

    def __enter__(self) -> ResultSinks:
        if self.parquet is not None:
            import pyarrow.parquet as pq

            self.parquet.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.parquet, result_schema())
        if self.db is not None:
            from defectkit.serve.store import ResultStore

            self._store = ResultStore.open(self.db, self.data_dir / "blobs")
        return self

    def write(self, table: Any, files: Sequence[str | os.PathLike[str]] | None = None) -> None:
        """Append rows; ``files`` (one per row) are read for the database's copy
        of each image (default: the row's path)."""
        if self._writer is not None:
            self._writer.write_table(table)
        if self._store is not None:
            records = table.column("record").to_pylist()
            for k, line in enumerate(records):
                rec = json.loads(line)
                if rec.get("error") is not None:
                    continue
                src = Path(files[k] if files is not None else rec["path"])
                self._store.add(rec, src.read_bytes(), None, filename=rec["path"])
                self.n_stored += 1

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._store is not None:
            self._store.close()

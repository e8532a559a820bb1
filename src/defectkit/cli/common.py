"""What every command shares: the Typer app, the consoles, the one handler that
turns library errors into exit code 2, progress bars, flag parsing and output."""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from defectkit.errors import DefectkitError
from defectkit.scale.local_pool import MAX_AUTO_JOBS, MIN_IMAGES_FOR_WORKERS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="defectkit: learn from good parts, inspect new ones, evaluate.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)

EXIT_FILES_FAILED = 1
EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])

MM_PER_PIXEL_HELP = "pixel size in mm, to give region areas in mm^2"
SEVERITY_RULES_HELP = "JSON or TOML file of severity rules (see decide/severity.py)"
RUNTIME_HELP = "auto (onnx for a bundle folder from `defectkit export`), torch or onnx"
PRECISION_HELP = (
    "backbone arithmetic when scoring: float32, or bfloat16 (torch runtime, patchcore/padim/"
    "kmeans, CPUs with AVX512-BF16 or AMX; 1.2x faster inspect on magnetic-tile, see "
    "BENCHMARKS.md)"
)
JOBS_HELP = (
    "local processes, one torch thread each (0: one per CPU core, at most "
    f"{MAX_AUTO_JOBS}, from {MIN_IMAGES_FOR_WORKERS} images on; 1: this process alone, "
    "all cores)"
)
#: --jobs of the commands that score a stream (serve, watch)
STREAM_JOBS_HELP = (
    "processes scoring, this one included, one torch thread each (0: one per CPU core, "
    f"at most {MAX_AUTO_JOBS}; 1: this process alone, on --threads threads)"
)
OVERLAP_HELP = "px shared by neighbouring tiles (default tile/8)"
BLEND_HELP = "stitching of overlaps: max or mean"


def shown(text: object) -> str:
    """Text (often a file name) safe to print with Rich: markup such as ``[/]`` in a
    name escaped, and bytes of a name that are not UTF-8 (surrogates) shown as
    backslash escapes instead of failing with UnicodeEncodeError."""
    s = str(text)
    try:
        s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return escape(s)


def fail(message: str) -> typer.Exit:
    """Print ``message`` as an error; the exit (code 2) to raise."""
    # one line, never wrapped: an error naming a long path must stay greppable
    err.print(f"[bold red]error:[/] {shown(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_USAGE)


def command(name: str | None = None) -> Callable[[F], F]:
    """Register a command whose library errors (bad settings, data or model file)
    end it with their message and exit code 2: the one error handler."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except DefectkitError as e:
                raise fail(str(e)) from None

        app.command(name)(run)
        return fn

    return register


def write_error(path: Path, e: OSError) -> str:
    """Message for a model file that could not be written (writes are atomic)."""
    return (
        f"{path}: cannot write the model file ({e.strerror or e}); "
        "a model file already there is left unchanged"
    )


def skipped(errors: list[tuple[Path, str]]) -> None:
    for p, problem in errors:
        err.print(f"[yellow]skipped[/] {shown(p)}: {shown(problem)}", highlight=False)


def warn_calibration(thr: Any) -> None:
    """Warn on stderr when a threshold's held-out images cannot certify its target."""
    from defectkit.decide.calibration import calibration_warning

    warning = calibration_warning(thr)
    if warning is not None:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """A Rich progress bar on stderr; yields a (stage, done, total) callback."""
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def parse_params(items: list[str] | None, flag: str = "--param") -> dict[str, Any]:
    """NAME=VALUE flags as a dict; values parsed as JSON where they are JSON."""
    params: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise fail(f"{flag} expects NAME=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def tiling_option(tile: int | None, overlap: int | None, blend: str) -> Any:
    """The --tile flags as a :class:`~defectkit.tiling.Tiling`; None without --tile."""
    from defectkit.tiling import BLENDS, Tiling

    if tile is None:
        if overlap is not None:
            raise fail("--tile-overlap needs --tile")
        return None
    if blend not in BLENDS:
        raise fail(f"--tile-blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    return Tiling(tile, overlap, blend)


def decision_options(mm_per_pixel: float | None, severity_rules: Path | None) -> Any:
    """Validate --mm-per-pixel and --severity-rules before any long work."""
    from defectkit.decide.severity import DEFAULT_RULES, load_severity_rules

    if mm_per_pixel is not None and not (mm_per_pixel > 0 and math.isfinite(mm_per_pixel)):
        raise fail(f"--mm-per-pixel must be a number > 0, got {mm_per_pixel}")
    rules = DEFAULT_RULES if severity_rules is None else load_severity_rules(severity_rules)
    if rules.needs_mm and mm_per_pixel is None:
        raise fail(f"{severity_rules}: the severity rules use min_area_mm2; give --mm-per-pixel")
    return rules


def check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise fail(f"--format must be {' or '.join(allowed)}, got {fmt!r}")


def json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def strict_json(o: Any) -> Any:
    """``o`` with every NaN or infinite float (an undefined metric, e.g. AUROC without
    defective images) as None: JSON has no NaN, and strict parsers refuse it."""
    if isinstance(o, dict):
        return {k: strict_json(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [strict_json(v) for v in o]
    if isinstance(o, float | np.floating) and not math.isfinite(float(o)):
        return None
    return o


def print_json(o: Any, *, indent: int | None = None) -> None:
    """One JSON document on stdout, NaN as null."""
    sys.stdout.write(
        json.dumps(strict_json(o), default=json_default, allow_nan=False, indent=indent) + "\n"
    )


def two_column_table(rows: Any, title: str, header: tuple[str, str] = ("metric", "value")) -> Table:
    table = Table(*header, title=title)
    for name, value in rows:
        table.add_row(name, value)
    return table

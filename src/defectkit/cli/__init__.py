"""The ``defectkit`` command line: thin shells over :mod:`defectkit.pipeline`.
stdout carries results (tables or JSON lines); progress bars and messages go to
stderr.

Exit codes: 0 success; 1 some input files failed (the rest were processed);
2 bad usage, settings, dataset or model file.

One module per command group: ``fit``, ``inspect``, ``evaluate`` (and ``report``),
``calibrate``, ``serve`` (and ``export-labels``, ``watch``), ``tools`` (``methods``,
``info``, ``export``, ``demo``); ``common`` holds the app and what they share.
"""

from __future__ import annotations

import os

# Spinning OpenMP threads collapse throughput (to ~2 images/s) when another
# process shares the cores, as on a line PC; passive waiting costs ~15% when idle.
# Set before torch is first imported (all heavy imports are lazy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from defectkit.cli import calibrate, evaluate, fit, inspect, serve, tools
from defectkit.cli.common import EXIT_FILES_FAILED, EXIT_USAGE, app

__all__ = [
    "EXIT_FILES_FAILED",
    "EXIT_USAGE",
    "app",
    "calibrate",
    "evaluate",
    "fit",
    "inspect",
    "serve",
    "tools",
]

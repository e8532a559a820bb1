"""Atomic writes: content, file mode, and leftovers of killed writers."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np

from defectkit.atomic import STALE_SECONDS, remove_stale, temp_sibling, write_bytes, write_text
from defectkit.data.images import save_png
from defectkit.model_file import ModelFile, write_model


def _leftover(target: Path, age: float, folder: bool = False) -> Path:
    """A temporary as a writer killed ``age`` seconds ago would have left it."""
    p = temp_sibling(target, sweep=False)
    if folder:
        p.mkdir()
        (p / "extractor.onnx").write_bytes(b"half")
    else:
        p.write_bytes(b"half a model")
    then = time.time() - age
    os.utime(p, (then, then))
    return p


def test_write_replaces_the_content_and_leaves_nothing_beside(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.dkm"
    write_bytes(target, b"one")
    write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.dkm"]


def test_the_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_bytes(tmp_path / "m.dkm", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_a_killed_writers_leftovers_go_with_the_next_write_once_stale(tmp_path: Path) -> None:
    target = tmp_path / "m.dkm"
    stale = _leftover(target, STALE_SECONDS + 60)
    stale_bundle = _leftover(target, STALE_SECONDS + 60, folder=True)
    recent = _leftover(target, 60)  # perhaps a writer still at work: kept
    other = _leftover(tmp_path / "other.dkm", STALE_SECONDS + 60)  # another target's
    write_model(target, ModelFile(info={"method": "x"}, arrays={"a": np.ones(2)}))
    assert not stale.exists() and not stale_bundle.exists()
    assert recent.exists() and other.exists()
    assert remove_stale(tmp_path / "other.dkm") == [other]


def test_overlays_do_not_sweep(tmp_path: Path) -> None:
    target = tmp_path / "000001_a_overlay.png"
    stale = _leftover(target, STALE_SECONDS + 60)
    save_png(target, np.zeros((4, 4), np.uint8))
    assert stale.exists()  # many overlays share a folder: no listing per file

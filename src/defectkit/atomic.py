"""Atomic writes: a hidden temporary sibling, renamed over the target when done.

Readers see the old file or the new one, never half of one. A writer killed
outright (SIGKILL, power loss) cannot remove its temporary; the next write to
the same target removes such leftovers once they are an hour old (no live
writer takes that long), so a line PC that refits a model every night does not
collect them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import time
from pathlib import Path

#: Leftover temporaries older than this are removed by the next write.
STALE_SECONDS = 3600


def temp_sibling(path: str | os.PathLike[str], *, sweep: bool = True) -> Path:
    """A new hidden name beside ``path`` (``.NAME.RANDOM.tmp``), its folder made.
    With ``sweep``, stale leftovers of earlier writes to ``path`` go first (leave
    it off for many small files in one folder, e.g. overlays: each sweep lists
    the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_stale(path)
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def remove_stale(path: str | os.PathLike[str], max_age: float = STALE_SECONDS) -> list[Path]:
    """Remove leftover temporaries of ``path`` older than ``max_age`` seconds;
    returns those removed."""
    path = Path(path)
    cutoff = time.time() - max_age
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if p.lstat().st_mtime >= cutoff:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; with ``durable``, fsync the file and
    its folder so the new content survives a power cut.

    Not ``tempfile.mkstemp``: its files are 0600 whatever the umask, and the
    target would keep that mode, unreadable to an inspection service run as
    another user. ``os.open`` with 0o666 leaves the mode to the umask.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_folder(path.parent)
    return path


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make renames in ``folder`` durable, where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> Path:
    """``write_bytes`` of ``text`` in UTF-8."""
    return write_bytes(path, text.encode("utf-8"), durable=durable)

"""Errors with messages a line operator can act on."""

from __future__ import annotations

from pathlib import Path


class DefectkitError(Exception):
    """Base class: every error defectkit raises on purpose."""


class ImageError(DefectkitError):
    """One image could not be used; names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self) -> tuple[type[ImageError], tuple[str | None, str]]:
        # rebuilt from both arguments: raised in a worker process, it arrives whole
        return type(self), (self.path, self.problem)


class DatasetError(DefectkitError):
    """A dataset folder or manifest is unusable (empty, wrong layout, bad masks)."""


class ModelFileError(DefectkitError):
    """A model file is missing, truncated, tampered with or of the wrong version."""


class ConfigError(DefectkitError):
    """Settings that cannot work together or name something unknown."""

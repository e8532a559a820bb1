"""Severity grades of defect regions (``minor`` / ``major`` / ``critical``) from
small rules a quality engineer can set in a JSON or TOML file.

A rules file names the conditions of the two upper grades; a region gets the
worst grade any of whose conditions it meets (``match = "all"`` asks for all of
them), else ``minor``. Conditions:

* ``min_area_px``: area in pixels >= this
* ``min_area_mm2``: area in mm^2 >= this (needs ``--mm-per-pixel``)
* ``min_area_fraction``: area / image area >= this (in (0, 1])
* ``min_score_ratio``: region's max score / the threshold the region was cut at >= this

Example (TOML)::

    [major]
    min_area_mm2 = 1.0
    min_score_ratio = 1.5

    [critical]
    min_area_mm2 = 5.0
    min_score_ratio = 2.0

A file replaces the defaults: a grade the file does not name is never given.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectkit.errors import ConfigError

__all__ = ["DEFAULT_RULES", "GRADES", "GradeRule", "SeverityRules", "load_severity_rules"]

#: grades from mildest to worst
GRADES: tuple[str, ...] = ("minor", "major", "critical")
_CONDITIONS = ("min_area_px", "min_area_mm2", "min_area_fraction", "min_score_ratio")


@dataclass(frozen=True)
class GradeRule:
    """Conditions of one grade; a region meets the rule when any (or all) of the
    conditions that are set hold. A rule with no condition never matches."""

    min_area_px: float | None = None
    min_area_mm2: float | None = None
    min_area_fraction: float | None = None
    min_score_ratio: float | None = None
    match: str = "any"

    def conditions(self) -> dict[str, float]:
        return {k: v for k in _CONDITIONS if (v := getattr(self, k)) is not None}

    def matches(
        self, *, area_px: float, area_mm2: float | None, area_fraction: float, score_ratio: float
    ) -> bool:
        values = {
            "min_area_px": area_px,
            "min_area_mm2": area_mm2,
            "min_area_fraction": area_fraction,
            "min_score_ratio": score_ratio,
        }
        hits = [
            values[k] is not None and values[k] >= limit for k, limit in self.conditions().items()
        ]
        if not hits:
            return False
        return all(hits) if self.match == "all" else any(hits)


@dataclass(frozen=True)
class SeverityRules:
    """Rules of the ``major`` and ``critical`` grades (``minor`` is the rest)."""

    major: GradeRule = field(default_factory=GradeRule)
    critical: GradeRule = field(default_factory=GradeRule)

    @property
    def needs_mm(self) -> bool:
        """True when a rule is in mm^2, so a pixel size must be given."""
        return self.major.min_area_mm2 is not None or self.critical.min_area_mm2 is not None

    def grade(
        self,
        *,
        area_px: int,
        area_mm2: float | None,
        image_area: int,
        score: float,
        threshold: float,
    ) -> str:
        """Grade of one region; ``score`` is its max, ``threshold`` where it was cut."""
        ratio = score / threshold if threshold > 0 else math.inf
        kw = {
            "area_px": area_px,
            "area_mm2": area_mm2,
            "area_fraction": area_px / max(image_area, 1),
            "score_ratio": ratio,
        }
        if self.critical.matches(**kw):
            return "critical"
        if self.major.matches(**kw):
            return "major"
        return "minor"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("major", "critical"):
            rule: GradeRule = getattr(self, name)
            out[name] = {**rule.conditions(), "match": rule.match}
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "severity rules") -> SeverityRules:
        """Validate a parsed config; every problem is a ConfigError naming the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a table/object of grades, got {_kind(data)}")
        unknown = sorted(set(data) - {"major", "critical"})
        if unknown:
            raise ConfigError(
                f"{source}: unknown grade(s) {unknown}; rules are given for 'major' and "
                "'critical' (every other region is 'minor')"
            )
        if not data:
            raise ConfigError(f"{source}: no grade given; set [major] and/or [critical]")
        rules = {name: _grade_rule(data[name], f"{source}: [{name}]") for name in data}
        return cls(**rules)


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else type(value).__name__


def _grade_rule(data: Any, where: str) -> GradeRule:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of conditions, got {_kind(data)}")
    unknown = sorted(set(data) - {*_CONDITIONS, "match"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {[*_CONDITIONS, 'match']}")
    match = data.get("match", "any")
    if match not in ("any", "all"):
        raise ConfigError(f"{where}: match must be 'any' or 'all', got {match!r}")
    values: dict[str, float] = {}
    for key in _CONDITIONS:
        if key not in data:
            continue
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{where}: {key} must be a number, got {v!r}")
        if v <= 0:
            raise ConfigError(f"{where}: {key} must be > 0, got {v}")
        if key == "min_area_fraction" and v > 1:
            raise ConfigError(f"{where}: min_area_fraction must be in (0, 1], got {v}")
        values[key] = float(v)
    if not values:
        raise ConfigError(f"{where}: no condition; set one of {list(_CONDITIONS)}")
    return GradeRule(**values, match=match)


#: used when no rules file is given: a region is ``major`` from 1% of the image or
#: 1.5x the threshold at its peak, ``critical`` from 5% of the image or 2x.
DEFAULT_RULES = SeverityRules(
    major=GradeRule(min_area_fraction=0.01, min_score_ratio=1.5),
    critical=GradeRule(min_area_fraction=0.05, min_score_ratio=2.0),
)


def load_severity_rules(path: str | os.PathLike[str]) -> SeverityRules:
    """Read and validate a rules file (``.json`` or ``.toml``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"severity rules file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read severity rules {p}: {e}") from None
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON ({e})") from None
    elif suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise ConfigError(
                    f"{p}: reading TOML on Python 3.10 needs `pip install tomli`; "
                    "or write the rules as JSON"
                ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e})") from None
    else:
        raise ConfigError(f"{p}: severity rules must be a .json or .toml file")
    return SeverityRules.from_dict(data, source=str(p))

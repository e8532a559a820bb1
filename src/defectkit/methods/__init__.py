"""Method registry: every module in this package that defines an ``AnomalyModel``
subclass with a ``name`` is registered. Adding a method = adding one module."""

from __future__ import annotations

import importlib
import pkgutil

from defectkit.errors import ConfigError
from defectkit.methods.base import AnomalyModel, ScoreResult

__all__ = ["DEFAULT_METHOD", "AnomalyModel", "ScoreResult", "available_methods", "get_method"]

DEFAULT_METHOD = "patchcore"
_REGISTRY: dict[str, type[AnomalyModel]] = {}


def _discover() -> None:
    if _REGISTRY:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, AnomalyModel)
                and obj.name
                and obj.__module__ == module.__name__
            ):
                _REGISTRY[obj.name] = obj


def available_methods() -> dict[str, type[AnomalyModel]]:
    """Registered methods by name, sorted."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[AnomalyModel]:
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name]

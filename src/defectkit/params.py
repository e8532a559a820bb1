"""Settings of an estimator, read from its constructor, as scikit-learn does.

A constructor only stores its arguments, each under an attribute of the same
name, and nothing rewrites them later: what an estimator derives from them
(default layers resolved, the mode a model file was fitted with) lives in
attributes ending in ``_``. So ``cls(**est.get_params())`` is the same
estimator, before and after ``fit``, and a model file that stores the settings
rebuilds it.

>>> from defectkit.methods.threshold import ThresholdMethod
>>> model = ThresholdMethod(size=64)
>>> model.get_params()["size"], model.set_params(size=32).size
(64, 32)
>>> model.set_params(sise=32)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
defectkit.errors.ConfigError: method 'threshold' has no setting(s) ['sise']; known: [...]
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

from defectkit.errors import ConfigError

__all__ = ["Params", "check_names"]

_P = TypeVar("_P", bound="Params")


def check_names(owner: str, settings: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse setting names not in ``known``, before any work starts; ``owner``
    says whose settings they are (``"method 'patchcore'"``, ``"mask head"``)."""
    known = set(known)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"{owner} has no setting(s) {unknown}; known: {sorted(known)}")


class Params:
    """``get_params`` / ``set_params`` / ``check_params`` from the ``__init__`` signature."""

    #: private parts built lazily from the settings (a backbone, a search index):
    #: ``set_params`` drops them, so new settings are not served by old parts
    _built_from_settings: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's parameters, in order."""
        sig = inspect.signature(cls.__init__)
        return [
            name
            for name, p in sig.parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    @classmethod
    def _settings_owner(cls) -> str:
        """Whose settings error messages name."""
        return f"method {getattr(cls, 'name', '') or cls.__name__!r}"

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Refuse unknown setting names before any work starts."""
        check_names(cls._settings_owner(), params, cls.param_names())

    def get_params(self) -> dict[str, Any]:
        """Constructor settings, read back from attributes of the same name."""
        return {name: getattr(self, name) for name in self.param_names()}

    def set_params(self: _P, **params: Any) -> _P:
        """Change settings (all names checked first); they take effect at the next
        ``fit``, as in scikit-learn. Returns ``self``."""
        self.check_params(params)
        for name, value in params.items():
            setattr(self, name, value)
        if params:
            for part in self._built_from_settings:
                setattr(self, part, None)
        return self

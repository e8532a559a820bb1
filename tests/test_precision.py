"""Backbone precision: bfloat16 scoring on CPUs that compute it in hardware."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_fit
from typer.testing import CliRunner

import defectkit.backbones as backbones
from defectkit.backbones import bfloat16_native, load_backbone
from defectkit.cli import app
from defectkit.detector import Detector
from defectkit.errors import ConfigError

needs_bf16 = pytest.mark.skipif(
    not bfloat16_native(), reason="this CPU has neither AVX512-BF16 nor AMX (bfloat16 refused)"
)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


@needs_bf16
def test_bfloat16_maps_are_float32_close_to_float32_and_switching_back_is_exact() -> None:
    fx = load_backbone("efficientnet-lite0")
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = fx(x)
        low = fx.set_precision("bfloat16")(x)
        back = fx.set_precision("float32")(x)
    for r, lo, b in zip(ref, low, back, strict=True):
        assert lo.dtype == torch.float32 and lo.shape == r.shape
        assert 0 < _rel_err(lo, r) < 0.08  # it ran in bfloat16, and stayed close
        assert torch.equal(b, r)  # float32 weights were kept
    assert fx.precision == "float32"
    assert all(p.dtype == torch.float32 for p in fx.state_dict().values())


@needs_bf16
def test_fused_bfloat16_path_matches_the_plain_bfloat16_network() -> None:
    fused = load_backbone("efficientnet-lite0").set_precision("bfloat16")
    plain = load_backbone("efficientnet-lite0", fused=False).set_precision("bfloat16")
    assert fused._lowp["bfloat16"].net.fused and not plain._lowp["bfloat16"].net.fused
    x = torch.rand(3, 3, 97, 120, generator=torch.Generator().manual_seed(1))  # odd size too
    with torch.inference_mode():
        for a, b in zip(fused(x), plain(x), strict=True):
            assert _rel_err(a, b) < 0.03


def test_bfloat16_is_refused_where_the_cpu_would_emulate_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backbones, "bfloat16_native", lambda: False)
    fx = load_backbone("efficientnet-lite0")
    with pytest.raises(ConfigError, match="AVX512-BF16 or AMX"):
        fx.set_precision("bfloat16")
    assert fx.precision == "float32"


def test_unknown_precision_is_refused() -> None:
    fx = load_backbone("efficientnet-lite0")
    with pytest.raises(ConfigError, match="float32, bfloat16"):
        fx.set_precision("float16")


@pytest.fixture(scope="module")
def fitted(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("precision") / "pc.dkm"
    return cli_fit(demo_root, out, "--method", "patchcore", "-p", "image_size=96")


def _inspect(model: Path, data: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["inspect", str(model), str(data / "test"), "-q", *args])
    return res.exit_code, res.output


@needs_bf16
def test_cli_inspect_in_bfloat16_gives_the_same_lines_with_close_scores(
    fitted: Path, demo_root: Path
) -> None:
    code32, out32 = _inspect(fitted, demo_root)
    code16, out16 = _inspect(fitted, demo_root, "--precision", "bfloat16")
    assert code32 == code16 == 0, out16
    a = [json.loads(line) for line in out32.splitlines()]
    b = [json.loads(line) for line in out16.splitlines()]
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) > 10
    sa = np.array([r["score"] for r in a])
    sb = np.array([r["score"] for r in b])
    assert np.max(np.abs(sa - sb) / sa) < 0.1
    assert not np.array_equal(sa, sb)  # the option reached the backbone
    assert all(r["threshold"] == s["threshold"] for r, s in zip(a, b, strict=True))


def test_cli_refuses_bad_precisions(fitted: Path, demo_root: Path, tmp_path: Path) -> None:
    code, out = _inspect(fitted, demo_root, "--precision", "float16")
    assert code == 2 and "--precision must be one of float32, bfloat16" in out
    other = cli_fit(demo_root, tmp_path / "thr.dkm", "--method", "threshold")
    code, out = _inspect(other, demo_root, "--precision", "bfloat16")
    assert code == 2 and "is for the backbone methods (kmeans, padim, patchcore)" in out
    assert "not threshold" in out  # the methods come from their low_precision tag


def test_precision_is_for_the_pytorch_backbone_only(fitted: Path) -> None:
    det = Detector.load(fitted)
    det.model._extractor = types.SimpleNamespace(layers=det.model.layers_)  # e.g. onnxruntime's
    with pytest.raises(ConfigError, match="PyTorch runtime"):
        det.set_precision("bfloat16")

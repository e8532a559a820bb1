"""Building blocks of the reconstruction methods (``autoencoder``, ``vae``,
``ganomaly``): what the network reconstructs, the convolutional encoder and
decoder, a seeded training loop, residual maps (L2 and SSIM) and the network
weights as plain arrays for a model file.

Two input spaces:

- ``"features"``: frozen pretrained EfficientNet-Lite maps (the stride-8 and
  stride-16 stage ends, brought to the stride-8 grid and standardised per
  channel), as in DFR (Shi et al., 2021). The network sees what the backbone
  finds worth describing, so a defect that changes texture is off the learned
  manifold even when its grey levels are close to normal ones;
- ``"pixels"``: the image itself in [0, 1], at the working size.

The encoder and decoder are fully convolutional: in feature space 1x1
convolutions (a per-position bottleneck, DFR-style), with one ``kernel`` x
``kernel`` convolution inside when ``kernel`` > 1 (the methods default to 1:
not measured on magnetic-tile; it multiplies the training compute several times);
in pixel space strided 4x4 convolutions down to a
1/16 grid and transposed ones back up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectkit.backbones import FeatureExtractor, load_backbone
from defectkit.errors import ConfigError, ModelFileError
from defectkit.methods.base import (
    AnomalyModel,
    Image,
    Progress,
    ScoreResult,
    check_images,
    loaded_layers,
)
from defectkit.methods.parts.embedding import patch_embedding
from defectkit.methods.parts.extract import feature_batches
from defectkit.methods.parts.maps import top_mean, upsample_map
from defectkit.methods.parts.resize import to_tensor

SPACES = ("features", "pixels")
#: strided 4x4 convolutions of the pixel-space encoder (grid = image_size / 16)
PIXEL_DOWNSAMPLE = 4


# -- what is reconstructed --------------------------------------------------------


class ReconstructionInput:
    """Turns images into the tensors a reconstruction network sees.

    ``fit_stats(x)`` learns the per-channel standardisation (features only);
    ``batches(images)`` yields ``(indices, (B, C, h, w) tensors)``.
    """

    def __init__(
        self,
        space: str,
        image_size: int,
        backbone: str = "efficientnet-lite0",
        layers: list[str] | None = None,
        batch_size: int = 8,
    ) -> None:
        if space not in SPACES:
            raise ConfigError(f"space must be one of {SPACES}, got {space!r}")
        self.space = space
        self.image_size = image_size
        self.backbone = backbone
        self.layers = layers
        self.batch_size = batch_size
        self._extractor: FeatureExtractor | None = None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the global RNG
                self._extractor = load_backbone(self.backbone, self.layers)
        return self._extractor

    def channels(self) -> int:
        return sum(self.extractor.channels) if self.space == "features" else 3

    def raw_batches(
        self, images: Sequence[Image], progress: Progress | None, stage: str
    ) -> Iterator[tuple[list[int], Tensor]]:
        """Unstandardised tensors, a batch at a time."""
        if self.space == "pixels":
            size = (self.image_size, self.image_size)
            for start in range(0, len(images), self.batch_size):
                idx = list(range(start, min(start + self.batch_size, len(images))))
                yield idx, torch.cat([to_tensor(images[i], size) for i in idx])
                if progress is not None:
                    progress(stage, idx[-1] + 1, len(images))
            return
        for idx, maps in feature_batches(
            self.extractor, images, self.image_size, self.batch_size, progress=progress, stage=stage
        ):
            yield idx, patch_embedding(maps, 1)

    def all(self, images: Sequence[Image], progress: Progress | None, stage: str) -> Tensor:
        """Every image's tensor, in input order (squashed: one size for all)."""
        parts: list[Tensor] = [torch.empty(0)] * len(images)
        for idx, x in self.raw_batches(images, progress, stage):
            for j, i in enumerate(idx):
                parts[i] = x[j]
        return self.standardise(torch.stack(parts))

    def fit_stats(self, x: Tensor) -> Tensor:
        """Learn the per-channel standardisation from ``x`` and return ``x`` standardised."""
        if self.space == "features":
            self.mean = x.mean(dim=(0, 2, 3))
            self.std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        else:
            self.mean = torch.zeros(x.shape[1])
            self.std = torch.ones(x.shape[1])
        return self.standardise(x)

    def standardise(self, x: Tensor) -> Tensor:
        if self.mean is None or self.std is None:
            return x
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


# -- networks ------------------------------------------------------------------------


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


def encoder(
    in_channels: int, hidden: int, latent: int, space: str, kernel: int = 3
) -> nn.Sequential:
    """(B, in, h, w) -> (B, latent, h', w'): h' = h (features) or h / 16 (pixels)."""
    if space == "features":
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 1), _act()]
        if kernel > 1:
            layers += [nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2), _act()]
        layers.append(nn.Conv2d(hidden, latent, 1))
        return nn.Sequential(*layers)
    layers = []
    ch = in_channels
    for i in range(PIXEL_DOWNSAMPLE):
        width = max(8, hidden >> (PIXEL_DOWNSAMPLE - 1 - i))
        layers += [nn.Conv2d(ch, width, 4, stride=2, padding=1), _act()]
        ch = width
    layers.append(nn.Conv2d(ch, latent, 3, padding=1))
    return nn.Sequential(*layers)


def decoder(
    latent: int, hidden: int, out_channels: int, space: str, kernel: int = 3
) -> nn.Sequential:
    """Mirror of :func:`encoder`; pixel space ends in a sigmoid (images in [0, 1])."""
    if space == "features":
        layers: list[nn.Module] = [nn.Conv2d(latent, hidden, 1), _act()]
        if kernel > 1:
            layers += [nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2), _act()]
        layers.append(nn.Conv2d(hidden, out_channels, 1))
        return nn.Sequential(*layers)
    widths = [max(8, hidden >> i) for i in range(PIXEL_DOWNSAMPLE)]
    layers = [nn.Conv2d(latent, widths[0], 3, padding=1), _act()]
    for i, width in enumerate(widths):
        out = widths[i + 1] if i + 1 < len(widths) else out_channels
        layers.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1))
        if i + 1 < len(widths):
            layers.append(_act())
    layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def build_seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` with weights initialised from ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# -- training ----------------------------------------------------------------------


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    seed: int


def check_train_settings(s: TrainSettings, owner: str) -> None:
    if not isinstance(s.epochs, int) or s.epochs < 1:
        raise ConfigError(f"{owner}: epochs must be an integer >= 1, got {s.epochs!r}")
    if not isinstance(s.batch_size, int) or s.batch_size < 1:
        raise ConfigError(f"{owner}: batch_size must be an integer >= 1, got {s.batch_size!r}")
    if not s.lr > 0:
        raise ConfigError(f"{owner}: lr must be > 0, got {s.lr!r}")


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of one epoch, shuffled by ``generator`` (data order is seeded)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def train(
    x: Tensor,
    settings: TrainSettings,
    step: Callable[[Tensor, torch.Generator], None],
    progress: Progress | None,
    stage: str = "train",
) -> None:
    """Run ``step(batch, generator)`` over shuffled minibatches for every epoch.

    ``step`` does its own forward, backward and optimiser updates (GANomaly
    updates two networks per batch); the generator also draws any noise.
    Training runs on one thread: the steps are small (1x1 convolutions over a
    few thousand grid cells), and on the shared 2-core machine an epoch of 300
    feature grids took 1.3 s on one thread against 24 s on two (threads
    waiting on each other under load).
    """
    g = torch.Generator().manual_seed(settings.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in range(settings.epochs):
            for idx in minibatches(len(x), settings.batch_size, g):
                step(x[idx], g)
            if progress is not None:
                progress(stage, epoch + 1, settings.epochs)
    finally:
        torch.set_num_threads(threads)


# -- residual maps ---------------------------------------------------------------------


def ssim_map(x: Tensor, y: Tensor, window: int = 7, data_range: float = 1.0) -> Tensor:
    """Local SSIM (uniform ``window``), averaged over channels: (B, C, h, w) -> (B, h, w).

    ``data_range`` sets the stabilising constants (1 for images in [0, 1]; a
    few units for standardised features).
    """
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    pad = window // 2

    def blur(t: Tensor) -> Tensor:
        return F.avg_pool2d(F.pad(t, [pad] * 4, mode="reflect"), window, stride=1)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(1)


def residual_map(
    x: Tensor, x_hat: Tensor, ssim_weight: float, window: int, data_range: float
) -> Tensor:
    """Per-position anomaly: mean squared residual over channels + ``ssim_weight`` * (1 - SSIM)."""
    out = ((x - x_hat) ** 2).mean(1)
    if ssim_weight > 0:
        w = min(window, x.shape[-1], x.shape[-2])
        w = w if w % 2 else w - 1
        out = out + ssim_weight * (1.0 - ssim_map(x, x_hat, max(w, 1), data_range))
    return out


def smooth(grid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a working-grid map; ``sigma`` in grid cells."""
    if sigma <= 0:
        return grid.astype(np.float32)
    return cv2.GaussianBlur(
        grid.astype(np.float32), (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT
    )


# -- weights as arrays ------------------------------------------------------------------


def module_arrays(module: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """Every parameter and buffer as a float32 array under ``prefix.name``."""
    return {
        f"{prefix}.{k}": v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in module.state_dict().items()
    }


def load_module_arrays(
    module: nn.Module, arrays: dict[str, np.ndarray], prefix: str, owner: str
) -> None:
    """Inverse of :func:`module_arrays`: every tensor present, of the right shape, finite."""
    state: dict[str, Tensor] = {}
    for k, v in module.state_dict().items():
        arr = arrays.get(f"{prefix}.{k}")
        if arr is None or tuple(arr.shape) != tuple(v.shape):
            raise ModelFileError(
                f"{owner} model: {prefix}.{k} missing or not of shape {tuple(v.shape)} "
                "(settings do not match the model file?)"
            )
        if not np.all(np.isfinite(arr)):
            raise ModelFileError(f"{owner} model: {prefix}.{k} holds NaN or infinite values")
        state[k] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    extra = sorted(
        k for k in arrays if k.startswith(prefix + ".") and k[len(prefix) + 1 :] not in state
    )
    if extra:
        raise ModelFileError(f"{owner} model: unexpected arrays {extra[:3]}")
    module.load_state_dict(state, strict=True)


def input_state(inp: ReconstructionInput) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    assert inp.mean is not None and inp.std is not None
    return (
        {"input.mean": inp.mean.numpy().astype(np.float32), "input.std": inp.std.numpy()},
        {"layers": list(inp.extractor.layers) if inp.space == "features" else None},
    )


def load_input_state(
    inp: ReconstructionInput, arrays: dict[str, np.ndarray], channels: int, owner: str
) -> None:
    mean, std = arrays.get("input.mean"), arrays.get("input.std")
    for key, arr in (("input.mean", mean), ("input.std", std)):
        if arr is None or arr.shape != (channels,) or not np.all(np.isfinite(arr)):
            raise ModelFileError(
                f"{owner} model: {key} missing, not of shape ({channels},) or not finite"
            )
    assert mean is not None and std is not None
    if np.any(std <= 0):
        raise ModelFileError(f"{owner} model: input.std must be positive")
    inp.mean = torch.from_numpy(mean.astype(np.float32))
    inp.std = torch.from_numpy(std.astype(np.float32))


# -- shared estimator mechanics ------------------------------------------------------------


class ReconstructionModel(AnomalyModel):
    """Common fit/score/persistence of the reconstruction methods (not registered).

    A subclass names its networks (``_build``), one training step (``_step``)
    and its reconstruction, with a second pair of codes whose distance gives
    the image score when that is not the residual (``_forward``). The
    working grid map is smoothed by ``sigma`` (grid cells per 32 cells of the
    grid side); the image score is the mean of its highest ``top_fraction``
    (``top_fraction=0`` takes the maximum); the map is upsampled to the input's size.

    With ``normalise`` the residual of each channel at each grid cell is first
    divided by its root mean square over the training images, then both grids
    are standardised per grid cell by their mean and spread over the training
    images: images are squashed to one size, so a cell is the same place on
    every part, and cells and channels that are hard to reconstruct on good
    parts too (tile edges, chamfers) stop dominating. On magnetic-tile (300
    training images, half the test set, feature space) this took image AUROC
    from 0.64 to 0.80.
    ``train_crop`` (feature space) trains on a random ``train_crop`` x
    ``train_crop`` window of each batch's grid: the 1x1 bottleneck sees every
    cell alike, so this only trades samples per step for speed.
    """

    #: settings every subclass's constructor stores
    space: str
    backbone: str
    layers: list[str] | None
    image_size: int
    hidden: int
    latent: int
    kernel: int
    epochs: int
    batch_size: int
    lr: float
    ssim_weight: float
    ssim_window: int
    sigma: float
    top_fraction: float
    normalise: bool
    train_crop: int
    seed: int

    def _init_common(self, **settings: Any) -> None:
        for k, v in settings.items():
            setattr(self, k, v)
        self._input: ReconstructionInput | None = None
        self._nets: dict[str, nn.Module] | None = None
        self._norm: dict[str, np.ndarray] | None = None

    # -- for subclasses -----------------------------------------------------------------
    def _build(self, channels: int) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _step(self, x: Tensor, g: torch.Generator) -> None:
        raise NotImplementedError

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Reconstruction of ``x`` and a (B, L, h', w') code difference whose squared
        norm per grid cell gives the image score, or None to score the residual."""
        raise NotImplementedError

    def _evidence(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, h, w) residual maps and the (B, h', w') grids the image score comes from."""
        x_hat, code_diff = self._forward(x)
        r = self._residual(x, x_hat)
        if code_diff is None:
            return r, r
        scale = None if self._norm is None else self._norm.get("code_scale")
        if scale is not None:
            if tuple(scale.shape) != tuple(code_diff.shape[1:]):
                raise ModelFileError(
                    f"{self._owner} model: code scale {scale.shape} does not match the "
                    f"codes {tuple(code_diff.shape[1:])} (other image_size?)"
                )
            code_diff = code_diff / torch.from_numpy(scale)
        return r, (code_diff**2).mean(1)

    def _validate_extra(self) -> None:
        """Method-specific settings checks."""

    def _codes_scored(self) -> bool:
        """Whether the image score comes from code differences (not the residual)."""
        return False

    def _train_view(self, x: Tensor, g: torch.Generator) -> Tensor:
        """A random window of the batch's grid (feature space, ``train_crop``)."""
        c = self.train_crop
        if self.space != "features" or not c or c >= min(x.shape[-2:]):
            return x
        i = int(torch.randint(0, x.shape[-2] - c + 1, (1,), generator=g))
        j = int(torch.randint(0, x.shape[-1] - c + 1, (1,), generator=g))
        return x[..., i : i + c, j : j + c]

    def _ssim_term(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """(B, h, w) structural dissimilarity 1 - SSIM, for losses."""
        w = min(self.ssim_window, x.shape[-1], x.shape[-2])
        w = max(w if w % 2 else w - 1, 1)
        return 1.0 - ssim_map(x, x_hat, w, self._data_range())

    # -- shared ------------------------------------------------------------------------
    @property
    def _owner(self) -> str:
        return self.name

    def _validate(self) -> None:
        o = self._owner
        if self.space not in SPACES:
            raise ConfigError(f"{o}: space must be one of {SPACES}, got {self.space!r}")
        minimum = 32 if self.space == "features" else 2**PIXEL_DOWNSAMPLE * 2
        if not isinstance(self.image_size, int) or self.image_size < minimum:
            raise ConfigError(
                f"{o}: image_size must be an integer >= {minimum}, got {self.image_size!r}"
            )
        if self.space == "pixels" and self.image_size % 2**PIXEL_DOWNSAMPLE:
            raise ConfigError(
                f"{o}: image_size must be a multiple of {2**PIXEL_DOWNSAMPLE} "
                f"in pixel space, got {self.image_size}"
            )
        for label, v in (("hidden", self.hidden), ("latent", self.latent)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{o}: {label} must be an integer >= 1, got {v!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"{o}: kernel must be an odd integer >= 1, got {self.kernel!r}")
        if self.ssim_weight < 0:
            raise ConfigError(f"{o}: ssim_weight must be >= 0, got {self.ssim_weight}")
        if (
            not isinstance(self.ssim_window, int)
            or self.ssim_window < 3
            or not self.ssim_window % 2
        ):
            raise ConfigError(
                f"{o}: ssim_window must be an odd integer >= 3, got {self.ssim_window!r}"
            )
        if self.sigma < 0:
            raise ConfigError(f"{o}: sigma must be >= 0, got {self.sigma}")
        if not isinstance(self.train_crop, int) or self.train_crop < 0:
            raise ConfigError(
                f"{o}: train_crop must be an integer >= 0 (0: whole grid), got {self.train_crop!r}"
            )
        if not 0 <= self.top_fraction <= 1:
            raise ConfigError(f"{o}: top_fraction must lie in [0, 1], got {self.top_fraction}")
        check_train_settings(TrainSettings(self.epochs, self.batch_size, self.lr, self.seed), o)
        self._validate_extra()

    def _inputs(self) -> ReconstructionInput:
        """What the networks see: built on first use for the layers the model was
        fitted (or loaded) with, else the settings'."""
        if self._input is None:
            layers = self.layers_ if hasattr(self, "layers_") else self.layers
            self._input = ReconstructionInput(
                self.space, self.image_size, self.backbone, layers, batch_size=8
            )
        return self._input

    def _data_range(self) -> float:
        """SSIM constants: images span 1, standardised features a few units."""
        return 1.0 if self.space == "pixels" else 4.0

    def _residual(self, x: Tensor, x_hat: Tensor) -> Tensor:
        scale = None if self._norm is None else self._norm.get("residual_scale")
        if scale is None:
            return residual_map(x, x_hat, self.ssim_weight, self.ssim_window, self._data_range())
        if tuple(scale.shape) != tuple(x.shape[1:]):
            raise ModelFileError(
                f"{self._owner} model: residual scale {scale.shape} does not match the "
                f"input {tuple(x.shape[1:])} (other image_size?)"
            )
        out = (((x - x_hat) / torch.from_numpy(scale)) ** 2).mean(1)
        if self.ssim_weight > 0:
            out = out + self.ssim_weight * self._ssim_term(x, x_hat)
        return out

    def _scales(self, x: Tensor) -> dict[str, np.ndarray]:
        """Root mean square residual (and code difference) per channel and grid cell."""
        totals: dict[str, Tensor] = {}
        with torch.inference_mode():
            for s in range(0, len(x), 16):
                part = x[s : s + 16]
                x_hat, code_diff = self._forward(part)
                diffs = {"residual_scale": part - x_hat}
                if code_diff is not None:
                    diffs["code_scale"] = code_diff
                for key, d in diffs.items():
                    sq = (d**2).sum(0).double()
                    totals[key] = totals[key] + sq if key in totals else sq
        out = {}
        for key, total in totals.items():
            rms = (total / len(x)).sqrt()
            out[key] = (rms + 1e-3 * rms.mean() + 1e-12).numpy().astype(np.float32)
        return out

    def fit(self, images: Sequence[Image], progress: Progress | None = None) -> ReconstructionModel:
        self._validate()
        images = check_images(images, min_count=2)
        # from the settings, whatever an earlier fit or model file left
        inp = self._input = ReconstructionInput(
            self.space, self.image_size, self.backbone, self.layers, batch_size=8
        )
        x = inp.fit_stats(inp.all(images, progress, "features"))
        nets = self._build(x.shape[1])
        self._nets = nets
        self._optimisers = self._make_optimisers()
        for net in nets.values():
            net.train()
        settings = TrainSettings(self.epochs, self.batch_size, self.lr, self.seed)
        train(x, settings, self._step, progress)
        for net in nets.values():
            net.eval()
        self._norm = None
        if self.normalise:
            self._norm = self._scales(x)
            self._norm.update(self._grid_stats(x))
        self.layers_ = list(inp.extractor.layers) if self.space == "features" else None
        self.grid_ = [int(x.shape[-2]), int(x.shape[-1])]
        self.n_train_images_ = len(images)
        del self._optimisers
        return self

    def _raw_evidence(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            parts = [self._evidence(x[s : s + 16]) for s in range(0, len(x), 16)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _grid_stats(self, x: Tensor) -> dict[str, np.ndarray]:
        """Per-cell mean and spread of both evidence grids over the training images."""
        m, s = self._raw_evidence(x)
        out = {}
        for key, grid in (("map", m), ("score", s)):
            sd = grid.std(0)
            out[f"{key}_mean"] = grid.mean(0).numpy().astype(np.float32)
            out[f"{key}_std"] = (sd + 1e-3 * sd.mean() + 1e-12).numpy().astype(np.float32)
        return out

    def _normalised(self, key: str, grid: np.ndarray) -> np.ndarray:
        if self._norm is None or f"{key}_mean" not in self._norm:
            return grid
        mean, std = self._norm[f"{key}_mean"], self._norm[f"{key}_std"]
        if mean.shape != grid.shape:
            raise ModelFileError(
                f"{self._owner} model: normalisation grid {mean.shape} does not match the "
                f"evidence grid {grid.shape} (other image_size?)"
            )
        return (grid - mean) / std

    def _make_optimisers(self) -> dict[str, torch.optim.Optimizer]:
        assert self._nets is not None
        params = [p for net in self._nets.values() for p in net.parameters()]
        return {"all": torch.optim.Adam(params, lr=self.lr)}

    def score(self, images: Sequence[Image], progress: Progress | None = None) -> ScoreResult:
        self._require_fitted()
        images = check_images(images)
        inp = self._inputs()
        scores = np.empty(len(images), dtype=np.float32)
        maps: list[np.ndarray] = [np.empty(0)] * len(images)
        extras: list[dict[str, Any]] = [{} for _ in images]
        with torch.inference_mode():
            for idx, raw in inp.raw_batches(images, progress, "score"):
                learned = 0 if inp.mean is None else int(inp.mean.shape[0])
                if raw.shape[1] != learned:
                    raise ModelFileError(
                        f"{self._owner} model: learned {learned} input channels, "
                        f"the input gives {raw.shape[1]} (other backbone or layers?)"
                    )
                x = inp.standardise(raw)
                map_grid, score_grid = self._evidence(x)
                for j, i in enumerate(idx):
                    m = self._smooth(self._normalised("map", map_grid[j].numpy()))
                    s = self._smooth(self._normalised("score", score_grid[j].numpy()))
                    scores[i] = top_mean(s, self.top_fraction) if self.top_fraction else s.max()
                    maps[i] = upsample_map(m, images[i].shape[:2], 0.0)
                    worst = np.unravel_index(int(np.argmax(s)), s.shape)
                    extras[i] = {"worst_cell": [int(v) for v in worst], "grid": list(s.shape)}
        return ScoreResult(scores=scores, maps=maps, extras=extras)

    def _smooth(self, grid: np.ndarray) -> np.ndarray:
        return smooth(grid, self.sigma * min(grid.shape) / 32.0)

    # -- persistence ---------------------------------------------------------------------
    def learned_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        assert self._nets is not None
        arrays, info = input_state(self._inputs())
        for key, net in self._nets.items():
            arrays.update(module_arrays(net, key))
        for key, arr in (self._norm or {}).items():
            arrays[f"norm.{key}"] = arr
        info.update({"grid": self.grid_, "n_train_images": self.n_train_images_})
        return arrays, info

    def load_learned_state(self, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        self._validate()
        # the layers it was fitted with (files that record none: the settings')
        layers = loaded_layers(info, "layers", self._owner) if self.space == "features" else None
        self.layers_ = layers or (self.layers if self.space == "features" else None)
        self._input = None
        inp = self._inputs()
        channels = inp.channels()
        load_input_state(inp, arrays, channels, self._owner)
        nets = self._build(channels)
        for key, net in nets.items():
            load_module_arrays(net, arrays, key, self._owner)
            net.eval()
        grid = info.get("grid")
        if not (
            isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) for v in grid)
        ):
            raise ModelFileError(f"{self._owner} model: grid missing or malformed")
        norm = None
        if self.normalise:
            norm = {}
            keys = ["residual_scale", "map_mean", "map_std", "score_mean", "score_std"]
            if "norm.code_scale" in arrays or self._codes_scored():
                keys.append("code_scale")
            for key in keys:
                arr = arrays.get(f"norm.{key}")
                ndim = 3 if key.endswith("scale") else 2
                if arr is None or arr.ndim != ndim or not np.all(np.isfinite(arr)):
                    raise ModelFileError(f"{self._owner} model: norm.{key} missing or malformed")
                if key.endswith(("std", "scale")) and np.any(arr <= 0):
                    raise ModelFileError(f"{self._owner} model: norm.{key} must be positive")
                norm[key] = arr.astype(np.float32)
        self._norm = norm
        self._nets = nets
        self.grid_ = grid
        self.n_train_images_ = int(info.get("n_train_images", 0))

"""Convolutional autoencoder: learn to reconstruct good parts; where the
reconstruction fails, something unseen is there. The anomaly map is the
squared residual (mean over channels) plus ``ssim_weight`` times the local
structural dissimilarity (1 - SSIM); the image score is the mean of the
highest ``top_fraction`` of the smoothed map on the working grid.

By default the network reconstructs frozen pretrained features
(``space="features"``: EfficientNet-Lite stride-8 and stride-16 maps on the
stride-8 grid, standardised per channel), as in DFR (Shi et al., 2021);
``space="pixels"`` reconstructs the image itself (working size
``image_size``, 128 is a sensible choice there), squashed to a square.

Measured on magnetic-tile (fit on 686 train/good images, every 10th held
out; scored on every 2nd test image, 291; image AUROC; on a shared, loaded
2-core machine, so times are rough): features with the defaults 0.825
(blowhole 0.95, break 0.90, crack 0.59, fray 0.89, uneven 0.74; fit about
4-5 min including feature extraction); without the per-cell normalisation
(see ``parts.reconstruction.ReconstructionModel``) 0.64 (300 training images,
10 epochs; 0.79 with it).
SSIM adds nothing in feature space (ssim_weight 0 / 0.5 / 2: 0.825 / 0.825 /
0.824), so it is off by default there; it is meant for ``space="pixels"``.
Pixel space (``space="pixels", image_size=128``, same split): 0.606 (L2
only), 0.608 (ssim_weight 0.5), 0.614 (ssim_weight 2), 0.633 (ssim_weight 2
without normalisation), and 20 epochs took about 19 min: blurry
reconstructions of the tile texture leave residuals everywhere, while small
blowholes and low-contrast "uneven" regions are reconstructed well enough to
hide. Through the CLI (``benchmarks/methods_table.py``, full test set of 582)
the defaults scored image AUROC 0.821, pixel AUROC 0.699, fit 202 s.

Built from ``parts.reconstruction`` (input space, encoder/decoder, seeded
training loop, residual and SSIM maps, weights as arrays) and ``parts.maps``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectkit.methods.parts.reconstruction import (
    ReconstructionModel,
    build_seeded,
    decoder,
    encoder,
)


class _AutoEncoder(nn.Module):
    def __init__(self, channels: int, hidden: int, latent: int, space: str, kernel: int) -> None:
        super().__init__()
        self.encoder = encoder(channels, hidden, latent, space, kernel)
        self.decoder = decoder(latent, hidden, channels, space, kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class AutoEncoder(ReconstructionModel):
    """Convolutional autoencoder with L2 + SSIM residual maps.

    >>> model = AutoEncoder(epochs=20).fit(good_images)   # doctest: +SKIP
    >>> model.score(new_images).maps[0].shape             # doctest: +SKIP
    """

    name = "autoencoder"
    summary = "convolutional autoencoder of pretrained features (or pixels) + L2/SSIM residual"

    def __init__(
        self,
        space: str = "features",
        backbone: str = "efficientnet-lite0",
        layers: list[str] | None = None,
        image_size: int = 256,
        hidden: int = 128,
        latent: int = 32,
        kernel: int = 1,
        epochs: int = 20,
        batch_size: int = 16,
        lr: float = 1e-3,
        ssim_weight: float = 0.0,
        ssim_window: int = 7,
        sigma: float = 1.0,
        top_fraction: float = 0.0,
        normalise: bool = True,
        train_crop: int = 16,
        seed: int = 0,
    ) -> None:
        self._init_common(
            space=space,
            backbone=backbone,
            layers=layers,
            image_size=image_size,
            hidden=hidden,
            latent=latent,
            kernel=kernel,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            ssim_weight=ssim_weight,
            ssim_window=ssim_window,
            sigma=sigma,
            top_fraction=top_fraction,
            normalise=normalise,
            train_crop=train_crop,
            seed=seed,
        )

    def _build(self, channels: int) -> dict[str, nn.Module]:
        net = build_seeded(
            self.seed,
            lambda: _AutoEncoder(channels, self.hidden, self.latent, self.space, self.kernel),
        )
        return {"net": net}

    def _step(self, x: Tensor, g: torch.Generator) -> None:
        assert self._nets is not None
        opt = self._optimisers["all"]
        x = self._train_view(x, g)
        x_hat = self._nets["net"](x)
        loss = F.mse_loss(x_hat, x)
        if self.ssim_weight > 0:
            loss = loss + self.ssim_weight * self._ssim_term(x, x_hat).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        assert self._nets is not None
        return self._nets["net"](x), None

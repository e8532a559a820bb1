"""Variational autoencoder: the ``autoencoder`` with a Gaussian latent
(Kingma and Welling, 2014). The encoder gives a mean and a log-variance per
latent channel and grid cell; training samples the latent (noise drawn from
the seeded generator) and adds ``beta`` times the KL divergence to a standard
normal, which keeps the latent smooth and compact, so unusual inputs are
pulled toward typical good reconstructions. Scoring decodes the mean
(deterministic); the map and score are the residual as in ``autoencoder``.

Same networks, input spaces, residual maps and persistence as ``autoencoder``
(``parts.reconstruction``); only the bottleneck and the loss differ.

Measured on magnetic-tile as for ``autoencoder`` (686 training images, 291
test images, image AUROC, defaults): 0.819 (blowhole 0.95, break 0.89, crack
0.58, fray 0.87, uneven 0.73), about the autoencoder's 0.825: with a
per-cell latent the KL term mostly regularises, it does not change what is
hard to reconstruct. Through the CLI (``benchmarks/methods_table.py``, full
test set of 582): image AUROC 0.820, pixel AUROC 0.697, fit 119 s.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from defectkit.errors import ConfigError
from defectkit.methods.parts.reconstruction import (
    ReconstructionModel,
    build_seeded,
    decoder,
    encoder,
)


class _VAE(nn.Module):
    def __init__(self, channels: int, hidden: int, latent: int, space: str, kernel: int) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = encoder(channels, hidden, 2 * latent, space, kernel)
        self.decoder = decoder(latent, hidden, channels, space, kernel)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).split(self.latent, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction from the latent mean (used for scoring)."""
        return self.decoder(self.moments(x)[0])


class VAE(ReconstructionModel):
    """Variational autoencoder with L2 + SSIM residual maps.

    >>> model = VAE(beta=0.1).fit(good_images)   # doctest: +SKIP
    """

    name = "vae"
    summary = "variational autoencoder of pretrained features (or pixels) + residual maps"

    def __init__(
        self,
        space: str = "features",
        backbone: str = "efficientnet-lite0",
        layers: list[str] | None = None,
        image_size: int = 256,
        hidden: int = 128,
        latent: int = 32,
        kernel: int = 1,
        beta: float = 0.01,
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
        self.beta = beta
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

    def _validate_extra(self) -> None:
        if not self.beta >= 0:
            raise ConfigError(f"vae: beta must be >= 0, got {self.beta!r}")

    def _build(self, channels: int) -> dict[str, nn.Module]:
        net = build_seeded(
            self.seed, lambda: _VAE(channels, self.hidden, self.latent, self.space, self.kernel)
        )
        return {"net": net}

    def _step(self, x: Tensor, g: torch.Generator) -> None:
        assert self._nets is not None
        net = self._nets["net"]
        x = self._train_view(x, g)
        mu, logvar = net.moments(x)
        z = mu + torch.randn(mu.shape, generator=g) * (0.5 * logvar).exp()
        x_hat = net.decoder(z)
        # per grid cell: squared error summed over channels, KL summed over latent channels
        recon = ((x_hat - x) ** 2).sum(1).mean()
        kl = (0.5 * (mu**2 + logvar.exp() - 1.0 - logvar)).sum(1).mean()
        loss = recon + self.beta * kl
        if self.ssim_weight > 0:
            loss = loss + self.ssim_weight * x.shape[1] * self._ssim_term(x, x_hat).mean()
        opt = self._optimisers["all"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        assert self._nets is not None
        return self._nets["net"](x), None

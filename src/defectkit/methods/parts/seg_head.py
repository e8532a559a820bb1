"""A small segmentation head on frozen backbone features, and the losses it is
trained with (focal + soft dice), for self-supervised methods that learn from
synthetic defects.

The head is a plain ``nn.Module`` (exportable): feature maps of several strides
are brought to one grid (finer ones average-pooled, coarser ones bilinearly
upsampled), standardised per channel (statistics of the training features), and passed
through a 1x1 reduction and two 3x3 convolutions (the second dilated, so a cell
sees about 7x7 cells of context) to one logit per grid cell.

>>> head = SegHead([24, 40, 112], hidden=16)
>>> maps = [torch.rand(2, 24, 16, 16), torch.rand(2, 40, 8, 8), torch.rand(2, 112, 4, 4)]
>>> tuple(head(maps).shape)
(2, 1, 8, 8)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegHead", "dice_loss", "focal_loss", "to_grid"]


def to_grid(features: Sequence[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
    """Every map on ``grid``: finer maps average-pooled, coarser ones bilinearly upsampled."""
    out = []
    for f in features:
        if f.shape[-2:] == grid:
            out.append(f)
        elif f.shape[-2] > grid[0]:
            out.append(F.adaptive_avg_pool2d(f, grid))
        else:
            out.append(F.interpolate(f, size=grid, mode="bilinear", align_corners=False))
    return out


class SegHead(nn.Module):
    """``(B, C_i, h_i, w_i)`` maps -> ``(B, 1, h, w)`` logits on the grid of ``grid_layer``."""

    def __init__(self, channels: Sequence[int], hidden: int = 32, grid_layer: int = 1) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.grid_layer = min(grid_layer, len(self.channels) - 1)
        total = sum(self.channels)
        self.register_buffer("mean", torch.zeros(1, total, 1, 1))
        self.register_buffer("std", torch.ones(1, total, 1, 1))
        self.reduce = nn.Conv2d(total, hidden, 1)
        self.conv1 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2)
        self.out = nn.Conv2d(hidden, 1, 1)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Kaiming init from ``generator`` (deterministic, leaves global RNG alone)."""
        for conv in (self.reduce, self.conv1, self.conv2, self.out):
            nn.init.kaiming_uniform_(conv.weight, a=0.0, nonlinearity="relu", generator=generator)
            nn.init.zeros_(conv.bias)
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            self.out.bias.fill_(-3.0)  # start near "no defect": most cells are good

    def joined(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Maps on one grid, concatenated (not yet standardised)."""
        grid = tuple(features[self.grid_layer].shape[-2:])
        return torch.cat(to_grid(features, grid), dim=1)  # type: ignore[arg-type]

    def forward_joined(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = F.relu(self.reduce(x))
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.out(x)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_joined(self.joined(features))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean binary focal loss (Lin et al., 2017); ``target`` may be soft (0..1)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    return ((1 - p_t) ** gamma * bce).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss over the whole batch (images without defects count toward the
    denominator only, so they push predictions toward 0)."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    return 1 - (2 * inter + eps) / (p.sum() + target.sum() + eps)

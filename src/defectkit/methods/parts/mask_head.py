"""A head that learns from a few labelled defect masks where defects are, on the
patch features a memory-bank method already computes (semi-supervised maps).

Why it exists: some defects are made of textures that are each normal on their
own. On magnetic-tile, an "uneven" tile shows two grindings; the labelled
region is one of them, and nearest-neighbour distance to good patches hardly
ranks it above the rest of its tile (AUROC 0.69 within those images). The
features do hold the difference: a head trained on half of the uneven images'
masks ranks the other half's at 0.99. Good images alone cannot say which of two
normal-looking textures is the defect; a few masks can.

The head sees each patch's standardised features through a 1x1 reduction and
three dilated 3x3 residual convolutions (dilations 1, 2, 4: a cell sees about
15x15 cells), joined with the same features minus their mean over the image (so
it can also tell a patch from the rest of its part), and gives one logit per
grid cell.

>>> head = MaskHead(channels=8, hidden=4)
>>> tuple(head(torch.rand(2, 8, 6, 5)).shape)
(2, 1, 6, 5)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectkit.errors import ConfigError
from defectkit.params import check_names

__all__ = [
    "DILATIONS",
    "SETTINGS",
    "MaskHead",
    "MaskHeadSettings",
    "check_masks",
    "check_settings",
    "grid_mask",
    "train_mask_head",
]

#: dilations of the head's 3x3 convolutions
DILATIONS = (1, 2, 4)


@dataclass(frozen=True)
class MaskHeadSettings:
    """The mask head settings a method's ``fit_mask_head`` takes, checked when made
    (defaults: PatchCore.fit_mask_head's): ``weight`` of the head's probability in
    the map, in units of the good patch scores' spread; the head's ``hidden``
    channels; training ``steps``; at most ``max_goods`` good images to learn from."""

    weight: float = 15.0
    hidden: int = 32
    steps: int = 800
    max_goods: int = 200

    def __post_init__(self) -> None:
        for f in fields(self):
            key, value = f.name, getattr(self, f.name)
            if key == "weight":
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
                want = "a number > 0"
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
                want = "a whole number >= 1"
            if not ok:
                raise ConfigError(f"mask head setting {key} must be {want}, got {value!r}")


#: the mask head setting names
SETTINGS = tuple(f.name for f in fields(MaskHeadSettings))


class MaskHead(nn.Module):
    """``(B, channels, h, w)`` patch features -> ``(B, 1, h, w)`` defect logits."""

    def __init__(self, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(hidden, hidden, 3, padding=d, dilation=d) for d in DILATIONS
        )
        self.image = nn.Conv2d(channels, hidden, 1)
        self.out = nn.Conv2d(2 * hidden, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        h = F.relu(self.reduce(F.dropout2d(x, 0.1, self.training)))
        for conv in self.convs:
            h = F.relu(conv(h)) + h
        whole = F.relu(self.image(x.mean((2, 3), keepdim=True))).expand_as(h)
        return self.out(torch.cat([h, h - whole], 1))


def check_settings(settings: dict[str, object]) -> None:
    """Raise :class:`~defectkit.errors.ConfigError` for an unknown mask head setting or
    a value out of range (``weight`` > 0; the others whole numbers >= 1)."""
    check_names("mask head", settings, SETTINGS)
    MaskHeadSettings(**settings)  # type: ignore[arg-type]


def check_masks(shapes: Sequence[tuple[int, int]], masks: Sequence[np.ndarray]) -> None:
    """Raise :class:`~defectkit.errors.ConfigError` unless there is one mask of each
    image's (height, width) in ``shapes``."""
    if len(masks) != len(shapes):
        raise ConfigError(f"{len(masks)} defect masks for {len(shapes)} defect images")
    for i, ((h, w), m) in enumerate(zip(shapes, masks, strict=True)):
        if np.shape(m) != (h, w):
            raise ConfigError(
                f"defect mask {i} is {np.shape(m)[::-1]} (width, height), its image ({w}, {h})"
            )


def grid_mask(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The share of each grid cell that ``mask`` (H, W bool) covers, float32 (h, w)."""
    h, w = grid
    return cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)


def train_mask_head(
    defects: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    goods: Sequence[np.ndarray],
    *,
    hidden: int = 32,
    steps: int = 800,
    batch: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
) -> MaskHead:
    """A :class:`MaskHead` fitted on feature grids (h, w, C): ``defects`` with
    their ``masks`` (h, w shares, see :func:`grid_mask`) and ``goods`` (all 0).

    Each step draws half its batch from the defects (randomly flipped) and half
    from the goods, so a few dozen labelled images are not drowned by hundreds
    of good ones. Seeded: the same inputs give the same head.
    """
    if not defects or len(defects) != len(masks):
        raise ValueError("train_mask_head needs defect grids, one mask each")
    if not goods:
        raise ValueError("train_mask_head needs good grids")
    channels = defects[0].shape[-1]
    pooled = np.concatenate([g.reshape(-1, channels) for g in (*defects, *goods)])
    with torch.random.fork_rng():  # seeded init and dropout, global RNG left alone
        torch.manual_seed(seed)
        head = MaskHead(channels, hidden)
        with torch.no_grad():
            head.mean.copy_(torch.from_numpy(pooled.mean(0)).view(1, -1, 1, 1))
            head.std.copy_(torch.from_numpy(pooled.std(0) + 1e-6).view(1, -1, 1, 1))
        _train(head, defects, masks, goods, steps=steps, batch=batch, lr=lr, seed=seed)
    return head


def _train(
    head: MaskHead,
    defects: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    goods: Sequence[np.ndarray],
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    head.train()
    for _ in range(steps):
        items = []
        for _ in range(batch):
            if rng.random() < 0.5:
                k = int(rng.integers(len(defects)))
                x, m = defects[k], masks[k]
                if rng.random() < 0.5:
                    x, m = x[::-1], m[::-1]
                if rng.random() < 0.5:
                    x, m = x[:, ::-1], m[:, ::-1]
            else:
                x = goods[int(rng.integers(len(goods)))]
                m = np.zeros(x.shape[:2], np.float32)
            items.append((np.ascontiguousarray(x, np.float32), np.ascontiguousarray(m, np.float32)))
        loss = _batch_loss(head, items)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()


def _batch_loss(head: MaskHead, items: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """Mean binary cross-entropy per cell; the grids of each size run as one batch."""

    def tensors(group: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.stack([g[0] for g in group])).permute(0, 3, 1, 2)
        return x.contiguous(), torch.from_numpy(np.stack([g[1] for g in group]))[:, None]

    by_size: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for it in items:
        by_size.setdefault(it[1].shape, []).append(it)
    total = torch.zeros(())
    cells = 0
    for group in by_size.values():
        x, m = tensors(group)
        total = total + F.binary_cross_entropy_with_logits(head(x), m, reduction="sum")
        cells += m.numel()
    return total / cells

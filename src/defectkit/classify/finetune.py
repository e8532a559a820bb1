"""Fine-tuning the last blocks of an EfficientNet-Lite backbone with the head.

The frozen part runs once per training image (and augmented copy): its output at
the cut, and the pooled features of tapped layers before the cut, are kept. Then
only the last blocks and the head train, on those tensors, so an epoch costs the
last blocks alone (at stride 32, a few percent of the network). The blocks have
BatchNorm folded into their convolutions (as at inference), so they train as
plain convolutions with biases, without batch statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from defectkit.backbones import FeatureExtractor
from defectkit.classify.features import pool_maps
from defectkit.classify.head import HeadTraining, class_weights, train_loop
from defectkit.errors import ConfigError

__all__ = ["TunedBlocks", "lite_network", "tuned_block_indices"]


def lite_network(fx: FeatureExtractor) -> nn.Module:
    """The EfficientNet-Lite network inside a feature extractor (fine-tuning needs it)."""
    net = getattr(fx.body, "net", None)
    if net is None or not hasattr(net, "_blocks"):
        raise ConfigError(
            "fine-tuning needs an EfficientNet-Lite backbone; "
            f"{fx.backbone_name} is a custom module"
        )
    return net


def tuned_block_indices(layers: Sequence[str], n: int) -> list[int]:
    """The last ``n`` blocks up to the last tapped layer (``blocks.K``)."""
    taps = [int(name.split(".")[1]) for name in layers if name.startswith("blocks.")]
    if not taps:
        raise ConfigError(f"fine-tuning needs 'blocks.N' layers, got {list(layers)}")
    last = max(taps)
    if not 0 <= n <= last + 1:
        raise ConfigError(f"fine_tune must be in 0..{last + 1} for layers {list(layers)}, got {n}")
    return list(range(last - n + 1, last + 1))


class TunedBlocks(nn.Module):
    """Trainable copies of blocks ``first..last`` (plus, once set, the head) applied
    to the frozen output of block ``first - 1``; pools the tapped layers among them."""

    def __init__(self, fx: FeatureExtractor, blocks: list[int], pooling: Sequence[str]) -> None:
        super().__init__()
        net = lite_network(fx)
        self.indices = list(blocks)
        self.blocks = nn.ModuleList(copy.deepcopy(net._blocks[i]) for i in blocks)
        self.blocks.requires_grad_(True)
        taps = [int(n.split(".")[1]) for n in fx.layers]
        self.late_taps = [t for t in taps if t >= blocks[0]]
        self.pooling = list(pooling)
        self.head: nn.Linear | None = None

    def set_head(self, head: nn.Linear, mean: np.ndarray, scale: np.ndarray) -> None:
        """The head to train with the blocks, and the feature standardisation before it."""
        self.head = copy.deepcopy(head)
        self.head.requires_grad_(True)
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("scale", torch.from_numpy(scale.astype(np.float32)))

    def features(self, cut: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, d): ``early`` (pooled layers tapped before the cut, maybe
        (B, 0)) then the pooled tapped layers among the blocks, run from ``cut``."""
        x = cut
        found: dict[int, torch.Tensor] = {}
        for i, block in zip(self.indices, self.blocks, strict=True):
            x = block(x)
            if i in self.late_taps:
                found[i] = x
        late = pool_maps([found[t] for t in self.late_taps], self.pooling)
        return torch.cat([early, late], 1)

    def forward(self, cut: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ConfigError("TunedBlocks: set_head() before training")
        return self.head((self.features(cut, early) - self.mean) / self.scale)

    def copy_into(self, fx: FeatureExtractor) -> None:
        """Put the trained block weights into the extractor used at inference."""
        net = lite_network(fx)
        with torch.no_grad():
            for i, block in zip(self.indices, self.blocks, strict=True):
                for (name, p), (_, q) in zip(
                    net._blocks[i].named_parameters(), block.named_parameters(), strict=True
                ):
                    if p.shape != q.shape:
                        raise ConfigError(f"block {i} parameter {name}: shape mismatch")
                    p.copy_(q)


def frozen_inputs(
    fx: FeatureExtractor,
    batch: torch.Tensor,
    first_tuned: int,
    pooling: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of block ``first_tuned - 1``, pooled early taps) for one batch."""
    net = lite_network(fx)
    taps = [int(n.split(".")[1]) for n in fx.layers]
    early = [t for t in taps if t < first_tuned]
    cut = first_tuned - 1
    x = fx.preprocess(batch)
    if fx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        maps = net.forward_features(x, [*early, cut])
    cut_map = maps[-1].contiguous().clone()
    pooled = (
        pool_maps(maps[:-1], pooling).clone()
        if early
        else torch.zeros(batch.shape[0], 0, dtype=cut_map.dtype)
    )
    return cut_map, pooled


def fine_tune(
    model: TunedBlocks,
    cut: torch.Tensor,
    early: torch.Tensor,
    y: np.ndarray,
    n_classes: int,
    *,
    val: tuple[torch.Tensor, torch.Tensor, np.ndarray] | None,
    class_weight: str | None,
    lr: float,
    l2: float,
    max_epochs: int,
    patience: int,
    batch_size: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> HeadTraining:
    """Train the blocks (at ``lr``) and the head (at 10x ``lr``); early stopping on ``val``."""
    yt = torch.from_numpy(y).long()
    w = torch.from_numpy(class_weights(y, n_classes, class_weight))
    val_fn = None
    if val is not None and len(val[2]):
        vc, ve, vy = val
        vyt = torch.from_numpy(vy).long()

        def val_fn() -> float:
            with torch.no_grad():
                logits = torch.cat(
                    [
                        model(vc[s : s + batch_size], ve[s : s + batch_size])
                        for s in range(0, len(vyt), batch_size)
                    ]
                )
                return float(torch.nn.functional.cross_entropy(logits, vyt, weight=w))

    return train_loop(
        model,
        lambda idx: model(cut[idx], early[idx]),
        len(yt),
        yt,
        w,
        params=[
            {"params": model.blocks.parameters(), "lr": lr},
            {"params": model.head.parameters(), "lr": 10 * lr},
        ],
        val=val_fn,
        max_epochs=max_epochs,
        patience=patience,
        batch_size=batch_size,
        seed=seed,
        penalty=(lambda: 0.5 * l2 * model.head.weight.pow(2).sum()) if l2 > 0 else None,
        progress=progress,
    )

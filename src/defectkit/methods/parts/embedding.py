"""Locally aware patch embedding (PatchCore): pool each feature map over a small
neighbourhood, bring all maps to the finest one's grid, concatenate."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_embedding(features: list[torch.Tensor], neighbourhood: int = 3) -> torch.Tensor:
    """(B, sum C_i, h, w) from feature maps whose first entry has the finest grid."""
    h, w = features[0].shape[-2:]
    out = []
    for f in features:
        if neighbourhood > 1:
            f = F.avg_pool2d(
                f, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False
            )
        if f.shape[-2:] != (h, w):
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)

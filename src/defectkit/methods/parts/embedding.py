"""Locally aware patch embedding (PatchCore): pool each feature map over a small
neighbourhood, bring all maps to the finest one's grid, concatenate."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_embedding(
    features: list[torch.Tensor], neighbourhood: int = 3, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """(B, sum C_i, h, w) on ``grid`` (default: the first, finest map's grid).

    Maps finer than the grid are average-pooled down to it, coarser ones
    bilinearly upsampled, so fine detail can join without more patches.

    The neighbourhood pooling runs on channels-last tensors (the result is then
    channels-last too): PyTorch's CPU pooling kernel is much faster in that
    layout, and the values are bit-identical. PatchCore's embedding of four
    256 px images (lite2's stride-8 and -16 maps) takes 3.7-5.0 ms instead of
    10.5-13.3 ms on one thread.
    """
    h, w = grid if grid is not None else features[0].shape[-2:]
    out = []
    for f in features:
        if neighbourhood > 1:
            f = F.avg_pool2d(
                f.contiguous(memory_format=torch.channels_last),
                neighbourhood,
                stride=1,
                padding=neighbourhood // 2,
                count_include_pad=False,
            )
        if f.shape[-2] > h:
            f = F.adaptive_avg_pool2d(f, (h, w))
        elif f.shape[-2:] != (h, w):
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def with_position(emb: torch.Tensor, weight: float) -> torch.Tensor:
    """Append the patch's normalised (row, col) times ``weight`` as two channels.

    Nearest-neighbour matching then prefers good patches from about the same
    place: on parts whose images are aligned (a tile cut to the frame, a fixed
    fixture), an edge patch is compared with edges, not with the middle.
    ``weight`` sets how far (in feature distance) a move across the image costs.
    """
    if weight <= 0:
        return emb
    b, _, h, w = emb.shape
    rows = torch.linspace(0, 1, h, dtype=emb.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    cols = torch.linspace(0, 1, w, dtype=emb.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([emb, weight * rows, weight * cols], dim=1)

"""The trainable parts of the classifier: a softmax head on standardised features
(weighted cross-entropy, early stopping on a validation set) and temperature
scaling, which makes its probabilities calibrated (Guo et al., 2017)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HeadTraining",
    "class_weights",
    "fit_temperature",
    "train_head",
    "train_loop",
]


def class_weights(y: np.ndarray, n_classes: int, mode: str | None) -> np.ndarray:
    """Per-class loss weights: ``"balanced"`` = n / (classes * n_c), so every class
    weighs the same in total; ``None`` = 1 each."""
    if mode is None or mode == "none":
        return np.ones(n_classes, dtype=np.float32)
    if mode != "balanced":
        raise ValueError(f"class_weight must be 'balanced' or None, got {mode!r}")
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)


@dataclass
class HeadTraining:
    """What a training run did (stored in the model file's JSON)."""

    epochs: int = 0
    best_epoch: int = 0
    best_val_loss: float | None = None
    stopped_early: bool = False
    val_losses: list[float] = field(default_factory=list)


def train_loop(
    module: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    n_train: int,
    targets: torch.Tensor,
    weights: torch.Tensor,
    *,
    params: Iterable[dict] | Iterable[torch.Tensor],
    val: Callable[[], float] | None,
    max_epochs: int,
    patience: int,
    batch_size: int,
    seed: int,
    penalty: Callable[[], torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> HeadTraining:
    """Mini-batch Adam over ``forward(index batch) -> logits``; keeps the state of
    ``module`` at the epoch of lowest validation loss (``val()``), stops after
    ``patience`` epochs without improvement. Without ``val`` it runs ``max_epochs``.
    Shuffling comes from a generator seeded with ``seed``: same data, same result."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params)
    info = HeadTraining()
    best_state = copy.deepcopy(module.state_dict())
    best = math.inf
    since = 0
    for epoch in range(1, max_epochs + 1):
        module.train()
        order = torch.randperm(n_train, generator=gen)
        for start in range(0, n_train, batch_size):
            idx = order[start : start + batch_size]
            logits = forward(idx)
            loss = F.cross_entropy(logits, targets[idx], weight=weights)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        module.eval()
        info.epochs = epoch
        if progress is not None:
            progress(epoch, max_epochs)
        if val is None:
            continue
        v = float(val())
        info.val_losses.append(round(v, 6))
        if v < best - 1e-6:
            best, since = v, 0
            info.best_epoch, info.best_val_loss = epoch, v
            best_state = copy.deepcopy(module.state_dict())
        else:
            since += 1
            if since >= patience:
                info.stopped_early = True
                break
    if val is None:
        info.best_epoch = info.epochs
    else:
        module.load_state_dict(best_state)
    module.eval()
    return info


def train_head(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    class_weight: str | None = "balanced",
    l2: float = 1e-3,
    lr: float = 1e-3,
    max_epochs: int = 100,
    patience: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[nn.Linear, HeadTraining]:
    """A linear softmax head on standardised features ``x`` (n, d), labels ``y`` in
    ``0..n_classes-1``; L2 penalty ``l2/2 * ||W||^2`` on the mean loss. Starts from
    zero weights (the problem is convex: the start does not matter, and zero is
    deterministic)."""
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y).long()
    w = torch.from_numpy(class_weights(y, n_classes, class_weight))
    val = None
    if x_val is not None and y_val is not None and len(y_val):
        xv = torch.from_numpy(np.ascontiguousarray(x_val, np.float32))
        yv = torch.from_numpy(y_val).long()

        def val() -> float:
            with torch.no_grad():
                return float(F.cross_entropy(head(xv), yv, weight=w))

    info = train_loop(
        head,
        lambda idx: head(xt[idx]),
        len(yt),
        yt,
        w,
        params=[{"params": head.parameters(), "lr": lr}],
        val=val,
        max_epochs=max_epochs,
        patience=patience,
        batch_size=batch_size,
        seed=seed,
        penalty=(lambda: 0.5 * l2 * head.weight.pow(2).sum()) if l2 > 0 else None,
        progress=progress,
    )
    return head, info


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 that minimises the negative log-likelihood of
    ``softmax(logits / T)`` on held-out labels; 1.0 when there are none.

    Dividing by T keeps every image's ranking of classes (so accuracy does not
    change) and makes a stated probability of 0.9 right about 9 times in 10.
    The targets are softened by the rule of succession: the true class gets
    ``1 - 1/(n + 2)`` for ``n`` held-out images, the rest is shared by the other
    classes. Without it, a validation set the head classifies without error
    drives T to 0 and every probability to 1; with it, n correct answers give a
    confidence of about ``1 - 1/(n + 2)``, as much as n answers can show.
    Searched on log T in [-4, 4] (T from 0.02 to 55).
    """
    n = len(y)
    if n == 0:
        return 1.0
    z = torch.from_numpy(np.asarray(logits, np.float64))
    c = z.shape[1]
    eps = 1.0 / (n + 2)
    target = torch.full((n, c), eps / max(c - 1, 1), dtype=torch.float64)
    target[torch.arange(n), torch.from_numpy(np.asarray(y)).long()] = 1.0 - eps

    def nll(log_t: float) -> float:
        return float(-(target * F.log_softmax(z / math.exp(log_t), 1)).sum(1).mean())

    from scipy.optimize import minimize_scalar  # 0.7 s to import; only fitting needs it

    res = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-4})
    temperature = math.exp(float(res.x))
    # never worse than no scaling on the data it was fitted on
    return temperature if nll(float(res.x)) <= nll(0.0) else 1.0

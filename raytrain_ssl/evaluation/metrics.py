"""Classification metrics shared by the training loops and the `eval` command."""

from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Fraction of rows whose label is among the k highest logits, for each k (k above the number of
    classes counts every row as correct, as torchmetrics does). Empty input gives 0.0."""
    if labels.numel() == 0:
        return [0.0 for _ in ks]
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.reshape(-1, 1)
    return [float(hits[:, :k].any(dim=1).float().mean()) for k in ks]

"""A MoCo-style queue of past keys used as extra negatives for NT-Xent (He et al. 2019, arXiv 1911.05722).

SimCLRv2 reports a small gain from such a memory with a momentum encoder; it also lets small batches (CPU)
see more negatives. The queue lives in buffers, so it is saved and restored with the model's state_dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrain_ssl import dist


class NegativeQueue(nn.Module):
    """Ring buffer of `size` L2-normalised keys of dimension `dim`, identical on every rank.

    Buffers: `queue` (size, dim), `ptr` (next row to write), `num_filled` (rows holding real keys; the
    random initial rows are never returned).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"size and dim must be > 0, got size={size}, dim={dim}")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Add this rank's (n, dim) keys; all ranks' keys are gathered (a collective: call on every rank)."""
        keys = dist.all_gather_no_grad(keys.detach())
        keys = F.normalize(keys.to(self.queue), dim=1)[-self.size :]  # only the newest `size` rows can stay
        rows = (int(self.ptr) + torch.arange(keys.shape[0], device=self.queue.device)) % self.size
        self.queue[rows] = keys
        self.ptr.fill_((int(self.ptr) + keys.shape[0]) % self.size)
        self.num_filled.fill_(min(int(self.num_filled) + keys.shape[0], self.size))

    def negatives(self) -> Tensor | None:
        """The filled rows (num_filled, dim), detached; None before the first enqueue."""
        filled = int(self.num_filled)
        if filled == 0:
            return None
        # Writing starts at row 0, so until the ring is full the filled rows are exactly the first ones.
        return self.queue[:filled].detach()

"""SimCLRv2 projection head g(h) (google-research/simclr, tf2/model.py `ProjectionHead`, `LinearLayer`).

Each layer is Linear (no bias) -> BatchNorm, with ReLU after every layer but the last. The last BN has a
scale but no shift (TF `center=False`): a shift right before the normalised contrastive loss is dead
weight. SimCLRv2 fine-tunes from a middle layer of this head ("fine-tune from layer 1" of 3), hence
`hiddens`, `truncated` and `layer_dim`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]


def _linear(in_dim: int, out_dim: int) -> nn.Linear:
    # TF LinearLayer: RandomNormal(stddev=0.01) kernel; no bias because BN follows.
    linear = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.normal_(linear.weight, std=0.01)
    return linear


class ProjectionHead(nn.Module):
    """MLP head h (N, in_dim) -> z (N, out_dim).

    Args:
        in_dim: encoder feature width (`ResNet.num_features`).
        hidden_dim: width of the middle layers; None means in_dim, as SimCLRv2 does.
        out_dim: width of z (128 in SimCLR).
        num_layers: 3 in SimCLRv2, 2 in SimCLR v1; 0 means no head (identity, z = h).
        norm_layer: called as norm_layer(width). The last norm's bias is removed (set to None, which
            PyTorch's BatchNorm and SyncBatchNorm.convert_sync_batchnorm both accept), so code that
            swaps norm modules must carry a None bias over as None.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int | None = None,
        out_dim: int = 128,
        num_layers: int = 3,
        norm_layer: NormLayer = nn.BatchNorm1d,
    ) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        self.in_dim = in_dim
        self.num_layers = num_layers
        # dims[k] = output width after k layers; dims[0] is the input.
        self._dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim] * (num_layers > 0)
        self.out_dim = self._dims[-1]

        layers = []
        for k in range(num_layers):
            is_last = k == num_layers - 1
            norm = norm_layer(self._dims[k + 1])
            if is_last:
                norm.bias = None  # TF center=False: scale, no shift
                layers.append(nn.Sequential(_linear(self._dims[k], self._dims[k + 1]), norm))
            else:
                relu = nn.ReLU(inplace=True)
                layers.append(nn.Sequential(_linear(self._dims[k], self._dims[k + 1]), norm, relu))
        self.layers = nn.ModuleList(layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h

    def hiddens(self, h: torch.Tensor) -> list[torch.Tensor]:
        """[h, after layer 1, ..., after layer L]; entry k is what "fine-tune from layer k" feeds on."""
        outputs = [h]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        return outputs

    def truncated(self, k: int) -> nn.Module:
        """The first k layers as a module sharing this head's parameters (k = 0 -> nn.Identity)."""
        self._check_k(k)
        return nn.Sequential(*self.layers[:k]) if k > 0 else nn.Identity()

    def layer_dim(self, k: int) -> int:
        """Output width of the first k layers (k = 0 -> in_dim)."""
        self._check_k(k)
        return self._dims[k]

    def _check_k(self, k: int) -> None:
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"layer index {k} out of range; valid: 0..{self.num_layers}")

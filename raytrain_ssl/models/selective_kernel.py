"""Selective-kernel convolution as SimCLRv2 uses it (google-research/simclr, tf2/resnet.py `SK_Conv2D`).

Li et al. 2019, "Selective Kernel Networks" (arXiv:1903.06586). SimCLRv2's variant differs from the paper:
both streams are 3x3 (not 3x3 + dilated 3x3), computed by one conv with twice the filters, and the
attention is a 1x1 conv -> BN -> ReLU -> 1x1 conv with a softmax across the two streams.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]

# SimCLRv2 trains every SK model with sk_ratio=0.0625 and a floor of 32 attention channels.
SK_RATIO = 0.0625
SK_MIN_DIM = 32


def init_conv_(weight: torch.Tensor) -> torch.Tensor:
    """TF2 Keras `VarianceScaling()` default: fan-in, truncated normal cut at 2 std.

    0.8796 is the std of a unit normal truncated to [-2, 2]; dividing by it makes the *effective* std
    sqrt(1 / fan_in), as Keras does. Meta tensors pass through untouched (no data to fill).
    """
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free conv with TF `Conv2dFixedPadding` geometry.

    For odd kernels TF pads (k-1)//2 on both sides whatever the stride, which is PyTorch's symmetric
    `padding=k//2`; every conv in SimCLR's ResNet has an odd kernel.
    """
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
    )
    init_conv_(conv.weight)
    return conv


class SelectiveKernelConv(nn.Module):
    """Two 3x3 streams mixed by per-channel softmax attention. (N, C_in, H, W) -> (N, C_out, H/s, W/s).

    Replaces the 3x3 conv + BN + ReLU of a bottleneck block; it ends with its own BN + ReLU on the
    streams, so the block does not add another.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm_layer: NormLayer,
        sk_ratio: float = SK_RATIO,
        min_dim: int = SK_MIN_DIM,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        # One conv computes both streams: channels [0, C) are stream 0, [C, 2C) stream 1.
        self.conv = conv2d(in_channels, 2 * out_channels, 3, stride)
        self.bn = norm_layer(2 * out_channels)
        self.relu = nn.ReLU(inplace=True)
        mid_dim = max(int(out_channels * sk_ratio), min_dim)
        self.attn_reduce = conv2d(out_channels, mid_dim, 1)
        self.attn_bn = norm_layer(mid_dim)
        self.attn_expand = conv2d(mid_dim, 2 * out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        streams = self.relu(self.bn(self.conv(x)))
        s0, s1 = streams.chunk(2, dim=1)
        # Global context of the fused streams, shape (N, C, 1, 1).
        context = (s0 + s1).mean(dim=(2, 3), keepdim=True)
        context = self.relu(self.attn_bn(self.attn_reduce(context)))
        logits = self.attn_expand(context)
        # Softmax across the two streams, independently per channel.
        weights = torch.stack(logits.chunk(2, dim=1), dim=0).softmax(dim=0)
        return s0 * weights[0] + s1 * weights[1]

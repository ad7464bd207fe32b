"""SimCLRv2's ResNet encoder (google-research/simclr, tf2/resnet.py), written for PyTorch.

Differences from torchvision's ResNet, all taken from the TF source:
- every block group's first block has a projection shortcut, even where shapes already match
  (group 1 of ResNet-18/34);
- the last BN of every residual branch starts with gamma = 0, so each block starts as the identity;
- pooling uses TF "SAME"/fixed padding (pads at the bottom/right), so converted checkpoints line up;
- with selective kernels on (SimCLRv2's "SK", sk_ratio 0.0625) three more things change, ResNet-D style:
  the 7x7 stem becomes three 3x3 convs (C/2, C/2, C), projection shortcuts become
  2x2 avg-pool -> 1x1 conv instead of a strided 1x1 conv, and bottleneck 3x3 convs become SK convs.
  Basic blocks (ResNet-18/34) get the stem and shortcut changes but keep plain 3x3 convs.

The model knows nothing about distribution: `norm_layer` is injected and every norm is an instance of
it, so a training stage can swap BatchNorm for a global (synchronised) one by module replacement.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_ssl.models.selective_kernel import NormLayer, SelectiveKernelConv, conv2d

# depth -> (block type, blocks per group), as in tf2/resnet.py `resnet()`.
_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
SUPPORTED_DEPTHS: tuple[int, ...] = tuple(_DEPTHS)

# Fractional widths exist for CPU tests; below 8 channels BN statistics and SK splits get silly.
MIN_CHANNELS = 8


def scaled_channels(channels: int, width_multiplier: float) -> int:
    """Channel count after the width multiplier: max(8, round(channels * width)).

    Exact for SimCLRv2's integer widths (1x, 2x, 3x); for fractional widths (0.125, 0.25, 0.5) it gives
    the obvious numbers (64 * 0.25 = 16) with a floor of 8.
    """
    return max(MIN_CHANNELS, int(round(channels * width_multiplier)))


class _ShortcutAvgPool(nn.Module):
    """The 2x2 average pool of SimCLRv2's ResNet-D shortcut, padded exactly as TF pads it.

    stride 2: TF pads one zero row/column at the bottom/right, then pools VALID; the zeros count in the
    average. stride 1: TF pools with SAME padding, which averages only real pixels at the border.
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (0, 1, 0, 1))
        if self.stride > 1:
            return F.avg_pool2d(padded, 2, self.stride)
        summed = F.avg_pool2d(padded, 2, 1, divisor_override=1)
        counts = F.avg_pool2d(F.pad(x.new_ones((1, 1) + x.shape[2:]), (0, 1, 0, 1)), 2, 1, divisor_override=1)
        return summed / counts


class _MaxPoolSame(nn.Module):
    """3x3/2 max pool with TF SAME padding (extra padding at the bottom/right, unlike PyTorch's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size in (x.shape[3], x.shape[2]):  # F.pad wants the last dim first
            total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 3, 2)


def _projection_shortcut(
    in_channels: int, out_channels: int, stride: int, selective_kernel: bool, norm_layer: NormLayer
) -> nn.Sequential:
    if selective_kernel:  # ResNet-D: pool first so the 1x1 conv sees every pixel
        return nn.Sequential(
            _ShortcutAvgPool(stride), conv2d(in_channels, out_channels, 1), norm_layer(out_channels)
        )
    return nn.Sequential(conv2d(in_channels, out_channels, 1, stride), norm_layer(out_channels))


class BasicBlock(nn.Module):
    """3x3 -> 3x3 residual block (ResNet-18/34). Output channels = `channels`."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int,
        projection: bool,
        selective_kernel: bool,
        norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        self.shortcut = (
            _projection_shortcut(in_channels, channels, stride, selective_kernel, norm_layer)
            if projection
            else nn.Identity()
        )
        self.conv1 = conv2d(in_channels, channels, 3, stride)
        self.bn1 = norm_layer(channels)
        self.conv2 = conv2d(channels, channels, 3)
        self.bn2 = norm_layer(channels)
        self.relu = nn.ReLU(inplace=True)

    def zero_init_last_norm(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (or SK) -> 1x1 residual block (ResNet-50+). Output channels = 4 * `channels`."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int,
        projection: bool,
        selective_kernel: bool,
        norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.shortcut = (
            _projection_shortcut(in_channels, out_channels, stride, selective_kernel, norm_layer)
            if projection
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv2d(in_channels, channels, 1)
        self.bn1 = norm_layer(channels)
        # The stride sits on the 3x3 conv (as in TF and torchvision "ResNet v1.5").
        if selective_kernel:
            self.conv2: nn.Module = SelectiveKernelConv(channels, channels, stride, norm_layer)
        else:
            self.conv2 = nn.Sequential(
                conv2d(channels, channels, 3, stride), norm_layer(channels), nn.ReLU(inplace=True)
            )
        self.conv3 = conv2d(channels, out_channels, 1)
        self.bn3 = norm_layer(out_channels)

    def zero_init_last_norm(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)  # includes its BN + ReLU
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """SimCLRv2 ResNet encoder: images (N, 3, H, W) -> pooled features (N, num_features).

    Args:
        depth: one of 18, 34 (basic blocks), 50, 101, 152, 200 (bottleneck blocks).
        width_multiplier: scales every channel count (see `scaled_channels`); 1, 2, 3 in the paper.
        selective_kernel: SimCLRv2's "+SK" variant (SK convs, ResNet-D stem and shortcuts).
        small_image_stem: for inputs of 64 px and below (CIFAR): one 3x3 stride-1 conv, no max pool.
        norm_layer: called as norm_layer(channels) for every norm; BatchNorm2d matches TF's defaults
            (eps 1e-5, decay 0.9 == momentum 0.1).

    Attributes: `stem`, `block_groups` (4 stages; SimCLR's fine_tune_after_block counts these),
    `num_features`.
    """

    def __init__(
        self,
        depth: int,
        width_multiplier: float = 1.0,
        selective_kernel: bool = False,
        small_image_stem: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"unknown ResNet depth {depth}; known: {', '.join(map(str, SUPPORTED_DEPTHS))}")
        if width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
        self.depth = depth
        self.width_multiplier = width_multiplier
        self.selective_kernel = selective_kernel
        self.small_image_stem = small_image_stem

        kind, blocks_per_group = _DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        stem_channels = scaled_channels(64, width_multiplier)
        self.stem = self._make_stem(stem_channels, norm_layer)

        groups = []
        in_channels = stem_channels
        for index, num_blocks in enumerate(blocks_per_group):
            channels = scaled_channels(64 * 2**index, width_multiplier)
            group = []
            for position in range(num_blocks):
                stride = 2 if (index > 0 and position == 0) else 1
                # Every group's first block projects its shortcut, even at stride 1 (as TF does).
                projection = position == 0
                group.append(block(in_channels, channels, stride, projection, selective_kernel, norm_layer))
                in_channels = channels * block.expansion
            groups.append(nn.Sequential(*group))
        self.block_groups = nn.ModuleList(groups)
        self.num_features = in_channels

        for module in self.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                module.zero_init_last_norm()

    def _make_stem(self, channels: int, norm_layer: NormLayer) -> nn.Sequential:
        if self.small_image_stem:
            return nn.Sequential(conv2d(3, channels, 3), norm_layer(channels), nn.ReLU(inplace=True))
        if self.selective_kernel:
            half = scaled_channels(32, self.width_multiplier)
            convs: list[nn.Module] = [
                conv2d(3, half, 3, stride=2),
                norm_layer(half),
                nn.ReLU(inplace=True),
                conv2d(half, half, 3),
                norm_layer(half),
                nn.ReLU(inplace=True),
                conv2d(half, channels, 3),
            ]
        else:
            convs = [conv2d(3, channels, 7, stride=2)]
        return nn.Sequential(*convs, norm_layer(channels), nn.ReLU(inplace=True), _MaxPoolSame())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling: (N, num_features, H/32, W/32), or H/8 with the small stem."""
        x = self.stem(x)
        for group in self.block_groups:
            x = group(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean() rather than flatten/view: works for channels_last maps without a copy.
        return self.forward_features(x).mean(dim=(2, 3))

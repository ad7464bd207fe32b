"""Encoder names, timm style: `r{depth}_{width}x_sk{0|1}`, e.g. `r50_1x_sk0`, `r152_3x_sk1`, `r18_0.25x_sk0`.

The names are those of SimCLRv2's released checkpoints. The 36 paper-sized variants (depth 18..200 x
width 1/2/3 x SK off/on) are registered and listed; any other positive width parses too, so tiny CPU
models (`r18_0.125x_sk0`) need no registration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from raytrain_ssl.models.resnet import SUPPORTED_DEPTHS, ResNet
from raytrain_ssl.models.selective_kernel import NormLayer

ModelFn = Callable[..., ResNet]
_MODELS: dict[str, ModelFn] = {}
_NAME_PATTERN = re.compile(r"r(\d+)_(\d+(?:\.\d+)?)x_sk([01])")
_REGISTERED_WIDTHS = (1, 2, 3)


@dataclass(frozen=True)
class ModelSpec:
    depth: int
    width_multiplier: float
    selective_kernel: bool

    @property
    def name(self) -> str:
        return model_name(self.depth, self.width_multiplier, self.selective_kernel)


def register_model(fn: ModelFn) -> ModelFn:
    """Decorator: register `fn(**kwargs) -> ResNet` under `fn.__name__`."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def model_name(depth: int, width_multiplier: float, selective_kernel: bool) -> str:
    """Canonical name: integer widths print without a decimal point (`r50_2x_sk1`, `r18_0.25x_sk0`)."""
    width = float(width_multiplier)
    width_text = str(int(width)) if width.is_integer() else repr(width)
    return f"r{depth}_{width_text}x_sk{int(bool(selective_kernel))}"


def _unknown(name: str) -> ValueError:
    depths = "/".join(map(str, SUPPORTED_DEPTHS))
    return ValueError(
        f"unknown model {name!r}; known: {', '.join(_MODELS)}, "
        f"or r{{depth}}_{{width}}x_sk{{0|1}} with depth in {depths}"
    )


def parse_model_name(name: str) -> ModelSpec:
    """`r{depth}_{width}x_sk{0|1}` -> ModelSpec; ValueError listing the valid names otherwise."""
    match = _NAME_PATTERN.fullmatch(name)
    if match is None:
        raise _unknown(name)
    depth, width, sk = int(match[1]), float(match[2]), match[3] == "1"
    if depth not in SUPPORTED_DEPTHS or width <= 0:
        raise _unknown(name)
    return ModelSpec(depth, width, sk)


def _make_variant(depth: int, width: int, selective_kernel: bool) -> ModelFn:
    def variant(small_image_stem: bool = False, norm_layer: NormLayer = nn.BatchNorm2d) -> ResNet:
        return ResNet(depth, width, selective_kernel, small_image_stem, norm_layer)

    variant.__name__ = variant.__qualname__ = model_name(depth, width, selective_kernel)
    variant.__doc__ = f"SimCLRv2 ResNet-{depth} {width}x{' + SK' if selective_kernel else ''}."
    return variant


# The paper-sized family, generated: 36 hand-written five-line functions would say nothing more.
for _depth in SUPPORTED_DEPTHS:
    for _width in _REGISTERED_WIDTHS:
        for _sk in (False, True):
            register_model(_make_variant(_depth, _width, _sk))


def list_models() -> list[str]:
    """Registered names, by depth, then width, then SK."""
    return list(_MODELS)


def create_encoder(
    name: str, small_image_stem: bool = False, norm_layer: NormLayer = nn.BatchNorm2d
) -> ResNet:
    """Build the encoder called `name` (registered, or any parseable `r{depth}_{width}x_sk{0|1}`).

    Wrap in `with torch.device("meta"):` to size a model without allocating it.
    """
    if name in _MODELS:
        return _MODELS[name](small_image_stem=small_image_stem, norm_layer=norm_layer)
    spec = parse_model_name(name)
    return ResNet(spec.depth, spec.width_multiplier, spec.selective_kernel, small_image_stem, norm_layer)


def count_parameters(module: nn.Module, include_buffers: bool = False) -> int:
    """Number of parameter elements (trainable or frozen).

    include_buffers=True also counts floating-point buffers (BN running mean/variance): TF checkpoints
    store those as variables, and SimCLRv2's Table 1 "Param (M)" counts them (see tests/models).
    """
    total = sum(p.numel() for p in module.parameters())
    if include_buffers:
        total += sum(b.numel() for b in module.buffers() if b.is_floating_point())
    return total

"""Model registry: names, parsing, round trips, errors, creation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from raytrain_ssl.models import (
    ModelSpec,
    ResNet,
    count_parameters,
    create_encoder,
    list_models,
    model_name,
    parse_model_name,
    register_model,
)


def test_registered_family() -> None:
    names = list_models()
    assert len(names) == 36 == len(set(names))
    assert names[:2] == ["r18_1x_sk0", "r18_1x_sk1"]
    assert {"r50_1x_sk0", "r50_2x_sk1", "r101_1x_sk1", "r152_3x_sk1", "r200_3x_sk0"} <= set(names)


@pytest.mark.parametrize("name", list_models() + ["r18_0.25x_sk0", "r50_0.125x_sk1", "r34_1.5x_sk0"])
def test_name_round_trip(name: str) -> None:
    spec = parse_model_name(name)
    assert model_name(*dataclasses.astuple(spec)) == name == spec.name


def test_parse_values_and_canonical_form() -> None:
    assert parse_model_name("r18_0.25x_sk0") == ModelSpec(18, 0.25, False)
    assert parse_model_name("r152_3x_sk1") == ModelSpec(152, 3.0, True)
    assert parse_model_name("r50_1.0x_sk1").name == "r50_1x_sk1"
    assert model_name(50, 1, True) == "r50_1x_sk1"


BAD_NAMES = ["r51_1x", "r51_1x_sk0", "r50_0x_sk0", "r50_1x_sk2", "resnet50", "r50_1x_sk0 "]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_unknown_name_gives_one_line_with_choices(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_model_name(bad)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"unknown model {bad!r}; known: r18_1x_sk0, r18_1x_sk1, ")
    assert message.endswith("or r{depth}_{width}x_sk{0|1} with depth in 18/34/50/101/152/200")
    with pytest.raises(ValueError, match="unknown model"):
        create_encoder(bad)


def test_create_encoder_passes_options() -> None:
    class MarkedNorm(nn.BatchNorm2d):
        pass

    with torch.device("meta"):
        big = create_encoder("r152_3x_sk1", small_image_stem=True, norm_layer=MarkedNorm)
    assert isinstance(big, ResNet) and big.small_image_stem and big.selective_kernel
    assert (big.depth, big.width_multiplier) == (152, 3)
    assert any(isinstance(m, MarkedNorm) for m in big.modules())
    tiny = create_encoder("r18_0.25x_sk0")
    assert (tiny.depth, tiny.width_multiplier, tiny.selective_kernel) == (18, 0.25, False)


def test_count_parameters() -> None:
    assert count_parameters(nn.Linear(3, 4)) == 16
    bn = nn.BatchNorm1d(5)
    assert count_parameters(bn) == 10
    assert count_parameters(bn, include_buffers=True) == 20  # + running mean/var, not the step counter


def test_register_model_rejects_duplicates() -> None:
    def r18_1x_sk0() -> ResNet:  # same name as a registered variant
        return ResNet(18)

    with pytest.raises(ValueError, match="already registered"):
        register_model(r18_1x_sk0)

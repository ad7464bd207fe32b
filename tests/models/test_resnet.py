"""ResNet encoder: sizes against the SimCLRv2 paper, shapes, init, memory format, TF padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raytrain_ssl.models import ResNet, count_parameters, create_encoder
from raytrain_ssl.models.resnet import BasicBlock, Bottleneck, _MaxPoolSame, _ShortcutAvgPool

# SimCLRv2 (Chen et al. 2020, arXiv:2006.10029) Table 1, "Param (M)", as republished in the
# google-research/simclr README checkpoint table: (depth, width, sk) -> millions.
PAPER_PARAMS_M = {
    (50, 1, False): 24,
    (50, 1, True): 35,
    (50, 2, False): 94,
    (50, 2, True): 140,
    (101, 1, False): 43,
    (101, 1, True): 65,
    (101, 2, False): 170,
    (101, 2, True): 257,
    (152, 1, False): 58,
    (152, 1, True): 89,
    (152, 2, False): 233,
    (152, 2, True): 354,
    (152, 3, True): 795,
}


def _meta_encoder(depth: int, width: float, sk: bool) -> ResNet:
    # Meta tensors have shapes but no storage: a 795M-parameter model costs nothing to build.
    with torch.device("meta"):
        return ResNet(depth, width, sk)


@pytest.mark.parametrize("depth,width,sk", list(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(depth: int, width: int, sk: bool) -> None:
    model = _meta_encoder(depth, width, sk)
    expected_m = PAPER_PARAMS_M[(depth, width, sk)]
    # The paper counts TF variables of the encoder, which include BN moving mean/variance: with them,
    # all 13 entries round to the published number. Trainable parameters alone are 0.05-0.5% fewer,
    # which flips the rounding for R152 2x (232.25M) and 2x+SK (353.40M).
    assert round(count_parameters(model, include_buffers=True) / 1e6) == expected_m
    trainable_m = count_parameters(model) / 1e6
    assert expected_m - 1 < trainable_m < expected_m + 0.5


def test_known_exact_counts() -> None:
    # Trainable parameters of two anchors, so a structural change shows up as a number, not a rounding.
    assert count_parameters(_meta_encoder(50, 1, False)) == 23_508_032  # torchvision R50 minus fc
    # SimCLR gives group 1 of ResNet-18 a projection shortcut (1x1 conv 64->64 + BN) torchvision lacks.
    assert count_parameters(_meta_encoder(18, 1, False)) == 11_176_512 + 64 * 64 + 2 * 64


@pytest.mark.parametrize(
    "name,size,small,features,spatial",
    [
        ("r18_0.25x_sk0", 224, False, 128, 7),
        ("r50_0.125x_sk1", 224, False, 256, 7),
        ("r18_0.25x_sk0", 32, True, 128, 4),
        ("r50_0.125x_sk1", 32, True, 256, 4),
    ],
)
def test_output_shapes(name: str, size: int, small: bool, features: int, spatial: int) -> None:
    model = create_encoder(name, small_image_stem=small).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, features, spatial, spatial)
        assert model(x).shape == (2, features)
    assert model.num_features == features


def test_full_width_feature_dims() -> None:
    assert _meta_encoder(18, 1, False).num_features == 512
    assert _meta_encoder(50, 1, True).num_features == 2048
    assert _meta_encoder(152, 3, True).num_features == 6144


@pytest.mark.parametrize("name", ["r18_0.25x_sk0", "r34_0.125x_sk1", "r50_0.125x_sk0", "r50_0.125x_sk1"])
def test_tiny_variants_train_step(name: str) -> None:
    model = create_encoder(name, small_image_stem=True).train()
    out = model(torch.randn(4, 3, 32, 32))
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_block_final_norm_gammas_start_at_zero() -> None:
    for name in ("r18_0.25x_sk1", "r50_0.125x_sk1"):
        model = create_encoder(name)
        blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        assert len(blocks) == (8 if name.startswith("r18") else 16)
        for block in blocks:
            last = block.bn2 if isinstance(block, BasicBlock) else block.bn3
            assert torch.all(last.weight == 0)
        # ...and only those: every other norm starts at gamma = 1.
        finals = {id(b.bn2 if isinstance(b, BasicBlock) else b.bn3) for b in blocks}
        others = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in finals]
        assert others and all(torch.all(m.weight == 1) for m in others)


def test_selective_kernel_changes_stem_and_shortcuts() -> None:
    def convs(model: ResNet) -> list[nn.Conv2d]:
        return [c for c in model.stem if isinstance(c, nn.Conv2d)]

    plain, sk = create_encoder("r50_0.125x_sk0"), create_encoder("r50_0.125x_sk1")
    assert [c.kernel_size for c in convs(plain)] == [(7, 7)]
    assert [c.kernel_size for c in convs(sk)] == [(3, 3)] * 3
    assert isinstance(sk.block_groups[1][0].shortcut[0], _ShortcutAvgPool)
    assert plain.block_groups[1][0].shortcut[0].stride == (2, 2)
    # The small-image stem ignores SK: a single 3x3 stride-1 conv and no pooling.
    small = create_encoder("r50_0.125x_sk1", small_image_stem=True)
    assert [(c.kernel_size, c.stride) for c in convs(small)] == [((3, 3), (1, 1))]
    assert not any(isinstance(m, _MaxPoolSame) for m in small.stem)


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = create_encoder("r50_0.125x_sk1", small_image_stem=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    # Training step in channels_last too (backward through chunk/stack of non-contiguous maps).
    model.train()(x.to(memory_format=torch.channels_last)).sum().backward()


def test_norm_layer_is_injected_everywhere() -> None:
    class MarkedNorm(nn.BatchNorm2d):
        pass

    model = create_encoder("r50_0.125x_sk1", norm_layer=MarkedNorm)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert norms and all(type(m) is MarkedNorm for m in norms)


def test_bad_depth_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown ResNet depth 51; known: 18, 34, 50, 101, 152, 200"):
        ResNet(51)


def test_maxpool_pads_like_tf_same() -> None:
    # 4x4 input, 3x3 stride 2 SAME: TF pads one row/col at the end only, so windows start at 0 and 2.
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    expected = torch.tensor([[[[10.0, 11.0], [14.0, 15.0]]]])
    torch.testing.assert_close(_MaxPoolSame()(x), expected)


def test_shortcut_avgpool_pads_like_tf() -> None:
    ones = torch.ones(1, 1, 3, 3)
    # stride 1 (SAME): border windows average only real pixels.
    torch.testing.assert_close(_ShortcutAvgPool(1)(ones), ones)
    # stride 2 (fixed zero pad + VALID): padded zeros count in the average.
    expected = torch.tensor([[[[1.0, 0.5], [0.5, 0.25]]]])
    torch.testing.assert_close(_ShortcutAvgPool(2)(ones), expected)

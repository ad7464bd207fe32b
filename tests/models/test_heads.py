"""ProjectionHead: SimCLRv2 layer structure, hiddens, truncation for fine-tuning from layer k."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raytrain_ssl.models import ProjectionHead


def test_layer_structure_matches_simclrv2() -> None:
    head = ProjectionHead(32, out_dim=8, num_layers=3)
    assert len(head.layers) == 3
    for k, layer in enumerate(head.layers):
        linear, norm = layer[0], layer[1]
        assert isinstance(linear, nn.Linear) and linear.bias is None
        assert isinstance(norm, nn.BatchNorm1d)
        is_last = k == 2
        # Middle layers: BN with shift, then ReLU. Last: BN with scale only (TF center=False), no ReLU.
        assert (norm.bias is None) == is_last
        assert isinstance(layer[-1], nn.ReLU) != is_last
    assert [head.layer_dim(k) for k in range(4)] == [32, 32, 32, 8]
    assert head.out_dim == 8


def test_hidden_dim_and_single_layer() -> None:
    head = ProjectionHead(32, hidden_dim=16, out_dim=8, num_layers=2)
    assert [head.layer_dim(k) for k in range(3)] == [32, 16, 8]
    linear = ProjectionHead(32, out_dim=8, num_layers=1)  # SimCLR's "linear" head mode
    assert linear.layers[0][1].bias is None and not isinstance(linear.layers[0][-1], nn.ReLU)


def test_hiddens_and_forward() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(16, out_dim=4, num_layers=3).eval()
    h = torch.randn(5, 16)
    hiddens = head.hiddens(h)
    assert len(hiddens) == 4
    assert [t.shape[1] for t in hiddens] == [16, 16, 16, 4]
    assert hiddens[0] is h
    torch.testing.assert_close(head(h), hiddens[-1])
    assert (hiddens[1] >= 0).all()  # post-ReLU, as SimCLRv2 hands to the fine-tuning head


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_truncated_shares_parameters(k: int) -> None:
    torch.manual_seed(0)
    head = ProjectionHead(16, out_dim=4, num_layers=3).eval()
    sub = head.truncated(k)
    if k == 0:
        assert isinstance(sub, nn.Identity)
    head_params = {id(p) for p in head.parameters()}
    assert all(id(p) in head_params for p in sub.parameters())
    expected = sum(p.numel() for layer in head.layers[:k] for p in layer.parameters())
    assert sum(p.numel() for p in sub.parameters()) == expected
    h = torch.randn(5, 16)
    torch.testing.assert_close(sub(h), head.hiddens(h)[k])
    assert sub(h).shape[1] == head.layer_dim(k)
    # A change through the truncated module is a change in the head.
    if k > 0:
        with torch.no_grad():
            next(sub.parameters()).add_(1.0)
        torch.testing.assert_close(sub(h), head.hiddens(h)[k])


def test_no_head() -> None:
    head = ProjectionHead(16, num_layers=0)
    h = torch.randn(3, 16)
    assert head(h) is h
    assert len(head.hiddens(h)) == 1
    assert head.out_dim == 16 and head.layer_dim(0) == 16
    assert not list(head.parameters())


def test_train_step_and_bad_k() -> None:
    head = ProjectionHead(16, out_dim=4).train()
    head(torch.randn(6, 16)).sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="layer index 4 out of range; valid: 0..3"):
        head.truncated(4)


def test_sync_batchnorm_conversion_keeps_missing_bias() -> None:
    # The training stage swaps BN for a global one; the scale-only last BN must survive that.
    head = nn.SyncBatchNorm.convert_sync_batchnorm(ProjectionHead(16, out_dim=4))
    norms = [layer[1] for layer in head.layers]
    assert all(isinstance(n, nn.SyncBatchNorm) for n in norms)
    assert norms[-1].bias is None and norms[0].bias is not None

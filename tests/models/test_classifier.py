"""Fine-tuning network: head layers 1..k kept exactly, new zero-initialised classifier, spec round trip."""

from __future__ import annotations

import pytest
import torch

from raytrain_ssl.models import ProjectionHead, create_encoder
from raytrain_ssl.models.classifier import ClassifierSpec, HeadSpec, load_pretrained

NAME = "r18_0.25x_sk0"


def _pretrain_state(num_layers=3, hidden=None, out=32):
    torch.manual_seed(0)
    encoder = create_encoder(NAME, small_image_stem=True)
    head = ProjectionHead(encoder.num_features, hidden_dim=hidden, out_dim=out, num_layers=num_layers)
    for p in head.parameters():  # make every weight distinct from a fresh init
        p.data.normal_()
    return {"encoder": encoder.state_dict(), "head": head.state_dict()}, encoder, head


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_head_layer_k_keeps_exactly_layers_1_to_k(k):
    state, encoder, head = _pretrain_state()
    spec = ClassifierSpec(NAME, True, num_classes=10, head=HeadSpec(None, 32, 3), head_layer=k)
    model = spec.build()
    load_pretrained(model, state, k)

    assert len(model.head) == k
    for i in range(k):  # the same weights as pretrained layer i+1
        for (name, kept), original in zip(model.head[i].state_dict().items(), head.layers[i].state_dict().values()):
            assert torch.equal(kept, original), f"layer {i + 1} {name}"
    for key, value in encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value)
    assert model.fc.in_features == head.layer_dim(k)
    assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0

    model.eval()
    images = torch.rand(3, 3, 16, 16)
    head.eval()
    expected = head.hiddens(encoder.eval()(images))[k]
    torch.testing.assert_close(model.features(images), expected)


def test_every_parameter_trains():
    spec = ClassifierSpec(NAME, True, 10, HeadSpec(None, 32, 3), 1)
    model = spec.build()
    model.fc.weight.data.normal_()  # past the zero init, gradients reach every layer
    model(torch.rand(4, 3, 16, 16)).logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_spec_round_trips_through_a_dict():
    spec = ClassifierSpec(NAME, False, 7, HeadSpec(64, 16, 2), 2)
    assert ClassifierSpec.from_dict(spec.to_dict()) == spec
    bare = ClassifierSpec(NAME, True, 5)
    assert ClassifierSpec.from_dict(bare.to_dict()) == bare
    assert len(bare.build().head) == 0


def test_wrong_checkpoint_fails_loudly():
    state, _, _ = _pretrain_state(out=16)  # the head was 16 wide, the spec says 32
    model = ClassifierSpec(NAME, True, 10, HeadSpec(None, 32, 3), 3).build()
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_pretrained(model, state, 3)

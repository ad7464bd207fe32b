"""The network fine-tuning, distillation and evaluation share: encoder -> head layers 1..k -> linear.

SimCLRv2 fine-tunes "from a middle layer of the projection head": the encoder and the first k head layers
keep their pretrained weights, a new linear classifier (zero-initialised, as in google-research/simclr
`LinearLayer(zero_init=True)` for the supervised head) sits on top, and the whole network trains.

`ClassifierSpec` is the architecture as plain data: it is saved in every checkpoint and beside every
exported model, so a network can be rebuilt from the spec alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from raytrain_ssl.models.heads import ProjectionHead
from raytrain_ssl.models.registry import create_encoder


@dataclass(frozen=True)
class HeadSpec:
    """The projection head the encoder was pretrained with (only its first `layers` are kept)."""

    hidden_dim: int | None
    out_dim: int
    num_layers: int


@dataclass(frozen=True)
class ClassifierSpec:
    model_name: str
    small_image_stem: bool
    num_classes: int
    head: HeadSpec | None = None  # None: no head layer, the classifier reads the encoder features
    head_layer: int = 0  # keep head layers 1..head_layer

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ClassifierSpec":
        head = HeadSpec(**raw["head"]) if raw.get("head") else None
        return cls(**{**raw, "head": head})

    def build(self) -> "Classifier":
        encoder = create_encoder(self.model_name, small_image_stem=self.small_image_stem)
        trunk, width = _head_trunk(encoder.num_features, self.head, self.head_layer)
        return Classifier(encoder, trunk, width, self.num_classes)


def _head_trunk(in_dim: int, head: HeadSpec | None, k: int) -> tuple[nn.Module, int]:
    if head is None or k == 0:
        return nn.Sequential(), in_dim
    full = ProjectionHead(in_dim, hidden_dim=head.hidden_dim, out_dim=head.out_dim, num_layers=head.num_layers)
    return nn.Sequential(*full.layers[:k]), full.layer_dim(k)


class Classifier(nn.Module):
    """encoder -> head trunk (layers 1..k, possibly empty) -> linear classifier `fc`."""

    def __init__(self, encoder: nn.Module, trunk: nn.Sequential, trunk_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = trunk
        self.fc = nn.Linear(trunk_dim, num_classes)
        # Zero-init: the first steps do not push random gradients into the pretrained layers.
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the linear classifier reads (encoder output passed through head layers 1..k)."""
        return self.head(self.encoder(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images))


def load_pretrained(classifier: Classifier, state: dict, head_layer: int) -> None:
    """Copy a pretrain checkpoint's encoder and head layers 1..k into `classifier` (strictly: every
    kept weight must be present and shaped alike, so a wrong checkpoint fails loudly)."""
    classifier.encoder.load_state_dict(state["encoder"])
    if head_layer == 0:
        return
    prefixes = tuple(f"layers.{i}." for i in range(head_layer))
    kept = {
        key.removeprefix("layers."): value for key, value in (state.get("head") or {}).items() if key.startswith(prefixes)
    }
    classifier.head.load_state_dict(kept)


def pretrained_head_spec(pretrain_config: dict) -> HeadSpec | None:
    model = pretrain_config["model"]
    if not model.get("head_layers"):
        return None
    return HeadSpec(model.get("head_hidden_dim"), model["projection_dim"], model["head_layers"])

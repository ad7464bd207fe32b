"""Encoders and heads. No distributed code here: norm layers are injected by the caller."""

from raytrain_ssl.models.heads import ProjectionHead
from raytrain_ssl.models.registry import (
    ModelSpec,
    count_parameters,
    create_encoder,
    list_models,
    model_name,
    parse_model_name,
    register_model,
)
from raytrain_ssl.models.resnet import ResNet

__all__ = [
    "ModelSpec",
    "ProjectionHead",
    "ResNet",
    "count_parameters",
    "create_encoder",
    "list_models",
    "model_name",
    "parse_model_name",
    "register_model",
]

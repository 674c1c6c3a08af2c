"""ResNet models (v1.5, v2 pre-activation, SE, BiT) and their name registry."""

from jaxres.models.registry import create_model, list_models
from jaxres.models.resnet import ResNet

__all__ = ["ResNet", "create_model", "list_models"]

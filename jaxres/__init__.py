"""jaxres: ResNetV2 / SE-ResNet training, evaluation and transfer in JAX + Flax (linen)."""

__version__ = "0.1.0"

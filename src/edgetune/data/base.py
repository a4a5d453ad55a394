"""Dataset registry and the in-memory bundle every loader returns.

A loader is ``fn(cfg: DataConfig) -> DataBundle``. A split is a ``TensorDataset`` whose last tensor is
the target (``(x, y)`` for classification and causal LM, ``(src, tgt_in, tgt_out)`` for seq2seq), a
:class:`~edgetune.data.batches.DictDataset` (tokenized text: ``input_ids``, ``attention_mask``, ``labels``),
or a :class:`~edgetune.data.text_classification.TextDataset` of raw strings that
:func:`~edgetune.data.tokenize.tokenize_bundle` turns into a DictDataset for a given tokenizer. The
training loop batches the tensors directly (no DataLoader workers needed for in-memory data) and applies
``bundle.transform`` to every batch on the device (uint8 images to float, trimming padding).
Loader-specific options live under ``data.options`` and are validated by the loader's own config class
(registered with the loader, see :func:`register_dataset`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import Field
from torch.utils.data import TensorDataset

from edgetune.core.config import Config, validate
from edgetune.core.errors import DataError
from edgetune.core.registry import Registry
from edgetune.data.batches import BatchTransform, DictDataset

if TYPE_CHECKING:
    from edgetune.data.text_classification import TextDataset

__all__ = ["DATASETS", "DataBundle", "DataConfig", "load_dataset", "loader_options", "register_dataset"]

Task = Literal["classification", "lm", "seq2seq"]
DataSplit = Union[TensorDataset, DictDataset, "TextDataset"]


class DataConfig(Config):
    """Which dataset to load and how.

    name: registered dataset name (``edgetune ls datasets``).
    path: folder (or file) holding the data; searched before ``$EDGETUNE_DATA`` and system paths.
    fallback: dataset to use, with a warning in the log and report, when ``name`` is not found.
    val_fraction: fraction of the training split held out (stratified by class, seeded) as validation.
    limit_train / limit_test: keep only the first N examples (after a seeded shuffle) for quick runs.
    seed: seed of the shuffles and of generated datasets.
    options: loader-specific options, validated by that loader.
    """

    name: str = "fashion-mnist"
    path: str | None = None
    fallback: str | None = None
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    limit_train: int | None = Field(default=None, gt=0)
    limit_test: int | None = Field(default=None, gt=0)
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


@dataclass
class DataBundle:
    """Splits of a dataset held in memory, plus what a model builder needs to know about them.

    input_shape: shape of one input example, e.g. ``(1, 28, 28)``, ``(T,)`` for token sequences, ``()``
        for raw text (a :class:`TextDataset` split, not yet tokenized).
    num_classes: number of classes (classification) or vocabulary size (lm / seq2seq).
    source: where the data came from (path or generator description), for reports.
    transform: per-batch preprocessing the training loop applies on the device to every train / val /
        test batch, e.g. :class:`~edgetune.data.transforms.ToFloat` for uint8 images ``(B, C, H, W)``.
    token_vocab_size: for tokenized text classification, the tokenizer's vocabulary size (what an
        embedding layer needs); None otherwise.
    """

    name: str
    task: Task
    train: DataSplit
    test: DataSplit
    num_classes: int
    input_shape: tuple[int, ...]
    val: DataSplit | None = None
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    notes: list[str] = field(default_factory=list)
    transform: BatchTransform | None = None
    token_vocab_size: int | None = None

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary of the inputs: num_classes for lm / seq2seq, the tokenizer's for tokenized text."""
        return self.num_classes if self.task in ("lm", "seq2seq") else self.token_vocab_size


Loader = Callable[[DataConfig], DataBundle]
DATASETS: Registry[Loader] = Registry("dataset")


def register_dataset(
    name: str, *, config: type[Config] | None = None, summary: str = ""
) -> Callable[[Loader], Loader]:
    """Register a loader; ``config`` validates ``data.options`` for it."""
    return DATASETS.register(name, config=config, summary=summary)


def loader_options(cfg: DataConfig, config_cls: type[Config]) -> Any:
    """Validate ``cfg.options`` against a loader's option class (errors name ``data.options.<key>``)."""
    return validate(config_cls, cfg.options, where="data.options")


def load_dataset(cfg: DataConfig) -> DataBundle:
    """Load ``cfg.name``; on :class:`DataError` fall back to ``cfg.fallback`` when one is set."""
    import logging

    from edgetune.data import _loaders  # noqa: F401  (registers the built-in loaders)

    log = logging.getLogger(__name__)
    entry = DATASETS.entry(cfg.name)
    if entry.config is not None:
        loader_options(cfg, entry.config)  # fail early on bad options, before any I/O
    try:
        return entry.obj(cfg)
    except DataError as err:
        if not cfg.fallback:
            raise
        note = f"dataset {cfg.name!r} not available, using fallback {cfg.fallback!r} instead. ({err})"
        log.warning(note)
        bundle = load_dataset(
            cfg.model_copy(update={"name": cfg.fallback, "fallback": None, "path": None, "options": {}})
        )
        bundle.notes.insert(0, note)
        return bundle

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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import Field, field_validator
from torch.utils.data import TensorDataset

from edgetune.core.config import Config, validate
from edgetune.core.errors import DataError
from edgetune.core.registry import Registry
from edgetune.data.augment import AugmentConfig
from edgetune.data.batches import BatchTransform, DictDataset
from edgetune.data.normalize import NormalizeConfig, normalize_bundle

if TYPE_CHECKING:
    from edgetune.data.text_classification import TextDataset
    from edgetune.data.transforms import Normalize

__all__ = ["DATASETS", "DataBundle", "DataConfig", "load_dataset", "loader_options", "parse_classes", "register_dataset"]

log = logging.getLogger(__name__)

Task = Literal["classification", "lm", "seq2seq"]
DataSplit = Union[TensorDataset, DictDataset, "TextDataset"]


def parse_classes(spec: list[int] | str) -> list[int]:
    """``"0-59"`` / ``"0-4,7"`` / ``[0, 1, 7]`` -> a list of distinct class ids >= 0, in the given order."""
    if isinstance(spec, str):
        out: list[int] = []
        for part in (p.strip() for p in spec.split(",")):
            lo, sep, hi = part.partition("-")
            if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
                raise ValueError(f"classes {spec!r}: {part!r} is not a class id or a range like 0-59")
            a, b = int(lo), int(hi) if sep else int(lo)
            if b < a:
                raise ValueError(f"classes {spec!r}: range {part!r} runs backwards; write {b}-{a}")
            out += range(a, b + 1)
    else:
        out = list(spec)
    if not out:
        raise ValueError("classes is empty; list the classes to keep, e.g. classes: 0-59, or leave it out")
    if any(c < 0 for c in out):
        raise ValueError(f"class ids are >= 0, got {[c for c in out if c < 0]}")
    dup = sorted({c for c in out if out.count(c) > 1})
    if dup:
        raise ValueError(f"classes lists {dup} more than once")
    return out


class DataConfig(Config):
    """Which dataset to load and how.

    name: registered dataset name (``edgetune ls datasets``).
    path: folder (or file) holding the data. When set, the data is read from there or the run stops with
        an error naming it; it is never replaced by ``$EDGETUNE_DATA``, an installed copy or ``fallback``.
    fallback: dataset to use, with a note in the log and report, only when ``name`` is not installed at
        all and no location was given for it (no ``path``, nothing of it under ``$EDGETUNE_DATA``). Files
        that are there but truncated, damaged or incomplete are an error, never a reason to fall back.
    val_fraction: fraction of the training split held out (stratified by class, seeded) as validation.
    limit_train / limit_test: keep only the first N examples (after a seeded shuffle) for quick runs.
    seed: seed of the shuffles and of generated datasets.
    classes: keep only these classes (classification), relabelled by their position in the list: a list of
        class ids or a string of ids and ranges, ``"0-59"`` or ``"0-4,7"``. Applied after the validation
        hold-out, so a stage trained on ``classes: 0-59`` and a later stage on all classes hold out the very
        same validation examples of classes 0-59 (few-shot class-incremental protocols need that).
    options: loader-specific options, validated by that loader.
    augment: train-only augmentation of image batches (:class:`~edgetune.data.augment.AugmentConfig`: random
        crop with zero padding, horizontal flip), e.g. ``{crop_padding: 4, hflip: true}`` for CIFAR.
    normalize: per-channel standardisation of image inputs after their conversion to floats:
        ``{mean: [0.2860], std: [0.3530]}`` (one value per channel, or one for all), or ``train`` for the
        training split's own per-channel statistics (:mod:`edgetune.data.normalize`). None: inputs as the
        dataset gives them (images in [0, 1]).
    """

    name: str = "fashion-mnist"
    path: str | None = None
    fallback: str | None = None
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    limit_train: int | None = Field(default=None, gt=0)
    limit_test: int | None = Field(default=None, gt=0)
    seed: int = 0
    classes: list[int] | str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    augment: AugmentConfig | None = None
    normalize: NormalizeConfig | Literal["train"] | None = None

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int] | str | None) -> list[int] | None:
        return None if v is None else parse_classes(v)


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
    normalization: the ``data.normalize`` step, already the last step of ``transform`` (kept so that
        train-only augmentation can pad with its normalised black); None without ``data.normalize``.
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
    normalization: Normalize | None = None

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
    """Load ``cfg.name``; use ``cfg.fallback`` only when the dataset is not installed and no location was given.

    The fallback applies to :class:`~edgetune.data.locate.DatasetNotInstalled` alone (see
    :mod:`edgetune.data.locate`): a ``data.path`` or ``$EDGETUNE_DATA`` copy that is wrong, and files that
    are present but truncated or mismatched, raise :class:`DataError` whatever ``fallback`` says. The
    bundle's ``notes`` start with a sentence saying the fallback was used. ``cfg.normalize`` applies to
    whichever dataset loads.
    """
    return normalize_bundle(_load(cfg), cfg.normalize)


def _load(cfg: DataConfig) -> DataBundle:
    from edgetune.data import _loaders  # noqa: F401  (registers the built-in loaders)
    from edgetune.data.locate import DatasetNotInstalled

    entry = DATASETS.entry(cfg.name)
    if entry.config is not None:
        loader_options(cfg, entry.config)  # fail early on bad options, before any I/O
    try:
        return entry.obj(cfg)
    except DatasetNotInstalled as err:
        if cfg.path:
            raise
        if not cfg.fallback:
            raise DatasetNotInstalled(
                f"{err} To run anyway on another dataset, set data.fallback=NAME (e.g. digits; see "
                "`edgetune ls datasets`)."
            ) from None
        note = (
            f"dataset {cfg.name!r} is not installed, using fallback {cfg.fallback!r} instead (data.fallback); "
            f"results are for {cfg.fallback!r}, not {cfg.name!r}. ({err})"
        )
        log.warning(note)
        bundle = _load(
            cfg.model_copy(update={"name": cfg.fallback, "fallback": None, "path": None, "options": {}})
        )
        bundle.notes.insert(0, note)
        return bundle
    except DataError as err:
        if not cfg.fallback:
            raise
        raise DataError(
            f"{err} (data.fallback={cfg.fallback!r} was not used: it stands in only for a dataset that is not "
            "installed at all when no data.path is given, never for files that are there but wrong.)"
        ) from None

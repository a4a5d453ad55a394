"""Datasets: registry and loaders (IDX, CIFAR batches, digits, SynGlyph, byte text, text classification
corpora and files, image folders), tokenization, per-batch transforms and FSCIL splits.

``load_dataset(DataConfig(name="fashion-mnist"))`` returns a :class:`DataBundle` of in-memory splits
(uint8 images plus a ``ToFloat`` transform; raw text as :class:`TextDataset`, tokenized by
:func:`tokenize_bundle`); ``edgetune ls datasets`` lists the registered names.
"""

from edgetune.data import _loaders  # noqa: F401  (registers the built-in datasets)
from edgetune.data.base import (
    DATASETS,
    DataBundle,
    DataConfig,
    load_dataset,
    loader_options,
    register_dataset,
)
from edgetune.data.common import make_bundle
from edgetune.data.fscil_index import read_index_lists, split_from_index_lists
from edgetune.data.idx import read_idx, read_idx_images, read_idx_labels, read_idx_pair, write_idx
from edgetune.data.locate import find_dataset
from edgetune.data.splits import FewShotEpisode, IncrementalSplit, class_incremental_split, few_shot_episode
from edgetune.data.text_classification import TextDataset
from edgetune.data.tokenize import ByteTokenizer, check_tokenizer, tokenize_bundle, tokenize_split
from edgetune.data.transforms import ToFloat, TrimPadding

__all__ = [
    "DATASETS",
    "ByteTokenizer",
    "DataBundle",
    "DataConfig",
    "FewShotEpisode",
    "IncrementalSplit",
    "TextDataset",
    "ToFloat",
    "TrimPadding",
    "check_tokenizer",
    "class_incremental_split",
    "few_shot_episode",
    "find_dataset",
    "load_dataset",
    "loader_options",
    "make_bundle",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "read_idx_pair",
    "read_index_lists",
    "register_dataset",
    "split_from_index_lists",
    "tokenize_bundle",
    "tokenize_split",
    "write_idx",
]

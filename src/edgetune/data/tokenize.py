"""Turn raw-text splits into token tensors for a model: a Hugging Face tokenizer, or bytes.

:func:`tokenize_bundle` maps every :class:`~edgetune.data.text_classification.TextDataset` split of a
bundle to a :class:`~edgetune.data.batches.DictDataset` with ``input_ids (N, T)``, ``attention_mask (N, T)``
(both int64) and ``labels (N,)``, where ``T`` is the split's longest tokenized text (at most
``max_length``), and sets the bundle's transform to :class:`~edgetune.data.transforms.TrimPadding` so
each batch is cut to its own longest text. :class:`ByteTokenizer` (UTF-8 bytes) lets edgetune's own
models read text when they have no tokenizer; :func:`check_tokenizer` catches a tokenizer whose ids do
not fit the model's embedding table before training starts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgetune.core.errors import ConfigError, DataError
from edgetune.data.base import DataBundle
from edgetune.data.batches import DictDataset, compose
from edgetune.data.text_classification import TextDataset
from edgetune.data.transforms import TrimPadding

__all__ = ["ByteTokenizer", "check_tokenizer", "tokenize_bundle", "tokenize_split"]

log = logging.getLogger(__name__)

# Texts are cut to max_length * _CHARS_PER_TOKEN characters before tokenizing: a long mail is not
# tokenized in full only to be truncated. Only a text whose first tokens average > 16 characters
# (unbroken base64, say) could come out differently.
_CHARS_PER_TOKEN = 16


class ByteTokenizer:
    """UTF-8 bytes as tokens, in the calling convention of a Hugging Face tokenizer.

    Ids: byte ``b`` -> ``b``; ``pad_token_id = 256``; ``cls_token_id = 257`` is put first (a classifier
    may pool position 0). ``len(tokenizer) == 258``.
    """

    pad_token_id = 256
    cls_token_id = 257
    padding_side = "right"

    def __len__(self) -> int:
        return 258

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """``[CLS] + bytes``, cut to ``max_length`` ids."""
        ids = [self.cls_token_id, *text.encode("utf-8")]
        return ids[:max_length] if max_length is not None else ids

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        truncation: bool = False,
        max_length: int | None = None,
        padding: bool | str = False,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """``{"input_ids", "attention_mask"}``: lists, or int64 tensors ``(N, T)`` with ``return_tensors="pt"``.

        padding: ``True``/``"longest"`` pads to the longest text, ``"max_length"`` to ``max_length``.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.encode(t, max_length if truncation else None) for t in batch]
        if padding in (True, "longest", "max_length"):
            width = (
                max_length
                if padding == "max_length" and max_length
                else max((len(i) for i in ids), default=0)
            )
            mask = [[1] * len(i) + [0] * (width - len(i)) for i in ids]
            ids = [i + [self.pad_token_id] * (width - len(i)) for i in ids]
        else:
            mask = [[1] * len(i) for i in ids]
        if return_tensors == "pt":
            return {
                "input_ids": torch.tensor(ids, dtype=torch.int64),
                "attention_mask": torch.tensor(mask, dtype=torch.int64),
            }
        if return_tensors is not None:
            raise ValueError(f"ByteTokenizer returns lists or 'pt' tensors, not {return_tensors!r}")
        return {"input_ids": ids, "attention_mask": mask}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab=258)"


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def tokenize_split(ds: TextDataset, tokenizer: Any, max_length: int) -> DictDataset:
    """Tokenize ``ds`` into ``input_ids (N, T)``, ``attention_mask (N, T)`` int64 and ``labels (N,)``.

    ``T`` is the longest tokenized text, at most ``max_length`` (longer texts are truncated); shorter
    rows are padded on the tokenizer's padding side.
    """
    if max_length < 1:
        raise ConfigError(f"max_length must be at least 1, got {max_length}")
    if getattr(tokenizer, "pad_token_id", 0) is None:
        raise ConfigError(
            f"tokenizer {_tokenizer_name(tokenizer)!r} has no padding token; set one (e.g. "
            "tokenizer.pad_token = tokenizer.eos_token for a causal LM) before tokenizing a dataset."
        )
    texts = [t[: max_length * _CHARS_PER_TOKEN] for t in ds.texts]
    if not texts:
        z = torch.zeros(0, 0, dtype=torch.int64)
        return DictDataset({"input_ids": z, "attention_mask": z.clone(), "labels": ds.labels.clone()})
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    try:
        ids, mask = enc["input_ids"], enc["attention_mask"]
    except KeyError:
        raise DataError(
            f"tokenizer {_tokenizer_name(tokenizer)!r} returned {sorted(enc)} without input_ids and "
            "attention_mask; use a Hugging Face tokenizer or ByteTokenizer."
        ) from None
    return DictDataset(
        {
            "input_ids": ids.to(torch.int64),
            "attention_mask": mask.to(torch.int64),
            "labels": ds.labels.clone(),
        }
    )


def tokenize_bundle(bundle: DataBundle, tokenizer: Any = None, max_length: int = 128) -> DataBundle:
    """A copy of ``bundle`` with every TextDataset split tokenized (see :func:`tokenize_split`).

    tokenizer: a Hugging Face tokenizer (the model's own), or None for :class:`ByteTokenizer`.
    The copy's transform is the bundle's transform followed by :class:`TrimPadding`; its
    ``input_shape`` is ``(T,)`` of the training split and ``token_vocab_size`` is ``len(tokenizer)``.
    """
    splits = {"train": bundle.train, "val": bundle.val, "test": bundle.test}
    not_text = [k for k, v in splits.items() if v is not None and not isinstance(v, TextDataset)]
    if not_text:
        raise ConfigError(
            f"dataset {bundle.name!r} is not raw text (its {', '.join(not_text)} split is a "
            f"{type(splits[not_text[0]]).__name__}); only text datasets (spamassassin, brown, text-csv, "
            "text-jsonl) are tokenized."
        )
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    if bundle.task == "lm":
        return _tokenize_lm_bundle(bundle, splits, tok, max_length)
    out = {k: tokenize_split(v, tok, max_length) if v is not None else None for k, v in splits.items()}
    train: DictDataset = out["train"]  # type: ignore[assignment]
    width = int(train.columns["input_ids"].shape[1])
    note = f"tokenized with {_tokenizer_name(tok)} (vocabulary {len(tok)}), max_length {max_length}"
    log.info("dataset %s: %s; train sequences padded to %d", bundle.name, note, width)
    return dataclasses.replace(
        bundle,
        train=train,
        val=out["val"],
        test=out["test"],
        input_shape=(width,),
        transform=compose(bundle.transform, TrimPadding()),
        token_vocab_size=len(tok),
        notes=[*bundle.notes, note],
    )


def tokenize_lm_split(ds: TextDataset, tokenizer: Any, block: int) -> DictDataset:
    """Causal-LM windows: every text tokenized, joined by the end-of-text token, cut into ``(N, block)`` windows.

    ``labels`` equal ``input_ids`` (Hugging Face convention; the lm task shifts them), ``attention_mask`` is all ones;
    a last window shorter than ``block`` is dropped.
    """
    if block < 2:
        raise ConfigError(f"model.max_length={block}: language-model windows need at least 2 tokens")
    sep = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for row in tokenizer(list(ds.texts))["input_ids"] if len(ds.texts) else []:  # one batched call
        ids += [int(i) for i in row]
        if sep is not None:
            ids.append(int(sep))
    n = len(ids) // block
    if n == 0:
        raise DataError(f"the text holds {len(ids)} tokens, fewer than one window of {block}; use more text or a "
                        "smaller model.max_length")
    x = torch.tensor(ids[: n * block], dtype=torch.int64).view(n, block)  # (N, block)
    return DictDataset({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})


def _tokenize_lm_bundle(bundle: DataBundle, splits: dict[str, Any], tok: Any, block: int) -> DataBundle:
    def one(v: Any) -> DictDataset:  # a split of prompt/answer pairs tokenizes itself (edgetune.data.instructions)
        own = getattr(v, "tokenize_lm", None)
        return own(tok, block) if callable(own) else tokenize_lm_split(v, tok, block)

    out = {k: one(v) if v is not None else None for k, v in splits.items()}
    note = f"tokenized with {_tokenizer_name(tok)} (vocabulary {len(tok)}) into {block}-token windows"
    log.info("dataset %s: %s: %d train, %d test windows", bundle.name, note, len(out["train"]), len(out["test"]))
    return dataclasses.replace(bundle, train=out["train"], val=out["val"], test=out["test"], input_shape=(block,),
                               num_classes=len(tok), token_vocab_size=len(tok), notes=[*bundle.notes, note])


def check_tokenizer(tokenizer: Any, model: nn.Module) -> None:
    """Raise :class:`ConfigError` when the tokenizer's ids do not fit the model's input embeddings.

    Checks ``len(tokenizer) <= num_embeddings`` of ``model.get_input_embeddings()`` when the model has
    that method (Hugging Face models do) and it returns an ``nn.Embedding``; otherwise does nothing.
    """
    get = getattr(model, "get_input_embeddings", None)
    if tokenizer is None or not callable(get):
        return
    try:
        emb = get()
    except NotImplementedError:
        return
    if not isinstance(emb, nn.Embedding):
        return
    n_tok, n_emb = len(tokenizer), emb.num_embeddings
    if n_tok > n_emb:
        raise ConfigError(
            f"tokenizer {_tokenizer_name(tokenizer)!r} has {n_tok} tokens but the model "
            f"{type(model).__name__} embeds only {n_emb} (its input embedding table); token ids >= {n_emb} "
            "would index past it. Use the tokenizer saved with the model, or grow the table with "
            f"model.resize_token_embeddings({n_tok}) before training."
        )

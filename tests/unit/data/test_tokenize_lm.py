"""Causal-LM windows from raw text with the model's own tokenizer (here edgetune's ByteTokenizer)."""

from __future__ import annotations

import pytest
import torch

from edgetune.core.errors import ConfigError, DataError
from edgetune.data.text_classification import TextDataset
from edgetune.data.tokenize import ByteTokenizer, tokenize_lm_split


def test_windows_are_the_concatenated_tokens_cut_in_blocks():
    tok = ByteTokenizer()
    texts = ["hello world", "a second text", "xyz"]
    ds = TextDataset(texts, torch.zeros(3, dtype=torch.int64))
    out = tokenize_lm_split(ds, tok, block=4)
    stream = [i for row in tok(texts)["input_ids"] for i in row]
    n = len(stream) // 4
    assert out.columns["input_ids"].shape == (n, 4)
    assert out.columns["input_ids"].reshape(-1).tolist() == stream[: n * 4]
    assert torch.equal(out.columns["labels"], out.columns["input_ids"])  # the lm task shifts them
    assert bool(out.columns["attention_mask"].all())


def test_too_little_text_or_a_tiny_window_is_refused():
    ds = TextDataset(["ab"], torch.zeros(1, dtype=torch.int64))
    with pytest.raises(DataError, match="fewer than one window"):
        tokenize_lm_split(ds, ByteTokenizer(), block=64)
    with pytest.raises(ConfigError, match="at least 2"):
        tokenize_lm_split(ds, ByteTokenizer(), block=1)

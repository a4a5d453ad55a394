"""Tokenizing text bundles: a tiny offline Hugging Face tokenizer, ByteTokenizer, trimming, vocab checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgetune.core.errors import ConfigError
from edgetune.data import DataConfig, make_bundle
from edgetune.data.batches import DictDataset, take
from edgetune.data.text_classification import TextDataset
from edgetune.data.tokenize import ByteTokenizer, check_tokenizer, tokenize_bundle, tokenize_split

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "##s", "a"]


@pytest.fixture
def bert(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return transformers.BertTokenizerFast.from_pretrained(str(tmp_path))  # a local folder: no network


def _text_bundle() -> object:
    train = TextDataset(
        ["the cat sat on the mat", "dogs", "a cat", "the dog sat"], torch.tensor([0, 1, 0, 1])
    )
    test = TextDataset(["cat", "the mat"], torch.tensor([0, 1]))
    return make_bundle(
        DataConfig(),
        name="toy",
        task="classification",
        train=train,
        test=test,
        num_classes=2,
        class_names=["x", "y"],
        input_shape=(),
    )


def test_tokenize_split_pads_to_longest_and_truncates(bert) -> None:
    ds = TextDataset(["the cat sat on the mat", "dogs"], torch.tensor([1, 0]))
    out = tokenize_split(ds, bert, max_length=32)
    ids, mask = out.columns["input_ids"], out.columns["attention_mask"]
    cls, sep = VOCAB.index("[CLS]"), VOCAB.index("[SEP]")
    assert ids.dtype == torch.int64 and ids.shape == (2, 8)  # [CLS] + 6 words + [SEP]
    assert ids[0].tolist() == [cls, 5, 6, 7, 8, 5, 9, sep]
    assert ids[1].tolist() == [cls, 10, 11, sep, 0, 0, 0, 0] and mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert set(out.columns) == {"input_ids", "attention_mask", "labels"} and out.targets.tolist() == [1, 0]
    short = tokenize_split(ds, bert, max_length=4)
    assert short.columns["input_ids"][0].tolist() == [cls, 5, 6, sep]


def test_tokenize_bundle_sets_trim_transform(bert) -> None:
    b = tokenize_bundle(_text_bundle(), bert, max_length=16)
    assert isinstance(b.train, DictDataset) and isinstance(b.test, DictDataset)
    assert b.input_shape == (8,) and b.token_vocab_size == len(VOCAB) == b.vocab_size
    assert "tokenized with" in b.notes[-1]
    batch = take(b.train, torch.tensor([1, 2]))  # "dogs", "a cat": 4 tokens each at most
    cut = b.transform(batch)
    assert cut["input_ids"].shape == (2, 4) and torch.equal(cut["labels"], torch.tensor([1, 0]))
    assert torch.equal(cut["input_ids"], batch["input_ids"][:, :4])


def test_tokenize_bundle_rejects_image_bundles() -> None:
    x, y = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    b = make_bundle(DataConfig(), name="img", task="classification", train=(x, y), test=(x, y), num_classes=2)
    with pytest.raises(
        ConfigError, match=r"'img' is not raw text \(its train, test split is a TensorDataset\)"
    ):
        tokenize_bundle(b)


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    enc = tok(["hé", "abcdef"], truncation=True, max_length=4, padding="longest", return_tensors="pt")
    assert enc["input_ids"].tolist() == [[257, 104, 0xC3, 0xA9], [257, 97, 98, 99]]
    enc = tok(["a", "abc"], padding=True)
    assert enc["input_ids"] == [[257, 97, 256, 256], [257, 97, 98, 99]]
    assert enc["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1]]
    b = tokenize_bundle(_text_bundle(), None, max_length=8)  # no tokenizer: bytes
    assert b.token_vocab_size == 258 and b.train.columns["input_ids"].shape == (4, 8)
    assert int(b.train.columns["input_ids"].max()) < 258


class _Tiny(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n, 4)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb


def test_check_tokenizer(bert) -> None:
    check_tokenizer(bert, _Tiny(len(VOCAB)))  # fits exactly
    check_tokenizer(bert, nn.Linear(2, 2))  # no embedding accessor: nothing to check
    with pytest.raises(ConfigError) as info:
        check_tokenizer(ByteTokenizer(), _Tiny(200))
    msg = str(info.value)
    assert "258 tokens" in msg and "embeds only 200" in msg and "resize_token_embeddings(258)" in msg


@pytest.mark.skipif(not Path("/usr/share/datasets/brown/cr09").is_file(), reason="run `make data`")
def test_real_brown_tokenized(bert, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetune.data import load_dataset
    from edgetune.data import locate as locate_mod

    monkeypatch.setattr(locate_mod, "SYSTEM_ROOTS", (Path("/usr/share/datasets"),))
    b = tokenize_bundle(load_dataset(DataConfig(name="brown", limit_train=300, limit_test=100)), bert, 64)
    ids = b.train.columns["input_ids"]
    assert ids.shape == (300, 64)  # 100-word chunks exceed 64 tokens: every row is truncated
    assert int(b.train.columns["attention_mask"].sum()) == 300 * 64


def test_long_texts_tokenize_as_if_whole(bert) -> None:
    long = "the cat sat on a mat " * 400  # 8400 characters, cut to 16 * max_length before tokenizing
    ds = TextDataset([long, "dogs"], torch.tensor([0, 1]))
    ours = tokenize_split(ds, bert, max_length=32).columns["input_ids"]
    whole = bert([long, "dogs"], truncation=True, max_length=32, padding="longest", return_tensors="pt")
    assert torch.equal(ours, whole["input_ids"])

"""The loop on dict batches (a tiny Hugging Face model), per-batch transforms, and uint8 images + ToFloat."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgetune.core.config import validate
from edgetune.data.batches import DictDataset
from edgetune.data.transforms import ToFloat
from edgetune.train.config import TrainConfig
from edgetune.train.loop import Trainer, evaluate

VOCAB, T, MARK = 24, 8, 3


def cfg(**kw) -> TrainConfig:
    base = {"epochs": 4, "batch_size": 32, "progress": False, "log_every_steps": 4, "eval_batch_size": 50,
            "optimizer": {"name": "adam", "lr": 0.003}}
    base.update(kw)
    return validate(TrainConfig, base)


def marked_texts(n: int, seed: int) -> DictDataset:
    """Token sequences with right padding; label 1 when the MARK token occurs among the real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, T), generator=g)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    pos = (torch.rand(n, generator=g) * (lengths - 1)).long() + 1  # never the [CLS]-like first slot
    ids[torch.arange(n)[labels == 1], pos[labels == 1]] = MARK
    ids[:, 0] = 1  # a fixed first token (the pooler reads it)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    return DictDataset({"input_ids": ids, "attention_mask": mask, "labels": labels})


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    conf = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=16, num_labels=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(conf)


def test_tiny_bert_learns_a_toy_rule_from_dict_batches():
    train, test = marked_texts(384, 0), marked_texts(200, 1)
    model = tiny_bert()
    before = evaluate(model, test, 50, torch.device("cpu"))
    tr = Trainer(model, train, cfg(epochs=6), test=test)
    out = tr.fit()
    assert before["acc"] < 0.7
    assert out["test_acc"] > 0.9, out
    assert out["steps"] == 6 * 12
    assert out["test_loss"] < before["loss"]
    train_recs = [r for r in tr.history if r["kind"] == "train"]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]


class Counting:
    """A transform that undoes an id offset (the model cannot run without it) and counts its calls."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.calls = {"train": 0, "eval": 0}
        self.model: nn.Module | None = None

    def __call__(self, batch):
        assert isinstance(batch, dict)
        self.calls["train" if self.model is not None and self.model.training else "eval"] += 1
        return {**batch, "input_ids": batch["input_ids"] - self.offset}


def test_transform_runs_on_every_train_and_eval_batch():
    train, test = marked_texts(96, 0), marked_texts(70, 1)
    shifted = lambda d: DictDataset({**d.columns, "input_ids": d.columns["input_ids"] + 1000})
    model = tiny_bert()
    tf = Counting(1000)
    tf.model = model
    tr = Trainer(model, shifted(train), cfg(epochs=2, eval_batch_size=50), test=shifted(test), val=shifted(test),
                 transform=tf)
    out = tr.fit()
    assert tf.calls["train"] == 2 * 3  # 96 / 32 per epoch
    assert tf.calls["eval"] == 2 * 2 * 2  # 2 epochs x (val, test) x ceil(70 / 50)
    ref = evaluate(model, test, 50, torch.device("cpu"))  # the same data without the offset
    assert out["test_acc"] == pytest.approx(ref["acc"]) and out["test_loss"] == pytest.approx(ref["loss"])
    with pytest.raises(IndexError):  # the offset ids break the model without the transform
        evaluate(model, shifted(test), 50, torch.device("cpu"))


def images(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 64, (n, 1, 4, 4), generator=g, dtype=torch.int64)
    x[:, 0, 0, :] = (y[:, None] * 120).clamp(max=255)  # a learnable row
    return TensorDataset(x.to(torch.uint8), y)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def test_uint8_images_with_tofloat_train_exactly_like_float_images():
    tr8, te8 = images(160, 0), images(64, 1)
    as_float = lambda d: TensorDataset(d.tensors[0].to(torch.float32) / 255.0, d.tensors[1])
    c = cfg(epochs=10, optimizer={"name": "adam", "lr": 0.01})
    a = Trainer(mlp(), as_float(tr8), c, test=as_float(te8), seed=5)
    ra = a.fit()
    b = Trainer(mlp(), tr8, c, test=te8, seed=5, transform=ToFloat(255))
    rb = b.fit()
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert ra["test_acc"] == rb["test_acc"] and ra["test_loss"] == rb["test_loss"]
    assert b.train_data.tensors[0].dtype == torch.uint8  # the split stays compact
    assert ra["test_acc"] > 0.9


def test_tofloat_on_dict_batches_of_pixel_values():
    class Pix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 3)

        def forward(self, pixel_values):
            assert pixel_values.dtype == torch.float32 and pixel_values.max() <= 1.0
            return self.lin(pixel_values.flatten(1))

    d = images(64, 0)
    data = DictDataset({"pixel_values": d.tensors[0], "labels": d.tensors[1]})
    out = Trainer(Pix(), data, cfg(epochs=1), test=data, transform=ToFloat(255)).fit()
    assert 0.0 <= out["test_acc"] <= 1.0 and out["steps"] == 2

"""Hugging Face folders: tiny random BERT/Llama models saved to tmp_path load offline for each task."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from edgetune.core.errors import CheckpointError, ConfigError, DataError, EdgetuneError
from edgetune.models.pretrained import gguf as gguf_mod
from edgetune.models.pretrained.hf import FeatureClassifier, load_hf

transformers = pytest.importorskip("transformers")

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
SENTENCES = ["the cat sat on the mat", "a dog ran"]


def _bert_config(**kw: Any) -> Any:
    return transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        **kw,
    )


def _save_tokenizer(folder: Path) -> None:
    vocab = folder.parent / f"{folder.name}-vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    if int(transformers.__version__.split(".")[0]) >= 5:
        tok = transformers.BertTokenizer(vocab=str(vocab))
    else:
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    tok.save_pretrained(str(folder))


@pytest.fixture
def bert_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-bert"
    transformers.BertModel(_bert_config()).save_pretrained(str(folder))
    _save_tokenizer(folder)
    return folder


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _batch(tok: Any) -> dict[str, torch.Tensor]:
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_classification_new_head(bert_dir: Path, no_network: None) -> None:
    loaded = load_hf(bert_dir, task="classification", num_classes=3)
    assert loaded.task == "classification" and loaded.head == "head"
    assert isinstance(loaded.model, FeatureClassifier)
    assert isinstance(loaded.model.get_submodule("head"), nn.Linear)
    assert loaded.model.head.in_features == 16 and loaded.model.head.out_features == 3
    b = _batch(loaded.tokenizer)
    assert b["input_ids"][0].tolist()[1:4] == [
        VOCAB.index(w) for w in ("the", "cat", "sat")
    ]  # real tokenizer
    with torch.no_grad():
        logits = loaded.model(**b)
        # mean pooling ignores padding: the short sentence alone gives the same logits
        alone = loaded.model(**{k: v[1:, : int(b["attention_mask"][1].sum())] for k, v in b.items()})
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)
    loaded.model(**b).sum().backward()
    assert loaded.model.head.weight.grad is not None


def test_features_are_masked_mean_of_hidden_states(bert_dir: Path) -> None:
    loaded = load_hf(bert_dir, task="features")
    assert loaded.task == "features" and loaded.head is None
    b = _batch(loaded.tokenizer)
    ref = transformers.BertModel.from_pretrained(str(bert_dir), local_files_only=True).eval()
    with torch.no_grad():
        feats = loaded.model(**b)
        hidden = ref(**b).last_hidden_state  # (B, T, D)
    assert feats.shape == (2, 16)
    for i in range(2):
        n = int(b["attention_mask"][i].sum())
        torch.testing.assert_close(feats[i], hidden[i, :n].mean(0), atol=1e-5, rtol=1e-5)


def test_cls_and_pooler_pools(bert_dir: Path) -> None:
    b = _batch(load_hf(bert_dir, task="features").tokenizer)
    ref = transformers.BertModel.from_pretrained(str(bert_dir), local_files_only=True).eval()
    with torch.no_grad():
        out = ref(**b)
        cls = load_hf(bert_dir, task="features", pool="cls").model(**b)
        pooler = load_hf(bert_dir, task="features", pool="pooler").model(**b)
    torch.testing.assert_close(cls, out.last_hidden_state[:, 0])
    torch.testing.assert_close(pooler, out.pooler_output)
    with pytest.raises(ConfigError, match="unknown pool 'max'"):
        load_hf(bert_dir, task="features", pool="max")


def test_saved_classifier_keeps_its_head(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-bert-cls"
    transformers.BertForSequenceClassification(_bert_config(num_labels=4)).save_pretrained(str(folder))
    loaded = load_hf(folder, task="classification")
    assert loaded.head == "classifier" and loaded.tokenizer is None
    out = loaded.model(input_ids=torch.tensor([[2, 5, 6, 3]]))
    assert out.logits.shape == (1, 4)


def test_encoder_without_head_needs_num_classes(bert_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no classification head; give num_classes"):
        load_hf(bert_dir, task="classification")


def test_causal_lm(llama_dir: Path, no_network: None) -> None:
    loaded = load_hf(llama_dir, task="lm")
    assert loaded.task == "lm" and loaded.head is None and loaded.tokenizer is None
    assert isinstance(loaded.model, transformers.LlamaForCausalLM)
    ids = torch.randint(0, 64, (2, 7))
    out = loaded.model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 7, 64)
    assert next(loaded.model.parameters()).dtype == torch.float32
    out.loss.backward()
    assert loaded.model.model.embed_tokens.weight.grad is not None


def test_missing_name_errors_without_network(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError) as err:
        load_hf("edgetune-tests/no-such-model", task="classification", num_classes=2)
    msg = str(err.value)
    assert "'edgetune-tests/no-such-model' is not on this machine" in msg
    assert "never downloads" in msg and "hf download edgetune-tests/no-such-model" in msg
    assert "model.hf" in msg


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no config.json"):
        load_hf(tmp_path / "empty", task="lm")


def test_corrupt_weights_are_a_checkpoint_error(llama_dir: Path) -> None:
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"could not load the Hugging Face model in .*tiny-llama"):
        load_hf(llama_dir, task="lm")


def test_bad_task_and_num_classes(llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unknown Hugging Face task 'seq2seq'"):
        load_hf(llama_dir, task="seq2seq")
    with pytest.raises(ConfigError, match="num_classes=3 is only valid for task 'classification'"):
        load_hf(llama_dir, task="lm", num_classes=3)


def test_transformers_missing(monkeypatch: pytest.MonkeyPatch, llama_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(EdgetuneError, match=r"pip install 'edgetune\[hf\]'"):
        load_hf(llama_dir, task="lm")


# --- GGUF conversion cache, with a fake converter writing a tiny Llama -------------------------------------


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, llama_dir: Path) -> list[Path]:
    calls: list[Path] = []

    def convert(gguf_path: Path, out: Path) -> None:
        calls.append(out)
        for f in llama_dir.iterdir():
            (out / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(gguf_mod, "_convert", convert)
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))
    return calls


def test_gguf_cache_converts_once(tmp_path: Path, fake_convert: list[Path]) -> None:
    src = tmp_path / "m.gguf"
    src.write_bytes(b"gguf")
    first = gguf_mod.load_gguf_lm(src, "ab" * 32)
    second = gguf_mod.load_gguf_lm(src, "ab" * 32)
    assert len(fake_convert) == 1
    folder = tmp_path / "cache" / "gguf" / ("ab" * 32)
    assert first.info["hf_folder"] == second.info["hf_folder"] == str(folder)
    manifest = json.loads((folder / gguf_mod.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == "ab" * 32 and "model.safetensors" in manifest["files"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("damage", ["no_manifest", "truncated", "same_size_garbage"])
def test_gguf_cache_damaged_is_rebuilt(tmp_path: Path, fake_convert: list[Path], damage: str) -> None:
    src = tmp_path / "m.gguf"
    src.write_bytes(b"gguf")
    sha = "cd" * 32
    folder = gguf_mod.gguf_to_hf(src, sha)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    if damage == "no_manifest":
        (folder / gguf_mod.MANIFEST).unlink()  # as if interrupted before completion
    elif damage == "truncated":
        weights.write_bytes(good[: len(good) // 2])
    else:
        weights.write_bytes(b"\xff" * len(good))  # sizes agree; only loading finds it
    loaded = gguf_mod.load_gguf_lm(src, sha)
    assert len(fake_convert) == 2
    assert weights.read_bytes() == good
    assert loaded.model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)

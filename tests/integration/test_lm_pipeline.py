"""Causal language modelling through the pipeline: raw text tokenized by the model's own tokenizer into windows,
a Hugging Face causal LM from a local folder, an evaluate stage then a training stage from it; perplexity falls."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from edgetune.data.locate import SYSTEM_ROOTS
from edgetune.recipe import load_recipe
from edgetune.runner import run

WORDS = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "was", "he", "it", "with", "as", "his", "on", "be"]


def _brown_installed() -> bool:
    return any((Path(root) / "brown").is_dir() for root in SYSTEM_ROOTS)


@pytest.mark.skipif(not _brown_installed(), reason="the Brown corpus is not installed (make data)")
def test_tiny_llama_learns_brown_text_through_stages(tmp_path):
    folder = tmp_path / "tiny-llama"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = transformers.BertTokenizer(vocab=str(vocab)) if int(transformers.__version__.split(".")[0]) >= 5 \
        else transformers.BertTokenizerFast(vocab_file=str(vocab))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    recipe = load_recipe({
        "name": "lm", "seed": 0, "data": {"name": "brown", "options": {"task": "lm"}, "limit_train": 40,
                                          "limit_test": 10},
        "model": {"hf": str(folder), "max_length": 32},
        "train": {"epochs": 2, "batch_size": 8, "progress": False, "num_threads": 1,
                  "optimizer": {"name": "adamw", "lr": 0.003}},
        "stages": [{"name": "zero", "step": "evaluate"}, {"name": "tuned", "model": {"from": "stage:zero"}}],
    })
    res = run(recipe, tmp_path / "run", write_report=True, command="test")
    zero, tuned = res.summary["stages"]["zero"], res.summary["stages"]["tuned"]
    assert zero["task"] == tuned["task"] == "lm"
    assert zero["steps"] == 0 and tuned["steps"] > 0
    assert tuned["test_ppl"] < 0.5 * zero["test_ppl"], (zero["test_ppl"], tuned["test_ppl"])  # random init -> learnt
    assert "test ppl" in (tmp_path / "run" / "report.md").read_text()

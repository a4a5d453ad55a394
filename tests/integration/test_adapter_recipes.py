"""The adapter recipes with tiny overrides: the default run's LoRA stage on the CHTs twin's sparse layers, the
sparse-backbone recipe, and the instruction pipeline (generated prompts, LoRA, exact match before and after) on a
tiny Llama. The real figures are the recipes' own (`edgetune run adapters/...`); these check the plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgetune.core.errors import ConfigError
from edgetune.recipe import load_recipe
from edgetune.runner import load_run_model, run

TINY = ["train.max_steps=24", "train.schedule.warmup_steps=2", "train.progress=false", "train.num_threads=1", "data.limit_train=2048",
        "data.limit_test=256"]


def _summary(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / "stages" / stage / "summary.json").read_text())


def test_default_run_adds_lora_on_the_sparse_twin_and_a_soup(tmp_path):
    cfg = load_recipe("foundation/default", [*TINY, f"output_dir={tmp_path}"])
    res = run(cfg, tmp_path / "run", command="test")
    assert res.summary["order"] == ["dense", "chts-1pct", "chts-lora", "dense-a", "dense-b", "soup", "personalize"]
    s = _summary(tmp_path / "run", "chts-lora")
    twin = _summary(tmp_path / "run", "chts-1pct")
    assert s["steps"] > 0 and s["model_source"] == "stage chts-1pct"
    # only the adapter and the head train: far fewer than the twin's trainable parameters plus the adapter's
    in_f = 64 if "digits" in s["dataset"] else 784
    lora = 8 * (in_f + 1024) + 8 * (1024 + 1024)
    head = 1024 * 9 + 9  # class 9 is held out of training for the personalization stage
    assert s["trainable_parameters"] == lora + head
    assert "adapter/adapter_model.safetensors" in s["family_files"]
    # the sparse links did not move: the adapter sits on them, unmerged
    before = load_file(str(tmp_path / "run" / "stages" / "chts-1pct" / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "stages" / "chts-lora" / "model.safetensors"))
    for layer in ("layers.0", "layers.1"):
        assert torch.equal(before[f"{layer}.values"], after[f"{layer}.base_layer.values"])
        assert torch.equal(before[f"{layer}.indices"], after[f"{layer}.base_layer.indices"])
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert twin["nonzeros"] < s["nonzeros"]
    # the stage folder reloads on its own (sparse section of the twin, then the adapter)
    loaded = load_run_model(tmp_path / "run" / "stages" / "chts-lora")
    assert all(torch.equal(v, after[k]) for k, v in loaded.model.state_dict().items())
    assert "chts-lora" in (tmp_path / "run" / "report.md").read_text()
    # neither export silently densifies nor writes a model that does not reload: both refuse, naming the way out
    from edgetune.adapters.export import export_merged
    from edgetune.sparse.export import export_run

    stage = tmp_path / "run" / "stages" / "chts-lora"
    last = load_run_model(stage, with_data=True)
    for export in (export_merged, export_run):
        with pytest.raises(ConfigError, match="adapter-peft") as err:
            export(last, stage, tmp_path / "exported")
        assert "layers.0" in str(err.value) and not (tmp_path / "exported").exists()
    # the soup is the average of two fine-tunes of the dense model, evaluated and reported like any stage
    a, b, soup = (load_file(str(tmp_path / "run" / "stages" / n / "model.safetensors"))
                  for n in ("dense-a", "dense-b", "soup"))
    assert all(torch.allclose(soup[k], (a[k] + b[k]) / 2) for k in soup)
    s = _summary(tmp_path / "run", "soup")
    assert s["merge_method"] == "linear" and s["steps"] == 0 and 0 < s["test_acc"] <= 1
    # personalization: the soup's frozen features, the held-out tenth class added from one example, no training
    p = _summary(tmp_path / "run", "personalize")
    assert p["steps"] == 0 and p["sessions"] == 2 and p["classes"] == 10 and p["draws"] == 10
    assert p["model_source"] == "stage soup" and p["last_novel_acc"] is not None and p["acc_first"] > 0.5


def test_sparse_backbone_recipe_runs_its_stages(tmp_path):
    cfg = load_recipe("adapters/chts-sparse-lora-glyphs",
                      [*TINY, f"output_dir={tmp_path}", "train.epochs=1"])
    res = run(cfg, tmp_path / "run", command="test")
    assert res.summary["order"] == ["chts", "probe", "sparse-tune", "lora"]
    s = {n: _summary(tmp_path / "run", n) for n in res.summary["order"]}
    assert s["probe"]["dataset"] == s["lora"]["dataset"] == "synglyph"
    head = 1024 * 20 + 20  # a new 20-class head
    assert s["probe"]["trainable_parameters"] == head
    assert s["lora"]["trainable_parameters"] == head + 8 * (784 + 1024) + 8 * (1024 + 1024)
    assert s["probe"]["trainable_parameters"] < s["sparse-tune"]["trainable_parameters"] < \
        s["lora"]["trainable_parameters"]


def _tiny_llama(folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    words = ["what", "is", "answer", "with", "the", "number", "only", "+", "-", "?", "."]
    digits = [str(i) for i in range(10)]
    vocab = folder.parent / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *digits,
                                *[f"##{d}" for d in digits]]) + "\n")
    tok = transformers.BertTokenizer(vocab=str(vocab)) if int(transformers.__version__.split(".")[0]) >= 5 \
        else transformers.BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


def test_instruction_pipeline_lora_and_exact_match_before_and_after(tmp_path):
    folder = tmp_path / "tiny-llama"
    _tiny_llama(folder)
    recipe = load_recipe({
        "name": "instr", "seed": 0, "output_dir": str(tmp_path),
        "data": {"name": "instructions", "options": {"tasks": ["add", "subtract"], "train_per_task": 64,
                                                     "test_per_task": 8}},
        "model": {"hf": str(folder), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 16, "progress": False, "num_threads": 1,
                  "optimizer": {"name": "adamw", "lr": 0.01}},
        "stages": [
            {"name": "before", "step": "evaluate-generation", "evaluate-generation": {"examples": 2}},
            {"name": "lora", "adapter": {"method": "lora", "rank": 4, "targets": ["q_proj", "v_proj"],
                                         "trainable": ["lm_head.*"]}},
            {"name": "after", "model": {"from": "stage:lora"}, "step": "evaluate-generation",
             "expect": {"min_test_exact_match": 0.0}},
        ],
    })
    res = run(recipe, tmp_path / "run", command="test")
    before, lora, after = (res.summary["stages"][n] for n in ("before", "lora", "after"))
    assert before["steps"] == 0 and before["test_generated"] == 16 and 0.0 <= before["test_exact_match"] <= 1.0
    assert len(before["test_generations"]) == 2 and set(before["test_generations"][0]) == {
        "prompt", "prediction", "reference", "match"}
    assert before["test_generations"][0]["reference"].replace(" ", "").isdigit()
    assert lora["steps"] > 0 and "test_exact_match" not in lora
    assert after["test_loss"] == pytest.approx(lora["test_loss"], rel=1e-5)  # the same model, measured again
    assert after["test_loss"] < before["test_loss"]  # the answers' loss fell
    assert after["expect"]["min_test_exact_match"]["got"] == after["test_exact_match"]
    table = (tmp_path / "run" / "report.md").read_text().split("## Stages compared", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in table.splitlines() if line.startswith("| stage"))
    assert "exact match" in header and f"{after['test_exact_match']:.4f}" in table

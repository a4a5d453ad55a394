"""HOP on a tiny random BERT: pooling against a naive loop, zero forgetting by construction (bit-exact), learning
on keyword-labelled text, the problem choice when it is not given, save/load, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from edgetune.adapters import adapter_state_dict
from edgetune.core.errors import CheckpointError, ConfigError, DataError
from edgetune.incremental.hop import HopConfig, HopModel, content_mask, hop_features, select_problem

transformers = pytest.importorskip("transformers")

WORDS = [f"w{i}" for i in range(40)]
FILLER = WORDS[12:]


class WordTokenizer:
    """Whitespace words -> ids in a Hugging Face tokenizer's calling convention: [CLS] words [SEP], right padding."""

    pad_token_id, cls_token_id, sep_token_id = 0, 1, 2
    vocab: ClassVar[dict[str, int]] = {w: i + 3 for i, w in enumerate(WORDS)}

    def __len__(self) -> int:
        return 3 + len(WORDS)

    def __call__(self, texts: list[str], truncation: bool = True, max_length: int | None = None,
                 padding: str = "longest", return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        rows = [[1, *[self.vocab[w] for w in t.split()][: (max_length or 10**6) - 2], 2] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": ids.ne(0).long()}


def tiny_bert(seed: int = 0) -> Any:
    cfg = transformers.BertConfig(vocab_size=len(WordTokenizer()), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def keyword_data(keys: list[str], n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """Class c's texts hold the word ``keys[c]`` somewhere among 4-10 random filler words."""
    r = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        c = i % len(keys)
        words = [r.choice(FILLER) for _ in range(r.randint(4, 10))]
        words.insert(r.randint(0, len(words)), keys[c])
        texts.append(" ".join(words))
        labels.append(c)
    return texts, torch.tensor(labels)


TASKS = [["w0", "w1", "w2"], ["w3", "w4"], ["w5", "w6", "w7"]]
FAST = {"rank": 4, "targets": ["query", "value"], "steps": 80, "batch_size": 32, "lr": 1e-2, "head_lr": 1e-2,
        "head_hidden": 32, "max_length": 16}


def hop(**fields: Any) -> HopModel:
    return HopModel(tiny_bert(), WordTokenizer(), HopConfig(**{**FAST, **fields}))


# ------------------------------------------------------------------------------------------ pure parts
def test_moment_pooling_without_cls_matches_a_naive_loop_on_tiny_bert() -> None:
    bert, tok = tiny_bert(), WordTokenizer()
    batch = tok(["w3 w4 w5", "w6", "w7 w8 w9 w10 w11 w12"])
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state  # (3, 8, 32)
    mask = content_mask(batch["input_ids"], batch["attention_mask"], tok.cls_token_id)
    got = hop_features(hidden, mask, "moments", (1, 2))
    for b in range(3):
        tokens = [hidden[b, i] for i in range(hidden.shape[1])
                  if batch["attention_mask"][b, i] == 1 and batch["input_ids"][b, i] != tok.cls_token_id]
        assert len(tokens) == batch["attention_mask"][b].sum() - 1  # only [CLS] left out ([SEP] stays)
        mean = [sum(float(t[d]) for t in tokens) / len(tokens) for d in range(32)]
        std = [(sum((float(t[d]) - mean[d]) ** 2 for t in tokens) / len(tokens)) ** 0.5 for d in range(32)]
        torch.testing.assert_close(got[b], torch.tensor(mean + std), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hop_features(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(hop_features(hidden, mask, "cls", cls_index=torch.tensor([1, 0, 2])),
                               hidden[torch.arange(3), torch.tensor([1, 0, 2])])


def test_cls_found_by_id_with_left_padding() -> None:
    ids = torch.tensor([[0, 0, 1, 5, 2], [1, 6, 7, 8, 2]])
    mask = content_mask(ids, ids.ne(0).long(), 1)
    assert mask.tolist() == [[False, False, False, True, True], [False, True, True, True, True]]
    assert content_mask(ids, ids.ne(0).long(), None)[1].all()


def test_gradient_is_finite_where_a_channel_is_constant() -> None:
    hidden = torch.randn(2, 5, 4)
    hidden[:, :, 1] = 0.3  # constant channel: sigma = 0, as on three of MiniLM's output channels
    hidden.requires_grad_(True)
    out = hop_features(hidden, torch.ones(2, 5, dtype=torch.bool), "moments", (1, 2))
    out.square().sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert hidden.grad[:, :, 0].abs().sum() > 0


def test_select_problem_rules_by_hand() -> None:
    # 2 problems, 2 examples, 2 classes
    probs = torch.tensor([[[0.6, 0.4], [0.9, 0.1]],
                          [[0.2, 0.8], [0.45, 0.55]]])
    labels, chosen = select_problem(probs, "confidence")
    assert chosen.tolist() == [1, 0] and labels.tolist() == [1, 0]
    labels, chosen = select_problem(probs, "entropy")
    assert chosen.tolist() == [1, 0] and labels.tolist() == [1, 0]
    labels, chosen = select_problem(probs, "average")  # means (0.4, 0.6) and (0.675, 0.325)
    assert labels.tolist() == [1, 0] and chosen.tolist() == [-1, -1]
    with pytest.raises(ConfigError, match="unknown select rule"):
        select_problem(probs, "vote")


# ------------------------------------------------------------------------------------------ learning
@pytest.fixture(scope="module")
def learned() -> tuple[HopModel, list[dict[str, Any]], list[torch.Tensor]]:
    """HOP after three task-incremental problems, with each problem's state and test probabilities right after
    it was learned."""
    model = hop()
    snaps, probs = [], []
    for t, keys in enumerate(TASKS):
        x, y = keyword_data(keys, 90, t)
        model.learn_problem(f"p{t}", x, y, [f"c{k}" for k in keys])
        snaps.append({"adapter": {k: v.clone() for k, v in adapter_state_dict(model.encoder, f"problem{t}").items()},
                      "head": {k: v.clone() for k, v in model.heads[f"problem{t}"].state_dict().items()}})
        probs.append(model.predict_proba(keyword_data(keys, 30, 100 + t)[0], f"p{t}"))
    return model, snaps, probs


def test_learns_keyword_problems(learned: tuple[HopModel, list, list]) -> None:
    model = learned[0]
    for t, keys in enumerate(TASKS):
        x, y = keyword_data(keys, 60, 100 + t)
        acc = float((model.predict(x, f"p{t}") == y).float().mean())
        assert acc >= 0.9, (t, acc)  # chance is 1/3 or 1/2
    assert model.problems == ["p0", "p1", "p2"] and model.classes("p1") == ("cw3", "cw4")


def test_old_adapters_and_heads_are_bit_exact_and_predictions_unchanged(learned: tuple[HopModel, list, list]
                                                                         ) -> None:
    model, snaps, probs = learned
    for t in range(len(TASKS)):
        now = adapter_state_dict(model.encoder, f"problem{t}")
        assert all(torch.equal(now[k], v) for k, v in snaps[t]["adapter"].items())
        assert all(torch.equal(model.heads[f"problem{t}"].state_dict()[k], v) for k, v in snaps[t]["head"].items())
        # task-incremental: zero forgetting by construction, tested on the outputs themselves
        assert torch.equal(model.predict_proba(keyword_data(TASKS[t], 30, 100 + t)[0], f"p{t}"), probs[t])


def test_a_shared_adapter_moves_and_forgets_where_hop_does_not() -> None:
    model = hop(adapters="shared")
    x0, y0 = keyword_data(TASKS[0], 60, 0)
    model.learn_problem("p0", x0, y0, 3)
    before = {k: v.clone() for k, v in adapter_state_dict(model.encoder, "shared").items()}
    test = keyword_data(TASKS[0], 30, 100)[0]
    p_before = model.predict_proba(test, "p0")
    model.learn_problem("p1", *keyword_data(TASKS[1], 60, 1), 2)
    after = adapter_state_dict(model.encoder, "shared")
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    assert not torch.equal(model.predict_proba(test, "p0"), p_before)


def test_joint_learning_with_a_shared_adapter() -> None:
    model = hop(adapters="shared", steps=50)
    problems = [(f"p{t}", *keyword_data(keys, 90, t), len(keys)) for t, keys in enumerate(TASKS)]
    info = model.learn_jointly(problems)
    assert info["steps"] == 50 * 3
    for t, keys in enumerate(TASKS):
        x, y = keyword_data(keys, 60, 100 + t)
        assert float((model.predict(x, f"p{t}") == y).float().mean()) >= 0.9


def test_domain_incremental_choice_of_the_problem() -> None:
    """Same classes in every domain, another keyword pair per domain: the confident domain's adapter answers."""
    domains = [["w0", "w1"], ["w2", "w3"], ["w4", "w5"]]
    model = hop()
    for d, keys in enumerate(domains):
        model.learn_problem(f"d{d}", *keyword_data(keys, 90, d), ["neg", "pos"])
    x = [t for d, keys in enumerate(domains) for t in keyword_data(keys, 20, 100 + d)[0]]
    y = torch.cat([keyword_data(keys, 20, 100 + d)[1] for d, keys in enumerate(domains)])
    truth = torch.arange(3).repeat_interleave(20)
    labels, chosen = model.predict(x, return_problem=True)
    assert float((labels == y).float().mean()) >= 0.75  # chance 1/2 (0.85 measured)
    assert float((chosen == truth).float().mean()) >= 0.5  # chance 1/3 (0.7 measured)
    for d in range(3):  # with the problem given every domain is learned: the gap is the cost of guessing it
        assert float((model.predict(x[20 * d:20 * d + 20], f"d{d}") == y[20 * d:20 * d + 20]).float().mean()) >= 0.95
    for rule in ("entropy", "average"):
        assert model.predict(x, select=rule).shape == (60,)
    assert (model.predict(x, select="average", return_problem=True)[1] == -1).all()
    given = model.predict(x[:20], "d0")
    assert torch.equal(given, model.predict_proba(x[:20], "d0").argmax(1))


def test_shared_head_domain_baseline_predicts_without_the_problem() -> None:
    model = hop(adapters="shared", heads="shared", steps=20)
    model.learn_problem("d0", *keyword_data(["w0", "w1"], 40, 0), ["neg", "pos"])
    model.learn_problem("d1", *keyword_data(["w2", "w3"], 40, 1), ["neg", "pos"])
    x = keyword_data(["w2", "w3"], 20, 5)[0]
    assert torch.equal(model.predict(x), model.predict(x, "d0"))  # one adapter, one head
    with pytest.raises(ConfigError, match="heads='shared' needs every problem"):
        model.learn_problem("d2", *keyword_data(["w4", "w5", "w6"], 30, 2), 3)


def test_feature_encoder_is_unwrapped() -> None:
    from edgetune.models.pretrained.hf import FeatureEncoder

    model = HopModel(FeatureEncoder(tiny_bert()), WordTokenizer(), HopConfig(**FAST))
    assert type(model.encoder).__name__ == "BertModel"


# ------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_and_damage(tmp_path: Path, learned: tuple[HopModel, list, list]) -> None:
    model = learned[0]
    model.save(tmp_path / "hop")
    back = HopModel.load(tmp_path / "hop", tiny_bert(), WordTokenizer())
    assert back.problems == model.problems and back.cfg == model.cfg
    for t, keys in enumerate(TASKS):
        x = keyword_data(keys, 20, 200 + t)[0]
        assert torch.equal(back.predict_proba(x, f"p{t}"), model.predict_proba(x, f"p{t}"))
    meta = json.loads((tmp_path / "hop" / "hop.json").read_text())
    assert meta["format"] == "edgetune-hop" and [p["name"] for p in meta["problems"]] == ["p0", "p1", "p2"]
    data = bytearray((tmp_path / "hop" / "hop.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "hop" / "hop.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        HopModel.load(tmp_path / "hop", tiny_bert(), WordTokenizer())
    with pytest.raises(CheckpointError, match="no saved HOP model"):
        HopModel.load(tmp_path / "nothing", tiny_bert(), WordTokenizer())


def test_save_load_full_encoder_and_shared_head(tmp_path: Path) -> None:
    model = hop(adapters="full", heads="shared", steps=3, lr=1e-4)
    model.learn_problem("d0", *keyword_data(["w0", "w1"], 20, 0), ["neg", "pos"])
    back = HopModel.load(model.save(tmp_path / "full"), tiny_bert(seed=9), WordTokenizer())
    x = keyword_data(["w0", "w1"], 10, 3)[0]
    assert torch.equal(back.predict_proba(x, "d0"), model.predict_proba(x, "d0"))


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_refused_and_leaves_the_model_as_it_was() -> None:
    model = hop(steps=2)
    x, y = keyword_data(["w0", "w1"], 10, 0)
    model.learn_problem("spam", x, y, 2)
    with pytest.raises(ConfigError, match='unknown problem .spma.*Did you mean "spam"'):
        model.predict(x, "spma")
    with pytest.raises(ConfigError, match="already learned"):
        model.learn_problem("spam", x, y, 2)
    with pytest.raises(DataError, match="no training texts"):
        model.learn_problem("empty", [], [], 2)
    with pytest.raises(DataError, match=r"labels \[2\] \(at positions \[3\]\) are outside its 2 classes"):
        model.learn_problem("bad-label", x[:4], [0, 1, 0, 2], 2)
    with pytest.raises(DataError, match="one per text"):
        model.learn_problem("short", x, y[:3], 2)
    with pytest.raises(DataError, match="not one string"):
        model.learn_problem("str", "w0 w1", [0], 2)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        model.learn_problem("one", x, torch.zeros(10, dtype=torch.long), 1)
    with pytest.raises(ConfigError, match="adapters='shared' or 'full'"):
        model.learn_jointly([("a", x, y, 2), ("b", x, y, 2)])
    assert model.problems == ["spam"] and list(model.heads) == ["problem0"]
    from edgetune.adapters import adapter_names

    assert adapter_names(model.encoder) == ["problem0"]


def test_problem_needed_when_classes_differ_and_config_errors() -> None:
    model = hop(steps=2)
    model.learn_problem("a", *keyword_data(["w0", "w1"], 10, 0), ["x", "y"])
    model.learn_problem("b", *keyword_data(["w2", "w3", "w4"], 12, 1), 3)
    with pytest.raises(ConfigError, match="different classes"):
        model.predict(["w0 w12"])
    with pytest.raises(ConfigError, match="no problem is learned"):
        hop().predict(["w0"])
    with pytest.raises(ConfigError, match="orders"):
        _validate({"orders": [0]})
    with pytest.raises(ConfigError, match="adapter_rank"):
        _validate({"adapter_rank": 4})


def _validate(data: dict[str, Any]) -> HopConfig:
    from edgetune.core.config import validate

    return validate(HopConfig, data)

"""Greedy generation and exact match: against a naive one-example-at-a-time reference, a hand-made case, both
batch layouts, the end-token rules, and a tiny Hugging Face Llama (its key/value cache gives what re-reading gives,
and what its own ``generate`` gives)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgetune.core.errors import ConfigError
from edgetune.data.batches import DictDataset
from edgetune.train.generation import exact_match, greedy_generate, prompt_answer_pairs

V, EOS, PAD = 12, 1, 0


class Successor(nn.Module):
    """Next token = last token + 1, except after ``stop_after`` it says EOS; called by keyword or positionally."""

    def __init__(self, stop_after: int | None = 9) -> None:
        super().__init__()
        self.stop_after = stop_after
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        nxt = (input_ids + 1) % V  # (B, T): a prediction at every position
        if self.stop_after is not None:
            nxt = torch.where(input_ids == self.stop_after, torch.full_like(nxt, EOS), nxt)
        return nn.functional.one_hot(nxt, V).float()  # (B, T, V)


class RandomLM(nn.Module):
    """A fixed random bigram-plus-position table: a model whose greedy path depends on the whole prefix."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(V, V, generator=g))
        self.mix = nn.Parameter(torch.randn(V, V, generator=g))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb[input_ids]  # (B, T, V)
        ctx = h.cumsum(1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)
        return h + ctx @ self.mix


def _naive_generate(model: nn.Module, prompt: list[int], n: int, eos: int | None) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))
        t = int(logits[0, -1].argmax())
        out.append(t)
        seq.append(t)
        if t == eos:
            break
    return out


def _dict_split(rows: list[tuple[list[int], list[int]]]) -> DictDataset:
    """Right-padded input_ids / attention_mask / labels (-100 on prompt and padding) from (prompt, answer) rows."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    labels = torch.full((len(rows), width), -100)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    return DictDataset({"input_ids": ids, "attention_mask": mask, "labels": labels})


def test_greedy_generate_hand_computed() -> None:
    out = greedy_generate(Successor(), torch.tensor([[2, 3], [6, 7]]), 5, eos_id=EOS)
    # row 0 counts 4, 5, 6, 7, 8 (budget); row 1 counts 8, 9, then EOS and stays at EOS
    assert out.tolist() == [[4, 5, 6, 7, 8], [8, 9, EOS, EOS, EOS]]


def test_greedy_generate_matches_naive_reference_and_stops_early() -> None:
    model = RandomLM(3)
    prompts = torch.randint(2, V, (5, 4), generator=torch.Generator().manual_seed(1))
    got = greedy_generate(model, prompts, 6, eos_id=None, keyword=False)
    for r in range(5):
        assert got[r].tolist() == _naive_generate(model, prompts[r].tolist(), 6, None)
    m = Successor()
    out = greedy_generate(m, torch.tensor([[8], [7]]), 10, eos_id=EOS)
    assert out.tolist() == [[9, EOS, EOS], [8, 9, EOS]] and m.calls == 3  # stops once every row ended


def test_prompt_answer_pairs_in_both_layouts() -> None:
    rows = [([2, 3, 4], [5, EOS]), ([7], [8, 9, EOS])]
    data = _dict_split(rows)
    prompts, answers, keyword = prompt_answer_pairs(data)
    assert keyword and prompts == [[2, 3, 4], [7]] and answers == [[5, EOS], [8, 9, EOS]]
    # list layout [x, y]: y is x shifted by one, -100 where the next token is still prompt
    x = torch.tensor([[2, 3, 4, 5, PAD], [7, 8, 9, PAD, PAD]])
    y = torch.tensor([[-100, -100, 5, EOS, -100], [8, 9, EOS, -100, -100]])
    prompts, answers, keyword = prompt_answer_pairs(TensorDataset(x, y))
    assert not keyword and prompts == [[2, 3, 4], [7]] and answers == [[5, EOS], [8, 9, EOS]]


def test_prompt_answer_pairs_left_padding() -> None:
    ids = torch.tensor([[PAD, PAD, 2, 3, 4, EOS]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, -100, 4, EOS]])
    prompts, answers, _ = prompt_answer_pairs(DictDataset({"input_ids": ids, "attention_mask": mask,
                                                           "labels": labels}))
    assert prompts == [[2, 3]] and answers == [[4, EOS]]


def test_plain_text_is_refused_with_a_clear_message() -> None:
    ids = torch.tensor([[2, 3, 4]])
    with pytest.raises(ConfigError, match="no prompt"):
        prompt_answer_pairs(DictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}))
    with pytest.raises(ConfigError, match="no answer"):
        prompt_answer_pairs(DictDataset({"input_ids": ids, "labels": torch.full_like(ids, -100)}))
    with pytest.raises(ConfigError, match="per token"):
        prompt_answer_pairs(DictDataset({"input_ids": ids, "labels": torch.tensor([1])}))


def test_exact_match_end_token_rules() -> None:
    # Successor answers prompt [..., k] with k+1, k+2, ... and EOS after 9
    rows = [([2, 7], [8, 9, EOS]),    # right, and stops: match
            ([3, 4], [5, 6, EOS]),    # right start but the model runs on (7, 8, ...): no match
            ([5], [6, 7, 8, 9, EOS]),  # right: match
            ([2, 8], [9, 3, EOS])]    # wrong token: no match
    r = exact_match(Successor(), _dict_split(rows), eos_id=EOS, batch_size=2)
    assert r["exact_match"] == 0.5 and r["count"] == 4
    assert [e["match"] for e in r["examples"]] == [True, False, True, False]
    assert r["examples"][1]["prediction"] == [5, 6, 7, 8, 9]  # budget: longest reference in the batch + 2
    # without an end token the generation is cut at the answer's length: [5, 6] matches
    rows_no_end = [([3, 4], [5, 6]), ([2, 8], [9, 3])]
    assert exact_match(Successor(), _dict_split(rows_no_end), eos_id=None)["exact_match"] == 0.5
    assert exact_match(Successor(), _dict_split(rows), eos_id=EOS, limit=1)["count"] == 1


def test_exact_match_decodes_with_a_tokenizer() -> None:
    class Tok:  # two ids spell the same text: exact match compares text, not ids
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return " ".join("x" if i in (5, 10) else str(i) for i in ids if i != EOS)

    rows = [([4], [10, 6, EOS])]  # the model says 5, 6, ...; 5 and 10 both decode to "x"
    model = Successor(stop_after=6)
    r = exact_match(model, _dict_split(rows), eos_id=EOS, tokenizer=Tok())
    assert r["exact_match"] == 1.0 and r["examples"][0]["prediction"] == "x 6"
    assert exact_match(model, _dict_split(rows), eos_id=EOS)["exact_match"] == 0.0  # ids differ


def test_exact_match_restores_training_mode() -> None:
    m = Successor()
    m.train()
    exact_match(m, _dict_split([([2], [3, EOS])]), eos_id=EOS)
    assert m.training


def test_tiny_llama_cache_equals_rereading_and_hf_generate() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    prompts = torch.randint(2, 40, (3, 6), generator=torch.Generator().manual_seed(2))

    class Plain(nn.Module):  # the same network without generation support: re-reads the sequence
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    cached = greedy_generate(model, prompts, 8, eos_id=None)
    plain = greedy_generate(Plain(model), prompts, 8, eos_id=None)
    assert torch.equal(cached, plain)
    ref = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(cached, ref[:, prompts.shape[1]:])

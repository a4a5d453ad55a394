"""Transformer and attention: naive attention reference, causal/padding masks, generation, learning checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetune.core.errors import ShapeError
from edgetune.models import CausalLM, ModelSpec, MultiHeadAttention, Seq2SeqTransformer, build_model

TINY = {"dim": 32, "depth": 2, "heads": 4, "max_len": 32}




def _naive_attention(
    attn: MultiHeadAttention, x: torch.Tensor, causal: bool, keep: torch.Tensor | None
) -> torch.Tensor:
    """Loop over batch, heads and queries; softmax over the allowed keys only."""
    b, t, d = x.shape
    h, dh = attn.heads, d // attn.heads
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    out = torch.zeros(b, t, d, dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            sl = slice(hi * dh, (hi + 1) * dh)
            for i in range(t):
                allowed = [j for j in range(t) if (not causal or j <= i) and (keep is None or keep[bi, j])]
                scores = torch.stack([q[bi, i, sl] @ k[bi, j, sl] / math.sqrt(dh) for j in allowed])
                w = torch.softmax(scores, dim=0)
                out[bi, i, sl] = sum(w[n] * v[bi, j, sl] for n, j in enumerate(allowed))
    return attn.out_proj(out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_naive_reference(causal: bool, padded: bool) -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2, dtype=torch.float64)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    keep = (
        torch.tensor([[True, True, False, True, True], [True, True, True, True, False]]) if padded else None
    )
    got = attn(x, causal=causal, key_mask=keep)
    torch.testing.assert_close(got, _naive_attention(attn, x, causal, keep))


def test_named_projections_are_linear() -> None:
    for task in ("lm", "seq2seq"):
        model = build_model("transformer", TINY, ModelSpec((16,), 20, task))
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"} <= names
    vit = build_model("vit", {"dim": 16, "heads": 2, "depth": 1}, ModelSpec((1, 8, 8), 3))
    for suffix in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2"):
        assert isinstance(vit.get_submodule(f"blocks.0.{suffix}"), nn.Linear)
    s2s = build_model("transformer", TINY, ModelSpec((16,), 20, "seq2seq"))
    assert isinstance(s2s.get_submodule("decoder.1.cross_attn.q_proj"), nn.Linear)


def test_causal_lm_future_tokens_do_not_change_past_logits() -> None:
    torch.manual_seed(0)
    model = build_model("transformer", TINY, ModelSpec((16,), 20, "lm")).eval()
    x = torch.randint(0, 20, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 7) % 20
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_seq2seq_decoder_is_causal_and_source_padding_is_ignored() -> None:
    torch.manual_seed(0)
    model = build_model("transformer", {**TINY, "pad_id": 0}, ModelSpec((8,), 20, "seq2seq")).eval()
    src = torch.randint(1, 20, (2, 8))
    src[:, 6:] = 0
    tgt = torch.randint(1, 20, (2, 6))
    with torch.no_grad():
        base = model(src, tgt)
        tgt2 = tgt.clone()
        tgt2[:, 4] = tgt2[:, 4] % 19 + 1  # another non-pad token
        torch.testing.assert_close(model(src, tgt2)[:, :4], base[:, :4])
        longer = torch.cat([src, torch.zeros(2, 4, dtype=torch.long)], dim=1)  # more padding: same result
        torch.testing.assert_close(model(longer, tgt), base)
        src3 = src.clone()
        src3[:, 0] = (src3[:, 0] % 19) + 1
        assert not torch.allclose(model(src3, tgt), base)


def test_weight_tying() -> None:
    tied = build_model("transformer", TINY, ModelSpec((8,), 20, "lm"))
    untied = build_model("transformer", {**TINY, "tie_weights": False}, ModelSpec((8,), 20, "lm"))
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    n = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert n == 20 * 32


def test_forward_rejects_sequences_longer_than_max_len() -> None:
    model = build_model("transformer", TINY, ModelSpec((8,), 20, "lm"))
    with pytest.raises(ShapeError, match="length 33 exceeds max_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ShapeError, match="int64 token ids"):
        model(torch.zeros(1, 8))


def test_generate_shapes_greedy_and_seeded_sampling() -> None:
    torch.manual_seed(0)
    model = build_model("transformer", TINY, ModelSpec((8,), 20, "lm")).eval()
    assert isinstance(model, CausalLM)
    idx = torch.randint(0, 20, (3, 4))
    out = model.generate(idx, 40, temperature=0.0)  # runs past max_len: context is cropped
    assert out.shape == (3, 44) and torch.equal(out[:, :4], idx)
    # greedy: each new token is the argmax of the model's logits on the (cropped) prefix
    for t in (4, 20, 43):
        with torch.no_grad():
            logits = model(out[:, max(0, t - 32) : t])[:, -1]
        assert torch.equal(out[:, t], logits.argmax(-1))
    torch.testing.assert_close(model.generate(idx, 6, top_k=1), out[:, :10], rtol=0, atol=0)
    s1 = model.generate(idx, 8, generator=torch.Generator().manual_seed(1))
    s2 = model.generate(idx, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and s1.max() < 20


def test_causal_lm_overfits_repeated_byte_pattern() -> None:
    torch.manual_seed(0)
    vocab, t = 256, 32
    model = build_model(
        "transformer", {"dim": 64, "depth": 2, "heads": 4, "max_len": t}, ModelSpec((t,), vocab, "lm")
    )
    stream = torch.tensor(list(b"edge tune! " * 20))
    starts = torch.arange(0, 64)
    x = torch.stack([stream[s : s + t] for s in starts])
    y = torch.stack([stream[s + 1 : s + t + 1] for s in starts])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.15 * math.log(vocab), loss.item()  # reaches ~0.3; log(V) = 5.5


def test_seq2seq_learns_to_copy() -> None:
    torch.manual_seed(0)
    vocab, bos = 10, 1
    model = build_model(
        "transformer", {"dim": 32, "depth": 2, "heads": 2, "max_len": 8}, ModelSpec((4,), vocab, "seq2seq")
    )
    assert isinstance(model, Seq2SeqTransformer)
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        src = torch.randint(2, vocab, (n, 4), generator=g)
        return src, torch.cat([torch.full((n, 1), bos), src[:, :-1]], dim=1)

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        src, tgt_in = batch(64)
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), src.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src, _ = batch(256)
    decoded = model.greedy_decode(src, bos, 4)[:, 1:]
    exact = (decoded == src).all(dim=1).float().mean().item()
    assert exact > 0.9, exact

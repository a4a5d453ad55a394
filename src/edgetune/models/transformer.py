"""Small pre-LayerNorm Transformers: a causal language model and an encoder-decoder (seq2seq).

Vaswani et al., "Attention Is All You Need" (NeurIPS 2017), with the pre-LN placement of GPT-2 and
nanoGPT. Every projection is its own :class:`torch.nn.Linear` named ``q_proj``, ``k_proj``, ``v_proj``,
``out_proj`` (attention) and ``fc1``, ``fc2`` (feed-forward), so the sparse and adapter families can
target them by name. Attention runs through ``F.scaled_dot_product_attention`` (``is_causal`` for the
causal mask). Positions are learned embeddings up to ``max_len``. The blocks here are reused by the ViT.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError, ShapeError
from edgetune.models.base import ModelSpec, register_model

__all__ = [
    "CausalLM",
    "FeedForward",
    "MultiHeadAttention",
    "Seq2SeqTransformer",
    "TransformerBlock",
    "TransformerConfig",
    "init_transformer_weights",
]

Device = torch.device | str | None


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linear layers."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(
                f"attention dim {dim} is not divisible by heads {heads}; pick heads dividing dim"
            )
        kw = {"device": device, "dtype": dtype}
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(dim, dim, **kw)
        self.k_proj = nn.Linear(dim, dim, **kw)
        self.v_proj = nn.Linear(dim, dim, **kw)
        self.out_proj = nn.Linear(dim, dim, **kw)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, D/H)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (B, T, D)`` attends to ``context (B, S, D)`` (default: ``x``) -> ``(B, T, D)``.

        ``key_mask (B, S)`` bool, True where a key may be attended to (False on padding).
        """
        kv = x if context is None else context
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(kv)), self._split(self.v_proj(kv))
        mask = None
        if key_mask is not None:
            mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
            if causal:
                t, s = q.shape[2], k.shape[2]
                mask = mask & torch.ones(t, s, dtype=torch.bool, device=x.device).tril()
                causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        return self.out_proj(y.transpose(1, 2).flatten(2))  # (B, T, D)


class FeedForward(nn.Module):
    """``(B, T, D) -> (B, T, D)``: ``fc2(dropout(gelu(fc1(x))))`` with hidden size ``hidden``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        dropout: float = 0.0,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x += attn(ln1(x))``; with ``cross``: ``x += cross_attn(ln_cross(x), memory)``;
    ``x += mlp(ln2(x))``. ``(B, T, D) -> (B, T, D)``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        cross: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.ln1 = nn.LayerNorm(dim, **kw)
        self.attn = MultiHeadAttention(dim, heads, dropout, **kw)
        self.ln_cross = nn.LayerNorm(dim, **kw) if cross else None
        self.cross_attn = MultiHeadAttention(dim, heads, dropout, **kw) if cross else None
        self.ln2 = nn.LayerNorm(dim, **kw)
        self.mlp = FeedForward(dim, max(1, round(dim * mlp_ratio)), dropout, **kw)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        causal: bool = False,
        key_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), causal=causal, key_mask=key_mask))
        if self.cross_attn is not None and self.ln_cross is not None:
            if memory is None:
                raise ShapeError("a decoder block needs the encoder output `memory` (B, S, D)")
            x = x + self.drop(self.cross_attn(self.ln_cross(x), memory, key_mask=memory_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


def init_transformer_weights(model: nn.Module, depth: int) -> None:
    """GPT-2 init: N(0, 0.02) for Linear/Embedding, zero biases, residual projections scaled by 1/sqrt(2*depth)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * depth) if name.endswith(("out_proj", "fc2")) else 0.02
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


class _TokenModel(nn.Module):
    """Token + learned position embeddings shared by both Transformer kinds."""

    def __init__(
        self, vocab: int, dim: int, max_len: int, dropout: float, device: Device, dtype: torch.dtype | None
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab, dim, **kw)
        self.pos_emb = nn.Embedding(max_len, dim, **kw)
        self.drop = nn.Dropout(dropout)

    def embed(self, idx: torch.Tensor, what: str) -> torch.Tensor:
        """``(B, T)`` long token ids -> ``(B, T, D)``."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ShapeError(
                f"{what} must be (B, T) int64 token ids, got shape {tuple(idx.shape)} {idx.dtype}"
            )
        t = idx.shape[1]
        if t > self.max_len:
            raise ShapeError(
                f"{what} length {t} exceeds max_len {self.max_len}; raise model.max_len or crop it"
            )
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))


class CausalLM(_TokenModel):
    """Decoder-only LM. ``forward(idx (B, T) long) -> (B, T, V)`` logits of the next token."""

    def __init__(
        self,
        vocab: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        max_len: int = 256,
        dropout: float = 0.0,
        tie_weights: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(vocab, dim, max_len, dropout, device, dtype)
        kw = {"device": device, "dtype": dtype}
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, dropout, **kw) for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(dim, **kw)
        self.head = nn.Linear(dim, vocab, bias=False, **kw)
        init_transformer_weights(self, depth)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx, "input")
        for block in self.blocks:
            h = block(h, causal=True)
        return self.head(self.ln_f(h))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx (B, T0)`` by sampling -> ``(B, T0 + max_new_tokens)``.

        The context is cropped to the last ``max_len`` tokens. ``temperature <= 0`` picks the argmax;
        ``top_k`` keeps only the k most likely tokens. Leaves train/eval mode to the caller.
        """
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if top_k is not None and top_k < 1:
            raise ConfigError(f"top_k must be >= 1 or None, got {top_k}")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.max_len :])[:, -1, :]  # (B, V)
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits.float(), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


class Seq2SeqTransformer(_TokenModel):
    """Encoder-decoder over one shared vocabulary. ``forward(src (B, S), tgt_in (B, T)) -> (B, T, V)``.

    ``pad_id``: source positions holding it are masked out of encoder and cross attention.
    """

    def __init__(
        self,
        vocab: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        max_len: int = 256,
        dropout: float = 0.0,
        tie_weights: bool = True,
        pad_id: int | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(vocab, dim, max_len, dropout, device, dtype)
        kw = {"device": device, "dtype": dtype}
        self.pad_id = pad_id
        self.encoder = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, dropout, **kw) for _ in range(depth)
        )
        self.ln_enc = nn.LayerNorm(dim, **kw)
        self.decoder = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, dropout, cross=True, **kw) for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(dim, **kw)
        self.head = nn.Linear(dim, vocab, bias=False, **kw)
        init_transformer_weights(self, 2 * depth)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``src (B, S)`` -> memory ``(B, S, D)`` and key mask ``(B, S)`` (None without ``pad_id``)."""
        mask = None if self.pad_id is None else src != self.pad_id
        h = self.embed(src, "src")
        for block in self.encoder:
            h = block(h, key_mask=mask)
        return self.ln_enc(h), mask

    def decode(
        self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``tgt_in (B, T)`` with encoder ``memory (B, S, D)`` -> logits ``(B, T, V)``."""
        h = self.embed(tgt_in, "tgt_in")
        for block in self.decoder:
            h = block(h, memory, causal=True, memory_mask=memory_mask)
        return self.head(self.ln_f(h))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, bos_id: int, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: ``src (B, S)`` -> ``(B, 1 + max_new_tokens)`` starting with ``bos_id``."""
        memory, mask = self.encode(src)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        for _ in range(min(max_new_tokens, self.max_len - 1)):
            nxt = self.decode(out, memory, mask)[:, -1].argmax(dim=-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
        return out


class TransformerConfig(Config):
    """kind: "causal_lm" or "seq2seq" (default: follow the data task, "lm" or "seq2seq");
    dim/depth/heads: width, number of blocks (per stack for seq2seq) and attention heads (must divide dim);
    mlp_ratio: feed-forward hidden size / dim; max_len: longest sequence (learned positions);
    tie_weights: share the output head with the token embedding; pad_id: source padding token (seq2seq)."""

    kind: Literal["causal_lm", "seq2seq"] | None = None
    dim: int = Field(default=128, gt=0)
    depth: int = Field(default=2, gt=0)
    heads: int = Field(default=4, gt=0)
    mlp_ratio: float = Field(default=4.0, gt=0.0)
    max_len: int = Field(default=256, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    tie_weights: bool = True
    pad_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> TransformerConfig:
        if self.dim % self.heads:
            raise ValueError(
                f"dim {self.dim} is not divisible by heads {self.heads}; pick heads dividing dim"
            )
        return self


_TASK_KIND = {"lm": "causal_lm", "causal_lm": "causal_lm", "seq2seq": "seq2seq"}


@register_model(
    "transformer", config=TransformerConfig, summary="small pre-LN Transformer: causal LM or seq2seq"
)
def build_transformer(
    cfg: TransformerConfig, spec: ModelSpec, device: Device, dtype: torch.dtype | None
) -> CausalLM | Seq2SeqTransformer:
    """Causal LM for task "lm", encoder-decoder for task "seq2seq"; ``spec.num_classes`` is the vocabulary."""
    task_kind = _TASK_KIND.get(spec.task)
    kind = cfg.kind or task_kind
    if kind is None:
        raise ConfigError(
            f"model 'transformer' works on token tasks, but the data task is {spec.task!r}; "
            "use a token dataset or set model.kind=causal_lm|seq2seq explicitly"
        )
    if task_kind is not None and kind != task_kind:
        raise ConfigError(
            f"model.kind={kind!r} does not match the data task {spec.task!r}; set model.kind={task_kind}"
        )
    if len(spec.input_shape) != 1:
        raise ConfigError(
            f"model 'transformer' needs token sequences of shape (T,), got input shape {spec.input_shape}"
        )
    if spec.input_shape[0] > cfg.max_len:
        raise ConfigError(
            f"sequence length {spec.input_shape[0]} exceeds model.max_len {cfg.max_len}; "
            f"set model.max_len >= {spec.input_shape[0]} or use shorter sequences"
        )
    if spec.num_classes < 2:
        raise ConfigError(
            f"model 'transformer' needs a vocabulary of >= 2 tokens, got num_classes={spec.num_classes}"
        )
    if cfg.pad_id is not None and cfg.pad_id >= spec.num_classes:
        raise ConfigError(f"model.pad_id {cfg.pad_id} is outside the vocabulary of {spec.num_classes} tokens")
    if kind == "causal_lm":
        if cfg.pad_id is not None:
            raise ConfigError("model.pad_id only applies to kind=seq2seq; remove it for a causal LM")
        return CausalLM(
            spec.num_classes, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.max_len, cfg.dropout,
            cfg.tie_weights, device=device, dtype=dtype,
        )  # fmt: skip
    return Seq2SeqTransformer(
        spec.num_classes, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.max_len, cfg.dropout,
        cfg.tie_weights, pad_id=cfg.pad_id, device=device, dtype=dtype,
    )  # fmt: skip

"""Causal-LM plumbing of the ``merging-llm-safety`` suite: prompts, batches, LoRA experts, greedy answers.

- :class:`ChatCodec` turns a request into the token ids the model reads before answering (SmolLM2's chat template:
  its default system turn, the user turn, the assistant header) and an answer into ids ending with the end-of-turn
  token; :class:`CharCodec` is a character-level stand-in for the tiny random Llama of the quick size.
- :func:`lm_batches`: right-padded dict batches ``input_ids``, ``attention_mask`` and ``labels`` ``(B, T)`` with
  the labels already shifted (``labels[t]`` is the token at ``t + 1`` where that token is part of the answer,
  ``-100`` elsewhere), the layout :func:`edgetune.merging.data_aware.cross_entropy` and the safety merge read.
- :func:`train_lora_expert`: a LoRA on the model, trained on answer tokens, folded into the weights; returns the
  changed tensors and leaves the model exactly as it was.
- :func:`answer`: greedy answers of many prompts, left-padded batches through Hugging Face ``generate``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from edgetune.adapters.lora import LoraConfig
from edgetune.adapters.model import adapter_layers, add_adapter_, remove_adapters_
from edgetune.merging.data_aware import IGNORE_INDEX, cross_entropy, logits_of

__all__ = [
    "CharCodec",
    "ChatCodec",
    "Codec",
    "Generated",
    "answer",
    "lm_batches",
    "tiny_llama",
    "train_lora_expert",
]

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]


class Codec(Protocol):
    """How requests and answers become token ids, and ids text."""

    end_id: int
    pad_id: int

    def prompt_ids(self, request: str) -> list[int]: ...

    def answer_ids(self, text: str, end: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ChatCodec:
    """A Hugging Face tokenizer with a chat template: a request is one user turn after the template's own system
    turn, followed by the assistant header; answers end with the tokenizer's end-of-turn (eos) token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.end_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.end_id

    def prompt_ids(self, request: str) -> list[int]:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True
        )
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def answer_ids(self, text: str, end: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) + ([self.end_id] if end else [])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True)).strip()


class CharCodec:
    """Characters of printable ASCII as tokens (ids 3..97): ``0`` pads, ``1`` opens a request, ``2`` ends a turn."""

    end_id, pad_id, vocab_size = 2, 0, 98
    _open = 1

    def prompt_ids(self, request: str) -> list[int]:
        return [self._open, *self._chars(request), self.end_id]

    def answer_ids(self, text: str, end: bool = True) -> list[int]:
        return [*self._chars(text), *([self.end_id] if end else [])]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i + 29) for i in ids if 3 <= i < self.vocab_size).strip()

    @staticmethod
    def _chars(text: str) -> list[int]:
        return [min(max(ord(ch), 32), 126) - 29 for ch in text]


def tiny_llama(vocab_size: int, seed: int) -> nn.Module:
    """A randomly initialised 2-block Llama (hidden 32) for the quick size: SmolLM2's architecture in miniature.
    Weights are drawn with std 0.2 (not Llama's 0.02), so that its tied output layer can reach confident logits."""
    from edgetune.models.pretrained.hf import require_transformers

    tf = require_transformers()
    cfg = tf.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).eval()


def lm_batches(
    codec: Codec, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int
) -> list[dict[str, Tensor]]:
    """``(prompt ids, answer ids)`` pairs -> right-padded batches of ``input_ids``, ``attention_mask`` and shifted
    ``labels`` ``(B, T)`` (only the answer's tokens are predicted), in the given order."""
    out = []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo : lo + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), codec.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(chunk), width), dtype=torch.int64)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.int64)
        for r, (p, a) in enumerate(chunk):
            seq = p + a
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            labels[r, len(p) - 1 : len(seq) - 1] = torch.tensor(a)  # position t predicts the token at t + 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _cycle(batches: Sequence[Mapping[str, Tensor]], seed: int) -> Iterator[Mapping[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[i]


def lm_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean cross-entropy of the answer tokens of one :func:`lm_batches` batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return cross_entropy(logits_of(out), batch["labels"])


def train_lora_expert(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    cfg: LoraConfig,
    *,
    steps: int,
    lr: float,
    seed: int,
) -> tuple[StateDict, list[float]]:
    """Train a LoRA ``cfg`` on ``batches`` (``steps`` AdamW steps, batches visited in a seeded order) and return the
    adapted weights with the update folded in (``{"<layer>.weight": W + BA}``) and the loss of each step.

    The model is left as it was: the adapter is removed and the weights it touched are restored exactly.
    """
    add_adapter_(model, cfg, name="expert", seed=seed)
    keys = [f"{path}.weight" for path, _ in adapter_layers(model)]
    before = {
        k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".base_layer.weight")
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    stream = _cycle(batches, seed)
    model.train()
    try:
        for _ in range(steps):
            loss = lm_loss(model, next(stream))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
    remove_adapters_(model, "expert", merge=True)
    merged = {k: model.state_dict()[k].detach().clone() for k in keys}
    model.load_state_dict(
        {k.replace(".base_layer.weight", ".weight"): v for k, v in before.items()}, strict=False
    )
    for p in model.parameters():
        p.requires_grad_(False)
    if losses:
        log.info(
            "LoRA expert: loss %.3f -> %.3f in %d steps on %d layers", losses[0], losses[-1], steps, len(keys)
        )
    return merged, losses


@dataclass
class Generated:
    """A greedy answer: its decoded text (before the end token) and whether the model produced the end token."""

    text: str
    stopped: bool


@torch.no_grad()
def answer(
    model: nn.Module, codec: Codec, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 32
) -> list[Generated]:
    """Greedy answers of ``prompts`` (token ids), in order: prompts sorted by length into left-padded batches and
    decoded by the model's Hugging Face ``generate`` (positions follow the attention mask, so padding is not read).
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generated | None] = [None] * len(prompts)
    model.eval()
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), codec.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for r, i in enumerate(rows):
            p = prompts[i]
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=codec.pad_id,
            eos_token_id=codec.end_id,
        )[:, width:]
        for r, i in enumerate(rows):
            new = gen[r].tolist()
            stopped = codec.end_id in new
            out[i] = Generated(codec.decode(new[: new.index(codec.end_id)] if stopped else new), stopped)
    return [g for g in out if g is not None]

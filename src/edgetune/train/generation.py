"""Greedy generation and exact match: does a causal LM say the reference answer after a prompt?

Works on any tokenized causal-LM split whose ``labels`` mark a prompt: ``-100`` on the prompt (and padding), the
answer's tokens after it (what :class:`edgetune.data.instructions.InstructionDataset` builds), in either layout
the ``lm`` task reads:

- dict batches (Hugging Face style): ``input_ids``, ``attention_mask``, ``labels`` all ``(N, T)``, labels
  unshifted: the prompt is ``input_ids[:p]`` where ``p`` is the first label that is not ``-100``;
- list batches ``[x, y]`` with ``y`` the shifted target: the prompt is ``x[:p + 1]`` (``y[p] = x[p + 1]`` is the
  first answer token).

The answer is every label that is not ``-100``. Prompts are grouped by length, so a batch holds prompts of one
length and needs no padding (a causal model then reads each prompt exactly as it would alone, whatever its
position-id rules). Hugging Face models (anything with ``prepare_inputs_for_generation``) decode with their
key/value cache; other models re-read the whole sequence at each new token.

Exact match: the tokens generated before the end token, decoded and stripped, equal the reference answer decoded
and stripped (token ids are compared when there is no tokenizer), and, when the reference ends with the end
token, the model produced it (it stopped). Without an end token the generation is cut at the answer's length.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from edgetune.core.errors import ConfigError
from edgetune.train.tasks import IGNORE_INDEX, logits_of

__all__ = ["exact_match", "greedy_generate", "prompt_answer_pairs"]

log = logging.getLogger(__name__)


def prompt_answer_pairs(data: Any) -> tuple[list[list[int]], list[list[int]], bool]:
    """``(prompts, answers, keyword)`` of a tokenized split: token id lists per example, and whether the model
    is called with keywords (dict batches) or positionally (``[x, y]`` batches).

    Raises :class:`ConfigError` when an example has no prompt or no answer (labels not ``-100`` from the start,
    or all ``-100``): the split is plain text, not prompt/answer pairs.
    """
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise ConfigError("exact match needs [x, y] language-model batches or dict batches with labels")
        x, y = data.tensors
        ids, labels, keyword, shift = x, y, False, 1
        mask = torch.ones_like(x)
    else:
        cols = getattr(data, "columns", None)
        if not isinstance(cols, dict) or "input_ids" not in cols or "labels" not in cols:
            raise ConfigError("exact match needs a tokenized language-model split (input_ids and labels); got "
                              f"{type(data).__name__}")
        ids, labels, keyword, shift = cols["input_ids"], cols["labels"], True, 0
        mask = cols.get("attention_mask", torch.ones_like(ids))
        if labels.shape != ids.shape:
            raise ConfigError(f"labels {tuple(labels.shape)} are not per token like input_ids {tuple(ids.shape)}; "
                              "exact match needs a language-model split")
    prompts, answers = [], []
    for i in range(len(ids)):
        valid = torch.nonzero(labels[i] != IGNORE_INDEX).flatten()
        real = torch.nonzero(mask[i] != 0).flatten()
        start = int(real[0]) if len(real) else 0
        if len(valid) == 0 or int(valid[0]) + shift <= start:
            raise ConfigError(f"example {i} has {'no answer' if len(valid) == 0 else 'no prompt'} in its labels (a "
                              "prompt is labelled -100 and followed by the answer); exact match needs prompt/answer "
                              "data such as data.name=instructions")
        p = int(valid[0]) + shift
        prompts.append(ids[i, start:p].tolist())
        answers.append(labels[i, valid].tolist())
    return prompts, answers, keyword


def _cache_arg(model: nn.Module) -> tuple[str | None, dict[str, Any]]:
    """The keyword a Hugging Face model takes its key/value cache by (``cache``; ``past_key_values`` before
    transformers 5.2x; None for a model without one), and fixed keywords that save work (only the last logits)."""
    if not hasattr(model, "prepare_inputs_for_generation"):
        return None, {}
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return next((k for k in ("cache", "past_key_values") if k in params), None), extra


def _call(model: nn.Module, ids: Tensor, keyword: bool, cache_arg: str | None, past: Any, extra: dict[str, Any]
          ) -> Any:
    if not keyword:
        return model(ids)
    mask = torch.ones(ids.shape[0], ids.shape[1] + _cache_len(past), dtype=torch.int64, device=ids.device)
    if cache_arg is None:
        return model(input_ids=ids, attention_mask=mask, **extra)
    return model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_arg: past}, **extra)


def _cache_len(past: Any) -> int:
    if past is None:
        return 0
    get = getattr(past, "get_seq_length", None)
    return int(get()) if callable(get) else int(past[0][0].shape[-2])


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Tensor, max_new_tokens: int, *, eos_id: int | None = None,
                    keyword: bool = True) -> Tensor:
    """Greedy continuation of equal-length ``prompts (B, P)``: ``(B, N)`` new tokens, ``N <= max_new_tokens``.

    A row that produced ``eos_id`` is padded with ``eos_id`` afterwards; generation stops when every row has.
    keyword: call the model as ``model(input_ids=..., attention_mask=...)`` (Hugging Face style; its key/value cache
    is used when it has one), else ``model(ids)``. The model is used as it is (call ``model.eval()`` first).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    cache_arg, extra = _cache_arg(model) if keyword else (None, {})
    seq, past = prompts, None
    out: list[Tensor] = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=prompts.device)
    feed = prompts
    for _ in range(max_new_tokens):
        res = _call(model, feed if cache_arg else seq, keyword, cache_arg, past, extra)
        nxt = logits_of(res)[:, -1].argmax(-1)  # (B,)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out.append(nxt)
        if cache_arg:
            past, feed = getattr(res, cache_arg, None), nxt[:, None]
            if past is None:  # the model keeps no cache after all: re-read the sequence
                cache_arg = None
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return torch.stack(out, dim=1)


def _strip_end(ids: list[int], end: int | None) -> tuple[list[int], bool]:
    """Tokens before the first ``end`` and whether there was one."""
    if end is not None and end in ids:
        return ids[:ids.index(end)], True
    return ids, False


def _text(tokenizer: Any, ids: list[int]) -> str | None:
    decode = getattr(tokenizer, "decode", None)
    return decode(ids, skip_special_tokens=True).strip() if callable(decode) else None


@torch.no_grad()
def exact_match(model: nn.Module, data: Any, *, device: torch.device | str = "cpu", batch_size: int = 32,
                eos_id: int | None = None, tokenizer: Any = None, max_new_tokens: int | None = None,
                limit: int | None = None, examples: int = 5) -> dict[str, Any]:
    """Share of examples whose greedy answer after the prompt equals the reference answer (see the module doc).

    data: a tokenized prompt/answer split (see :func:`prompt_answer_pairs`); the first ``limit`` examples are used.
    eos_id: the end token (stops generation; a reference that ends with it must be matched by a model that
    stops). tokenizer: decodes both sides for a text comparison (token ids otherwise). max_new_tokens: the
    generation budget (default: the longest reference in the batch plus 2 tokens, enough to tell whether the model
    stopped where the reference does). Returns ``exact_match``, ``count``, ``mean_new_tokens`` and the first
    ``examples`` ``{"prompt", "prediction", "reference", "match"}`` (decoded when a tokenizer is given).
    """
    prompts, answers, keyword = prompt_answer_pairs(data)
    if limit is not None:
        prompts, answers = prompts[:limit], answers[:limit]
    if not prompts:
        raise ConfigError("exact match got no examples")
    device = torch.device(device)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    preds: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for _, idx in sorted(by_len.items()):
            for lo in range(0, len(idx), batch_size):
                rows = idx[lo:lo + batch_size]
                x = torch.tensor([prompts[i] for i in rows], dtype=torch.int64, device=device)  # (B, P)
                budget = max_new_tokens or max(len(answers[i]) for i in rows) + 2
                gen = greedy_generate(model, x, budget, eos_id=eos_id, keyword=keyword).cpu()
                for r, i in enumerate(rows):
                    preds[i] = gen[r].tolist()
    finally:
        model.train(was_training)
    hits, new_tokens, shown = 0, 0, []
    for i, (pred, ref) in enumerate(zip(preds, answers)):
        got, stopped = _strip_end(pred, eos_id)
        want, ends = _strip_end(ref, eos_id)
        if eos_id is None:
            got = got[:len(want)]
        a, b = _text(tokenizer, got), _text(tokenizer, want)
        same = (a == b) if a is not None and b is not None else got == want
        ok = same and (stopped or not ends)
        hits += ok
        new_tokens += len(got) + stopped
        if i < examples:
            show = (lambda ids: _text(tokenizer, ids)) if tokenizer is not None else (lambda ids: ids)
            shown.append({"prompt": show(prompts[i]), "prediction": show(got), "reference": show(want), "match": ok})
    n = len(prompts)
    log.info("exact match %.4f over %d examples", hits / n, n)
    return {"exact_match": hits / n, "count": n, "mean_new_tokens": new_tokens / n, "examples": shown}


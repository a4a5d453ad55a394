"""Tasks: each task's loss and metrics equal a naive per-example loop; logits_of; sums add up exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgetune.core.errors import ConfigError
from edgetune.train.tasks import IGNORE_INDEX, TASKS, get_task, logits_of


class Fixed(nn.Module):
    """Returns preset logits (wrapped by ``wrap``) and records how it was called."""

    def __init__(self, logits: torch.Tensor, wrap=lambda t: t) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.wrap = wrap
        self.calls: list[tuple[tuple, dict]] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.wrap(self.logits)


def naive_ce(rows: list[tuple[torch.Tensor, int]], smoothing: float = 0.0) -> tuple[float, int, int]:
    """Mean cross-entropy, #correct, #counted over (logit row (C,), target) pairs; -100 targets skipped."""
    total, correct, count = 0.0, 0, 0
    for row, y in rows:
        if y == IGNORE_INDEX:
            continue
        row = row.double()
        logp = [float(v) - math.log(sum(math.exp(float(u)) for u in row)) for v in row]
        nll = -logp[y]
        smooth = -sum(logp) / len(logp)
        total += (1 - smoothing) * nll + smoothing * smooth
        best = max(range(len(row)), key=lambda c: float(row[c]))
        correct += int(best == y)
        count += 1
    return (total / count if count else 0.0), correct, count


def check(out, task, ref_loss, ref_correct, ref_count):
    assert float(out.loss.detach()) == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert int(out.sums["correct"]) == ref_correct
    assert int(out.sums["count"]) == ref_count
    m = task.summarize({k: float(v) for k, v in out.sums.items()})
    assert m["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert m["acc"] == pytest.approx(ref_correct / max(1, ref_count))
    return m


# ----------------------------------------------------------------------------------- classification
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_classification_equals_naive_loop_with_ignored_targets(smoothing):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 5, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    y[[1, 4]] = IGNORE_INDEX
    task = get_task("classification", label_smoothing=smoothing)
    model = Fixed(logits)
    x = torch.zeros(7, 3)
    out = task.step(model, [x, y])
    ref = naive_ce([(logits[i], int(y[i])) for i in range(7)], smoothing)
    check(out, task, *ref)
    assert ref[2] == 5
    # the model was called positionally with the inputs, without the target
    (args, kwargs), = model.calls
    assert len(args) == 1 and args[0] is x and kwargs == {}
    out.loss.backward()  # the loss carries the graph
    assert model.logits.grad is not None and model.logits.grad[1].abs().sum() == 0  # ignored rows get no gradient


def test_classification_hand_computed():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1, 0])
    task = get_task("classification")
    out = task.step(Fixed(logits), [torch.zeros(3, 1), y])
    # p = 3/4 (right), 1/2 (tie -> argmax 0, wrong), 1/(1+e^2) (wrong)
    expect = (-math.log(0.75) - math.log(0.5) + math.log(1 + math.e**2)) / 3
    m = check(out, task, expect, 1, 3)
    assert set(m) == {"loss", "acc"}


def test_classification_all_targets_ignored_gives_zero_loss_with_graph():
    model = Fixed(torch.randn(4, 3))
    task = get_task("classification")
    out = task.step(model, [torch.zeros(4, 1), torch.full((4,), IGNORE_INDEX)])
    assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert model.logits.grad is not None and torch.all(model.logits.grad == 0)
    assert task.summarize({k: float(v) for k, v in out.sums.items()}) == {"loss": 0.0, "acc": 0.0}


def test_classification_dict_batch_calls_model_by_keyword_without_labels():
    logits = torch.randn(3, 4)
    model = Fixed(logits)
    batch = {"input_ids": torch.ones(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5, dtype=torch.long),
             "labels": torch.tensor([0, 2, 3])}
    task = get_task("classification")
    out = task.step(model, batch)
    (args, kwargs), = model.calls
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"}
    check(out, task, *naive_ce([(logits[i], int(batch["labels"][i])) for i in range(3)]))


def test_classification_rejects_token_level_shapes():
    with pytest.raises(ConfigError, match="model.task=lm"):
        get_task("classification").step(Fixed(torch.randn(2, 3, 4)), [torch.zeros(2, 3), torch.zeros(2, 3).long()])


# --------------------------------------------------------------------------------------------- lm
def lm_data(b=3, t=6, v=7, seed=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    return logits, ids


def test_lm_list_batch_is_pre_shifted_and_equals_naive_loop():
    logits, ids = lm_data()
    y = ids.clone()
    y[0, -2:] = IGNORE_INDEX  # padding
    task = get_task("lm")
    out = task.step(Fixed(logits), [ids, y])
    rows = [(logits[b, t], int(y[b, t])) for b in range(3) for t in range(6)]  # logit t predicts target t
    m = check(out, task, *naive_ce(rows))
    assert m["ppl"] == pytest.approx(math.exp(m["loss"]))
    assert tuple(task.metrics) == ("loss", "ppl", "acc")


def test_lm_dict_batch_shifts_hugging_face_labels():
    logits, ids = lm_data()
    labels = ids.clone()
    labels[1, 4:] = IGNORE_INDEX
    task = get_task("lm")
    model = Fixed(logits)
    out = task.step(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    rows = [(logits[b, t], int(labels[b, t + 1])) for b in range(3) for t in range(5)]  # logit t predicts label t+1
    m = check(out, task, *naive_ce(rows))
    assert m["ppl"] == pytest.approx(math.exp(m["loss"]))
    assert "labels" not in model.calls[0][1]


def test_lm_dict_batch_loss_equals_hugging_face_models_own_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 40, (2, 9))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[0, 6:] = IGNORE_INDEX
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        out = get_task("lm").step(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert float(out.loss.detach()) == pytest.approx(float(ref), rel=1e-5)


# ---------------------------------------------------------------------------------------- seq2seq
def test_seq2seq_equals_naive_loop_and_calls_with_src_and_tgt_in():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 6, generator=g)
    src = torch.randint(0, 6, (2, 4), generator=g)
    tgt_in = torch.randint(0, 6, (2, 5), generator=g)
    tgt_out = torch.randint(0, 6, (2, 5), generator=g)
    tgt_out[1, 3:] = IGNORE_INDEX
    task = get_task("seq2seq")
    model = Fixed(logits)
    out = task.step(model, [src, tgt_in, tgt_out])
    (args, _kwargs), = model.calls
    assert len(args) == 2 and args[0] is src and args[1] is tgt_in
    rows = [(logits[b, t], int(tgt_out[b, t])) for b in range(2) for t in range(5)]  # no shift
    m = check(out, task, *naive_ce(rows))
    assert m["ppl"] == pytest.approx(math.exp(m["loss"]))


def test_registered_tasks():
    assert set(TASKS.names()) >= {"classification", "lm", "seq2seq"}
    with pytest.raises(ConfigError, match="seq2seq"):
        get_task("seq2sec")


# ------------------------------------------------------------------------------------- logits_of
def test_logits_of_every_output_shape():
    from transformers.modeling_outputs import SequenceClassifierOutput

    t = torch.randn(2, 3)
    assert logits_of(t) is t
    assert logits_of(SequenceClassifierOutput(logits=t)) is t
    assert logits_of(SequenceClassifierOutput(loss=torch.tensor(1.0), logits=t)) is t
    assert logits_of({"logits": t, "hidden": torch.zeros(1)}) is t
    assert logits_of((t, torch.zeros(1))) is t
    assert logits_of([t]) is t


def test_a_model_without_logits_is_a_config_error():
    from transformers.modeling_outputs import BaseModelOutput

    hidden = torch.randn(2, 4, 8)
    for out in ({"hidden": hidden}, BaseModelOutput(last_hidden_state=hidden), None, "text", ()):
        with pytest.raises(ConfigError, match="no logits"):
            logits_of(out)
    with pytest.raises(ConfigError, match="model.task=classification"):
        get_task("classification").step(Fixed(hidden, wrap=lambda x: {"hidden": x}),
                                        [torch.zeros(2, 1), torch.zeros(2).long()])


@pytest.mark.parametrize("wrap", [
    lambda t: t,
    lambda t: {"logits": t},
    lambda t: (t,),
])
def test_tasks_read_logits_through_any_wrapper(wrap):
    logits, ids = lm_data()
    a = get_task("lm").step(Fixed(logits), [ids, ids])
    b = get_task("lm").step(Fixed(logits, wrap=wrap), [ids, ids])
    assert torch.equal(a.loss, b.loss)


# ------------------------------------------------------------------------------------------- sums
def _halves(batch, n):
    h = n // 2
    if isinstance(batch, dict):
        return {k: v[:h] for k, v in batch.items()}, {k: v[h:] for k, v in batch.items()}
    return [t[:h] for t in batch], [t[h:] for t in batch]


def _add(a, b):
    return {k: float(a.get(k, 0)) + float(b[k]) for k in b}


@pytest.mark.parametrize("name", ["classification", "lm-list", "lm-dict", "seq2seq"])
def test_sums_over_two_half_batches_summarize_to_the_full_batch(name):
    g = torch.Generator().manual_seed(4)
    if name == "classification":
        logits = torch.randn(8, 5, generator=g)
        y = torch.randint(0, 5, (8,), generator=g)
        y[[0, 5, 6]] = IGNORE_INDEX  # the halves hold different numbers of counted targets
        batch = [torch.zeros(8, 2), y]
        task = get_task("classification")
    else:
        logits = torch.randn(8, 6, 7, generator=g)
        y = torch.randint(0, 7, (8, 6), generator=g)
        y[:3, 2:] = IGNORE_INDEX
        task = get_task("seq2seq" if name == "seq2seq" else "lm")
        if name == "lm-dict":
            batch = {"input_ids": y.clamp(min=0), "labels": y}
        elif name == "seq2seq":
            batch = [torch.zeros(8, 2), torch.zeros(8, 6), y]
        else:
            batch = [torch.zeros(8, 6), y]
    full = task.step(Fixed(logits), batch)
    a_b, b_b = _halves(batch, 8)
    a = task.step(Fixed(logits[:4]), a_b)
    b = task.step(Fixed(logits[4:]), b_b)
    assert int(a.sums["count"]) != int(b.sums["count"])
    whole = task.summarize({k: float(v) for k, v in full.sums.items()})
    parts = task.summarize(_add({k: float(v) for k, v in a.sums.items()}, b.sums))
    assert parts.keys() == whole.keys()
    for k in whole:
        assert parts[k] == pytest.approx(whole[k], rel=1e-6), k
    assert whole["loss"] == pytest.approx(float(full.loss.detach()), rel=1e-6)
    if "ppl" in whole:
        assert whole["ppl"] == pytest.approx(math.exp(whole["loss"]), rel=1e-9)

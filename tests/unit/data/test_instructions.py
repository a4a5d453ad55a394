"""The generated instruction set: correct answers, determinism, distinct prompts with no test prompt in training,
options, and tokenization (prompt masked with -100, answer + end token, chat template, the lm task's loss)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from edgetune.core.errors import ConfigError
from edgetune.data import DataConfig, load_dataset
from edgetune.data.instructions import INSTRUCTION_TASKS, InstructionDataset, generate_instructions
from edgetune.data.tokenize import tokenize_bundle
from edgetune.train.tasks import get_task


class CharTokenizer:
    """One id per character (ids 3..); pad 0, eos 1; an optional chat template ``<u>...<a>`` (ids 2 mark them)."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, chat: bool = False) -> None:
        self.chat_template = "<u>{content}<a>" if chat else None
        self.messages: list[list[dict[str, str]]] = []

    def __len__(self) -> int:
        return 3 + 128

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [2] if add_special_tokens else []  # a "BOS" the instruction data must not add
        i = 0
        while i < len(text):
            if text.startswith("<u>", i) or text.startswith("<a>", i):
                ids.append(2)
                i += 3
            else:
                ids.append(3 + ord(text[i]) % 128)
                i += 1
        return {"input_ids": ids}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        assert not tokenize and add_generation_prompt
        self.messages.append(messages)
        return "<u>" + messages[-1]["content"] + "<a>"

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 3) for i in ids if i >= 3)


def _check_answer(task: str, prompt: str, answer: str) -> None:
    nums = [int(v) for v in re.findall(r"\d+", prompt)]
    if task == "add":
        assert answer == str(nums[0] + nums[1])
    elif task == "subtract":
        assert nums[0] > nums[1] and answer == str(nums[0] - nums[1])
    elif task == "max":
        assert len(nums) == 4 and answer == str(max(nums))
    elif task == "sort":
        assert answer == ", ".join(map(str, sorted(nums)))
    elif task == "date":
        y, m, d = nums
        assert answer == f"{d:02d}/{m:02d}/{y}"
    elif task == "upper":
        words = re.search(r"'(.*)'", prompt).group(1)
        assert answer == words.upper() and len(words.split()) == 2
    else:
        raise AssertionError(task)


def test_every_answer_is_right() -> None:
    train, test = generate_instructions(list(INSTRUCTION_TASKS), (30, 10), seed=3)
    names = list(INSTRUCTION_TASKS)
    assert len(train) == 30 * len(names) and len(test) == 10 * len(names)
    for prompt, answer, tid in train + test:
        _check_answer(names[tid], prompt, answer)


def test_hand_written_example() -> None:
    rows = generate_instructions(["add"], (1,), seed=0)[0]
    prompt, answer, tid = rows[0]
    a, b = (int(v) for v in re.findall(r"\d+", prompt))
    assert prompt == f"What is {a} + {b}? Answer with the number only." and answer == str(a + b) and tid == 0


def test_deterministic_distinct_and_no_test_prompt_in_training() -> None:
    a = load_dataset(DataConfig(name="instructions", seed=5, options={"train_per_task": 40, "test_per_task": 20}))
    b = load_dataset(DataConfig(name="instructions", seed=5, options={"train_per_task": 40, "test_per_task": 20}))
    c = load_dataset(DataConfig(name="instructions", seed=6, options={"train_per_task": 40, "test_per_task": 20}))
    assert a.train.texts == b.train.texts and a.test.answers == b.test.answers
    assert a.train.texts != c.train.texts
    assert len(set(a.train.texts)) == len(a.train) and not set(a.train.texts) & set(a.test.texts)
    assert a.task == "lm" and isinstance(a.train, InstructionDataset) and a.class_names == list(INSTRUCTION_TASKS)


def test_a_task_keeps_its_examples_when_others_are_added() -> None:
    only = load_dataset(DataConfig(name="instructions", options={"tasks": ["date"], "train_per_task": 5}))
    both = load_dataset(DataConfig(name="instructions", options={"tasks": ["add", "date"], "train_per_task": 5}))
    assert only.train.texts == both.train.texts[5:]


def test_limits_and_validation_split_keep_answers_aligned() -> None:
    b = load_dataset(DataConfig(name="instructions", limit_train=50, val_fraction=0.2,
                                options={"train_per_task": 20, "test_per_task": 4}))
    assert len(b.train) == 40 and len(b.val) == 10 and isinstance(b.val, InstructionDataset)
    names = list(INSTRUCTION_TASKS)
    for split in (b.train, b.val, b.test):
        for prompt, answer, tid in zip(split.texts, split.answers, split.labels.tolist()):
            _check_answer(names[tid], prompt, answer)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown instruction task 'ad'.*add"):
        load_dataset(DataConfig(name="instructions", options={"tasks": ["ad"]}))
    with pytest.raises(ConfigError, match="twice"):
        load_dataset(DataConfig(name="instructions", options={"tasks": ["add", "add"]}))
    with pytest.raises(ConfigError, match="colour"):
        load_dataset(DataConfig(name="instructions", options={"colour": 1}))


def test_tokenized_labels_cover_the_answer_and_end_token_only() -> None:
    tok = CharTokenizer()
    ds = InstructionDataset(["ab?", "c?"], ["12", "345"], torch.tensor([0, 0]))
    out = ds.tokenize_lm(tok, max_length=16)
    ids, mask, labels = out.columns["input_ids"], out.columns["attention_mask"], out.columns["labels"]
    enc = lambda s: [3 + ord(ch) for ch in s]
    # row 0: "ab?\n" then "12" + eos, both 7 tokens long
    assert ids[0].tolist() == enc("ab?\n") + enc("12") + [1]
    assert ids.shape == (2, 7) and ids[1].tolist() == enc("c?\n") + enc("345") + [1]
    assert labels[0].tolist() == [-100] * 4 + enc("12") + [1]
    assert labels[1].tolist() == [-100] * 3 + enc("345") + [1]
    assert mask.tolist() == [[1] * 7, [1] * 7]
    short = InstructionDataset(["a?"], ["1"], torch.tensor([0])).tokenize_lm(tok, 16)
    with pytest.raises(ConfigError, match="max_length"):
        ds.tokenize_lm(tok, max_length=6)
    assert short.columns["input_ids"].shape == (1, 5)


def test_padding_rows_are_masked_and_ignored() -> None:
    tok = CharTokenizer()
    out = InstructionDataset(["long prompt?", "q?"], ["1", "2"], torch.tensor([0, 0])).tokenize_lm(tok, 64)
    ids, mask, labels = out.columns["input_ids"], out.columns["attention_mask"], out.columns["labels"]
    n = len("q?\n") + 2
    assert mask[1].tolist() == [1] * n + [0] * (ids.shape[1] - n)
    assert (ids[1, n:] == tok.pad_token_id).all() and (labels[1, n:] == -100).all()


def test_chat_template_wraps_the_prompt_with_the_system_message() -> None:
    tok = CharTokenizer(chat=True)
    ds = InstructionDataset(["q?"], ["7"], torch.tensor([0]), system="Be brief.")
    out = ds.tokenize_lm(tok, 32)
    assert out.columns["input_ids"][0].tolist() == [2, *(3 + ord(c) for c in "q?"), 2, 3 + ord("7"), 1]
    assert tok.messages[-1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q?"}]
    plain = InstructionDataset(["q?"], ["7"], torch.tensor([0]), chat_template="never").tokenize_lm(tok, 32)
    assert plain.columns["input_ids"][0].tolist()[:3] == [3 + ord(c) for c in "q?\n"]


def test_tokenize_bundle_uses_the_split_s_own_tokenization() -> None:
    b = load_dataset(DataConfig(name="instructions", val_fraction=0.25,
                                options={"tasks": ["add", "upper"], "train_per_task": 4, "test_per_task": 2}))
    t = tokenize_bundle(b, CharTokenizer(), max_length=128)
    for split in (t.train, t.val, t.test):
        labels = split.columns["labels"]
        assert labels.shape == split.columns["input_ids"].shape and (labels[:, 0] == -100).all()
    assert t.num_classes == len(CharTokenizer()) and t.input_shape == (128,)
    batch = t.transform(t.train.take(torch.arange(2)))
    assert batch["labels"].shape == batch["input_ids"].shape  # padding trimmed from labels too


def test_lm_task_loss_is_the_answer_tokens_cross_entropy() -> None:
    tok = CharTokenizer()
    out = InstructionDataset(["ab?", "c?"], ["12", "345"], torch.tensor([0, 0])).tokenize_lm(tok, 16)
    batch = out.take(torch.arange(2))
    torch.manual_seed(0)
    logits = torch.randn(2, batch["input_ids"].shape[1], len(tok))

    class Fixed(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return logits

    step = get_task("lm").step(Fixed(), batch)
    terms = []
    for r in range(2):
        for t in range(1, logits.shape[1]):
            y = int(batch["labels"][r, t])
            if y != -100:  # the token at t is predicted from position t - 1
                terms.append(-torch.log_softmax(logits[r, t - 1], -1)[y])
    assert int(step.sums["count"]) == len(terms) == (2 + 1) + (3 + 1)
    assert torch.allclose(step.loss, torch.stack(terms).mean(), atol=1e-6)

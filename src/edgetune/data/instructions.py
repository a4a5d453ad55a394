"""``instructions``: a generated instruction-following set of templated arithmetic and formatting tasks.

Every example is a short instruction (the prompt) and its one correct answer, drawn from a seed, so the set needs
no files and the same seed gives the same texts. Tasks (``tasks`` option; the label of an example is its task):

- ``add``: "What is 47 + 38? Answer with the number only." -> "85" (operands 10..99);
- ``subtract``: "What is 91 - 26? ..." -> "65" (first operand larger);
- ``max``: "Which is the largest of these numbers: 42, 7, 88, 19? ..." -> "88" (four distinct numbers 1..99);
- ``sort``: "Sort these numbers from smallest to largest: 42, 7, 19. ..." -> "7, 19, 42";
- ``date``: "Rewrite the date 1987-03-07 in the format DD/MM/YYYY. ..." -> "07/03/1987";
- ``upper``: "Write 'river stone' in capital letters. ..." -> "RIVER STONE" (two words of a fixed list).

Each task draws from its own stream (``numpy.random.default_rng([seed, task index])``), so adding a task leaves the
others' examples unchanged; within a task every prompt is distinct and no test prompt appears in training.

The loader returns :class:`InstructionDataset` splits (raw text, ``task="lm"``). The pipeline tokenizes them with
the model's own tokenizer (:meth:`InstructionDataset.tokenize_lm`, called by
:func:`edgetune.data.tokenize.tokenize_bundle`): prompt tokens, then answer tokens and the tokenizer's end token
(eos, else sep). ``labels`` are ``-100`` on the prompt and on padding, so the ``lm`` task's loss, next-token
accuracy and perplexity cover the answer only, and a model is scored on what it should say, not on the question.
With ``chat_template: auto`` a tokenizer that has a chat template (SmolLM2-Instruct, ...) wraps the prompt as a
user turn followed by the assistant header, the format the instruct model was tuned on; otherwise the prompt is
the instruction and a newline. Greedy generation after the prompt, compared with the answer, is the
``evaluate-generation`` stage step (:mod:`edgetune.train.generation`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError, DataError
from edgetune.data.base import DataBundle, DataConfig, loader_options, register_dataset
from edgetune.data.batches import DictDataset
from edgetune.data.common import make_bundle
from edgetune.data.text_classification import TextDataset
from edgetune.data.transforms import TrimPadding

__all__ = ["INSTRUCTION_TASKS", "InstructionDataset", "InstructionOptions", "generate_instructions",
           "load_instructions"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label the lm task ignores (edgetune.train.tasks.IGNORE_INDEX)
_ONLY = "Answer with the number only."

WORDS = ("apple", "bridge", "candle", "desert", "engine", "forest", "garden", "harbor", "island", "jacket", "kettle",
         "ladder", "meadow", "needle", "orange", "pencil", "quiet", "river", "silver", "table", "umbrella", "valley",
         "window", "yellow", "zebra", "anchor", "basket", "copper", "dragon", "empty", "feather", "glass", "honey",
         "iron", "jungle", "kitten", "lemon", "marble", "north", "ocean", "pepper", "rabbit", "shadow", "tiger",
         "velvet", "winter", "cotton", "planet", "rocket", "summer", "thunder", "violet", "wooden", "orbit", "cloud",
         "stone", "paper", "music", "light", "green")

Example = tuple[str, str]


def _add(rng: np.random.Generator) -> Example:
    a, b = (int(v) for v in rng.integers(10, 100, size=2))
    return f"What is {a} + {b}? {_ONLY}", str(a + b)


def _subtract(rng: np.random.Generator) -> Example:
    a, b = sorted((int(v) for v in rng.choice(np.arange(10, 100), size=2, replace=False)), reverse=True)
    return f"What is {a} - {b}? {_ONLY}", str(a - b)


def _max(rng: np.random.Generator) -> Example:
    xs = [int(v) for v in rng.choice(np.arange(1, 100), size=4, replace=False)]
    return f"Which is the largest of these numbers: {', '.join(map(str, xs))}? {_ONLY}", str(max(xs))


def _sort(rng: np.random.Generator) -> Example:
    xs = [int(v) for v in rng.choice(np.arange(1, 100), size=3, replace=False)]
    prompt = f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}. Answer with the sorted list only."
    return prompt, ", ".join(map(str, sorted(xs)))


def _date(rng: np.random.Generator) -> Example:
    y, m, d = int(rng.integers(1950, 2031)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return (f"Rewrite the date {y}-{m:02d}-{d:02d} in the format DD/MM/YYYY. Answer with the date only.",
            f"{d:02d}/{m:02d}/{y}")


def _upper(rng: np.random.Generator) -> Example:
    a, b = (WORDS[int(i)] for i in rng.choice(len(WORDS), size=2, replace=False))
    return f"Write '{a} {b}' in capital letters. Answer with the words only.", f"{a} {b}".upper()


#: task name -> ``fn(rng) -> (prompt, answer)``; the order fixes each task's stream id
INSTRUCTION_TASKS: dict[str, Callable[[np.random.Generator], Example]] = {
    "add": _add, "subtract": _subtract, "max": _max, "sort": _sort, "date": _date, "upper": _upper}


class InstructionOptions(Config):
    """tasks: which templated tasks (add, subtract, max, sort, date, upper); train_per_task / test_per_task:
    distinct examples of each task per split; chat_template: ``auto`` wraps each prompt in the tokenizer's chat
    template when it has one (instruct models), ``never`` writes the bare instruction and a newline; system: the
    system message of the chat (None: the template's own default)."""

    tasks: list[str] = Field(default_factory=lambda: list(INSTRUCTION_TASKS), min_length=1)
    train_per_task: int = Field(default=200, ge=1)
    test_per_task: int = Field(default=50, ge=1)
    chat_template: Literal["auto", "never"] = "auto"
    system: str | None = None

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        from edgetune.core.errors import did_you_mean

        for t in v:
            if t not in INSTRUCTION_TASKS:
                raise ValueError(f"unknown instruction task {t!r}.{did_you_mean(t, INSTRUCTION_TASKS)} "
                                 f"Known: {', '.join(INSTRUCTION_TASKS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"tasks {v} name a task twice; list each once")
        return v


def generate_instructions(tasks: Sequence[str], per_task: Sequence[int], seed: int) -> list[list[tuple[str, str, int]]]:
    """``[split][i] = (prompt, answer, task id)`` for splits of ``per_task[s]`` distinct examples of every task.

    Task ``t`` (its index in :data:`INSTRUCTION_TASKS`) draws from ``default_rng([seed, t])``; prompts are distinct
    across all splits of a task, so a test prompt never appears in training. Examples are task-major.
    """
    names = list(INSTRUCTION_TASKS)
    out: list[list[tuple[str, str, int]]] = [[] for _ in per_task]
    for task in tasks:
        tid = names.index(task)
        rng = np.random.default_rng([seed, tid])
        seen: set[str] = set()
        need, drawn = sum(per_task), []
        for _ in range(50 * need):
            prompt, answer = INSTRUCTION_TASKS[task](rng)
            if prompt not in seen:
                seen.add(prompt)
                drawn.append((prompt, answer, tid))
                if len(drawn) == need:
                    break
        if len(drawn) < need:
            raise DataError(f"instruction task {task!r} gave only {len(drawn)} distinct prompts of the {need} asked "
                            "for; lower data.options.train_per_task / test_per_task")
        lo = 0
        for s, n in enumerate(per_task):
            out[s] += drawn[lo:lo + n]
            lo += n
    return out


def end_token_id(tokenizer: Any) -> int | None:
    """The id that ends an answer: the tokenizer's eos token, else its sep token, else None."""
    for attr in ("eos_token_id", "sep_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return None


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without the special tokens a tokenizer adds around a sequence (CLS/SEP, BOS)."""
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except TypeError:  # a tokenizer without that keyword (edgetune's ByteTokenizer)
        ids = tokenizer(text)["input_ids"]
    return [int(i) for i in ids]


class InstructionDataset(TextDataset):
    """Prompts, their answers and the task id of each example (``labels (N,)``).

    ``texts`` holds the prompts (what a text pipeline sees); :meth:`tokenize_lm` builds the training sequences.
    """

    def __init__(self, prompts: Sequence[str], answers: Sequence[str], labels: torch.Tensor, *,
                 chat_template: str = "auto", system: str | None = None) -> None:
        super().__init__(prompts, labels)
        if len(answers) != len(prompts):
            raise ValueError(f"InstructionDataset has {len(prompts)} prompts but {len(answers)} answers")
        self.answers: list[str] = list(answers)
        self.chat_template, self.system = chat_template, system

    def subset(self, idx: torch.Tensor) -> InstructionDataset:
        pos = idx.tolist()
        return InstructionDataset([self.texts[i] for i in pos], [self.answers[i] for i in pos], self.labels[idx],
                                  chat_template=self.chat_template, system=self.system)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], int(self.labels[i])

    def prompt_text(self, tokenizer: Any, prompt: str) -> str:
        """The text the model reads before its answer (a chat turn when the tokenizer has a template)."""
        if self.chat_template == "auto" and getattr(tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": self.system}] if self.system is not None else [])
            messages.append({"role": "user", "content": prompt})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt + "\n"

    def tokenize_lm(self, tokenizer: Any, max_length: int) -> DictDataset:
        """``input_ids``, ``attention_mask`` ``(N, T)`` (right-padded with the pad token) and ``labels (N, T)``:
        the answer's tokens and end token, ``-100`` on the prompt and padding. ``T``: the longest example.

        Raises :class:`ConfigError` when an example is longer than ``max_length`` (cutting it would cut the answer).
        """
        end = end_token_id(tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if isinstance(pad, int) else (end if end is not None else 0)
        rows: list[tuple[list[int], list[int]]] = []
        for prompt, answer in zip(self.texts, self.answers):
            p = _encode(tokenizer, self.prompt_text(tokenizer, prompt))
            a = _encode(tokenizer, answer) + ([end] if end is not None else [])
            if len(p) + len(a) > max_length:
                raise ConfigError(f"an instruction example takes {len(p) + len(a)} tokens, more than model.max_length="
                                  f"{max_length}; raise model.max_length (the answer must not be cut): {prompt!r}")
            rows.append((p, a))
        width = max((len(p) + len(a) for p, a in rows), default=0)
        ids = torch.full((len(rows), width), pad, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
        for i, (p, a) in enumerate(rows):
            n = len(p) + len(a)
            ids[i, :n] = torch.tensor(p + a)
            mask[i, :n] = 1
            labels[i, len(p):n] = torch.tensor(a)
        return DictDataset({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __repr__(self) -> str:
        return f"InstructionDataset({len(self)} prompt/answer pairs)"


@register_dataset("instructions", config=InstructionOptions,
                  summary="generated instructions: templated arithmetic and formatting tasks, prompt -> answer (lm)")
def load_instructions(cfg: DataConfig) -> DataBundle:
    """Generate the prompt/answer pairs from ``data.seed``: a ``lm`` bundle of :class:`InstructionDataset` splits."""
    opts: InstructionOptions = loader_options(cfg, InstructionOptions)
    train, test = generate_instructions(opts.tasks, (opts.train_per_task, opts.test_per_task), cfg.seed)
    names = list(INSTRUCTION_TASKS)

    def split(rows: list[tuple[str, str, int]]) -> InstructionDataset:
        return InstructionDataset([r[0] for r in rows], [r[1] for r in rows],
                                  torch.tensor([r[2] for r in rows], dtype=torch.int64),
                                  chat_template=opts.chat_template, system=opts.system)

    return make_bundle(
        cfg, name="instructions", task="lm", train=split(train), test=split(test), num_classes=0,
        class_names=names, input_shape=(),
        source=f"generated (instructions, seed {cfg.seed}, tasks {', '.join(opts.tasks)}, "
               f"{opts.train_per_task}/{opts.test_per_task} per task)",
        notes=["instructions: loss, accuracy and perplexity cover the answer tokens only (the prompt is -100)"],
        transform=TrimPadding(keys=("input_ids", "attention_mask", "labels")))

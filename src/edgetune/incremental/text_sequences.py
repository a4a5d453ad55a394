"""Continual text sequences built from the offline corpora (``make data``): lists of problems, as data.

A :class:`TextSequence` is a setting (``task``: every problem has its own classes and is named at test;
``domain``: one label space, the problem is not named at test) and an ordered tuple of :class:`Problem` s, each
with class names and its own train / test :class:`~edgetune.data.text_classification.TextDataset` (labels are
indices into the problem's classes). Registered sequences (``build_sequence(SequenceConfig(name=...))``):

- ``brown-genres`` (task): the Brown corpus' 15 genres, in a seeded order, as 5 problems of 3 genres.
- ``spam-tasks`` (task): SpamAssassin as 3 problems: ham vs spam of set 1 (easy-ham-1 / spam-1), ham vs spam
  of set 2 (easy-ham-2 / spam-2), and easy vs hard ham (easy-ham-1 + easy-ham-2 / hard-ham-1).
- ``spam-domains`` (domain): ham vs spam in 3 domains: easy-ham-1 / spam-1, easy-ham-2 / spam-2 and
  hard-ham-1 / spam-2 (the two spam-2 domains draw disjoint mails).
- ``brown-fiction`` (domain): non-fiction vs fiction in 4 domains of one genre each side: press reportage /
  general fiction, learned / mystery, religion / adventure, skill and hobbies / romance.

Every problem draws at most ``train_per_class`` training and ``test_per_class`` test texts per class (seeded;
``quick`` makes both small), from the corpus' own train and test splits (Brown split by document, so no
document is on both sides). A corpus group that feeds several problems is shared out without repeats, so no
text is in two problems. SpamAssassin mails lose their headers by default (they would make spam trivial and
fill the first tokens); Brown documents are cut into ``chunk_words``-word chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from edgetune.core.config import Config
from edgetune.core.errors import DataError
from edgetune.core.registry import Registry
from edgetune.data.base import DataConfig, load_dataset
from edgetune.data.text_classification import TextDataset
from edgetune.data.text_corpora import BROWN_GENRES, SPAM_GROUPS

__all__ = ["SEQUENCES", "Problem", "SequenceConfig", "TextSequence", "build_sequence", "draw_problems"]

log = logging.getLogger(__name__)

QUICK_SIZES = (16, 8)  # train / test texts per class with quick=True


@dataclass(frozen=True)
class Problem:
    """One problem of a sequence: its name, class names, and train / test texts with labels in ``0..C-1``."""

    name: str
    classes: tuple[str, ...]
    train: TextDataset
    test: TextDataset


@dataclass(frozen=True)
class TextSequence:
    """An ordered sequence of problems in one setting (``task`` or ``domain``)."""

    name: str
    setting: Literal["task", "domain"]
    problems: tuple[Problem, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def describe(self) -> str:
        """One line per problem: name, classes, train / test sizes."""
        return "\n".join(f"{i}: {p.name} {list(p.classes)} train {len(p.train)} test {len(p.test)}"
                         for i, p in enumerate(self.problems))


class SequenceConfig(Config):
    """Which sequence and how big.

    name: a registered sequence (brown-genres, spam-tasks, spam-domains, brown-fiction).
    train_per_class / test_per_class: at most this many texts per class and problem (None: all there are).
    quick: 16 train and 8 test texts per class (overrides the two above). problems: keep the first N problems.
    seed: the order of Brown's genres and which texts are drawn. path: the corpus folder (default: installed).
    chunk_words: words per Brown text. strip_headers / max_chars: SpamAssassin mails without headers, cut to
    this many characters.
    """

    name: str = "brown-genres"
    train_per_class: int | None = Field(default=64, ge=1)
    test_per_class: int | None = Field(default=32, ge=1)
    quick: bool = False
    problems: int | None = Field(default=None, ge=1)
    seed: int = 0
    path: str | None = None
    chunk_words: int = Field(default=50, ge=1)
    strip_headers: bool = True
    max_chars: int = Field(default=3000, ge=1)


# a plan: (problem name, class names, for each class the corpus classes it is drawn from)
Plan = list[tuple[str, list[str], list[list[int]]]]
SEQUENCES: Registry[Callable[[SequenceConfig], tuple[str, str, Plan]]] = Registry("text sequence")


def draw_problems(train: TextDataset, test: TextDataset, plan: Plan, train_per_class: int | None,
                  test_per_class: int | None, seed: int) -> tuple[Problem, ...]:
    """The problems of ``plan`` drawn from corpus splits labelled by corpus class.

    Each corpus class's texts are shuffled once (``seed``) and handed out in turn, so a corpus class feeding
    ``k`` problems gives each its own texts, at most a ``1 / k`` share of them. Raises :class:`DataError` when a
    class of a problem gets none.
    """
    g = torch.Generator().manual_seed(seed)
    uses: dict[int, int] = {}
    for _, _, sources in plan:
        for src in sources:
            for c in src:
                uses[c] = uses.get(c, 0) + 1
    pools, quotas = [], []
    for split in (train, test):
        pool: dict[int, list[int]] = {}
        for c in sorted(set(split.labels.tolist())):
            idx = torch.nonzero(split.labels == c).flatten()
            pool[c] = idx[torch.randperm(len(idx), generator=g)].tolist()
        pools.append(pool)
        quotas.append({c: -(-len(v) // uses.get(c, 1)) for c, v in pool.items()})
    out = []
    for name, classes, sources in plan:
        parts = []
        for split, pool, quota, cap, what in ((train, pools[0], quotas[0], train_per_class, "train"),
                                              (test, pools[1], quotas[1], test_per_class, "test")):
            texts: list[str] = []
            labels: list[int] = []
            for k, (cls_name, src) in enumerate(zip(classes, sources, strict=True)):
                share = _share(pool, quota, src, cap)
                if not share:
                    raise DataError(f"problem {name!r}: class {cls_name!r} has no {what} texts left (corpus classes "
                                    f"{src} are used up by earlier problems); ask for fewer per class")
                texts += [split.texts[i] for i in share]
                labels += [k] * len(share)
            parts.append(TextDataset(texts, torch.tensor(labels, dtype=torch.int64)))
        out.append(Problem(name, tuple(classes), parts[0], parts[1]))
    return tuple(out)


def _share(pool: dict[int, list[int]], quota: dict[int, int], sources: list[int], cap: int | None) -> list[int]:
    """Take up to ``cap`` indices from the pools of ``sources``, round-robin (so a union stays balanced), at most
    ``quota[s]`` from source ``s``; taken indices leave the pool."""
    room = {s: min(quota.get(s, 0), len(pool.get(s, []))) for s in sources}
    per_source: dict[int, list[int]] = {s: [] for s in sources}
    taken = 0
    while any(room.values()) and (cap is None or taken < cap):
        for s in sources:
            if room[s] and (cap is None or taken < cap):
                per_source[s].append(pool[s][len(per_source[s])])
                room[s] -= 1
                taken += 1
    out: list[int] = []
    for s, got in per_source.items():
        del pool[s][: len(got)]
        out += got
    return out


def build_sequence(cfg: SequenceConfig | None = None, **fields: object) -> TextSequence:
    """Load the corpus and draw the sequence ``cfg.name`` (see the module docstring)."""
    cfg = cfg if cfg is not None else SequenceConfig()
    cfg = cfg.replace(**fields) if fields else cfg
    setting, dataset, plan = SEQUENCES.get(cfg.name)(cfg)
    if cfg.problems is not None:
        if cfg.problems > len(plan):
            raise DataError(f"sequence {cfg.name!r} has {len(plan)} problems; problems={cfg.problems} asks for more")
        plan = plan[: cfg.problems]
    if dataset == "spamassassin":
        opts = {"labels": "groups", "strip_headers": cfg.strip_headers, "max_chars": cfg.max_chars}
    else:
        opts = {"chunk_words": cfg.chunk_words}
    bundle = load_dataset(DataConfig(name=dataset, path=cfg.path, options=opts))
    n_train, n_test = QUICK_SIZES if cfg.quick else (cfg.train_per_class, cfg.test_per_class)
    problems = draw_problems(bundle.train, bundle.test, plan, n_train, n_test, cfg.seed)  # type: ignore[arg-type]
    seq = TextSequence(cfg.name, setting, problems, source=bundle.source)  # type: ignore[arg-type]
    log.info("sequence %s (%s-incremental) from %s:\n%s", cfg.name, setting, bundle.source, seq.describe())
    return seq


# ------------------------------------------------------------------------------------------ the sequences
_LETTERS = sorted(BROWN_GENRES)  # Brown class id = position of the genre letter


def _genre(letter: str) -> int:
    return _LETTERS.index(letter)


@SEQUENCES.register("brown-genres", summary="Brown: 15 genres as 5 task-incremental problems of 3 (seeded order)")
def _brown_genres(cfg: SequenceConfig) -> tuple[str, str, Plan]:
    order = torch.randperm(len(_LETTERS), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    plan: Plan = []
    for p in range(5):
        ids = order[3 * p: 3 * p + 3]
        plan.append((f"genres {'+'.join(_LETTERS[i] for i in ids)}", [BROWN_GENRES[_LETTERS[i]] for i in ids],
                     [[i] for i in ids]))
    return "task", "brown", plan


_G = {g: i for i, g in enumerate(SPAM_GROUPS)}


@SEQUENCES.register("spam-tasks", summary="SpamAssassin: ham/spam of set 1, of set 2, easy/hard ham (task-incremental)")
def _spam_tasks(cfg: SequenceConfig) -> tuple[str, str, Plan]:
    return "task", "spamassassin", [
        ("set 1: ham vs spam", ["ham", "spam"], [[_G["easy-ham-1"]], [_G["spam-1"]]]),
        ("set 2: ham vs spam", ["ham", "spam"], [[_G["easy-ham-2"]], [_G["spam-2"]]]),
        ("ham: easy vs hard", ["easy ham", "hard ham"], [[_G["easy-ham-1"], _G["easy-ham-2"]], [_G["hard-ham-1"]]]),
    ]


@SEQUENCES.register("spam-domains", summary="SpamAssassin: ham vs spam in 3 domains (domain-incremental)")
def _spam_domains(cfg: SequenceConfig) -> tuple[str, str, Plan]:
    classes = ["ham", "spam"]
    return "domain", "spamassassin", [
        ("easy-ham-1 / spam-1", classes, [[_G["easy-ham-1"]], [_G["spam-1"]]]),
        ("easy-ham-2 / spam-2", classes, [[_G["easy-ham-2"]], [_G["spam-2"]]]),
        ("hard-ham-1 / spam-2", classes, [[_G["hard-ham-1"]], [_G["spam-2"]]]),
    ]


@SEQUENCES.register("brown-fiction", summary="Brown: non-fiction vs fiction in 4 genre-pair domains (domain-incremental)")
def _brown_fiction(cfg: SequenceConfig) -> tuple[str, str, Plan]:
    classes = ["non-fiction", "fiction"]
    pairs = (("a", "k"), ("j", "l"), ("d", "n"), ("e", "p"))
    return "domain", "brown", [(f"{BROWN_GENRES[a]} / {BROWN_GENRES[b]}", classes, [[_genre(a)], [_genre(b)]])
                               for a, b in pairs]

"""Continual text sequences: generated corpora in the npm packages' layouts (always), the real ones when installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgetune.core.errors import ConfigError, DataError
from edgetune.data import locate as locate_mod
from edgetune.data.text_classification import TextDataset
from edgetune.data.text_corpora import BROWN_GENRES, SPAM_GROUPS
from edgetune.incremental.text_sequences import SEQUENCES, SequenceConfig, build_sequence, draw_problems

SPAM_COUNTS = {"easy-ham-1": 40, "easy-ham-2": 20, "hard-ham-1": 10, "spam-1": 20, "spam-2": 40}


@pytest.fixture
def corpora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Tiny SpamAssassin and Brown copies; the installed corpora are never searched."""
    monkeypatch.delenv(locate_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(locate_mod, "SYSTEM_ROOTS", (tmp_path / "no-system",))
    spam = tmp_path / "spam"
    for group, n in SPAM_COUNTS.items():
        folder = spam / "data" / group
        folder.mkdir(parents=True)
        for i in range(n):
            text = f"Subject: s\nFrom: x@y\n\nmail {group} {i} " + "word " * 20
            (folder / f"{i:05d}.json").write_text(json.dumps({"id": str(i), "group": group, "text": text}))
    brown = tmp_path / "brown"
    brown.mkdir()
    for g in BROWN_GENRES:
        for d in range(1, 6):
            name = f"c{g}{d:02d}"
            (brown / name).write_text(" ".join(f"{name}w{i}/nn" for i in range(120)))
    return {"spam": spam, "brown": brown}


def _genre_of(text: str) -> str:
    return text.split("w", 1)[0][1]  # "ca01w0 ..." -> "a"


def test_brown_genres_is_five_problems_of_three_genres_seeded(corpora: dict[str, Path]) -> None:
    seq = build_sequence(SequenceConfig(name="brown-genres", path=str(corpora["brown"]), chunk_words=10,
                                        train_per_class=8, test_per_class=4))
    assert seq.setting == "task" and len(seq) == 5
    genres = [c for p in seq for c in p.classes]
    assert sorted(genres) == sorted(BROWN_GENRES.values())  # every genre once
    name_to_letter = {v: k for k, v in BROWN_GENRES.items()}
    for p in seq:
        assert len(p.classes) == 3
        for split, cap in ((p.train, 8), (p.test, 4)):
            assert torch.bincount(split.labels, minlength=3).tolist() == [cap] * 3
            for text, y in zip(split.texts, split.labels.tolist(), strict=True):
                assert _genre_of(text) == name_to_letter[p.classes[y]]  # label = the text's genre
        train_docs = {t.split("w", 1)[0] for t in p.train.texts}
        assert train_docs.isdisjoint({t.split("w", 1)[0] for t in p.test.texts})  # split by document
    again = build_sequence(SequenceConfig(name="brown-genres", path=str(corpora["brown"]), chunk_words=10,
                                          train_per_class=8, test_per_class=4))
    assert [p.train.texts for p in again] == [p.train.texts for p in seq]
    other = build_sequence(SequenceConfig(name="brown-genres", path=str(corpora["brown"]), chunk_words=10,
                                          train_per_class=8, test_per_class=4, seed=1))
    assert [p.classes for p in other] != [p.classes for p in seq]


def test_spam_domains_share_labels_and_never_a_mail(corpora: dict[str, Path]) -> None:
    seq = build_sequence(SequenceConfig(name="spam-domains", path=str(corpora["spam"]), train_per_class=None,
                                        test_per_class=None))
    assert seq.setting == "domain" and [p.classes for p in seq] == [("ham", "spam")] * 3
    seen: set[str] = set()
    for p in seq:
        for split in (p.train, p.test):
            assert not seen & set(split.texts)
            seen |= set(split.texts)
        group = {"ham": p.name.split(" / ")[0], "spam": p.name.split(" / ")[1]}
        for text, y in zip(p.train.texts, p.train.labels.tolist(), strict=True):
            assert f"mail {group[p.classes[y]]} " in text
            assert not text.startswith("Subject")  # headers stripped
    # spam-2 feeds two domains: each gets half of its training mails (32 of 40 are training mails)
    assert [int((p.train.labels == 1).sum()) for p in seq][1:] == [16, 16]


def test_spam_tasks_and_quick_sizes(corpora: dict[str, Path]) -> None:
    seq = build_sequence(SequenceConfig(name="spam-tasks", path=str(corpora["spam"]), quick=True))
    assert seq.setting == "task" and [p.classes for p in seq][2] == ("easy ham", "hard ham")
    assert all(len(p.train) <= 32 and len(p.test) <= 16 for p in seq)
    easy = [t for t in seq.problems[2].train.texts if "easy-ham" in t]
    assert {"easy-ham-1", "easy-ham-2"} <= {t.split()[1] for t in easy}  # the union draws from both groups
    assert not set(seq.problems[0].train.texts) & set(seq.problems[2].train.texts)
    assert len(build_sequence(SequenceConfig(name="spam-tasks", path=str(corpora["spam"]), problems=2))) == 2


def test_draw_problems_by_hand() -> None:
    train = TextDataset([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(2)], torch.tensor([0] * 6 + [1] * 2))
    test = TextDataset(["a-t0", "a-t1", "a-t2", "b-t0", "b-t1"], torch.tensor([0, 0, 0, 1, 1]))
    plan = [("p", ["x", "y"], [[0], [0, 1]]), ("q", ["x", "y"], [[0], [1]])]
    # class 0 feeds three classes: a third of its 6 training texts (2) each; class 1 feeds two: 1 each
    p, q = draw_problems(train, test, plan, None, None, seed=0)
    assert torch.bincount(p.train.labels).tolist() == [2, 3] and torch.bincount(q.train.labels).tolist() == [2, 1]
    all_train = p.train.texts + q.train.texts
    assert len(set(all_train)) == len(all_train) == 8
    one = TextDataset(["a-t", "b-t"], torch.tensor([0, 1]))  # one test text per class, two problems want it
    twice = [("p", ["x", "y"], [[0], [1]]), ("q", ["x", "y"], [[0], [1]])]
    with pytest.raises(DataError, match="problem 'q': class 'x' has no test texts left"):
        draw_problems(train, one, twice, None, None, seed=0)
    capped = draw_problems(train, one, twice[:1], 2, 1, seed=0)[0]
    assert torch.bincount(capped.train.labels).tolist() == [2, 2] and len(capped.test) == 2


def test_bad_names_and_sizes(corpora: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match='Did you mean "spam-tasks"'):
        build_sequence(SequenceConfig(name="spam-task", path=str(corpora["spam"])))
    with pytest.raises(DataError, match="has 3 problems"):
        build_sequence(SequenceConfig(name="spam-domains", path=str(corpora["spam"]), problems=4))
    assert set(SEQUENCES.names()) == {"brown-genres", "spam-tasks", "spam-domains", "brown-fiction"}
    assert len(SPAM_GROUPS) == 5


def _installed(name: str) -> bool:
    try:
        locate_mod.find_folder(name, None, [], subdirs=("package",), how_to_get="")
    except Exception:  # noqa: BLE001  (any failure: not installed here)
        return False
    return True


@pytest.mark.skipif(not (_installed("brown") and _installed("spamassassin")), reason="run `make data`")
def test_real_corpora_default_sizes() -> None:
    seq = build_sequence(SequenceConfig(name="brown-fiction"))
    assert len(seq) == 4 and all(len(p.train) == 128 and len(p.test) == 64 for p in seq)
    seq = build_sequence(SequenceConfig(name="spam-domains"))
    assert [len(p.train) for p in seq] == [128] * 3 and [len(p.test) for p in seq] == [64] * 3

